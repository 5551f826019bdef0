"""`mlxlora plan`: counts and bytes against real tiny models, the 70B hand formula, header-only
reading, and the predicted peak against the peak a real training step measures."""

import gc
import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxlora import LoraConfig, TrainConfig
from mlxlora.cli import cli
from mlxlora.errors import ConfigError, ModelError
from mlxlora.models import load_base
from mlxlora.plan import (ModelShapes, format_plan, machine_memory, plan_training, read_model,
                          read_safetensors_header, suggest_fit)
from mlxlora.lora.surgery import count_parameters, get_lora_model

import tiny

LLAMA_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                 tie_word_embeddings=False, torch_dtype="bfloat16")

TARGETS = {  # name -> target_modules; phi3 has fused projections
    "qv": ["q_proj", "v_proj"], "all": "all-linear", "regex": r".*\.(k_proj|down_proj)",
    "path": ["model.layers.1.mlp.up_proj"],
}


def _real_counts(folder, lora, quantize=None):
    model = load_base(str(folder), quantize=quantize, group_size=32).model
    get_lora_model(model, lora)
    return count_parameters(model), model


def _formula(model, lora):
    """Σ r·(in + out) over the layers training adapts, read off the real modules."""
    return sum(lora.r * (m.lora_a.shape[0] + m.lora_b.shape[1]) for _, m in
               ((p, m) for p, m in model.named_modules() if hasattr(m, "lora_a")))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
@pytest.mark.parametrize("quant", [None, 4])
@pytest.mark.parametrize("target", ["qv", "all", "regex", "path"])
def test_counts_equal_count_parameters(tmp_path, arch, quant, target):
    folder = tiny.make_model(tmp_path / arch, arch, quantize=quant)
    t = TARGETS[target]
    if arch == "phi3" and target in ("qv", "regex"):
        t = ["qkv_proj"] if target == "qv" else r".*\.(o_proj|down_proj)"
    if arch == "phi3" and target == "path":
        t = ["model.layers.1.mlp.gate_up_proj"]
    lora = LoraConfig(r=4, target_modules=t, last_n_layers=1 if target == "qv" else None)
    (trainable, total), model = _real_counts(folder, lora)
    plan = plan_training(str(folder), lora, memory_bytes=2**40)
    assert (plan.trainable_params, plan.total_params) == (trainable, total)
    assert plan.trainable_params == _formula(model, lora)
    assert plan.adapted_layers == len([1 for _, m in model.named_modules() if hasattr(m, "lora_a")])
    # From config.json alone (llama-like layouts are computed, not read): the same numbers.
    config = json.loads((folder / "config.json").read_text())
    plan_c = plan_training(config, lora, memory_bytes=2**40)
    assert (plan_c.trainable_params, plan_c.total_params) == (trainable, total)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_time_quantize_counts_and_bytes(tmp_path, arch):
    folder = tiny.make_model(tmp_path / arch, arch)
    lora = LoraConfig(r=8, target_modules="all-linear")
    base = load_base(str(folder), quantize=4, group_size=32)
    real_bytes = sum(v.nbytes for _, v in _flat(base.model.parameters()))
    get_lora_model(base.model, lora)
    plan = plan_training(str(folder), lora, quantize=4, group_size=32)
    assert (plan.trainable_params, plan.total_params) == count_parameters(base.model)
    assert plan.base_bytes == real_bytes  # float32 scales and biases on CPU


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _tensor_bytes(folder):
    """Bytes of tensor data in a safetensors file: its size minus the 8-byte length and the header."""
    path = folder / "model.safetensors"
    size = int.from_bytes(path.read_bytes()[:8], "little")
    return path.stat().st_size - 8 - size


@pytest.mark.parametrize("quant", [None, 4, 8])
def test_base_bytes_equal_safetensors_bytes(tmp_path, quant):
    folder = tiny.make_model(tmp_path / "m", "llama", quantize=quant)  # float32 weights and scales
    plan = plan_training(str(folder), LoraConfig(), compute_dtype="float32")
    assert plan.base_bytes == _tensor_bytes(folder)
    assert plan_training(str(folder), LoraConfig(), compute_dtype=None).base_bytes == _tensor_bytes(folder)
    real = load_base(str(folder)).model
    assert plan.base_bytes == sum(v.nbytes for _, v in _flat(real.parameters()))
    # float16 compute halves every float tensor (weights, norms, scales, biases) but not packed words
    half = plan_training(str(folder), LoraConfig(), compute_dtype="float16")
    packed = sum(n * 4 for n in _packed_words(folder))
    assert half.base_bytes == (plan.base_bytes - packed) // 2 + packed


def _packed_words(folder):
    return [int(np.prod(h["shape"])) for h in read_safetensors_header(folder / "model.safetensors").values()
            if h["dtype"] == "U32"]


@pytest.mark.parametrize("r", [8, 16, 64])
def test_70b_trainable_counts_by_hand(r):
    blocks, D, kv, I = 80, 8192, 1024, 28672
    qv = blocks * r * ((D + D) + (D + kv))
    every = blocks * r * ((D + D) + 2 * (D + kv) + (D + D) + 2 * (D + I) + (I + D))
    assert plan_training(LLAMA_70B, LoraConfig(r=r)).trainable_params == qv
    assert plan_training(LLAMA_70B, LoraConfig(r=r, target_modules="all-linear")).trainable_params == every
    if r == 16:
        assert qv == 32_768_000


def test_70b_totals_and_memory():
    plan = plan_training(LLAMA_70B, LoraConfig(r=16), quantize=4, batch_size=1, max_seq_length=2048,
                         grad_checkpoint=True, compute_dtype="float16", memory_bytes=64 * 2**30)
    assert plan.total_params == 70_553_706_496 + 32_768_000  # Meta's published 70.55B + the adapter
    # 4-bit, group 64, float16 scale + bias per group: 4.5 bits per weight on every matrix; norms in fp16
    matrices = 70_553_706_496 - (2 * 80 + 1) * 8192
    assert plan.base_bytes == matrices * 9 // 16 + (2 * 80 + 1) * 8192 * 2
    assert plan.adapter_bytes_fp32 == 4 * 32_768_000 and plan.optimizer_bytes == 8 * 32_768_000
    assert 38e9 < plan.peak_bytes < 64 * 2**30 and plan.fits  # ~37 GiB of weights + ~2.8 GiB of the rest


def test_reads_headers_only(tmp_path, monkeypatch):
    """A file cut after its header plans the same, and no tensor loader is ever called."""
    folder = tiny.make_model(tmp_path / "full", "llama", quantize=4)
    lora = LoraConfig(r=4, target_modules="all-linear")
    full = plan_training(str(folder), lora)

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((folder / "config.json").read_text())
    raw = (folder / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(raw[:8 + int.from_bytes(raw[:8], "little")])

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor loader was called")

    import safetensors
    import safetensors.numpy

    monkeypatch.setattr(mx, "load", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.numpy, "load_file", refuse)
    got = plan_training(str(cut), lora)
    assert (got.total_params, got.trainable_params, got.base_bytes) == (full.total_params, full.trainable_params,
                                                                         full.base_bytes)
    assert got.source == "1 safetensors header(s)"


def test_gguf_metadata_matches_the_import(tmp_path):
    gguf = pytest.importorskip("gguf")
    from mlx.utils import tree_flatten

    folder = tiny.make_model(tmp_path / "m", "llama", hidden_size=64)
    model = load_base(str(folder)).model
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    config = json.loads((folder / "config.json").read_text())
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    for hf, a in tree_flatten(model.parameters()):
        a = np.array(a)
        name = names.get_name(hf, try_suffixes=(".weight",))
        if "q_proj" in hf:  # one native quant: stays 8-bit (group 32) on import
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    lora = LoraConfig(r=4, target_modules="all-linear")
    plan = plan_training(str(tmp_path / "t.gguf"), lora, compute_dtype="float32")
    assert plan.source == "GGUF metadata"
    get_lora_model(model, lora)
    assert (plan.trainable_params, plan.total_params) == count_parameters(model)
    q = 2 * 64 * 64  # two q_proj: 8-bit words + float32 scale and bias per 32 weights
    assert plan.base_bytes == 4 * (count_parameters(model)[1] - plan.trainable_params - q) + q + q // 32 * 2 * 4
    assert config["num_hidden_layers"] == 2


@pytest.mark.slow
def test_real_smollm2_gguf_plans_like_its_import():
    """The demo's SmolLM2-135M Q4_1 GGUF and the MLX folder imported from it: same counts, and the
    base bytes are the folder's tensor bytes (when the demo model is in the cache)."""
    from mlxlora.cache import cache_dir
    from mlxlora.models.demo import GGUF_NAME, MODEL_DIR

    gguf_file, folder = cache_dir() / GGUF_NAME, cache_dir() / MODEL_DIR
    if not (gguf_file.is_file() and (folder / "model.safetensors").is_file()):
        pytest.skip("the demo model is not in the cache (run scripts/demo once)")
    lora = LoraConfig(r=16, target_modules="all-linear")
    a = plan_training(str(gguf_file), lora, compute_dtype=None)
    b = plan_training(str(folder), lora, compute_dtype=None)
    assert (a.total_params, a.trainable_params, a.base_bytes) == (b.total_params, b.trainable_params, b.base_bytes)
    assert (b.total_params, b.trainable_params) == (139_399_488, 4_884_480)  # print_trainable_parameters of it
    assert b.base_bytes == _tensor_bytes(folder)


def _measured_peak(folder, lora, batch, seq, quantize=None, grad_checkpoint=False, steps=2):
    """Peak bytes of real training steps (Stepper, as the trainer runs them), over what was live before."""
    from mlxlora.train.step import Stepper, grad_checkpoint_blocks, make_optimizer

    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_base(str(folder), quantize=quantize, group_size=64).model
    mx.random.seed(0)
    get_lora_model(model, lora)
    if grad_checkpoint:
        grad_checkpoint_blocks(model)
    opt = make_optimizer(TrainConfig(lr=1e-4), 10)
    opt.init(model.trainable_parameters())
    stepper = Stepper(model, opt, clip_grad=1.0)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(3, 250, (batch, seq)), dtype=mx.int32)
    ones = mx.ones((batch, seq))
    for _ in range(steps):
        mx.eval(stepper.step([(x, x, ones)]), model.state, opt.state)
    peak = mx.get_peak_memory() - before
    del model, opt, stepper
    gc.collect()
    return peak


@pytest.mark.parametrize("case", [
    dict(target=["q_proj", "v_proj"]),
    dict(target="all-linear", quantize=4),
    dict(target="all-linear", grad_checkpoint=True),
    dict(target=["q_proj", "v_proj"], dora=True),
    dict(target=["q_proj", "v_proj"], arch="gemma2", head_dim=64),
])
def test_predicted_peak_within_30_percent(tmp_path, case, capsys):
    """hidden 256, 4 blocks, vocab 259, batch 4 x 256 tokens: the plan against mx.get_peak_memory()."""
    extra = {"head_dim": case["head_dim"]} if "head_dim" in case else {}
    folder = tiny.make_model(tmp_path / "m", case.get("arch", "llama"), hidden_size=256, num_hidden_layers=4,
                             intermediate_size=512, **extra)
    lora = LoraConfig(r=8, target_modules=case["target"], use_dora=case.get("dora", False))
    kw = dict(quantize=case.get("quantize"), grad_checkpoint=case.get("grad_checkpoint", False))
    plan = plan_training(str(folder), lora, batch_size=4, max_seq_length=256, group_size=64, backend="cpu", **kw)
    measured = _measured_peak(folder, lora, 4, 256, **kw)
    ratio = plan.peak_bytes / measured
    with capsys.disabled():
        print(f"\n[plan] {case}: predicted {plan.peak_bytes / 2**20:.1f} MiB, "
              f"measured {measured / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert 0.7 < ratio < 1.3, (plan.peak_bytes, measured)


def test_grpo_predicted_peak_within_30_percent(tmp_path, capsys):
    """--method grpo: two real GRPO steps (2 prompts x 4 sampled completions, one group at a time, the groups'
    gradients summed) against the plan at the length they reached (the SFT plan of the same flags: 0.57x)."""
    from mlxlora.config import GRPOConfig
    from mlxlora.data.prompts import load_prompts
    from mlxlora.train.grpo import GRPOStepper
    from mlxlora.train.rewards import parse_rewards
    from mlxlora.train.step import make_optimizer

    folder = tiny.make_model(tmp_path / "m", "llama", hidden_size=256, num_hidden_layers=4, intermediate_size=512)
    lora = LoraConfig(r=8, target_modules="all-linear")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": "x" * 180 + str(i)}) + "\n" for i in range(2)))
    cfg = GRPOConfig(group_size=4, max_completion_length=64, rewards=("length",))
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    base = load_base(str(folder))
    rows = load_prompts(tmp_path / "p.jsonl", base.tokenizer, need_answer=False)
    mx.random.seed(0)
    get_lora_model(base.model, lora)
    opt = make_optimizer(TrainConfig(lr=1e-4), 10)
    opt.init(base.model.trainable_parameters())
    stepper = GRPOStepper(base.model, opt, base.tokenizer, cfg, parse_rewards(cfg), beta=0.0, loss_type="dapo")
    sampled, sample = [], stepper.sample
    stepper.sample = lambda r: sampled.append(out := sample(r)) or out  # to read the lengths reached
    for step in range(2):
        mx.random.seed(step)
        stepper.grpo_step(rows)
    measured = mx.get_peak_memory() - before
    longest = max(len(r.ids) for r in rows) + max(len(c) for s in sampled for c in s)
    sample = None  # stepper.sample -> the lambda -> sample -> stepper: a cycle, broken so all is freed now
    del stepper, opt, base
    gc.collect()
    kw = dict(batch_size=2, max_seq_length=longest, backend="cpu")
    plan = plan_training(str(folder), lora, method="grpo", grpo=cfg, **kw)
    sft = plan_training(str(folder), lora, **kw)
    ratio = plan.peak_bytes / measured
    with capsys.disabled():
        print(f"\n[plan] grpo 2 x 4 x {longest}: predicted {plan.peak_bytes / 2**20:.1f} MiB, measured "
              f"{measured / 2**20:.1f} MiB, ratio {ratio:.3f} (the sft plan: {sft.peak_bytes / measured:.3f})")
    assert 0.7 < ratio < 1.3, (plan.peak_bytes, measured)
    assert plan.settings["rows_per_item"] == 4 and "4 completions" in format_plan(plan)


def test_suggest_fit_is_the_largest_batch_that_fits():
    lora = LoraConfig(r=16)
    budget = 64 * 2**30
    fit = suggest_fit(LLAMA_70B, lora, quantize=4, max_seq_length=2048, compute_dtype="float16",
                      memory_bytes=budget)
    kw = dict(quantize=4, max_seq_length=2048, compute_dtype="float16", memory_bytes=budget)
    assert fit.batch_size >= 1 and fit.plan.fits
    nxt = plan_training(LLAMA_70B, lora, batch_size=fit.batch_size + 1, grad_checkpoint=fit.grad_checkpoint, **kw)
    assert not nxt.fits
    if fit.grad_checkpoint:  # checkpointing is only suggested when a batch of 1 does not fit without it
        assert not plan_training(LLAMA_70B, lora, batch_size=1, **kw).fits
    none = suggest_fit(LLAMA_70B, lora, quantize=4, memory_bytes=2**30)
    assert none.batch_size == 0


def test_nothing_matched_and_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="matched no layer"):
        plan_training(LLAMA_70B, LoraConfig(target_modules=["nope"]))
    with pytest.raises(ConfigError, match="layers_to_transform"):
        plan_training(LLAMA_70B, LoraConfig(layers_to_transform=[80]))
    with pytest.raises(ModelError, match="lacks hidden_size"):
        plan_training({"model_type": "llama"}, LoraConfig())
    folder = tiny.make_model(tmp_path / "q", "llama", quantize=4)
    with pytest.raises(ModelError, match="already quantized"):
        plan_training(str(folder), LoraConfig(), quantize=4)
    with pytest.raises(ModelError, match="does not exist"):
        read_model(str(tmp_path / "missing"))


def test_last_n_layers_shrinks_activations():
    a = plan_training(LLAMA_70B, LoraConfig(r=8), batch_size=1, max_seq_length=1024, memory_bytes=2**50)
    b = plan_training(LLAMA_70B, LoraConfig(r=8, last_n_layers=8), batch_size=1, max_seq_length=1024,
                      memory_bytes=2**50)
    assert b.trainable_params * 10 == a.trainable_params
    assert b.activation_terms["kept for backward"] * 10 == a.activation_terms["kept for backward"]


def test_machine_memory_linux_and_macos_fallback(monkeypatch):
    import sys

    got, where = machine_memory()
    if sys.platform.startswith("linux"):
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
        assert (got, where) == (kb * 1024, "MemTotal (/proc/meminfo)")
    import subprocess

    class Out:
        stdout = "17179869184\n"

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Out())
    assert machine_memory() == (12 * 2**30, "0.75 × hw.memsize")


_run = tiny.run_cli


def test_cli_json_text_fit_and_errors(tmp_path):
    folder = tiny.make_model(tmp_path / "m", "qwen2")
    res = _run("plan", "--model", folder, "--rank", 4, "--target", "q_proj,v_proj", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    lora = LoraConfig(r=4)
    (trainable, total), _ = _real_counts(folder, lora)
    assert (got["trainable_params"], got["total_params"]) == (trainable, total)
    assert got["settings"]["batch_size"] == TrainConfig.batch_size

    config = tmp_path / "70b.json"
    config.write_text(json.dumps(LLAMA_70B))
    res = _run("plan", "--model", config, "--rank", 16, "--quantize", 4, "--batch-size", 2, "--fit",
               "--memory-gb", 64, "--max-seq-length", 1024)
    assert res.exit_code == 0, res.output
    assert "32,768,000 trainable" in res.output and "predicted peak" in res.output
    # 2 x 1024 tokens without checkpointing needs more than 64 GiB; with it they fit (the CPU path
    # dequantizes one slice of a weight at a time, so no block's float weights are kept)
    assert "does NOT fit" in res.output
    assert "fit: --batch-size 2 --grad-checkpoint (predicted peak" in res.output

    yaml_file = tmp_path / "train.yaml"  # the train config file works as it is; flags override it
    yaml_file.write_text(f"model: {folder}\ndata: somewhere\nrank: 2\ntarget: all-linear\niters: 10\n")
    res = _run("plan", "--config", yaml_file, "--rank", 4, "--json")
    (trainable, _), _ = _real_counts(folder, LoraConfig(r=4, target_modules="all-linear"))
    assert json.loads(res.output)["trainable_params"] == trainable

    for args, needle in ((("--model", folder, "--target", "nope"), "matched no layer"),
                         (("--rank", 4), "--model is required"),
                         (("--model", folder, "--memory-gb", -1), "--memory-gb")):
        res = CliRunner().invoke(cli, ["plan", *map(str, args)])
        err = res.output.strip().splitlines()
        assert res.exit_code != 0 and len(err) == 1 and needle in err[0], res.output


def test_format_plan_lists_every_term():
    plan = plan_training(LLAMA_70B, LoraConfig(r=8), memory_bytes=2**40)
    text = format_plan(plan)
    for key in ("parameters", "adapter file", "base weights", "AdamW moments", "predicted peak", *plan.activation_terms):
        assert key in text, key
    assert isinstance(read_model(LLAMA_70B), ModelShapes)
