"""llama.cpp itself as the runtime peer: the GGUF files mlxlora writes, run by llama-perplexity.

llama-perplexity (tools/perplexity/perplexity.cpp) tokenizes the text, cuts it into chunks of n_ctx
tokens (the first replaced by BOS when the vocabulary adds one) and scores only the second half of
each chunk: positions n_ctx/2 .. n_ctx-2 predict the next token. `mlx_perplexity` scores exactly those
tokens with mlxlora's own loss (loss.tokens.loss_sums), so both sides compute exp(mean NLL) of the same
targets. `--kl-divergence-base FILE` makes llama.cpp save its token ids, which the tests compare with
mlxlora's tokenization first. The binaries come from scripts/llama_cpp (tests/llamacpp_peer.py).
"""

import math
import os
import re
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import llamacpp_peer
import tiny

N_CTX, N_CHUNKS = 128, 2
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ADAPTER_SIZE = 0.04  # spread of the random lora_a/lora_b: SmolLM2's perplexity 36.8 -> 41.7 in mlxlora
TEXT = (
    "The river town woke slowly. At 6:45 the baker opened his shutters, and by 7:10 there were already "
    "twelve people waiting for bread. Nobody in the queue seemed to mind; they talked about the weather, "
    "the price of apples (3 for 1.50, up from 1.20 last year) and the bridge that had been closed since "
    "March. A child asked her grandmother why the water was brown. Because it rained in the mountains, "
    "the old woman said, and everything the rain touches ends up here sooner or later. The answer "
    "satisfied the child for almost a minute. Then she wanted to know where the mountains were, how far "
    "away, and whether you could walk there before lunch. It is about 140 kilometres, her grandmother "
    "said, so no, not before lunch, and not before dinner either. In the afternoon the sun came out. "
    "Fishermen lined the quay with their long rods, and a tourist photographed a heron standing on one "
    "leg in the shallows. The heron did not move for twenty minutes, which the tourist found remarkable "
    "and the fishermen found perfectly ordinary. By evening the river had turned from brown to grey to "
    "silver, the bridge lamps came on one by one, and the baker counted 418 loaves sold, a record for a "
    "Tuesday. He wrote the number in a small notebook he kept under the counter, next to the numbers from "
    "every other Tuesday since 1998, and went home to sleep.\n"
)
PPL_LINE = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def tool(name: str):
    """The cached llama.cpp binary, or skip (locally) / fail (when .ci/run built it and it is missing)."""
    path = llamacpp_peer.tool(name)
    if path is None:
        if os.environ.get("MLXLORA_REQUIRE_LLAMA_CPP"):
            pytest.fail(f"llama.cpp's {name} is missing from {llamacpp_peer.bin_dir()}: scripts/llama_cpp failed")
        pytest.skip(f"llama.cpp's {name} is not built here: run scripts/llama_cpp once (about 40 min on 2 cores)")
    return path


def llama_perplexity(tmp_path, model, lora=None, threads=2, log_probs=False):
    """(llama.cpp's perplexity of TEXT over N_CHUNKS chunks of N_CTX, the token ids it used[, its log-probs]).

    log_probs: also return the (scored positions, n_vocab) log-softmax llama.cpp saved (16-bit steps of
    at most 16/65535 nats over the top 16 nats; lower entries are saved as that floor).
    """
    text, saved = tmp_path / "text.txt", tmp_path / f"logits-{os.getpid()}-{id(model)}.bin"
    text.write_text(TEXT)
    cmd = [str(tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(N_CTX), "-b", str(N_CTX),
           "--chunks", str(N_CHUNKS), "-t", str(threads), "--kl-divergence-base", str(saved)]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = PPL_LINE.search(done.stdout + done.stderr)
    assert done.returncode == 0 and found, (done.returncode, done.stderr[-2000:])
    raw = saved.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(raw[8:20], dtype=np.int32))
    end = 20 + 4 * n_ctx * n_chunk
    tokens = np.frombuffer(raw[20:end], dtype=np.int32).tolist()
    saved.unlink()
    if not log_probs:
        return float(found[1]), tokens
    # per scored position: float32 step, float32 floor, then n_vocab uint16 steps above the floor
    rows = np.frombuffer(raw[end:], dtype=np.uint16).reshape(n_chunk * (n_ctx - 1 - n_ctx // 2), -1)
    step, floor = rows[:, :2].copy().view(np.float32), rows[:, 2:4].copy().view(np.float32)
    return float(found[1]), tokens, floor + step * rows[:, 4:4 + n_vocab].astype(np.float32)


def mlx_log_probs(model, tokens: list[int]) -> np.ndarray:
    """mlxlora's log-softmax at the positions llama-perplexity scores, (N_CHUNKS * (N_CTX/2 - 1), n_vocab)."""
    first, out = N_CTX // 2, []
    for c in range(N_CHUNKS):
        logits = model(mx.array([tokens[c * N_CTX:(c + 1) * N_CTX]]))[0, first:N_CTX - 1].astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    return np.concatenate(out)


def mlx_perplexity(model, tokens: list[int], bos: int | None = None) -> float:
    """mlxlora's perplexity of the targets llama-perplexity scores (see the module docstring)."""
    from mlxlora.loss.tokens import loss_sums

    first = N_CTX // 2
    total, count = 0.0, 0
    for c in range(N_CHUNKS):
        chunk = list(tokens[c * N_CTX:(c + 1) * N_CTX])
        if bos is not None:
            chunk[0] = bos
        mask = mx.array([[float(j >= first) for j in range(N_CTX - 1)]])
        s, n = loss_sums(model, mx.array([chunk[:-1]]), mx.array([chunk[1:]]), mask)
        total, count = total + float(s), count + int(n)
    assert count == N_CHUNKS * (N_CTX - first - 1)
    return math.exp(total / count)


def export(cli, model, out, gguf_type, adapter=None):
    args = ["export-model", "--model", model, "--format", "gguf", "--gguf-type", gguf_type, "--out", out]
    res = cli(*args, *(["--adapter", adapter] if adapter else []))
    assert res.exit_code == 0, res.output
    return out / f"{out.name}-{gguf_type}.gguf"


@pytest.mark.peer
def test_tiny_f32_export_has_mlxloras_perplexity_in_llama_cpp(tmp_path, tiny_bpe_dirs, cli):
    from mlxlora.models import load_base

    for arch in ("llama", "qwen2"):
        base = load_base(str(tiny_bpe_dirs[arch]))
        ppl, tokens = llama_perplexity(tmp_path, export(cli, tiny_bpe_dirs[arch], tmp_path / arch, "f32"))
        assert tokens == base.tokenizer.encode(TEXT)[:len(tokens)]
        ours = mlx_perplexity(base.model, tokens)
        assert abs(ppl - ours) / ours < 1e-4, (arch, ppl, ours)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (4-bit MLX folder) and its exports as f32 and f16 GGUF."""
    from mlxlora.models.demo import ensure_demo_model

    root = tmp_path_factory.mktemp("smollm-gguf")
    folder = ensure_demo_model()
    files = {t: export(tiny.run_cli, folder, root / t, t) for t in ("f32", "f16")}
    return folder, files, root


@pytest.mark.slow
@pytest.mark.peer
def test_smollm_export_has_mlxloras_perplexity_in_llama_cpp(smollm, tmp_path):
    """SmolLM2 (4-bit MLX, dequantized on export): f32 and f16 GGUF in llama.cpp vs mlxlora on the same tokens.

    f32 holds the dequantized weights exactly, so only summation order differs (tolerance 0.1%);
    f16 rounds each weight to 11 bits and llama.cpp's f16 matmul also rounds the activations (0.2%).
    """
    from mlxlora.models import load_base

    folder, files, _ = smollm
    base = load_base(str(folder))
    ppl32, tokens = llama_perplexity(tmp_path, files["f32"])
    assert tokens == base.tokenizer.encode(TEXT)[:len(tokens)]  # llama.cpp's "smollm" split = the tokenizer's
    ours = mlx_perplexity(base.model, tokens)
    ppl16, _ = llama_perplexity(tmp_path, files["f16"])
    print(f"SmolLM2 perplexity: mlxlora {ours:.4f}, llama.cpp f32 {ppl32:.4f}, f16 {ppl16:.4f}")
    assert abs(ppl32 - ours) / ours < 1e-3, (ppl32, ours)
    assert abs(ppl16 - ours) / ours < 2e-3, (ppl16, ours)


@pytest.mark.slow
@pytest.mark.peer
def test_smollm_lora_gguf_and_fused_gguf_in_llama_cpp(smollm, tmp_path, cli):
    """An adapter (non-zero lora_b on every linear, q/k included: llama.cpp's row permutation matters)
    exported with export-adapter --to gguf and applied by llama.cpp with --lora on the f32 base moves
    llama.cpp's perplexity by what it moves mlxlora's; the same adapter fused (fuse --format gguf) gives
    llama.cpp the adapted perplexity without --lora.

    Tolerance: both sides run the same float32 weights, so each perplexity agrees to summation order
    (0.1%); the change is then compared to 2% of itself plus those two 0.1% errors.
    """
    from mlxlora.config import LoraConfig
    from mlxlora.inference import load_with_adapter

    folder, files, root = smollm
    adapter = tiny.make_adapter(folder, tmp_path / "adapter", LoraConfig(r=8, target_modules="all-linear"),
                                seed=5, size=ADAPTER_SIZE)
    lora = tmp_path / "adapter.gguf"
    res = cli("export-adapter", adapter, lora, "--to", "gguf", "--model", folder)
    assert res.exit_code == 0, res.output
    base = load_with_adapter(str(folder))
    tokens = base.tokenizer.encode(TEXT)[:N_CTX * N_CHUNKS]
    ours_base = mlx_perplexity(base.model, tokens)
    ours_lora = mlx_perplexity(load_with_adapter(str(folder), str(adapter)).model, tokens)
    theirs_base, _ = llama_perplexity(tmp_path, files["f32"])
    theirs_lora, _ = llama_perplexity(tmp_path, files["f32"], lora=lora)
    fused_out = tmp_path / "fused"
    res = cli("fuse", "--model", folder, "--adapter", adapter, "--format", "gguf", "--gguf-type", "f32",
              "--out", fused_out)
    assert res.exit_code == 0, res.output
    theirs_fused, _ = llama_perplexity(tmp_path, fused_out / "fused-f32.gguf")
    print(f"SmolLM2 + LoRA perplexity: mlxlora {ours_base:.4f} -> {ours_lora:.4f}, "
          f"llama.cpp {theirs_base:.4f} -> {theirs_lora:.4f} (--lora), fused GGUF {theirs_fused:.4f}")
    change = ours_lora - ours_base
    assert abs(change) / ours_base > 0.05  # the adapter matters
    slack = 0.02 * abs(change) + 1e-3 * (ours_base + ours_lora)
    assert abs((theirs_lora - theirs_base) - change) < slack, (theirs_lora - theirs_base, change)
    assert abs(theirs_fused - ours_lora) / ours_lora < 1e-3, (theirs_fused, ours_lora)


@pytest.mark.slow
@pytest.mark.peer
@pytest.mark.parametrize("gguf_type", ["q4_k_m", "q6_k"])
def test_smollm_k_quant_export_imports_with_llama_cpps_log_probs(smollm, tmp_path, cli, gguf_type):
    """export-model --gguf-type q4_k_m/q6_k (through llama.cpp's llama-quantize) writes real K-quant tensors;
    mlxlora imports that file (its matrices stay quantized) and its log-probs on the text stay close to
    llama.cpp's own run of the same file; then a QLoRA adapter trains a few steps over the import.

    Tolerance: llama.cpp's CPU kernels multiply quantized blocks by activations they round to 8 bits
    (Q8_0 / Q8_K), mlxlora by float activations (its import dequantizes these types with gguf-py), and
    that rounding compounds over 30 layers: measured on q4_k_m, mean |log-prob difference| over the
    likely tokens (log-prob > -10) 0.110 nats, top-1 agreement 96.8 %, perplexity 0.80 % apart. The
    test allows 0.2 nats, 90 % and 2 %. (SmolLM2's 576-wide rows are not a multiple of 256, so
    llama-quantize writes most of its q4_k_m matrices as Q5_0 and only the 1536-wide ones as K-quants.)
    """
    from gguf import GGUFReader

    from mlxlora.models import load_base
    from mlxlora.models.gguf import convert_gguf

    tool("llama-quantize")
    folder, _, _ = smollm
    path = export(cli, folder, tmp_path / gguf_type, gguf_type)
    kinds = {t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert {"q4_k_m": "Q4_K", "q6_k": "Q6_K"}[gguf_type] in kinds, kinds
    theirs, tokens, theirs_lp = llama_perplexity(tmp_path, path, log_probs=True)
    imported = load_base(str(convert_gguf(path, tmp_path / "imported"))).model
    ours_lp = mlx_log_probs(imported, tokens)
    ours = mlx_perplexity(imported, tokens)
    mean = float(np.abs(ours_lp - theirs_lp)[theirs_lp > -10].mean())
    top1 = float((ours_lp.argmax(-1) == theirs_lp.argmax(-1)).mean())
    print(f"SmolLM2 {gguf_type}: perplexity mlxlora {ours:.4f}, llama.cpp {theirs:.4f}; mean |log-prob diff| "
          f"(log-prob > -10) {mean:.4f}; top-1 agreement {top1:.3f}; tensor types {sorted(kinds)}")
    assert mean < 0.2 and top1 > 0.9, (mean, top1)
    assert abs(theirs - ours) / ours < 0.02, (theirs, ours)
    _trains_qlora(tmp_path / "imported", tmp_path / "qlora", tokens)


def _trains_qlora(model_dir, out, tokens):
    """A few QLoRA steps over the imported (still quantized) file: the adapter learns and moves the output."""
    import mlx.nn as nn

    from mlxlora.config import TrainConfig
    from mlxlora.inference import load_with_adapter
    from mlxlora.models import load_base
    from mlxlora.train import train

    base = load_base(str(model_dir))
    assert isinstance(base.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    result = train(TrainConfig(model=str(model_dir), data=str(EXAMPLES / "devil"), adapter_path=str(out), iters=4,
                               batch_size=1, lr=1e-3, max_seq_length=128, val_batches=1, val_every=1000,
                               save_every=1000, report_every=1))
    assert result.steps == 4 and math.isfinite(result.train_loss)
    ids = mx.array([tokens[:64]])
    moved = mx.abs(load_with_adapter(str(model_dir), str(result.adapter_path)).model(ids) - base.model(ids)).max()
    assert float(moved) > 1e-3
