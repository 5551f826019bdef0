"""The training loop on tiny in-process models: it learns, accumulates exactly, checkpoints and resumes."""

import json
import os
import signal

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from mlxlora import LoraConfig, TrainConfig
from mlxlora.models import load_base
from mlxlora.lora.surgery import adapter_parameters as adapter_state
from mlxlora.train.step import Stepper, make_optimizer
from mlxlora.lora.surgery import get_lora_model  # noqa: E402
from mlxlora.train import TrainingStopped, train

import tiny

ROWS = [{"prompt": f"Say {w}.", "completion": f"{w} {w} {w}!"} for w in
        ["apple", "river", "stone", "cloud", "ember", "frost", "grain", "honey", "ivory", "jade", "kelp", "lunar"]]


@pytest.fixture
def data_dir(tmp_path):
    return tiny.write_data(tmp_path / "data", ROWS, ROWS[:4])


@pytest.fixture
def model_dir(tmp_path):
    return tiny.make_model(tmp_path / "model", "llama")


def _cfg(model_dir, data_dir, out, **kw):
    base = dict(model=str(model_dir), data=str(data_dir), adapter_path=str(out), iters=12, batch_size=4,
                lr=3e-3, val_every=6, save_every=4, report_every=4, seed=3,
                lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    base.update(kw)
    return TrainConfig(**base)


def test_overfits_small_dataset_and_writes_folder(model_dir, data_dir, tmp_path):
    out = tmp_path / "adapter"
    res = train(_cfg(model_dir, data_dir, out, iters=60, save_every=30, val_every=30))
    log = json.loads((out / "mlxlora.json").read_text())["run_record"]
    first, last = log["val_log"][0][1], log["val_log"][-1][1]
    # The tiny random model starts near log(vocab)=5.6; 60 steps must cut validation loss at least in half.
    assert first > 4.0 and last < 0.5 * first, (first, last)
    assert res.val_loss == pytest.approx(last)
    for name in ("adapter_config.json", "adapter_model.safetensors", "mlxlora.json", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-00000030" / "optimizer.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "step-00000030"
    rec = json.loads((out / "mlxlora.json").read_text())
    assert rec["run_record"]["data"]["train"]["samples"] == len(ROWS)
    assert len(rec["run_record"]["data"]["train"]["sha256"]) == 64
    assert rec["train_config"]["lora"]["r"] == 4


def test_refuses_existing_folder_without_force(model_dir, data_dir, tmp_path):
    from mlxlora.errors import AdapterError

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match="--force"):
        train(_cfg(model_dir, data_dir, out))
    assert (out / "keep.txt").read_text() == "mine"


def test_grad_accumulation_equals_one_big_batch(model_dir):
    base = load_base(str(model_dir))
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(3, 200, (4, 16)), dtype=mx.int32)
    y = mx.array(rng.integers(3, 200, (4, 16)), dtype=mx.int32)
    m = mx.array((rng.random((4, 16)) > 0.3).astype(np.float32))

    def run(batches):
        model = load_base(str(model_dir)).model
        mx.random.seed(0)
        get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
        opt = make_optimizer(TrainConfig(lr=1e-2), 10)
        opt.init(model.trainable_parameters())
        Stepper(model, opt, clip_grad=None).step(batches)
        return adapter_state(model)

    one = run([(x, y, m)])
    two = run([(x[:2], y[:2], m[:2]), (x[2:], y[2:], m[2:])])
    assert one.keys() == two.keys() and base is not None
    for k in one:
        np.testing.assert_allclose(np.array(one[k]), np.array(two[k]), atol=2e-6, err_msg=k)


def test_nonfinite_steps_are_skipped_then_stop(model_dir, data_dir, tmp_path):
    base = load_base(str(model_dir))
    base.model.model.norm.weight = base.model.model.norm.weight * float("nan")
    out = tmp_path / "adapter"
    mx.random.seed(3)
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        train(_cfg(model_dir, data_dir, out, max_nonfinite=3), base=base)
    # the update was undone every time: lora_b is still all zeros
    for k, v in adapter_state(base.model).items():
        if k.endswith("lora_b"):
            assert float(mx.abs(v).max()) == 0.0, k


def test_sigterm_in_a_single_process_run_checkpoints_like_ctrl_c(model_dir, data_dir, tmp_path):
    # `kill PID` or a job scheduler's stop: the run finishes its step, checkpoints and says how to resume.
    out, before = tmp_path / "run", signal.getsignal(signal.SIGTERM)

    def terminate(st):
        if st.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped, match=r"interrupted \(SIGTERM\) at step 3/.*--resume"):
        train(_cfg(model_dir, data_dir, out), callbacks=[terminate])
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-00000003"]
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handler is gone
    train(_cfg(model_dir, data_dir, out), resume=str(out))
    assert json.loads((out / "mlxlora.json").read_text())["run_record"]["resumed_from"] == str(out)


def test_sigint_saves_checkpoint_and_resume_is_bit_exact(model_dir, data_dir, tmp_path):
    # Dropout on, so the resumed run must also draw the same dropout masks.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    full = tmp_path / "full"
    train(_cfg(model_dir, data_dir, full, lora=lora))

    part = tmp_path / "part"

    def interrupt(st):
        if st.step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingStopped, match="--resume"):
        train(_cfg(model_dir, data_dir, part, lora=lora), callbacks=[interrupt])
    assert (part / "checkpoints" / "step-00000006").is_dir()
    train(_cfg(model_dir, data_dir, part, lora=lora), resume=str(part))

    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    la = json.loads((full / "mlxlora.json").read_text())["run_record"]
    lb = json.loads((part / "mlxlora.json").read_text())["run_record"]
    assert la["final_train_loss"] == lb["final_train_loss"]
    assert lb["resumed_from"] == str(part)
