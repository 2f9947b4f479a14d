"""Stage 1: tool environments (gymnasium), tools, tool-call parsers, the env registry, scripted experts."""
