"""`mlxlora plan`: parameters and predicted peak memory of a LoRA run without loading any weight (budget.py),
the activation model behind it (activations.py), and this machine's memory (machine.py)."""

from ..models.shapes import (BYTES, DTYPE_CODES, FLOATS, Matrix, ModelShapes, config_matrices, dims,
                             header_matrices, read_model, read_safetensors_header)
from .activations import BLOCK_EXTRA, ROLES, activation_terms
from .budget import (Fit, Plan, adapter_params, base_bytes, count_params, find_adapted, format_plan,
                     plan_training, quantized, suggest_fit)
from .machine import default_backend, human, machine_memory

__all__ = ["Plan", "Fit", "plan_training", "suggest_fit", "find_adapted", "count_params", "adapter_params",
           "quantized", "base_bytes", "activation_terms", "default_backend", "machine_memory", "human",
           "format_plan", "ROLES", "BLOCK_EXTRA", "BYTES", "DTYPE_CODES", "FLOATS", "Matrix", "ModelShapes",
           "read_model", "read_safetensors_header", "config_matrices", "header_matrices", "dims"]
