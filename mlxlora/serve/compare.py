"""Loss and perplexity of the base and of several adapters on one split, the base loaded once (`mlxlora eval`
with several --adapter)."""

from __future__ import annotations

from ..config import EvalConfig
from ..inference import eval_split
from .multi import MultiAdapterModel


def compare_perplexity(base, adapters: dict[str, str], data: str, cfg=None,
                       ignore_base_mismatch: bool = False) -> list[dict]:
    """Loss and perplexity of the bare base and of each adapter on one data split; the base is loaded once.

    base: a mlxlora.models.Base (left bare afterwards). adapters: name -> adapter folder. data: a folder or
    .jsonl file (cfg.split picks the split). Returns one row per model, base first: adapter, loss, perplexity,
    delta_loss (vs the base), samples, target_tokens, path.
    """
    cfg = cfg or EvalConfig()
    multi = MultiAdapterModel.of_base(base, ignore_base_mismatch)
    rows = []
    try:
        for name, path in adapters.items():
            multi.load_adapter(path, name)
        for name in [None, *adapters]:
            with multi.set_adapter(name):
                res = eval_split(base, data, cfg)
            rows.append({"adapter": name or "base", "loss": res["loss"], "perplexity": res["perplexity"],
                         "samples": res["samples"], "target_tokens": res["target_tokens"], "path": res["path"]})
    finally:
        for name in multi.adapters:
            multi.delete_adapter(name)
    base_loss = rows[0]["loss"] if rows else None
    for row in rows:
        row["delta_loss"] = None if row["loss"] is None or base_loss is None else row["loss"] - base_loss
    return rows


def format_perplexity_table(rows: list[dict]) -> str:
    """compare_perplexity's rows as an aligned text table."""
    width = max([len("adapter")] + [len(r["adapter"]) for r in rows])
    lines = [f"{'adapter':<{width}}  {'loss':>8}  {'perplexity':>10}  {'Δloss':>8}"]
    for r in rows:
        if r["loss"] is None:
            lines.append(f"{r['adapter']:<{width}}  {'-':>8}  {'-':>10}  {'-':>8}")
            continue
        delta = "" if r["adapter"] == "base" else f"{r['delta_loss']:+.4f}"
        lines.append(f"{r['adapter']:<{width}}  {r['loss']:>8.4f}  {r['perplexity']:>10.3f}  {delta:>8}")
    return "\n".join(lines)


__all__ = ["compare_perplexity", "format_perplexity_table"]
