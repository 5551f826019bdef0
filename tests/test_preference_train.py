"""Preference training on tiny models: it learns, the reference is the base (or the --init-adapter) with no
second model, accumulation is exact, resume is bit-exact, non-finite steps are skipped."""

import json
import math
import os
import signal

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from mlxlora import LoraConfig, TrainConfig
from mlxlora.adapters import load_adapter
from mlxlora.config import PreferenceConfig
from mlxlora.data import load_preference_split
from mlxlora.data.batches import pad_id
from mlxlora.lora.surgery import adapter_parameters, adapters_off, get_lora_model
from mlxlora.models import load_base
from mlxlora.train import TrainingStopped, train
from mlxlora.train import preference as P
from mlxlora.train.step import Stepper, make_optimizer

import tiny

WORDS = ["apple", "river", "stone", "cloud", "ember", "frost", "grain", "honey", "ivory", "jade", "kelp", "lunar"]
PAIRS = [{"prompt": f"Say {w}.", "chosen": f"{w} {w}!", "rejected": f"no {w[::-1]}"} for w in WORDS]


@pytest.fixture
def model_dir(tmp_path):
    return tiny.make_model(tmp_path / "model", "llama")


@pytest.fixture
def data_dir(tmp_path):
    return tiny.write_data(tmp_path / "data", PAIRS, PAIRS[:4])


def _cfg(model_dir, data_dir, out, method="dpo", **kw):
    pref = kw.pop("preference", PreferenceConfig(method=method, beta=0.5))
    base = dict(model=str(model_dir), data=str(data_dir), adapter_path=str(out), iters=12, batch_size=4,
                lr=3e-3, val_every=6, save_every=4, report_every=4, seed=3, preference=pref,
                lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    base.update(kw)
    return TrainConfig(**base)


def test_dpo_learns_and_the_record_names_the_method(model_dir, data_dir, tmp_path):
    out = tmp_path / "a"
    res = train(_cfg(model_dir, data_dir, out, iters=16))
    rec = json.loads((out / "mlxlora.json").read_text())
    run = rec["run_record"]
    # step 0: the policy IS the reference (lora_b = 0), so every pair's DPO loss is log 2
    assert run["val_log"][0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert res.val_loss < 0.6 * math.log(2), run["val_log"]
    assert run["method"] == {"method": "dpo", "beta": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.0}
    assert run["method_metrics"]["accuracy"] == 1.0 and run["method_metrics"]["margin"] > 0
    start, end = run["val_method_metrics_start"], run["val_method_metrics"]
    assert start["accuracy"] == 0.0 and start["margin"] == 0.0  # policy = reference: every reward is 0
    assert end["accuracy"] == 1.0 and end["margin"] > 0
    assert rec["train_config"]["preference"]["method"] == "dpo"
    # an ordinary adapter: it loads onto a fresh base like any other
    model = load_adapter(load_base(str(model_dir)).model, out)
    assert any(float(mx.abs(v).max()) > 0 for k, v in adapter_parameters(model).items() if k.endswith("lora_b"))


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_other_methods_lower_their_loss(model_dir, tmp_path, method):
    rows = PAIRS if method != "kto" else [
        {"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
        for i, r in enumerate(PAIRS)]
    data = tiny.write_data(tmp_path / "d", rows, rows[:4])
    res = train(_cfg(model_dir, data, tmp_path / "a", method=method, iters=10, val_every=100))
    run = json.loads((tmp_path / "a" / "mlxlora.json").read_text())["run_record"]
    assert res.val_loss < run["val_log"][0][1], run["val_log"]
    assert run["method"]["method"] == method


def test_adapters_off_is_the_base_and_no_weights_are_copied(model_dir, tmp_path):
    base = load_base(str(model_dir))
    ids = mx.array([[5, 60, 61, 62, 70, 80]])
    plain = base.model(ids)
    get_lora_model(base.model, LoraConfig(r=4, target_modules="all-linear"))
    tiny.randomize_adapters(base.model)
    adapted = base.model(ids)
    assert float(mx.abs(adapted - plain).max()) > 1e-3
    with adapters_off(base.model):
        assert float(mx.abs(base.model(ids) - plain).max()) == 0.0
    assert float(mx.abs(base.model(ids) - adapted).max()) == 0.0  # the adapter is back


def test_init_adapter_is_the_frozen_reference(model_dir, data_dir, tmp_path):
    sft = tiny.make_adapter(model_dir, tmp_path / "sft", LoraConfig(r=4, target_modules="all-linear"), seed=5)
    base = load_base(str(model_dir))
    split = load_preference_split(data_dir / "train.jsonl", base.tokenizer, 512)
    load_adapter(base.model, sft)
    init = dict(adapter_parameters(base.model))
    expected = P.reference_logps(base.model, split, 4, 8, pad_id(base.tokenizer), tensors=init)
    tiny.randomize_adapters(base.model, seed=9)  # the policy moves on ...
    moved = dict(adapter_parameters(base.model))
    again = P.reference_logps(base.model, split, 4, 8, pad_id(base.tokenizer), tensors=init)
    assert np.array_equal(expected, again)  # ... the reference does not
    assert all(mx.array_equal(moved[k], v) for k, v in adapter_parameters(base.model).items())  # swapped back
    bare = P.reference_logps(base.model, split, 4, 8, pad_id(base.tokenizer))
    assert np.abs(expected - bare).max() > 1e-2  # and it is not the bare base
    out = tmp_path / "dpo"
    train(_cfg(model_dir, data_dir, out, iters=4, init_adapter=str(sft)))
    run = json.loads((out / "mlxlora.json").read_text())["run_record"]
    assert run["val_log"][0][1] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
    a, b = load_file(str(sft / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)


def test_grad_accumulation_equals_one_big_batch(model_dir, data_dir):
    base = load_base(str(model_dir))
    cfg = _cfg(model_dir, data_dir, "unused", batch_size=4)
    split = load_preference_split(data_dir / "train.jsonl", base.tokenizer, 512)
    pid = pad_id(base.tokenizer)

    def run(groups):
        model = load_base(str(model_dir)).model
        mx.random.seed(0)
        get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
        tiny.randomize_adapters(model)
        ref = P.reference_logps(model, split, 4, 8, pid)
        opt = make_optimizer(TrainConfig(lr=1e-2), 10)
        opt.init(model.trainable_parameters())
        stepper = Stepper(model, opt, clip_grad=None, loss_fn=P.loss_fn(cfg))
        loss, n, _ = stepper.step([P.collate_items(split, g, 8, pid, ref) for g in groups])
        mx.eval(loss)
        return adapter_parameters(model), loss.item(), n.item()

    one, l1, n1 = run([[0, 1, 2, 3]])
    two, l2, n2 = run([[0, 1], [2, 3]])
    assert (n1, n2) == (4, 4) and l1 == pytest.approx(l2, rel=1e-5)
    for k in one:
        np.testing.assert_allclose(np.array(one[k]), np.array(two[k]), atol=2e-6, err_msg=k)


def test_sigint_and_resume_are_bit_exact_for_dpo(model_dir, data_dir, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    full = tmp_path / "full"
    train(_cfg(model_dir, data_dir, full, lora=lora))
    part = tmp_path / "part"

    def interrupt(st):
        if st.step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingStopped, match="--resume"):
        train(_cfg(model_dir, data_dir, part, lora=lora), callbacks=[interrupt])
    train(_cfg(model_dir, data_dir, part, lora=lora), resume=str(part))
    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    la = json.loads((full / "mlxlora.json").read_text())["run_record"]
    lb = json.loads((part / "mlxlora.json").read_text())["run_record"]
    assert la["final_train_loss"] == lb["final_train_loss"] and la["method_metrics"] == lb["method_metrics"]


def test_nonfinite_dpo_steps_are_skipped_then_stop(model_dir, data_dir, tmp_path):
    base = load_base(str(model_dir))
    base.model.model.norm.weight = base.model.model.norm.weight * float("nan")
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        train(_cfg(model_dir, data_dir, tmp_path / "a", max_nonfinite=3), base=base)
    for k, v in adapter_parameters(base.model).items():
        if k.endswith("lora_b"):
            assert float(mx.abs(v).max()) == 0.0, k
