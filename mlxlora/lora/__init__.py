"""MLX modules and model surgery: LoRA / DoRA layers over Linear, QuantizedLinear and Embedding, the
multi-adapter layers, LoRA on MoE experts (LoRASwitchLinear), quantized-weight helpers and the CPU fast path, and finding and wrapping targets."""

from .layers import ADAPTER_TYPES, DoRALinear, LoRAEmbedding, LoRALinear, base_of, lora_scale
from .switch import LoRASwitchLinear
from .surgery import (adapter_layers, adapter_parameters, count_parameters, find_targets, fuse_model,
                      get_lora_model, print_trainable_parameters, unwrap)

__all__ = ["ADAPTER_TYPES", "DoRALinear", "LoRAEmbedding", "LoRALinear", "LoRASwitchLinear", "base_of", "lora_scale",
           "adapter_layers", "adapter_parameters", "count_parameters", "find_targets", "fuse_model",
           "get_lora_model", "print_trainable_parameters", "unwrap"]
