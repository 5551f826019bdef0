"""Values that would poison a run are refused before any work: NaN / infinite / out-of-range floats, group
sizes the backend lacks, NaN adapters, configs that disagree with their tensors, another base of the same
shapes, unknown chat roles, odd files; chat templates are recorded and reused; --resume warns on drift."""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny
from mlxlora import LoraConfig

ROWS = [{"prompt": f"Say {w}.", "completion": f"{w} {w}!"} for w in ["apple", "river", "stone", "cloud"]]
CHATS = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
         for w in ["apple", "river", "stone", "cloud"]]
TRAIN = ["--iters", 2, "--batch-size", 2, "--rank", 2, "--alpha", 4, "--val-every", 100]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    model = tiny.make_model(root / "model", "llama")
    data = tiny.write_data(root / "data", ROWS, ROWS[:2])
    res = tiny.run_cli("train", "--model", model, "--data", data, "--adapter-path", root / "trained", *TRAIN)
    assert res.exit_code == 0, res.output
    return root, model, data, root / "trained"


# ------------------------------------------------------------------ 1. float flags

BAD_FLOATS = [
    ("train", ["--lr", "nan"], "--lr"), ("train", ["--lr", "inf"], "--lr"), ("train", ["--weight-decay", "nan"], "--weight-decay"),
    ("train", ["--weight-decay", "-1"], "--weight-decay"), ("train", ["--alpha", "inf"], "lora_alpha"),
    ("train", ["--clip-grad", "nan"], "--clip-grad"), ("train", ["--dropout", "nan"], "--dropout"),
    ("train", ["--q-group-size", "7", "--quantize", "4"], "--q-group-size"),
    ("generate", ["--temp", "nan"], "--temp"), ("generate", ["--top-p", "nan"], "--top-p"),
    ("chat", ["--temp", "inf"], "--temp"), ("fuse", ["--size-budget", "inf"], "--size-budget"),
    ("plan", ["--memory-gb", "nan"], "--memory-gb"), ("plan", ["--memory-gb", "-1"], "--memory-gb"),
    ("serve", ["--request-timeout", "nan"], "--request-timeout"),
]


@pytest.mark.parametrize("command,flags,needle", BAD_FLOATS, ids=[f"{c} {' '.join(f)}" for c, f, _ in BAD_FLOATS])
def test_non_finite_and_out_of_range_floats_are_refused_before_any_work(env, command, flags, needle):
    root, model, data, adapter = env
    out = root / "never"
    args = {"train": ["train", "--model", model, "--data", data, "--adapter-path", out, *TRAIN],
            "generate": ["generate", "--model", model, "--prompt", "hi"],
            "chat": ["chat", "--model", model], "serve": ["serve", "--model", model, "--port", 0],
            "fuse": ["fuse", "--model", model, "--adapter", adapter, "--out", out],
            "plan": ["plan", "--model", model]}[command]
    tiny.one_line_error(tiny.run_cli(*args, *flags), needle)
    assert not out.exists()


def test_nan_in_a_config_file_is_refused(env, tmp_path):
    root, model, data, adapter = env
    for text in ("lr: .nan\n", "lr: nan\n", "weight-decay: .inf\n"):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"model: {model}\ndata: {data}\n{text}")
        tiny.one_line_error(tiny.run_cli("train", "--config", cfg, "--adapter-path", tmp_path / "o"), "must be")
    assert not (tmp_path / "o").exists()


def test_a_group_size_no_layer_fits_is_refused(env, tmp_path):
    root, model, data, adapter = env
    # every linear input of the tiny model is 64 or 128 wide: 128 would quantize only down_proj...
    res = tiny.run_cli("convert", "--model", model, "--out", tmp_path / "q", "-q", 4, "--q-group-size", 7)
    assert res.exit_code == 2 and "'--q-group-size': '7' is not one of '32', '64', '128'" in res.output  # Click's choice
    assert not (tmp_path / "q").exists()
    small = tiny.make_model(tmp_path / "narrow", "llama", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            num_key_value_heads=1)
    # ...and on a 32/64-wide model nothing at all: an error, not an unquantized run recorded as 4-bit
    res = tiny.run_cli("train", "--model", small, "--data", data, "--adapter-path", tmp_path / "o", "--quantize", 4,
                       "--q-group-size", 128, *TRAIN)
    tiny.one_line_error(res, "--q-group-size 128", "nothing would be quantized")


# ------------------------------------------------------------------ 2. non-finite weights

def _poison(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = sorted(tensors)[0]
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, str(f))
    return dst


def test_an_adapter_holding_nan_is_refused_everywhere(env, tmp_path):
    root, model, data, adapter = env
    bad = _poison(adapter, tmp_path / "nan")
    for args in (["eval", "--model", model, "--adapter", bad, "--data", data],
                 ["generate", "--model", model, "--adapter", bad, "--prompt", "hi", "--max-tokens", 2],
                 ["fuse", "--model", model, "--adapter", bad, "--out", tmp_path / "f"],
                 ["export-adapter", bad, "--to", "mlx-lm", tmp_path / "m"],
                 ["export-adapter", bad, "--to", "peft", tmp_path / "p"],
                 ["export-adapter", bad, "--to", "gguf", tmp_path / "g.gguf", "--model", model],
                 ["export-model", "--model", model, "--adapter", bad, "--out", tmp_path / "h"]):
        tiny.one_line_error(tiny.run_cli(*args), "NaN or infinity")
    from mlxlora.commands.serve import load_engine
    from mlxlora.errors import AdapterError

    with pytest.raises(AdapterError, match="NaN or infinity"):
        load_engine(str(model), {"bad": str(bad)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


def test_training_that_ends_with_nan_weights_saves_nothing(env, tmp_path):
    from mlxlora.errors import TrainingStopped
    from mlxlora.lora.surgery import adapter_layers
    from mlxlora.train import Trainer
    from mlxlora.config import TrainConfig

    root, model, data, adapter = env
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(model), data=str(data), adapter_path=str(out), iters=2, batch_size=2,
                      val_every=100, lora=LoraConfig(r=2, lora_alpha=4))
    trainer = Trainer(cfg)

    def poison(st):
        if st.step == 2:
            layer = adapter_layers(trainer.base.model)[0][1]
            layer.lora_b = mx.full(layer.lora_b.shape, float("nan"))

    trainer.callbacks.append(poison)
    with pytest.raises(TrainingStopped, match="holds NaN or infinity"):
        trainer.run()
    assert not (out / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------ 3. config vs tensors, the base's weights

def test_config_and_tensors_that_disagree_are_refused(env, tmp_path):
    root, model, data, adapter = env
    peft = tmp_path / "peft"
    peft.mkdir()
    for n in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter / n, peft / n)
    cfg = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    tiny.one_line_error(tiny.run_cli("eval", "--model", model, "--adapter", peft, "--data", data),
                        "adapter_config.json gives rank 8", "holds rank 2 tensors")
    ours = tmp_path / "ours"
    shutil.copytree(adapter, ours)
    (ours / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4, "lora_alpha": 64}))
    tiny.one_line_error(tiny.run_cli("eval", "--model", model, "--adapter", ours, "--data", data),
                        "adapter_config.json and mlxlora.json disagree", "r 4 vs 2")


def test_another_base_with_the_same_shapes_fails_the_weight_check(env, tmp_path):
    root, model, data, adapter = env
    other = tiny.make_model(tmp_path / "other", "llama", seed=1)  # same architecture and shapes, other weights
    rec = json.loads((adapter / "mlxlora.json").read_text())["run_record"]
    assert rec["base_content"] and rec["base_fingerprint"]
    gen = ["generate", "--model", other, "--adapter", adapter, "--prompt", "hi", "--max-tokens", 2]
    tiny.one_line_error(tiny.run_cli(*gen), "the shapes match but the weight check failed", "--ignore-base-mismatch")
    assert tiny.run_cli(*gen, "--ignore-base-mismatch").exit_code == 0
    fuse = ["fuse", "--model", other, "--adapter", adapter, "--out", tmp_path / "f"]
    tiny.one_line_error(tiny.run_cli(*fuse), "weight check failed")
    assert tiny.run_cli(*fuse, "--ignore-base-mismatch").exit_code == 0
    assert tiny.run_cli("generate", "--model", model, "--adapter", adapter, "--prompt", "hi",
                        "--max-tokens", 2).exit_code == 0  # its own base (loaded as float32 on CPU) passes


def test_many_adapter_commands_check_the_base_too(env, tmp_path):
    """eval's table, eval --generate / --tasks, chat and serve attach adapters by name on one base
    (MultiAdapterModel): the same weight check as a single --adapter, the same --ignore-base-mismatch."""
    from mlxlora.commands.serve import load_engine
    from mlxlora.errors import AdapterError

    root, model, data, adapter = env
    other = tiny.make_model(tmp_path / "other", "llama", seed=1)
    named = f"mine={adapter}"
    runs = {
        "eval table": ["eval", "--model", other, "--adapter", named, "--data", data, "--split", "valid"],
        "eval --generate": ["eval", "--generate", "--model", other, "--adapter", named, "--data", data, "--split", "valid",
                            "--max-tokens", 2, "--out", tmp_path / "report"],
    }
    for what, args in runs.items():
        tiny.one_line_error(tiny.run_cli(*args), "the shapes match but the weight check failed", "--ignore-base-mismatch")
        res = tiny.run_cli(*args, "--ignore-base-mismatch")
        assert res.exit_code == 0, (what, res.output)
    with pytest.raises(AdapterError, match="weight check failed"):
        load_engine(str(other), {"mine": str(adapter)})  # serve and chat
    load_engine(str(other), {"mine": str(adapter)}, ignore_base_mismatch=True).close()
    load_engine(str(model), {"mine": str(adapter)}).close()  # its own base passes
    for command in ("chat", "serve"):
        tiny.one_line_error(tiny.run_cli(command, "--model", other, "--adapter", named), "weight check failed")


# ------------------------------------------------------------------ 4. chat data and odd files

def test_chat_rows_without_a_template_warn_and_generation_uses_the_recorded_one(env, tmp_path):
    from mlxlora.data import FALLBACK_CHAT_TEMPLATE, fallback_prompt
    from mlxlora.inference import load_with_adapter, render_prompt

    root, model, data, adapter = env
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    chats = tiny.write_data(tmp_path / "chats", CHATS)
    out = tmp_path / "out"
    res = tiny.run_cli("train", "--model", bare, "--data", chats, "--adapter-path", out, *TRAIN)
    assert res.exit_code == 0, res.output
    assert "has no chat template" in " ".join(res.output.split())
    rec = json.loads((out / "mlxlora.json").read_text())["chat_template"]
    assert rec == {"source": "fallback", "template": FALLBACK_CHAT_TEMPLATE}
    base = load_with_adapter(str(bare), str(out))
    assert render_prompt(base.tokenizer, "Say hi.", None, base.info["chat_template"]) == fallback_prompt("Say hi.")
    assert render_prompt(base.tokenizer, "Say hi.", None) == "Say hi."  # without the record: raw, as before
    ok = tiny.run_cli("train", "--model", model, "--data", chats, "--adapter-path", tmp_path / "t", *TRAIN)
    assert ok.exit_code == 0 and "no chat template" not in ok.output
    assert json.loads((tmp_path / "t" / "mlxlora.json").read_text())["chat_template"]["source"] == "tokenizer"


def test_unknown_roles_bom_fifo_and_link_loops_get_messages_that_say_what_is_wrong(env, tmp_path):
    root, model, data, adapter = env
    insp = lambda d: tiny.run_cli("data", "inspect", "--model", model, "--data", d, "-n", 1)  # noqa: E731
    bad_role = tiny.write_data(tmp_path / "role", [{"messages": [{"role": "narrator", "content": "x"},
                                                                {"role": "assistant", "content": "y"}]}])
    tiny.one_line_error(insp(bad_role), "train.jsonl:1", "unknown role 'narrator'")
    bom = tmp_path / "bom"
    bom.mkdir()
    (bom / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    res = insp(bom)
    assert res.exit_code == 0 and "4 samples" in res.output.replace("samples:", "samples"), res.output
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "train.jsonl")
    tiny.one_line_error(insp(fifo), "train.jsonl", "is a FIFO")
    tiny.one_line_error(tiny.run_cli("train", "--model", model, "--train-file", fifo / "train.jsonl",
                                     "--adapter-path", tmp_path / "o", *TRAIN), "--train-file", "is a FIFO")
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "train.jsonl").symlink_to(loop / "train.jsonl")
    tiny.one_line_error(insp(loop), "symbolic link loop")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").symlink_to(tmp_path / "gone.jsonl")
    tiny.one_line_error(insp(broken), "broken symbolic link")
    (tmp_path / "mloop").symlink_to(tmp_path / "mloop")
    tiny.one_line_error(tiny.run_cli("generate", "--model", tmp_path / "mloop", "--prompt", "hi"),
                        "--model", "symbolic link loop")
    tiny.one_line_error(tiny.run_cli("eval", "--model", model, "--adapter", tmp_path / "mloop", "--data", data),
                        "symbolic link loop")
    os.mkfifo(tmp_path / "cfg.yaml")
    tiny.one_line_error(tiny.run_cli("train", "--config", tmp_path / "cfg.yaml"), "--config", "is a FIFO")


# ------------------------------------------------------------------ 5. --resume

def test_resume_warns_when_data_or_schedule_changed(env, tmp_path):
    root, model, data, adapter = env
    d = tiny.write_data(tmp_path / "d", ROWS)
    out = tmp_path / "run"
    res = tiny.run_cli("train", "--model", model, "--data", d, "--adapter-path", out, "--iters", 4,
                       "--save-every", 2, "--batch-size", 2, "--rank", 2, "--val-every", 100)
    assert res.exit_code == 0, res.output
    same = tiny.run_cli("train", "--resume", out)  # nothing changed: no warning
    assert same.exit_code == 0 and "does not continue exactly" not in same.output
    with open(d / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "Say fog.", "completion": "fog!"}) + "\n")
    res = tiny.run_cli("train", "--resume", out, "--iters", 6)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "does not continue exactly" in text and "train data" in text and "changed" in text
    assert "--iters 4 -> 6" in text
    assert json.loads((out / "mlxlora.json").read_text())["run_record"]["steps"] == 6


def test_resume_drift_names_the_objective_settings_of_the_method_in_use():
    from dataclasses import asdict, replace

    from mlxlora.config import PreferenceConfig, TrainConfig
    from mlxlora.train.record import resume_drift

    was = TrainConfig(model="m", data="d", preference=PreferenceConfig(method="dpo", beta=0.1))
    record = {"train_config": asdict(was)}
    assert resume_drift(record, was, {}) == []
    now = replace(was, preference=replace(was.preference, beta=0.3))
    assert resume_drift(record, now, {}) == ["--beta 0.1 -> 0.3"]
    assert "--method dpo -> orpo" in resume_drift(record, replace(was, preference=PreferenceConfig(method="orpo")), {})
    sft = TrainConfig(model="m", data="d")  # SFT has no objective settings: a changed --beta is not drift
    assert resume_drift({"train_config": asdict(sft)}, replace(sft, preference=replace(sft.preference, beta=0.3)), {}) == []
