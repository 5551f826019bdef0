"""mlxlora: LoRA / DoRA / QLoRA fine-tuning with MLX.

Importing mlxlora changes no global state.
"""

from .config import LoraConfig, TrainConfig
from .errors import AdapterError, ConfigError, DataError, MlxloraError, ModelError
from .lora.layers import DoRALinear, LoRAEmbedding, LoRALinear
from .lora.surgery import get_lora_model, print_trainable_parameters

__version__ = "0.1.0"

__all__ = ["LoraConfig", "TrainConfig", "LoRALinear", "DoRALinear", "LoRAEmbedding",
           "get_lora_model", "print_trainable_parameters", "MlxloraError", "ConfigError",
           "DataError", "ModelError", "AdapterError"]
