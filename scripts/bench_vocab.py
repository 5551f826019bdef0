"""Case (d) of scripts/bench.py: a large-vocabulary model shape, mlxlora vs mlx-lm in the same run.

The model has Qwen3-0.6B's shapes and vocabulary (hidden 1024, 16 heads, 8 KV heads, head_dim 128,
intermediate 3072, 151,936 tokens, tied embedding) with random float32 weights and 1 of its 28 blocks
(this shared 2-core machine could not time 28); the head, the part the chunked loss changes, is whole. Rows
are prompt/completion pairs of ~L/2 + ~L/2 tokens (SmolLM2's tokenizer; its ids fit the vocabulary),
so about half the tokens carry loss.

It measures: peak memory and tokens/s at 4 x 1024 for mlxlora (chunked loss), mlxlora with the plain
loss (the throughput cost of chunking) and mlx-lm; then the peak of each at batch 1 on a ladder of
lengths (256, 384, 512, 768, ...) until it passes the largest budget, and from it the longest sequence
each trains within each budget.
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN3_06B = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024, intermediate_size=3072,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=40960,
                 torch_dtype="float32")


def large_vocab_model(tokenizer_src: Path, out: Path, layers: int = 1) -> Path:
    """A random float32 model with Qwen3-0.6B's shapes (first `layers` blocks) and SmolLM2's tokenizer files."""
    if (out / "config.json").is_file():
        return out
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = dict(QWEN3_06B, num_hidden_layers=layers)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(config))
    weights = {k: (mx.random.normal(v.shape) * 0.02).astype(mx.float32) if v.ndim >= 2 else v
               for k, v in tree_flatten(model.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in tokenizer_src.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def half_prompt_rows(model_dir: Path, out: Path, length: int, n: int) -> Path:
    """n prompt/completion rows of ~length/2 tokens each (cut from the demo completions)."""
    from mlx_lm.tokenizer_utils import load as load_tok

    root = Path(__file__).resolve().parent.parent
    tok = load_tok(model_dir)
    text = " ".join(json.loads(line)["completion"] for line in (root / "examples/devil/train.jsonl").open())
    ids = tok.encode(text)
    half = length // 2 - 16  # room for the chat template's tokens
    rows = []
    for k in range(n):
        start = (k * 2 * half) % max(1, len(ids) - 2 * half)
        piece = (ids * (1 + 4 * half // max(len(ids), 1)))[start:start + 2 * half]
        rows.append({"prompt": tok.decode(piece[:half]), "completion": tok.decode(piece[half:])})
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def ladder(max_len: int) -> list[int]:
    """Sequence lengths tried at batch 1: 256, 384, 512, 768, 1024, 1536, ... up to max_len."""
    out, n = [], 256
    while n <= max_len:
        out += [n] + ([n * 3 // 2] if n * 3 // 2 <= max_len else [])
        n *= 2
    return out


def case_d(run, q4: Path, work: Path, common: dict, budgets: list[float], max_len: int, repeats: int = 1) -> dict:
    """The measurements of case (d); `run(spec, blas)` is scripts/bench.py's one-process runner."""
    model = str(large_vocab_model(q4, work / "qwen3-0.6b-shape-1-block"))
    spec = dict(common, model=model, batch_size=4, max_seq_length=1024, warmup=1, steps=1,
                train_file=str(half_prompt_rows(q4, work / "half-1024.jsonl", 1024, 12)))
    out = {"model": "random Qwen3-0.6B shapes and vocabulary (151,936), 1 of 28 blocks, float32"}
    runs = {"mlxlora": [], "mlxlora plain loss": [], "mlx-lm": []}
    for rep in range(repeats):  # alternating, so a slow spell of the machine hits all three
        for who, extra in (("mlxlora", {}), ("mlxlora plain loss", {"chunk": 0}), ("mlx-lm", {})):
            r = run(dict(spec, **extra, trainer="mlx-lm" if who == "mlx-lm" else "mlxlora"), blas=True)
            runs[who].append(r)
            print(f"[d] 4x1024 rep {rep + 1} {who:18s} {r['tokens_per_s']:8.1f} tok/s  peak {r['peak_memory'] / 2**30:.2f} GiB"
                  + (f"  planned/measured {r['plan_ratio']:.2f}" if "plan_ratio" in r and not extra else ""), flush=True)
    for who, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["tokens_per_s"])
        out[who] = dict(rs[len(rs) // 2], all_tokens_per_s=[r["tokens_per_s"] for r in runs[who]])
    out["budgets_gib"] = budgets
    for who in ("mlx-lm", "mlxlora"):
        tried = []
        for length in ladder(max_len):
            s = dict(spec, trainer=who, batch_size=1, max_seq_length=length, warmup=1, steps=1,
                     train_file=str(half_prompt_rows(q4, work / f"ladder-{length}.jsonl", length, 3)))
            r = run(s, blas=True)
            tried.append([length, r["peak_memory"]])
            print(f"[d] 1x{length:<6d} {who:8s} peak {r['peak_memory'] / 2**30:.2f} GiB", flush=True)
            if r["peak_memory"] > max(budgets) * 2**30:
                break
        out[f"ladder {who}"] = tried
    return out


def longest(tried: list, budget_gib: float, max_len: int) -> str:
    """The longest length of a ladder whose peak stayed within the budget ('-' if none; '>= N' if the ladder ended inside it)."""
    fits = [n for n, peak in tried if peak <= budget_gib * 2**30]
    if not fits:
        return "-"
    return f">= {fits[-1]}" if fits[-1] == tried[-1][0] and tried[-1][0] >= ladder(max_len)[-1] else str(fits[-1])


def markdown_d(d: dict, max_len: int) -> str:
    """Rows of the README's benchmark table for case (d)."""
    m, p, a = d["mlxlora"], d["mlxlora plain loss"], d["mlx-lm"]
    lines = [f"Case (d), {d['model']}, rank 8 all-linear, prompt/completion rows (~half the tokens carry loss):", "",
             "| measure | mlxlora | mlx-lm | ratio |", "|---|---|---|---|",
             f"| peak memory at 4 x 1024 | {m['peak_memory'] / 2**30:.2f} GiB | {a['peak_memory'] / 2**30:.2f} GiB | "
             f"**{m['peak_memory'] / a['peak_memory']:.2f}x** |",
             f"| tokens/s at 4 x 1024 | {m['tokens_per_s']:.0f} | {a['tokens_per_s']:.0f} | {m['tokens_per_s'] / a['tokens_per_s']:.2f}x |",
             f"| mlxlora tokens/s, chunked vs plain loss | {m['tokens_per_s']:.0f} | plain {p['tokens_per_s']:.0f} "
             f"(peak {p['peak_memory'] / 2**30:.2f} GiB) | {m['tokens_per_s'] / p['tokens_per_s']:.3f}x |",
             f"| planned / measured peak (mlxlora, 4 x 1024) | {m.get('plan_ratio', float('nan')):.2f} | | |"]
    for b in d["budgets_gib"]:
        ll, lm = longest(d["ladder mlxlora"], b, max_len), longest(d["ladder mlx-lm"], b, max_len)
        ratio = (f"**{int(ll.lstrip('>= ')) / int(lm):.1f}x**" + ("+" if ll.startswith(">") else "")
                 if ll != "-" and lm not in ("-",) and not lm.startswith(">") else "")
        lines.append(f"| longest batch-1 sequence within {b:g} GiB | {ll} | {lm} | {ratio} |")
    for who in ("mlxlora", "mlx-lm"):
        lines.append(f"| {who} peak at batch 1 (tokens: GiB) | "
                     + ", ".join(f"{n}: {pk / 2**30:.2f}" for n, pk in d[f"ladder {who}"]) + " | | |")
    return "\n".join(lines) + "\n"
