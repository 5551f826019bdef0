"""`mlxlora fuse`: fuse an adapter into its base and write a model folder mlx-lm (or transformers) loads."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", required=True, help="Base model folder (HF or MLX), .gguf file, or hub id.")
@click.option("--adapter", required=True, help="Adapter folder (PEFT or mlxlora format).")
@click.option("--out", required=True, help="Output folder for the fused model.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "5", "6", "8", "none"]),
              help="Width of the re-quantized layers; none writes float. [default: the base's]")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), help="[default: the base's]")
@click.option("--strategy", type=click.Choice(["auto", "naive", "grid", "gptq", "refit"]),
              help="How a quantized base is re-quantized. [default: auto]")
@click.option("--size-budget", type=float,
              help="auto may grow the model up to this multiple of the naive fuse's size with 8-bit layers. "
                   "[default: 1.10]")
@click.option("--format", "fmt", type=click.Choice(["mlx", "hf"]), default="mlx", show_default=True,
              help="mlx: an mlx-lm folder; hf: a transformers folder (float weights).")
@click.option("--data", help="Validation data (folder or .jsonl) for the held-out losses. [default: the adapter's]")
@click.option("--calibration", help="Data (folder or .jsonl) whose activations guide re-quantization, or 'random'. "
              "[default: the adapter's training data, else random tokens]")
@click.option("--report", "show_report", is_flag=True, help="Print the per-layer report too.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--upload", "upload_repo", help="Then upload the fused folder to this Hub repo (user/name).")
@click.option("--private", is_flag=True, help="With --upload: create the repo private.")
def fuse(model, adapter, out, bits, group_size, strategy, size_budget, fmt, data, calibration, show_report, force,
         upload_repo, private):
    """Fuse an adapter into its base model; writes fuse_report.json beside the weights.

    Example: mlxlora fuse --model ./smollm2-q4 --adapter runs/devil --out fused/devil
    """
    from ..fuse import fuse_to_folder

    folder, report = fuse_to_folder(
        model, adapter, out, fmt=fmt, force=force, calibration=calibration, data=data,
        bits=bits, group_size=int(group_size) if group_size else None, strategy=strategy, size_budget=size_budget)
    if show_report:
        click.echo(format_report(report))
    click.echo(summary_line(report, folder))
    if upload_repo:
        from ..hub import upload_after_fuse

        click.echo(f"uploaded: {upload_after_fuse(folder, upload_repo, adapter=adapter, private=private)}")


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
