"""Conversion to GGUF and MLX."""
