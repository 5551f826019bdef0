"""What a fuse kept: per-layer delta metrics, the summary, fuse_report.json, and the report as text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..lora.layers import DoRALinear, LoRAEmbedding
from ..lora.quant import QUANTIZED_TYPES
from ..lora.switch import LoRASwitchLinear, QuantizedSwitchLinear

REPORT_FILE = "fuse_report.json"


def output_error(e: np.ndarray, wf: np.ndarray, h: np.ndarray | None) -> float:
    """||E X||^2 / ||W_fused X||^2 for inputs with sum x x^T = h: the share of the layer's output that is
    wrong. h None: one-hot inputs (an embedding's rows), i.e. ||E||^2 / ||W_fused||^2."""
    if h is None:
        return float(np.vdot(e, e) / max(np.vdot(wf, wf), 1e-30))
    return float(np.vdot(e @ h, e) / max(np.vdot(wf @ h, wf), 1e-30))


def delta_stats(w0: np.ndarray, wf: np.ndarray, wk: np.ndarray, h: np.ndarray | None = None) -> dict:
    """How much of the true delta (wf - w0) the fused weight wk kept: relative error ||kept - true|| / ||true||
    and cosine, in weight space and, given h = sum x x^T over some inputs x, in output space (on those
    inputs). delta_norm = ||true|| / ||w0||, the size of the fine-tune next to the weight."""
    true, kept = (wf - w0).astype(np.float64), (wk - w0).astype(np.float64)
    out = {"delta_norm": _ratio(np.linalg.norm(true), np.linalg.norm(w0)),
           "rel_error": _ratio(np.linalg.norm(kept - true), np.linalg.norm(true)),
           "cosine": _cos(np.vdot(kept, true), np.vdot(kept, kept), np.vdot(true, true))}
    if h is not None:
        th, kh = true @ h, kept @ h
        tt, kk, kt = np.vdot(th, true), np.vdot(kh, kept), np.vdot(kh, true)
        out["out_rel_error"] = _ratio(math.sqrt(max(kk - 2 * kt + tt, 0.0)), math.sqrt(max(tt, 0.0)))
        out["out_cosine"] = _cos(kt, kk, tt)
    return out


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def _cos(ab: float, aa: float, bb: float) -> float:
    return float(ab / math.sqrt(aa * bb)) if aa > 0 and bb > 0 else 0.0


def layer_kind(layer) -> str:
    if isinstance(layer, LoRASwitchLinear):
        return "experts"
    return "embedding" if isinstance(layer, LoRAEmbedding) else "dora" if isinstance(layer, DoRALinear) else "lora"


def quant_info(layer) -> dict:
    if isinstance(layer, QUANTIZED_TYPES + (QuantizedSwitchLinear,)):
        return {"bits": layer.bits, "group_size": layer.group_size}
    return {"bits": None, "group_size": None}


def summarize(rows: list[dict]) -> dict:
    """Layer count, layers per width ({"4": n, "8": m} or {"float": n}) and mean/min/max of each metric."""
    widths = [str(r["bits"] or "float") for r in rows]
    out = {"layers": len(rows), "widths": {w: widths.count(w) for w in sorted(set(widths))}}
    for key in ("delta_norm", "cosine", "rel_error", "out_cosine", "out_rel_error"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            out[f"mean_{key}"], out[f"min_{key}"], out[f"max_{key}"] = (float(np.mean(vals)), float(min(vals)),
                                                                        float(max(vals)))
    return out


def write_report(report: dict, folder) -> Path:
    """Write `report` as fuse_report.json into `folder`."""
    path = Path(folder) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def summary_line(report: dict, folder) -> str:
    """One line: what was fused how, how much of the delta / loss improvement it kept, and the size."""
    s, size, loss = report["summary"], report["size"], report.get("loss")
    widths = ", ".join(f"{n} at {w}{'' if w == 'float' else '-bit'}" for w, n in s["widths"].items())
    line = f"fused {s['layers']} layers ({report['strategy']}; {widths}) into {folder}"
    key = "out_cosine" if "mean_out_cosine" in s else "cosine"
    if f"mean_{key}" in s:
        held_out = (report.get("calibration") or {}).get("held_out")
        where = "of the weights" if key == "cosine" else "on held-out rows" if held_out else "on calibration rows"
        line += f" · delta cosine {where}: mean {s[f'mean_{key}']:.3f}, min {s[f'min_{key}']:.3f}"
    if loss and loss.get("fraction_kept") is not None:
        line += f" · kept {100 * loss['fraction_kept']:.1f}% of the held-out loss improvement"
    line += f" · {size['fused_bytes'] / 1e6:.1f} MB ({size['ratio_to_naive']:.3f}x the naive fuse)"
    return line


def format_report(report: dict) -> str:
    """The report as a table: one row per fused layer, then losses and notes."""
    out_space = any("out_cosine" in r for r in report["layers"])
    head = f"{'layer':<44} {'kind':<9} {'bits':>4} {'|dW|/|W|':>8} {'rel.err':>8} {'cosine':>7}"
    head += f" {'out.err':>8} {'out.cos':>7}" if out_space else ""
    lines = [head]
    for r in report["layers"]:
        row = (f"{r['path']:<44} {r['kind']:<9} {r['bits'] if r['bits'] else 'f':>4} "
               f"{_num(r.get('delta_norm')):>8} {_num(r['rel_error']):>8} {_num(r['cosine']):>7}")
        if out_space:
            row += f" {_num(r.get('out_rel_error')):>8} {_num(r.get('out_cosine')):>7}"
        lines.append(row)
    loss = report.get("loss")
    if loss:
        lines.append(f"held-out loss on {loss['data']}: base {loss['base']:.4f} · adapter {loss['adapter']:.4f}"
                     f" · fused {loss['fused']:.4f} · fraction kept {_num(loss.get('fraction_kept'))}")
    if report.get("calibration"):
        c = report["calibration"]
        lines.append(f"calibration: {c['samples']} rows, {c['tokens']} tokens of {c['data']}")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"
