"""Reports about a quantization run: expert coverage summary and its plot (matplotlib, the `plot` extra)."""
