"""Reports about a quantization run: expert coverage summary and heat map."""
