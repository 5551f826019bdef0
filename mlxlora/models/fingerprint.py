"""Which base an adapter belongs to: a fingerprint of the base, and what differs when it does not match.

The fingerprint hashes the architecture, parameter names/shapes/dtypes and the quantization config
(cheap: no weight values are read). An adapter's run record keeps it with `base_shapes`, so a
mismatch can say what differs. A second, separate check, `content_hash`, hashes a few sampled values
of every weight: two bases with the same shapes but other weights (another fine-tune of the same
architecture) differ there. Records written before it existed simply lack it, and load as before.
"""

from __future__ import annotations

import hashlib
import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten


def fingerprint(model: nn.Module, config: dict) -> str:
    """A hash of the base's architecture, parameter names/shapes/dtypes and quantization config.

    Two bases with the same fingerprint accept the same adapters. Cheap: reads no weight values.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"model_type": config.get("model_type"),
                         "quantization": config.get("quantization")}, sort_keys=True).encode())
    for name, arr in tree_flatten(model.parameters()):
        if ".lora_" in name or name.endswith(".m"):
            continue
        h.update(f"{name.replace('.linear.', '.').replace('.embedding.', '.')}:{tuple(arr.shape)}".encode())
    return h.hexdigest()[:16]


CONTENT_SAMPLES = 16  # values read from each weight tensor for the content hash


def _base_params(model: nn.Module):
    for name, arr in tree_flatten(model.parameters()):
        if ".lora_" in name or name.endswith(".m"):  # adapter tensors are not the base
            continue
        yield name.replace(".linear.", ".").replace(".embedding.", "."), arr


def content_hash(model: nn.Module) -> str:
    """A hash of CONTENT_SAMPLES evenly spaced values of every base weight (adapters left out).

    Float values are rounded to bfloat16 first, so the same checkpoint loaded in float32, bfloat16 or
    float16 hashes alike; quantized weights hash their packed integers, scales and biases. Cheap: one
    small gather per tensor and one host sync.
    """
    names, picks = [], []
    for name, arr in _base_params(model):
        flat = arr.reshape(-1)
        idx = mx.array(np.linspace(0, flat.size - 1, num=min(CONTENT_SAMPLES, flat.size)).round().astype(np.int32))
        pick = flat[idx]
        picks.append(pick.astype(mx.bfloat16).astype(mx.float32) if mx.issubdtype(pick.dtype, mx.floating)
                     else pick.astype(mx.int64))
        names.append(name)
    mx.eval(picks)
    h = hashlib.sha256()
    for name, pick in zip(names, picks):
        h.update(name.encode())
        h.update(np.array(pick).tobytes())
    return h.hexdigest()[:16]


def base_shapes(model: nn.Module) -> dict[str, list]:
    """Base parameter shapes, adapters left out and block indices folded: {"model.layers.*.mlp.up_proj.weight":
    [[128, 64], 2], ...} (name -> [shape, how many]). Works on a wrapped or a plain model."""
    groups: dict[str, list] = {}
    for name, arr in tree_flatten(model.parameters()):
        if ".lora_" in name or name.endswith(".m"):  # as models.fingerprint: adapter tensors are not the base
            continue
        name = name.replace(".linear.", ".").replace(".embedding.", ".")
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append((name, list(arr.shape)))
    out = {}
    for key, items in groups.items():
        if all(shape == items[0][1] for _, shape in items):
            out[key] = [items[0][1], len(items)]
        else:  # blocks of different shapes: keep each one by name
            out.update({name: [shape, 1] for name, shape in items})
    return out


def describe_base(model: nn.Module, config: dict, known: str | None = None, content: str | None = None) -> dict:
    """What an adapter's run record says about its base, for `check_base`: fingerprint, content hash,
    model_type, quantization and `base_shapes`. Take it before wrapping, or pass `known` / `content`, the
    fingerprint and content hash load_base computed."""
    return {"fingerprint": known or fingerprint(model, config), "content": content or content_hash(model),
            "model_type": config.get("model_type"), "quantization": config.get("quantization"),
            "shapes": base_shapes(model)}


def _quant_text(q) -> str:
    return f"{q.get('bits')}-bit (group size {q.get('group_size')})" if q else "not quantized"


def _shape_text(entry) -> str:
    return "absent" if entry is None else f"{tuple(entry[0])}" + (f" x{entry[1]}" if entry[1] > 1 else "")


def base_differences(recorded: dict, base: dict) -> list[str]:
    """What differs between the base an adapter was trained on (its run_record) and `base` (describe_base)."""
    if recorded.get("base_model_type") != base.get("model_type"):
        return [f"model_type {recorded.get('base_model_type')} vs {base.get('model_type')}"]
    rq, bq = recorded.get("base_quantization") or None, base.get("quantization") or None
    if (rq or {}).get("bits") != (bq or {}).get("bits") or (rq or {}).get("group_size") != (bq or {}).get("group_size"):
        fix = f" (load it with --quantize {rq.get('bits')})" if rq and not bq else ""
        return [f"quantization {_quant_text(rq)} vs {_quant_text(bq)}{fix}"]
    want, have = recorded.get("base_shapes"), base.get("shapes") or {}
    if not want:
        return ["parameter names/shapes (this adapter records no shape list)"]
    out = []
    for key in sorted(set(want) | set(have)):
        a, b = want.get(key), have.get(key)
        if a != b:
            out.append(f"{key} {_shape_text(a)} vs {_shape_text(b)}")
    return out or ["parameter names/shapes"]


__all__ = ["fingerprint", "content_hash", "base_shapes", "describe_base", "base_differences", "CONTENT_SAMPLES"]
