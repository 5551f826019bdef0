"""Run the conformance checks over every architecture of tests/arch_configs.py and write the matrix into
README.md (between the `conformance:start` / `conformance:end` markers).

    python scripts/conformance.py            # all architectures, rewrites the README table
    python scripts/conformance.py llama mixtral --no-write

The cells come from the same checks tests/test_conformance.py asserts (tests/conformance_checks.py), run here
eagerly; PEFT parity is what tests/test_transformers5.py checks (tests/hf_twins.py). Prints the counts.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import mlx.core as mx  # noqa: E402

import arch_configs as A  # noqa: E402
import conformance_checks as C  # noqa: E402

START, END = "<!-- conformance:start -->", "<!-- conformance:end -->"
# long reasons -> what fits in a table cell
SHORT = [
    (r"^refused: its linear-attention / state-space blocks.*", "refused: hybrid (state crosses positions)"),
    (r"^refused: absolute position embeddings.*", "refused: absolute positions"),
    (r"^refused: its attention broadcasts.*", "refused: mask broadcast (loss differs)"),
    (r"^refused: its attention does not take.*", "refused: attention ignores the packed mask"),
    (r"^no llama.cpp architecture mapping.*", "no llama.cpp mapping"),
    (r"^ok \(dense layers; DoRA on experts.*", "✅ dense layers (experts: refused)"),
    (r"^ok \(attention only.*", "✅ attention only (see tests/hf_twins.py)"),
    (r"^base logits equal; all-linear adapter differs.*", "router differs in transformers 5"),
    (r"^base logits differ.*", "base logits differ (tiny config)"),
    (r"^the folders differ.*", "weights differ (tiny config)"),
    (r"^transformers cannot build.*", "tiny config not built by transformers"),
    (r"^PEFT refuses it.*", "PEFT refuses Mamba out_proj"),
    (r"^mlx-lm fails \((\w+Error): (.{0,60}).*", r"mlx-lm fails: \2"),
]


def cell(text: str) -> str:
    if text == C.OK:
        return "✅"
    for pattern, short in SHORT:
        if re.match(pattern, text):
            return re.sub(pattern, short, text).replace("|", "/")
    return text.replace("|", "/")


def table(rows: list[C.Row]) -> str:
    head = "| architecture | " + " | ".join(C.COLUMNS) + " | not adapted |"
    lines = [head, "|" + "---|" * (len(C.COLUMNS) + 2)]
    for r in rows:
        left = ", ".join(f"{n} {t}" for t, n in sorted(r.left_out.items())) or "—"
        lines.append(f"| {r.arch} | " + " | ".join(cell(r.cells[c]) for c in C.COLUMNS) + f" | {left} |")
    return "\n".join(lines)


def counts(rows: list[C.Row]) -> dict:
    ok = lambda c: sum(r.cells[c] == C.OK or r.cells[c].startswith("ok (") for r in rows)  # noqa: E731
    return {"architectures": len(rows), **{c: ok(c) for c in C.COLUMNS},
            "mlx-lm failures": sum(r.mlx_lm_failure is not None for r in rows),
            "with frozen linear-like modules": sum(bool(r.left_out) for r in rows),
            "with all-zero-gradient adapters": sum(bool(r.dead) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="*", help="architectures (default: all)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave README.md alone")
    args = ap.parse_args()
    mx.disable_compile()  # as the test: every compiled graph is a C++ build on the CPU
    rows, t0 = [], time.perf_counter()
    for arch in args.archs or sorted(A.ARCHS):
        rows.append(C.check(arch))
        print(f"{arch}: {', '.join(f'{c}={cell(v)}' for c, v in rows[-1].cells.items())}", flush=True)
    text = table(rows)
    summary = counts(rows)
    print(text)
    print(f"{summary} in {time.perf_counter() - t0:.0f} s")
    if not args.no_write:
        readme = ROOT / "README.md"
        old = readme.read_text()
        if START not in old:
            raise SystemExit(f"{readme}: no {START} marker; add the section first")
        before, rest = old.split(START, 1)
        after = rest.split(END, 1)[1]
        stamp = (f"{summary['architectures']} architectures; train/save/load {summary['train']}, fuse "
                 f"{summary['fuse']}, QLoRA {summary['QLoRA']}, DoRA {summary['DoRA']}, packing {summary['packing']}, "
                 f"PEFT parity {summary['PEFT parity']}, GGUF LoRA export {summary['GGUF LoRA export']}; "
                 f"{summary['mlx-lm failures']} fail inside mlx-lm itself.")
        readme.write_text(f"{before}{START}\n{stamp}\n\n{text}\n{END}{after}")
        print(f"wrote {readme}")


if __name__ == "__main__":
    main()
