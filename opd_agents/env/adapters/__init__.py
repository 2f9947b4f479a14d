"""Adapters that make other ecosystems' environments ``ToolEnv``s (one module each)."""
