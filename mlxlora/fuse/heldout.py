"""The data a fuse measures itself on: the adapter's own splits, and held-out losses of base, adapter and fuse."""

from __future__ import annotations

from pathlib import Path

from mlx.utils import tree_unflatten

from .. import data as D
from ..config import EvalConfig
from ..data.batches import pad_id
from ..files import read_json_or_empty
from ..formats.mlxlora import RECORD_FILE
from ..inference import evaluate
from ..lora.layers import base_of


def adapter_record(adapter_dir: Path) -> dict:
    return read_json_or_empty(adapter_dir / RECORD_FILE)


def split_for(spec, record: dict, split: str, tokenizer, max_seq_length: int, notes: list):
    """A data split: `spec` (folder or .jsonl) if given, else the adapter's own `split` file; None if neither."""
    flag = "--data" if split == "valid" else "--calibration"
    if spec is False:
        return None
    if spec is not None:
        path = D.split_file(spec, split, flag)
    else:
        path = record.get("run_record", {}).get("data", {}).get(split, {}).get("path")
        if path is None or not Path(path).is_file():
            why = f"{path} no longer exists" if path else "the adapter names no such file"
            notes.append(f"no {split} data ({why}); pass {flag} FILE_OR_FOLDER")
            return None
    return D.load_split(path, tokenizer, max_seq_length)


def heldout_loss(model, split, tokenizer) -> float:
    return evaluate(model, split, EvalConfig.batch_size, EvalConfig.pad_multiple, pad_id(tokenizer))


def losses_before(model, layers, valid, tokenizer) -> dict:
    """Held-out loss of base + adapter (unfused) and of the base alone (adapters swapped out and back)."""
    model.eval()
    adapter_loss = heldout_loss(model, valid, tokenizer)
    model.update_modules(tree_unflatten([(p, base_of(m)) for p, m in layers]))
    try:
        base_loss = heldout_loss(model, valid, tokenizer)
    finally:
        model.update_modules(tree_unflatten(layers))
    return {"data": valid.stats.path, "base": base_loss, "adapter": adapter_loss}


def fraction_kept(losses: dict) -> float | None:
    """(base - fused) / (base - adapter): 1.0 = the fused model keeps all of the improvement."""
    gain = losses["base"] - losses["adapter"]
    return (losses["base"] - losses["fused"]) / gain if gain > 0 else None
