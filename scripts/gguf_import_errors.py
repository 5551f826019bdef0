"""Per GGUF tensor type: how mlxlora imports it and the error against gguf-py's dequantize (the
reference reading of the blocks). Prints the README table. Exact types use gguf-py's own
quantizer on Gaussian weights where it has one (Q4_0..Q8_0) and random valid blocks otherwise;
the re-quantized types use random valid blocks, the hard case for them (neighbouring 16-value
sub-block scales unrelated), and are compared with the file's own rounding step.

    python scripts/gguf_import_errors.py
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q, quants

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gguf_blocks import code_steps, random_blocks  # noqa: E402

from mlxlora.models.gguf_quants import EXACT, REQUANT_BITS, read_tensor  # noqa: E402

ROWS, COLS = 256, 1024


def imported(parts, spec):
    w = mx.dequantize(parts["weight"], parts["scales"].astype(mx.float32),
                      parts["biases"].astype(mx.float32), group_size=spec[0], bits=spec[1])
    return np.array(w)


def main():
    print("| type | MLX form | max abs error / max abs weight | RMS error / RMS file rounding | worst value / half step |")
    print("|---|---|---|---|---|")
    for kind in [*EXACT, *REQUANT_BITS]:
        if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            w = np.random.default_rng(0).normal(0, 0.05, (ROWS, COLS)).astype(np.float32)
            raw = quants.quantize(w, Q[kind])
        else:
            raw = random_blocks(kind, ROWS, COLS)
        want = quants.dequantize(raw, Q[kind])
        parts, spec = read_tensor("t.weight", kind, raw, (ROWS, COLS))
        err = np.abs(imported(parts, spec) - want)
        form = f"{spec[1]}-bit groups of 32" + ("" if kind in EXACT else ", re-quantized")
        rms = worst = "exact codes"
        if kind in REQUANT_BITS:
            step = code_steps(kind, raw)
            rms = f"{np.sqrt((err ** 2).mean() / (step ** 2 / 12).mean()):.2f}"
            worst = f"{(err[step > 0] / (step[step > 0] / 2)).max():.1f}"
        print(f"| {kind} | {form} | {err.max() / np.abs(want).max():.2g} | {rms} | {worst} |")


if __name__ == "__main__":
    main()
