"""The memory guard stops a run before it passes --memory-limit, checkpointed, with the command that resumes;
--auto-fit picks the settings the planner says fit."""

import json
import re

import tiny

ROWS = [{"prompt": f"Say {w}.", "completion": f"{w} {w} {w}!"} for w in
        ["apple", "river", "stone", "cloud", "ember", "frost", "grain", "honey"]]


def test_guard_checkpoints_stops_and_the_hint_resumes(tmp_path):
    model = tiny.make_model(tmp_path / "model", "llama")
    data = tiny.write_data(tmp_path / "data", ROWS)
    out = tmp_path / "run"
    # 2 MiB: above the tiny model's weights and optimizer state, below its first step's peak (~3.4 MiB)
    limit_gib = 2 / 1024
    args = ["train", "--model", model, "--data", data, "--adapter-path", out, "--iters", 6, "--batch-size", 4,
            "--rank", 4, "--save-every", 100, "--report-every", 100, "--val-every", 100]
    res = tiny.run_cli(*args, "--memory-limit", limit_gib)
    assert res.exit_code == 1 and "Traceback" not in res.output
    error = res.output.strip().splitlines()[-1]  # after the run's start-up lines, one error line
    assert error.startswith("Error: memory guard at step 1: the peak memory") and "--memory-limit 2 MiB" in error
    assert (out / "checkpoints" / "step-00000001").is_dir()
    hint = re.search(r"resume with less memory: (mlxlora train .*)$", error).group(1)
    assert hint == f"mlxlora train --resume {out} --batch-size 2 --grad-accum 2"
    res = tiny.run_cli(*hint.split()[1:], "--memory-limit", 64)  # the hinted command, with room to finish
    assert res.exit_code == 0, res.output
    record = json.loads((out / "mlxlora.json").read_text())
    assert record["train_config"]["batch_size"] == 2 and record["train_config"]["grad_accum"] == 2
    assert record["run_record"]["steps"] == 6


def test_auto_fit_chooses_and_says_so(tmp_path):
    from mlxlora.plan import suggest_fit
    from mlxlora import LoraConfig

    model = tiny.make_model(tmp_path / "model", "llama", hidden_size=256, intermediate_size=1024)
    data = tiny.write_data(tmp_path / "data", ROWS)
    lora = LoraConfig(r=4, target_modules="all-linear")
    budget = suggest_fit(str(model), lora, memory_bytes=64 << 20, max_seq_length=512).plan.peak_bytes
    fit = suggest_fit(str(model), lora, memory_bytes=budget, max_seq_length=512)
    res = tiny.run_cli("train", "--model", model, "--data", data, "--adapter-path", tmp_path / "a", "--iters", 2,
                       "--rank", 4, "--batch-size", 64, "--max-seq-length", 512, "--auto-fit",
                       "--memory-limit", f"{budget / 2**30:.9f}")
    assert res.exit_code == 0, res.output
    want = f"auto-fit: --batch-size {fit.batch_size} --grad-accum {-(-64 // fit.batch_size)}"
    assert want in res.output, res.output
    record = json.loads((tmp_path / "a" / "mlxlora.json").read_text())
    assert record["train_config"]["batch_size"] == fit.batch_size < 64


def test_auto_fit_plans_the_method_that_runs(tmp_path):
    """--auto-fit --method dpo plans two sequences per pair (it planned an SFT batch: twice too large);
    --method grpo keeps the batch of prompts (one group is trained at a time) and fits the rest."""
    from types import SimpleNamespace

    from mlxlora import LoraConfig, TrainConfig
    from mlxlora.config import PreferenceConfig
    from mlxlora.plan import suggest_fit
    from mlxlora.train.memory import auto_fit

    model = tiny.make_model(tmp_path / "model", "llama", hidden_size=256, intermediate_size=1024)
    base = SimpleNamespace(path=model, config={})
    lora = LoraConfig(r=4, target_modules="all-linear")
    budget = suggest_fit(str(model), lora, memory_bytes=512 << 20, max_seq_length=512).plan.peak_bytes
    sft = suggest_fit(str(model), lora, memory_bytes=budget, max_seq_length=512).batch_size
    common = dict(model=str(model), lora=lora, max_seq_length=512, auto_fit=True, memory_limit=budget / 2**30)
    dpo, _ = auto_fit(TrainConfig(batch_size=64, preference=PreferenceConfig(method="dpo"), **common), base)
    assert 0 < dpo.batch_size < sft and dpo.batch_size == suggest_fit(
        str(model), lora, memory_bytes=budget, max_seq_length=512, method="dpo").batch_size
    grpo, line = auto_fit(TrainConfig(batch_size=3, preference=PreferenceConfig(method="grpo"), **common), base)
    assert grpo.batch_size == 3 and "--batch-size 3" in line


def test_guard_stops_grpo_and_the_hint_resumes(tmp_path):
    """--method grpo: the guard reads one group per prompt (group_size x prompt + completions), stops with a
    checkpoint and a hint that lowers what a group holds (--grad-checkpoint; a smaller batch would not)."""
    model = tiny.make_model(tmp_path / "model", "llama")
    # groups of 8 x (~70-token prompt + 16): well above the 2 MiB limit, as the SFT test's first step is
    data = tiny.write_data(tmp_path / "data", [{"prompt": p * 30, "answer": "1"} for p in ("hi", "yo", "ok", "go")])
    out = tmp_path / "run"
    args = ["train", "--model", model, "--data", data, "--adapter-path", out, "--method", "grpo", "--reward",
            "length", "--group-size", 8, "--max-completion-length", 16, "--iters", 4, "--batch-size", 2,
            "--rank", 4, "--save-every", 100, "--report-every", 100]
    res = tiny.run_cli(*args, "--memory-limit", 2 / 1024)  # 2 MiB: below the first step's peak
    assert res.exit_code == 1 and "Traceback" not in res.output
    error = res.output.strip().splitlines()[-1]
    assert error.startswith("Error: memory guard at step 1: the peak memory") and "--memory-limit 2 MiB" in error
    assert (out / "checkpoints" / "step-00000001").is_dir()
    hint = re.search(r"resume with less memory: (mlxlora train .*)$", error).group(1)
    assert hint == f"mlxlora train --resume {out} --grad-checkpoint"
    res = tiny.run_cli(*hint.split()[1:], "--memory-limit", 64)
    assert res.exit_code == 0, res.output
    record = json.loads((out / "mlxlora.json").read_text())
    assert record["run_record"]["steps"] == 4 and record["train_config"]["grad_checkpoint"] is True
