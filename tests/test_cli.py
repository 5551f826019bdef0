"""The CLI end to end (CliRunner) and its bad-input table: one-line errors, exit != 0, nothing overwritten."""

import json
import subprocess
import sys

import pytest


import tiny

ROWS = [{"prompt": f"Name {i}.", "completion": f"Item {i} is number {i}."} for i in range(10)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny.make_model(root / "model", "qwen2")
    data = root / "data"
    data.mkdir()
    for split, rows in (("train", ROWS), ("valid", ROWS[:3]), ("test", ROWS[3:6])):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, model, data


run = tiny.run_cli


one_line_error = tiny.one_line_error


def test_train_generate_eval(env):
    root, model, data = env
    out = root / "adapter"
    res = run("train", "--model", model, "--data", data, "--adapter-path", out, "--iters", 8,
              "--batch-size", 2, "--lr", 3e-3, "--rank", 4, "--target", "all-linear", "--val-every", 4)
    assert res.exit_code == 0, res.output
    for f in ("adapter_config.json", "adapter_model.safetensors", "mlxlora.json", "loss.png"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4

    gen = run("generate", "--model", model, "--adapter", out, "--prompt", "Name 3.", "--max-tokens", 5)
    assert gen.exit_code == 0, gen.output
    base_gen = run("generate", "--model", model, "--prompt", "Name 3.", "--max-tokens", 5)
    assert base_gen.exit_code == 0

    ev = run("eval", "--model", model, "--adapter", out, "--data", data)
    base_ev = run("eval", "--model", model, "--data", data)
    assert ev.exit_code == 0 and base_ev.exit_code == 0, ev.output
    loss = lambda r: float(r.output.split("loss ")[1].split()[0])  # noqa: E731
    assert loss(ev) < loss(base_ev)  # 8 steps of training lower the held-out loss

    insp = run("data", "inspect", "--model", model, "--data", data, "-n", 1)
    assert insp.exit_code == 0 and "truncated" in insp.output


def test_config_file_and_flag_override(env):
    root, model, data = env
    cfg = root / "cfg.yaml"
    cfg.write_text(f"model: {model}\ndata: {data}\nrank: 2\niters: 2\nbatch-size: 2\nlr: 1e-3\n")
    out = root / "from_cfg"
    res = run("train", "--config", cfg, "--rank", 3, "--adapter-path", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3


def _bad_jsonl(root, text, name):
    d = root / name
    d.mkdir(exist_ok=True)
    (d / "train.jsonl").write_text(text)
    return d


@pytest.mark.parametrize("case", ["malformed", "missing_keys", "empty", "unknown_key", "exists",
                                  "no_model", "zero_rank", "negative_lr", "too_long", "mixed"])
def test_bad_input_table(env, case):
    root, model, data = env
    out = root / f"out_{case}"
    args = ["train", "--model", model, "--data", data, "--adapter-path", out, "--iters", 1]
    needles = []
    if case == "malformed":
        d = _bad_jsonl(root, '{"text": "ok"}\n{"text": \n', case)
        args[4], needles = d, ["train.jsonl:2"]
    elif case == "missing_keys":
        d = _bad_jsonl(root, '{"question": "x"}\n', case)
        args[4], needles = d, ["train.jsonl:1"]
    elif case == "mixed":
        d = _bad_jsonl(root, '{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', case)
        args[4], needles = d, ["train.jsonl:2"]
    elif case == "empty":
        args[4], needles = _bad_jsonl(root, "", case), ["train.jsonl"]
    elif case == "too_long":
        args += ["--max-seq-length", 3]
        needles = ["--max-seq-length"]
    elif case == "unknown_key":
        cfg = root / "bad.yaml"
        cfg.write_text("rank: 4\nlearning_rate: 0.1\n")
        args += ["--config", cfg]
        needles = ["bad.yaml", "learning_rate"]
    elif case == "exists":
        out.mkdir()
        (out / "adapter_model.safetensors").write_bytes(b"precious")
        needles = ["--force"]
    elif case == "no_model":
        args[2], needles = root / "nope", ["nope", "does not exist"]
    elif case == "zero_rank":
        args += ["--rank", 0]
        needles = ["r "]
    elif case == "negative_lr":
        args += ["--lr", -1]
        needles = ["--lr"]
    res = run(*args)
    one_line_error(res, *needles)
    if case == "exists":
        assert (out / "adapter_model.safetensors").read_bytes() == b"precious"
    else:
        assert not out.exists()


def test_console_script_runs_with_fast_blas(env, tmp_path):
    """The real entry point (subprocess) re-executes with OpenBLAS on Linux and still exits cleanly."""
    root, model, data = env
    res = subprocess.run([sys.executable, "-m", "mlxlora", "generate", "--model", str(model), "--prompt", "hi",
                          "--max-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    bad = subprocess.run([sys.executable, "-m", "mlxlora", "eval", "--model", str(tmp_path / "missing"),
                          "--data", str(data)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
