"""Base models: loading through mlx-lm (folder, .gguf file or hub id) and fingerprints; GGUF import,
transformers export, conversion, shapes read from headers alone (for the planner), the demo model."""

from .fingerprint import base_differences, base_shapes, describe_base, fingerprint
from .load import MX_DTYPES, Base, load_base, resolve_model_path

__all__ = ["Base", "load_base", "resolve_model_path", "fingerprint", "describe_base", "base_shapes",
           "base_differences", "MX_DTYPES"]
