"""Converters between mlxlora/mlx-lm and other formats: tables of names plus small functions that apply them."""
