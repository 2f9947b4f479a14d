"""Stage 7: streaming analysis, terminal replay, HTML report, exports of trajectory files."""
