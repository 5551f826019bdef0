"""`mlxlora train --method grpo` end to end: the CLI, the run record, one-line errors, resume bit for bit."""

import json
import os
import signal

import numpy as np
import pytest
from safetensors.numpy import load_file

import tiny
from mlxlora import LoraConfig, TrainConfig
from mlxlora.config import PreferenceConfig
from mlxlora.config.grpo import GRPOConfig
from mlxlora.train import TrainingStopped, train

PROMPTS = [{"prompt": p, "answer": a} for p, a in (("hi", "1"), ("yo", "2"), ("ok", "3"), ("go", "4"))]
REWARD = ("def first_is_letter(prompts, completions, **kw):\n"
          "    return [1.0 if c[:1].isascii() and c[:1].islower() else 0.0 for c in completions]\n")


@pytest.fixture
def model_dir(tmp_path):
    return tiny.make_model(tmp_path / "model", "llama")


@pytest.fixture
def data_dir(tmp_path):
    return tiny.write_data(tmp_path / "data", PROMPTS)


@pytest.fixture
def reward_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text(REWARD)
    return f


def test_cli_grpo_learns_and_records_the_method(cli, model_dir, data_dir, reward_file, tmp_path):
    out = tmp_path / "adapter"
    res = cli("train", "--model", model_dir, "--data", data_dir, "--adapter-path", out, "--method", "grpo",
              "--reward", f"{reward_file}:first_is_letter", "--reward", "length:0.1", "--group-size", 8,
              "--max-completion-length", 1, "--iters", 16, "--batch-size", 2, "--lr", "1e-2", "--schedule",
              "constant", "--target", "q_proj,v_proj,lm_head", "--report-every", 4, "--seed", 0)
    assert res.exit_code == 0, res.output
    assert "reward" in res.output and "first_is_letter" in res.output and "kl" in res.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "mlxlora.json"):
        assert (out / name).is_file(), name
    rec = json.loads((out / "mlxlora.json").read_text())["run_record"]
    assert rec["method"]["method"] == "grpo" and rec["method"]["group_size"] == 8
    assert rec["method"]["rewards"] == [f"{reward_file}:first_is_letter", "length:0.1"]
    assert rec["method"]["beta"] == 0.0 and rec["method"]["loss_type"] == "dapo"  # TRL's GRPO defaults
    log = rec["method_log"]
    assert [s for s, _ in log] == list(range(1, 17))
    first = np.mean([m["rewards/first_is_letter/mean"] for _, m in log[:3]])
    last = np.mean([m["rewards/first_is_letter/mean"] for _, m in log[-4:]])
    assert first < 0.3 and last >= 0.9, (first, last)
    res = cli("generate", "--model", model_dir, "--adapter", out, "--prompt", "hi", "--max-tokens", 1)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args, needle", [
    (("--reward", "nope"), "--reward nope: unknown reward 'nope'"),
    (("--group-size", "1"), "--group-size must be an integer >= 2"),
    (("--loss-type", "sigmoid"), "--loss-type must be one of dapo, grpo, bnpo, dr_grpo"),
])
def test_cli_grpo_bad_flags_are_one_line_errors(cli, model_dir, data_dir, tmp_path, args, needle):
    res = cli("train", "--model", model_dir, "--data", data_dir, "--adapter-path", tmp_path / "a", "--method",
              "grpo", "--iters", 1, *args)
    tiny.one_line_error(res, needle)


def test_cli_grpo_bad_row_and_grpo_flags_without_grpo(cli, model_dir, tmp_path):
    data = tiny.write_data(tmp_path / "d", [{"prompt": "hi", "answer": "1"}, {"prompt": "yo"}])
    res = cli("train", "--model", model_dir, "--data", data, "--adapter-path", tmp_path / "a", "--method", "grpo",
              "--iters", 1)
    tiny.one_line_error(res, f"{data / 'train.jsonl'}:2: no 'answer'")
    sft = tiny.write_data(tmp_path / "s", [{"text": "hello"}])
    res = cli("train", "--model", model_dir, "--data", sft, "--adapter-path", tmp_path / "b", "--group-size", 6,
              "--iters", 1)
    tiny.one_line_error(res, "--group-size applies to --method grpo")


def _cfg(model_dir, data_dir, reward_file, out, **kw):
    base = dict(model=str(model_dir), data=str(data_dir), adapter_path=str(out), iters=6, batch_size=2, lr=1e-2,
                save_every=3, report_every=3, seed=3, preference=PreferenceConfig(method="grpo", beta=0.05),
                grpo=GRPOConfig(group_size=4, max_completion_length=3,
                                rewards=(f"{reward_file}:first_is_letter", "length:0.1")),
                lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    base.update(kw)
    return TrainConfig(**base)


def test_grpo_resume_is_bit_exact(model_dir, data_dir, reward_file, tmp_path):
    """Sampling, dropout and the prompt order all come back from (seed, step): an interrupted run resumed
    from its step-3 checkpoint ends with the same adapter, bit for bit, and the same per-step rewards."""
    full = tmp_path / "full"
    train(_cfg(model_dir, data_dir, reward_file, full))
    part = tmp_path / "part"

    def interrupt(st):
        if st.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingStopped, match="--resume"):
        train(_cfg(model_dir, data_dir, reward_file, part), callbacks=[interrupt])
    train(_cfg(model_dir, data_dir, reward_file, part), resume=str(part))
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.abs(a[k]).max() > 0 for k in a if "lora_B" in k)  # it trained
    ra = json.loads((full / "mlxlora.json").read_text())["run_record"]
    rb = json.loads((part / "mlxlora.json").read_text())["run_record"]
    assert ra["method_log"] == rb["method_log"] and len(ra["method_log"]) == 6
    assert ra["method_log"][-1][1]["kl"] > 0  # beta > 0: the reference pass ran


def test_grpo_from_an_init_adapter_measures_kl_against_that_adapter(model_dir, data_dir, reward_file, tmp_path):
    """--init-adapter: the reference is that adapter frozen (not the base), so at step 1, before any update,
    policy and reference are the same weights and the KL is exactly 0; the base would be far from it."""
    init = tiny.make_adapter(model_dir, tmp_path / "sft", LoraConfig(r=4, target_modules="all-linear"), seed=2,
                             size=0.2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    train(_cfg(model_dir, data_dir, reward_file, tmp_path / "g", iters=3, init_adapter=str(init), lora=lora))
    log = json.loads((tmp_path / "g" / "mlxlora.json").read_text())["run_record"]["method_log"]
    assert log[0][1]["kl"] == 0.0 and log[-1][1]["kl"] > 0.0


def test_grpo_grad_accum_equals_the_larger_batch(model_dir, data_dir, reward_file, tmp_path):
    """--batch-size 1 --grad-accum 2 samples the same prompts in the same order as --batch-size 2, and the
    dapo loss divides once by the step's completion tokens: the same update."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    kw = dict(iters=2, save_every=10, lora=lora)
    train(_cfg(model_dir, data_dir, reward_file, tmp_path / "big", batch_size=2, **kw))
    train(_cfg(model_dir, data_dir, reward_file, tmp_path / "acc", batch_size=1, grad_accum=2, **kw))
    a = load_file(str(tmp_path / "big" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "adapter_model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert any(np.abs(a[k]).max() > 1e-4 for k in a if "lora_B" in k)


def test_grpo_on_a_quantized_base(cli, tmp_path, data_dir, reward_file):
    """QLoRA: a 4-bit base trains with GRPO through the CLI and the adapter loads for generation."""
    q = tiny.make_model(tmp_path / "q4", "llama", quantize=4)
    out = tmp_path / "qa"
    res = cli("train", "--model", q, "--data", data_dir, "--adapter-path", out, "--method", "grpo", "--reward",
              f"{reward_file}:first_is_letter", "--group-size", 4, "--max-completion-length", 2, "--iters", 2,
              "--batch-size", 2, "--beta", "0.04", "--target", "all-linear")
    assert res.exit_code == 0, res.output
    log = json.loads((out / "mlxlora.json").read_text())["run_record"]["method_log"]
    assert len(log) == 2 and all(np.isfinite(m["kl"]) for _, m in log)
    res = cli("generate", "--model", q, "--adapter", out, "--prompt", "hi", "--max-tokens", 2)
    assert res.exit_code == 0, res.output


def test_cli_grpo_builtin_rewards_on_conversation_rows(cli, model_dir, tmp_path):
    """The built-ins through the whole run: `answer` reaches `exact`, the weights sum, metrics per function."""
    rows = [{"messages": [{"role": "system", "content": "Answer with one letter."},
                          {"role": "user", "content": q}], "answer": a} for q, a in (("first?", "a"), ("last?", "z"))]
    data = tiny.write_data(tmp_path / "chat", rows)
    out = tmp_path / "b"
    res = cli("train", "--model", model_dir, "--data", data, "--adapter-path", out, "--method", "grpo", "--reward",
              "exact", "--reward", "format:0.5", "--reward", "length:0.25", "--format-pattern", "^[a-z]",
              "--group-size", 4, "--max-completion-length", 2, "--iters", 2, "--batch-size", 2)
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "mlxlora.json").read_text())["run_record"]
    assert rec["method"]["format_pattern"] == "^[a-z]"
    for _, m in rec["method_log"]:
        parts = [m[f"rewards/{n}/mean"] for n in ("exact", "format", "length")]
        assert 0 <= parts[0] <= 1 and 0 <= parts[1] <= 1 and -1 <= parts[2] < 0
        assert m["reward"] == pytest.approx(parts[0] + 0.5 * parts[1] + 0.25 * parts[2])
