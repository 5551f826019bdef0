"""Module paths: mlx-lm <-> Hugging Face transformers, per architecture (`model_type`).

mlx-lm keeps the transformers module tree for most architectures, so most entries are
the identity. Where they differ, an entry lists (mlx_prefix, hf_prefix) pairs; the
first pair whose prefix matches the path is applied (so list longer prefixes first).
A path is a module path (`model.layers.0.self_attn.q_proj`) or a parameter name under
it (`...q_proj.weight`); both convert the same way.

Checked against transformers 5 and mlx-lm 0.32:
- phi3: both use the fused `qkv_proj` and `gate_up_proj` -> identity.
- gemma/gemma2: same names; both store RMSNorm weights as w (applied as 1 + w) -> identity.
- gemma3 (multimodal checkpoint class): mlx-lm nests the text model under
  `language_model.`, transformers 5 under `model.language_model.` with `lm_head` on top.
"""

from __future__ import annotations

IDENTITY: tuple[tuple[str, str], ...] = ()
# Module names that are token embeddings in mlx-lm / transformers models.
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")

# model_type -> ((mlx_prefix, hf_prefix), ...)
NAME_TABLE: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": IDENTITY,
    "mistral": IDENTITY,
    "qwen2": IDENTITY,
    "qwen3": IDENTITY,
    "gemma": IDENTITY,
    "gemma2": IDENTITY,
    "gemma3_text": IDENTITY,
    "phi3": IDENTITY,
    "gemma3": (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head", "lm_head"),
    ),
}


def renames(model_type: str | None) -> tuple[tuple[str, str], ...]:
    """The (mlx_prefix, hf_prefix) pairs of `model_type`; identity for types not in the table.

    mlx-lm mirrors the transformers module tree unless its port says otherwise, so an
    unlisted type is assumed identical; a wrong guess shows up as unexpected tensors
    when an adapter is loaded, never as silently misplaced weights.
    """
    return NAME_TABLE.get(model_type or "", IDENTITY)


def _under(path: str, prefix: str) -> bool:
    # "a.b." matches anything below a.b; "a.b" matches a.b itself and anything below it.
    return path.startswith(prefix) if prefix.endswith(".") else path == prefix or path.startswith(prefix + ".")


def _apply(path: str, pairs) -> str:
    for src, dst in pairs:
        if _under(path, src):
            return dst + path[len(src):]
    return path


def mlx_to_hf(path: str, model_type: str | None) -> str:
    """The transformers name of an mlx-lm module/parameter path."""
    return _apply(path, renames(model_type))


def hf_to_mlx(path: str, model_type: str | None) -> str:
    """The mlx-lm name of a transformers module/parameter path."""
    return _apply(path, [(hf, mlx) for mlx, hf in renames(model_type)])


__all__ = ["EMBEDDING_NAMES", "NAME_TABLE", "renames", "mlx_to_hf", "hf_to_mlx"]
