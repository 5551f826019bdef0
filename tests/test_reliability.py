"""Reliability: base fingerprints, best checkpoint / early stop, memory warning, crashes and a full disk."""

import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load_file

from mlxlora import LoraConfig, TrainConfig
from mlxlora.adapters import load_adapter
from mlxlora.train.checkpoint import latest_checkpoint, list_checkpoints
from mlxlora.errors import AdapterError
from mlxlora.inference import load_with_adapter
from mlxlora.models import load_base
from mlxlora.train import Trainer, train

import tiny

ROWS = [{"prompt": f"Say {w}.", "completion": f"{w} {w} {w}!"} for w in
        ["apple", "river", "stone", "cloud", "ember", "frost", "grain", "honey"]]


@pytest.fixture
def data_dir(tmp_path):
    return tiny.write_data(tmp_path / "data", ROWS, ROWS[:2])


@pytest.fixture
def model_dir(tmp_path):
    return tiny.make_model(tmp_path / "model", "llama")


def _cfg(model_dir, data_dir, out, **kw):
    base = dict(model=str(model_dir), data=str(data_dir), adapter_path=str(out), iters=12, batch_size=2,
                lr=3e-3, val_every=100, save_every=2, report_every=1, seed=3,
                lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    base.update(kw)
    return TrainConfig(**base)


def _quiet():
    return Console(file=io.StringIO(), width=200)


def _same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert np.array_equal(x[k], y[k]), k


# ------------------------------------------------------------------ 1. base fingerprints

def test_adapter_on_another_base_is_refused_unless_ignored(model_dir, data_dir, tmp_path):
    out = tmp_path / "adapter"
    train(_cfg(model_dir, data_dir, out, iters=2), console=_quiet())
    rec = json.loads((out / "mlxlora.json").read_text())["run_record"]
    assert rec["base_fingerprint"] == load_base(str(model_dir)).info["fingerprint"]
    assert rec["base_shapes"]["model.layers.*.mlp.up_proj.weight"] == [[128, 64], 2]
    load_with_adapter(str(model_dir), str(out))  # same base: fine

    # A base whose MLP is wider: the adapter's q/k/v/o tensors would even fit, the base is still another one.
    wide = tiny.make_model(tmp_path / "wide", "llama", intermediate_size=96)
    with pytest.raises(AdapterError) as e:
        load_with_adapter(str(wide), str(out))
    msg = str(e.value)
    assert "\n" not in msg and "--ignore-base-mismatch" in msg
    assert "model.layers.*.mlp.up_proj.weight (128, 64) x2 vs (96, 64) x2" in msg
    assert "model.layers.*.mlp.down_proj.weight (64, 128) x2 vs (64, 96) x2" in msg
    assert "self_attn" not in msg  # only what differs
    # Overriding reaches the tensor check, which still lists every mis-shaped tensor (per block: up.b, gate.b, down.a).
    with pytest.raises(AdapterError, match=r"does not fit this base model \(6 problem\(s\)\)"):
        load_with_adapter(str(wide), str(out), ignore_base_mismatch=True)

    with pytest.raises(AdapterError, match=r"quantization not quantized vs 4-bit \(group size 32\)"):
        load_with_adapter(str(model_dir), str(out), quantize=4, group_size=32)
    qwen = tiny.make_model(tmp_path / "qwen", "qwen2")
    with pytest.raises(AdapterError, match="model_type llama vs qwen2"):
        load_with_adapter(str(qwen), str(out))
    # Without base_info (a caller that does not ask) nothing is checked.
    assert load_adapter(load_base(str(model_dir)).model, out) is not None


def test_cli_ignore_base_mismatch_on_generate_eval_and_resume(model_dir, data_dir, tmp_path):
    from click.testing import CliRunner

    from mlxlora.cli import cli

    out = tmp_path / "adapter"
    train(_cfg(model_dir, data_dir, out, iters=4, save_every=2), console=_quiet())
    other = tiny.make_model(tmp_path / "other", "llama", quantize=8, group_size=32)
    r = CliRunner()
    gen = ["generate", "--model", str(other), "--adapter", str(out), "--prompt", "hi", "--max-tokens", "2"]
    res = r.invoke(cli, gen)
    assert res.exit_code == 1 and "Error:" in res.output and "quantization not quantized vs 8-bit" in res.output
    assert r.invoke(cli, gen + ["--ignore-base-mismatch"]).exit_code == 0
    ev = ["eval", "--model", str(other), "--adapter", str(out), "--data", str(data_dir), "--split", "valid"]
    assert r.invoke(cli, ev).exit_code == 1
    res = r.invoke(cli, ev + ["--ignore-base-mismatch"])
    assert res.exit_code == 0 and "perplexity" in res.output
    tr = ["train", "--model", str(other), "--data", str(data_dir), "--adapter-path", str(out), "--iters", "6",
          "--batch-size", "2", "--rank", "4", "--alpha", "8", "--target", "all-linear", "--resume", str(out)]
    res = r.invoke(cli, tr)
    assert res.exit_code == 1 and "fingerprint" in res.output and "--ignore-base-mismatch" in res.output
    res = r.invoke(cli, tr + ["--ignore-base-mismatch"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "mlxlora.json").read_text())["run_record"]["steps"] == 6


# ------------------------------------------------------------------ 2. best checkpoint, early stop

def test_save_best_survives_pruning_and_early_stop_restores_it(model_dir, data_dir, tmp_path):
    # lr high enough that validation loss first falls, then rises (the tiny model overfits 8 rows).
    out = tmp_path / "adapter"
    cfg = _cfg(model_dir, data_dir, out, iters=40, lr=3e-2, val_every=2, save_every=2, keep_checkpoints=1,
               save_best=True, early_stop=2, schedule="constant", clip_grad=None)
    console = _quiet()
    res = train(cfg, console=console)
    log = json.loads((out / "mlxlora.json").read_text())["run_record"]
    vals = [v for s, v in log["val_log"] if s > 0]
    best_step, best_val = min(((s, v) for s, v in log["val_log"] if s > 0), key=lambda t: t[1])
    assert log["early_stopped_at"] == res.steps < 40
    # stopped exactly 2 validations after the best one, and those two were no better
    assert res.steps == best_step + 2 * 2 and min(vals[-2:]) >= best_val
    assert log["best_step"] == best_step and log["best_val_loss"] == best_val
    ckpts = out / "checkpoints"
    assert (ckpts / "best").read_text() == f"step-{best_step:08d}"
    names = [p.name for p in list_checkpoints(ckpts)]
    assert names == [f"step-{best_step:08d}", f"step-{res.steps:08d}"]  # keep 1 + the best
    _same_tensors(out, ckpts / f"step-{best_step:08d}")  # the final adapter is the best one
    assert res.val_loss == best_val
    text = console.file.getvalue()
    assert f"early stop at step {res.steps}" in text and f"the final adapter is the best checkpoint step-{best_step:08d}" in text


def test_early_stop_without_save_best_keeps_last_and_needs_valid(model_dir, data_dir, tmp_path):
    from mlxlora.errors import ConfigError

    (data_dir / "valid.jsonl").rename(tmp_path / "valid.jsonl")
    with pytest.raises(ConfigError, match="--save-best needs validation data"):
        Trainer(_cfg(model_dir, data_dir, tmp_path / "x", save_best=True), console=_quiet())
    with pytest.raises(ConfigError, match="--early-stop must be a positive"):
        _cfg(model_dir, data_dir, tmp_path / "x", early_stop=0)


# ------------------------------------------------------------------ 3. memory warning

def test_memory_warning_when_plan_exceeds_memory(model_dir, data_dir, tmp_path, monkeypatch):
    import mlxlora.plan.budget as plan

    monkeypatch.setattr(plan, "machine_memory", lambda: (1_000_000, "test budget"))
    console = _quiet()
    Trainer(_cfg(model_dir, data_dir, tmp_path / "a"), console=console)
    text = " ".join(console.file.getvalue().split())
    assert "warning: predicted peak memory" in text and "(test budget)" in text
    for flag in ("--grad-checkpoint", "--batch-size", "--max-seq-length", "--quantize 4"):
        assert flag in text, flag

    from dataclasses import replace
    from types import SimpleNamespace

    from mlxlora.config import PreferenceConfig
    from mlxlora.train.memory import memory_warning

    grpo = replace(_cfg(model_dir, data_dir, tmp_path / "g"), preference=PreferenceConfig(method="grpo"))
    base = SimpleNamespace(path=model_dir, config={})
    text = memory_warning(grpo, base, 16)  # GRPO: what lowers one group's peak, not the batch of prompts
    assert "--group-size" in text and "--max-completion-length" in text and "--batch-size" not in text

    monkeypatch.setattr(plan, "machine_memory", lambda: (10**12, "test budget"))  # fits: silent
    console = _quiet()
    Trainer(_cfg(model_dir, data_dir, tmp_path / "b"), console=console)
    assert "predicted peak memory" not in console.file.getvalue()

    def broken(*a, **k):
        raise KeyError("unknown architecture")

    monkeypatch.setattr(plan, "plan_training", broken)  # the planner failing never stops training
    console = _quiet()
    res = train(_cfg(model_dir, data_dir, tmp_path / "c", iters=2), console=console)
    assert res.steps == 2 and "predicted peak memory" not in console.file.getvalue()


# ------------------------------------------------------------------ 5. disk full

def test_disk_full_during_checkpoint_is_one_line_and_keeps_earlier(model_dir, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    real = mx.save_safetensors

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fill_disk(st):
        if st.step == 4:  # checkpoints 2 and 4 are written; the next save meets a full disk
            monkeypatch.setattr(mx, "save_safetensors", full)

    with pytest.raises(AdapterError) as e:
        train(_cfg(model_dir, data_dir, out), console=_quiet(), callbacks=[fill_disk])
    msg = str(e.value)
    assert "\n" not in msg and "step-00000006" in msg and "No space left on device" in msg
    assert "earlier checkpoints are intact" in msg
    monkeypatch.setattr(mx, "save_safetensors", real)
    ckpts = out / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000002", "step-00000004"]
    assert not [p for p in ckpts.iterdir() if ".tmp-" in p.name]
    assert latest_checkpoint(out).name == "step-00000004"
    # ...and the intact checkpoint resumes to the same result as a run that never failed.
    train(_cfg(model_dir, data_dir, out), resume=str(out), console=_quiet())
    train(_cfg(model_dir, data_dir, tmp_path / "ref"), console=_quiet())
    _same_tensors(out, tmp_path / "ref")


# ------------------------------------------------------------------ 4. SIGKILL at random moments

def _spawn(args, env):
    return subprocess.Popen([sys.executable, "-m", "mlxlora", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after_line(proc, text):
    for line in proc.stderr:
        if text in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _kill_inside_save(proc, ckpts: Path, timeout=60.0):
    """SIGKILL as soon as this process's checkpoint temp folder appears; True if the kill left it half-written."""
    mine = f"-{proc.pid}"  # save_checkpoint writes into .tmp-step-XXXXXXXX-<pid> (earlier runs' leftovers differ)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if ckpts.is_dir() and any(n.startswith(".tmp-step-") and n.endswith(mine) for n in os.listdir(ckpts)):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    return any(n.startswith(".tmp-step-") and n.endswith(mine) for n in os.listdir(ckpts))


def test_sigkill_at_any_moment_then_resume_is_bit_exact(model_dir, data_dir, tmp_path):
    out = tmp_path / "adapter"
    args = ["--model", str(model_dir), "--data", str(data_dir), "--adapter-path", str(out), "--iters", "12",
            "--batch-size", "2", "--save-every", "2", "--report-every", "1", "--val-every", "100", "--rank", "4",
            "--alpha", "8", "--target", "all-linear", "--seed", "3", "--lr", "3e-3"]
    # The children use this process's BLAS (no re-exec), so the in-process reference is bit-comparable.
    env = dict(os.environ, MLXLORA_BLAS_ACTIVE="1")
    ckpts = out / "checkpoints"
    rng = random.Random(7)
    resume = args + ["--resume", str(out)]

    # kill 1: mid-training, after the 3rd progress line (checkpoint 2 is complete)
    _kill_after_line(_spawn(args, env), "step 3/12")
    assert latest_checkpoint(out).name == "step-00000002"
    # kill 2: the moment a checkpoint's temp folder appears (one more try if the kill came after the rename)
    for _ in range(2):
        landed = _kill_inside_save(_spawn(resume, env), ckpts)
        names = [p.name for p in list_checkpoints(ckpts)]
        assert latest_checkpoint(out).name == names[-1]  # a complete one, never the temp folder
        assert (latest_checkpoint(out) / "optimizer.safetensors").is_file()
        if landed:
            break
    assert landed
    # kill 3: at a random time 0.5-3 s after start (while loading or training)
    p = _spawn(resume, env)
    time.sleep(rng.uniform(0.5, 3.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    # the last resume always finishes
    fin = subprocess.run([sys.executable, "-m", "mlxlora", "train", *resume], env=env, capture_output=True,
                         text=True, timeout=120)
    assert fin.returncode == 0, fin.stderr[-2000:]
    assert "resuming from" in fin.stderr
    assert not [n for n in os.listdir(ckpts) if ".tmp-" in n]  # the killed runs' temp folders are gone
    ref = tmp_path / "ref"
    train(_cfg(model_dir, data_dir, ref, lr=3e-3), console=_quiet())
    _same_tensors(out, ref)
    rec = json.loads((out / "mlxlora.json").read_text())["run_record"]
    assert rec["steps"] == 12
    assert rec["final_train_loss"] == json.loads((ref / "mlxlora.json").read_text())["run_record"]["final_train_loss"]
