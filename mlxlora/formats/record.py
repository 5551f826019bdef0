"""AdapterRecord: one adapter in memory, whatever file it came from or goes to.

Every format reads into a record and writes from one; the model side (mlxlora.adapters) attaches a
record to a base model and takes one back. Tensors use one canonical naming and orientation, mlx-lm's:
per module path (`model.layers.0.self_attn.q_proj`), `lora_a` (in, r), `lora_b` (r, out), DoRA's
magnitude `m` (out,); an embedding's `lora_a` is (num_embeddings, r) and `lora_b` (r, dims); MoE experts
(a SwitchLinear) have one pair per expert, `lora_a` (E, in, r) and `lora_b` (E, r, out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..config import LoraConfig
from ..files import natural_key

TENSORS = ("lora_a", "lora_b", "m")


@dataclass
class LayerLoRA:
    """One layer's update: scale * lora_a @ lora_b; m: DoRA's magnitude (out,) or None; embedding: the
    adapted layer is an Embedding."""

    lora_a: mx.array
    lora_b: mx.array
    scale: float
    m: mx.array | None = None
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    @property
    def experts(self) -> bool:
        """The layer is a SwitchLinear: lora_a (E, in, r), lora_b (E, r, out), one pair per expert."""
        return self.lora_a.ndim == 3

    def lora_b_for(self, scale: float) -> mx.array:
        """lora_b rescaled so that `scale * lora_a @ result` is this layer's update (formats with one scale
        for every layer fold the ratio in); lora_b itself when the scales agree."""
        if scale == self.scale:
            return self.lora_b
        return (self.lora_b.astype(mx.float32) * (self.scale / scale)).astype(self.lora_b.dtype)

    def arrays(self) -> dict[str, mx.array]:
        out = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        if self.m is not None:
            out["m"] = self.m
        return out


@dataclass
class AdapterRecord:
    """An adapter: its LoraConfig, one LayerLoRA per adapted module path, and what is known about it.

    format / path / weights: where it was read from ("mlxlora", "peft", "mlx-lm"; the folder; the tensor
    file), None for an adapter made in memory (a merge). model_type, base_model: as recorded.
    tied_head: the file says the output head is the adapted embedding (None: it does not say).
    meta: the rest of the record (mlxlora.json's train_config / run_record, merge info). source_config:
    the config file of the folder it was read from, as it was (PEFT's or mlx-lm's adapter_config.json). peft_targets / num_blocks: PEFT's target_modules naming exactly these layers and the model's
    block count, filled in from a model before a PEFT write (else full module paths are written).
    loose: tensors of layers that lack lora_a or lora_b in the file (kept so a check can name what is missing).
    """

    config: LoraConfig
    layers: dict[str, LayerLoRA]
    format: str | None = None
    path: Path | None = None
    weights: Path | None = None
    model_type: str | None = None
    base_model: str | None = None
    tied_head: bool | None = None
    meta: dict = field(default_factory=dict)
    source_config: dict | None = None
    peft_targets: list[str] | None = None
    num_blocks: int | None = None
    loose: dict[str, mx.array] = field(default_factory=dict)

    @property
    def source(self) -> str | None:
        return None if self.path is None else str(self.path)

    @property
    def info(self) -> dict:
        """`meta` under the name MultiAdapterModel's API gives it (a merge's combination and sources)."""
        return self.meta

    @property
    def module_paths(self) -> list[str]:
        """Adapted module paths in reading order (block by block)."""
        return sorted(self.layers, key=natural_key)

    @property
    def embeddings(self) -> set[str]:
        return {p for p, lora in self.layers.items() if lora.embedding}

    @property
    def nbytes(self) -> int:
        """Bytes of the adapter tensors (what attaching it costs)."""
        return sum(a.nbytes for lora in self.layers.values() for a in lora.arrays().values())

    def tensors(self) -> dict[str, mx.array]:
        """{`<path>.lora_a|lora_b|m`: array} in reading order."""
        return {f"{p}.{k}": v for p in self.module_paths for k, v in self.layers[p].arrays().items()}

    @classmethod
    def from_tensors(cls, config: LoraConfig, tensors: dict[str, mx.array], embeddings=frozenset(),
                     **fields) -> "AdapterRecord":
        """A record from flat canonical tensors; each layer's scale comes from `config` (rank/alpha patterns)."""
        grouped: dict[str, dict] = {}
        for name, value in tensors.items():
            path, _, kind = name.rpartition(".")
            grouped.setdefault(path, {})[kind] = value
        layers, loose = {}, {}
        for path in sorted(grouped, key=natural_key):
            t = grouped[path]
            if "lora_a" not in t or "lora_b" not in t:
                loose.update({f"{path}.{k}": v for k, v in t.items()})
                continue
            layers[path] = LayerLoRA(t["lora_a"], t["lora_b"], config.scale_for(path), t.get("m"), path in embeddings)
        return cls(config=config, layers=layers, loose=loose, **fields)


def nonfinite_tensors(tensors: dict[str, mx.array]) -> list[str]:
    """Names of the tensors holding NaN or infinity (one host sync for all of them)."""
    names = list(tensors)
    if not names:
        return []
    ok = mx.stack([mx.all(mx.isfinite(tensors[n])) for n in names])
    return [n for n, good in zip(names, ok.tolist()) if not good]


__all__ = ["TENSORS", "LayerLoRA", "AdapterRecord", "nonfinite_tensors"]
