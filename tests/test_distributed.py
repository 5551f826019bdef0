"""Data-parallel training over mx.distributed: 2 ranks on 127.0.0.1 via `mlx.launch --backend ring`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import tiny

HERE = Path(__file__).parent
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = tiny.make_model(root / "model", "llama")
    rows = [{"prompt": f"Count {i}.", "completion": " ".join(str(j) for j in range(i % 9 + 1))} for i in range(22)]
    data = tiny.write_data(root / "data", rows)
    return root, model, data


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))


def _launch(args, port, timeout=600):
    cmd = [LAUNCH, "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--starting-port", str(port), "--",
           sys.executable, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch not installed")
def test_two_ranks_equal_one_rank_with_double_batch(setup):
    root, model, data = setup
    one = subprocess.run([sys.executable, *map(str, [HERE / "dist_train_rank.py", model, data, root / "one", 4, 6])],
                         capture_output=True, text=True, timeout=600, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch([HERE / "dist_train_rank.py", model, data, root / "two", 2, 6], port=35210)
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
    assert "rank 0 of 2 done" in two.stdout and "rank 1 of 2 done" in two.stdout
    ref = mx.load(str(root / "one.rank0.safetensors"))
    r0 = mx.load(str(root / "two.rank0.safetensors"))
    r1 = mx.load(str(root / "two.rank1.safetensors"))
    assert ref.keys() == r0.keys() == r1.keys()
    moved = 0.0
    for k in ref:
        assert np.array_equal(np.array(r0[k]), np.array(r1[k])), k  # ranks hold identical weights
        np.testing.assert_allclose(np.array(r0[k]), np.array(ref[k]), atol=2e-5, err_msg=k)
        moved = max(moved, float(mx.abs(ref[k]).max()) if k.endswith("lora_b") else moved)
    assert moved > 1e-3  # training really changed lora_b, so the comparison means something
    # rank 0 alone wrote the adapter folder and its checkpoints
    assert (root / "two" / "adapter_model.safetensors").is_file()
    assert (root / "two" / "checkpoints" / "step-00000004").is_dir()
    rec = json.loads((root / "two" / "mlxlora.json").read_text())["run_record"]
    assert rec["steps"] == 6


@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch not installed")
def test_dpo_two_ranks_equal_one_rank_with_double_batch(setup):
    root = setup[0]
    model = setup[1]
    rows = [{"prompt": f"Count {i}.", "chosen": " ".join(str(j) for j in range(i % 7 + 1)), "rejected": f"no {i}"}
            for i in range(11)]  # 11 pairs: the last global batch of 4 does not reach rank 1
    data = tiny.write_data(root / "pairs", rows)
    args = [HERE / "dist_train_rank.py", model, data]
    one = subprocess.run([sys.executable, *map(str, args + [root / "dpo1", 4, 4, "dpo"])],
                         capture_output=True, text=True, timeout=600, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(args + [root / "dpo2", 2, 4, "dpo"], port=35230)
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
    ref, r0 = mx.load(str(root / "dpo1.rank0.safetensors")), mx.load(str(root / "dpo2.rank0.safetensors"))
    r1 = mx.load(str(root / "dpo2.rank1.safetensors"))
    for k in ref:
        assert np.array_equal(np.array(r0[k]), np.array(r1[k])), k
        np.testing.assert_allclose(np.array(r0[k]), np.array(ref[k]), atol=2e-5, err_msg=k)
    assert max(float(mx.abs(ref[k]).max()) for k in ref if k.endswith("lora_b")) > 1e-3
    a = json.loads((root / "dpo1" / "mlxlora.json").read_text())["run_record"]
    b = json.loads((root / "dpo2" / "mlxlora.json").read_text())["run_record"]
    assert a["method"]["method"] == b["method"]["method"] == "dpo"
    assert b["method_metrics"]["accuracy"] == pytest.approx(a["method_metrics"]["accuracy"])


@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch not installed")
def test_killed_rank_ends_run_with_error_and_usable_checkpoint(setup, tmp_path):
    root, model, data = setup
    script = tmp_path / "die.py"
    script.write_text(
        "import os, signal, sys\n"
        "from mlxlora import LoraConfig, TrainConfig\n"
        "from mlxlora.train import Trainer\n"
        f"cfg = TrainConfig(model={str(model)!r}, data={str(data)!r}, adapter_path={str(tmp_path / 'run')!r}, "
        "iters=50, batch_size=2, lr=3e-3, save_every=2, seed=5, pack=False, lora=LoraConfig(r=4))\n"
        "t = Trainer(cfg)\n"
        "def die(st):\n"
        "    if st.step == 3 and t.rank == 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "t.callbacks.append(die)\n"
        "t.run()\n")
    res = _launch([script], port=35260, timeout=300)
    # mlx.launch itself exits 0 after SIGTERM-ing the survivors; the surviving rank says what happened:
    # either the launcher's SIGTERM arrived first, or the ring reported the lost peer first.
    assert "rank 0: training stopped: " in res.stderr, res.stderr[-3000:]
    assert ("SIGTERM" in res.stderr) or ("lost a peer rank" in res.stderr)
    assert "mlxlora train --resume" in res.stderr
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert ckpt.is_dir()
    from mlxlora.adapters import load_adapter
    from mlxlora.models import load_base

    load_adapter(load_base(str(model)).model, ckpt)  # the last checkpoint loads
