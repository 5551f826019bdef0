"""An MoE model from the terminal: train (float and 4-bit) adapts the experts, eval sees the loss drop,
generate and plan show them."""

import json

import mlx.core as mx
import pytest

import tiny

ROWS = [{"prompt": f"Name {i}.", "completion": f"Item {i} is number {i}."} for i in range(10)]
run = tiny.run_cli


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-cli")
    data = tiny.write_data(root / "data", ROWS, ROWS[:3])
    return root, tiny.make_model(root / "moe", "qwen3_moe"), tiny.make_model(root / "q4", "qwen3_moe", quantize=4), data


@pytest.mark.parametrize("which", ["float", "q4"])
def test_train_adapts_experts_and_lowers_the_loss(env, which):
    root, model, q4, data = env
    src = model if which == "float" else q4
    out = root / f"adapter-{which}"
    res = run("train", "--model", src, "--data", data, "--adapter-path", out, "--iters", 8, "--batch-size", 2,
              "--lr", 3e-3, "--rank", 4, "--target", "all-linear")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert len(cfg["target_parameters"]) == 4  # gate_up_proj and down_proj of both blocks
    tensors = mx.load(str(out / "adapter_model.safetensors"))
    b = tensors["base_model.model.model.layers.1.mlp.experts.lora_B.weight"]  # down_proj: (out, r * E)
    assert b.shape == (64, 16) and float(mx.abs(b).max()) > 0  # trained away from zero
    assert not any(".mlp.gate." in k for k in tensors)  # the router is not in all-linear
    ev = run("eval", "--model", src, "--adapter", out, "--data", data, "--split", "valid")
    base_ev = run("eval", "--model", src, "--data", data, "--split", "valid")
    assert ev.exit_code == 0 and base_ev.exit_code == 0, ev.output
    loss = lambda r: float(r.output.split("loss ")[1].split()[0])  # noqa: E731
    assert loss(ev) < loss(base_ev)
    gen = run("generate", "--model", src, "--adapter", out, "--prompt", "Name 3.", "--max-tokens", 4)
    assert gen.exit_code == 0, gen.output


def test_dora_on_experts_is_a_one_line_error(env):
    root, model, _, data = env
    res = run("train", "--model", model, "--data", data, "--adapter-path", root / "dora", "--iters", 1,
              "--target", "all-linear", "--dora")
    tiny.one_line_error(res, "DoRA on MoE experts", "switch_mlp")
    assert not (root / "dora").exists()


@pytest.mark.parametrize("which", ["float", "q4", "config"])
def test_plan_counts_experts_as_training_does(env, which):
    from mlxlora.config import LoraConfig
    from mlxlora.lora.surgery import count_parameters, get_lora_model
    from mlxlora.models import load_base

    root, model, q4, _ = env
    spec = {"float": model, "q4": q4, "config": model / "config.json"}[which]
    res = run("plan", "--model", spec, "--rank", 4, "--target", "all-linear", "--memory-gb", 8, "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    wrapped = get_lora_model(load_base(str(q4 if which == "q4" else model)).model,
                             LoraConfig(r=4, target_modules="all-linear"))
    trainable, total = count_parameters(wrapped)
    assert (plan["trainable_params"], plan["total_params"]) == (trainable, total)
    # 4 experts of 3 projections (64x32 or 32x64) in 2 blocks; a token uses 2 of them: 2 idle experts' worth
    idle = 2 * 3 * 2 * 64 * 32
    idle_adapters = 2 * 3 * 2 * 4 * (64 + 32)
    assert plan["active_params"] == total - idle - idle_adapters
    assert plan["expert_layers"] == 6 and plan["expert_adapter_bytes_fp32"] == 4 * 6 * 4 * 4 * (64 + 32)
    text = run("plan", "--model", spec, "--rank", 4, "--target", "all-linear", "--memory-gb", 8)
    assert "active per token" in text.output and "6 expert layers" in text.output
