"""The loss forward pass: token cross-entropy sums (tokens.py) with the output head only at loss rows
(head.py), blocked causal attention on CPU (attention.py) and packed rows kept apart (packed.py)."""

from .tokens import loss_sums, to_batch

__all__ = ["loss_sums", "to_batch"]
