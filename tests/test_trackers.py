"""train --report-to: one offline run reports to wandb (offline mode), MLflow (a local file store), TensorBoard
(event files) and trackio (its local database); each is read back with the library's own reader (wandb's
protobuf records) and holds the numbers the progress lines printed, plus the config. A missing library and
an unknown tracker are one-line errors."""

import json
import os
import re
import struct
import subprocess
import sys

import pytest

import tiny

TRACKED = ["wandb", "mlflow", "tensorboard", "trackio"]
LINE = re.compile(r"step (\d+)/\d+ · epoch \d+ · loss ([0-9.]+)")


@pytest.fixture(scope="module")
def run(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(8)]
    data = tiny.write_data(root / "data", rows, rows[:2])
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true",
               MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true",
               TRACKIO_DIR=str(root / "trackio"), MLXLORA_CACHE=str(root / "cache"))
    out = root / "run"
    res = subprocess.run([sys.executable, "-m", "mlxlora", "train", "--model", str(tiny_dirs["llama"]), "--data",
                          str(data), "--adapter-path", str(out), "--iters", "4", "--report-every", "2", "--val-every",
                          "2", "--batch-size", "2", "--rank", "4", "--lr", "1e-3", "--report-to", ",".join(TRACKED)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = {int(s): float(v) for s, v in LINE.findall(res.stdout + res.stderr)}
    assert sorted(printed) == [2, 4]
    record = json.loads((out / "mlxlora.json").read_text())
    return root, out, env, printed, record


def _val_steps(record):
    return [s for s, _ in record["run_record"]["val_log"]] if "val_log" in record.get("run_record", {}) else None


def test_tensorboard_event_files(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, out, env, printed, record = run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(loss) == [2, 4] and all(loss[s] == pytest.approx(printed[s], abs=5e-5) for s in loss)
    assert [e.step for e in acc.Scalars("val_loss")] == [0, 2, 4]
    assert {"lr", "tokens_per_sec", "peak_memory_gb", "epoch"} <= set(acc.Tags()["scalars"])
    assert "config" in " ".join(acc.Tags()["tensors"])


def test_mlflow_file_store(run):
    from mlflow.tracking import MlflowClient

    root, out, env, printed, record = run
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (exp,) = [e for e in client.search_experiments() if e.name == "mlxlora"]
    (mrun,) = client.search_runs([exp.experiment_id])
    loss = {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "loss")}
    assert sorted(loss) == [2, 4] and all(loss[s] == pytest.approx(printed[s], abs=5e-5) for s in loss)
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "val_loss")] == [0, 2, 4]
    assert mrun.data.params["lora.r"] == "4" and float(mrun.data.params["lr"]) == 1e-3


def _wandb_records(path):
    """wandb's .wandb file: a 7-byte header, then LevelDB log chunks (crc, length, type) of Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block trailer too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def test_wandb_offline_run(run):
    root, out, env, printed, record = run
    (f,) = list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    history, config = {}, {}
    for rec in _wandb_records(f):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(rec.history.step.num, {}).update(items)
        elif kind in ("run", "config"):  # the config comes with the run record (later changes: config records)
            update = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in update})
    assert {s: h["loss"] for s, h in history.items() if "loss" in h} == pytest.approx(printed, abs=5e-5)
    assert sorted(s for s, h in history.items() if "val_loss" in h) == [0, 2, 4]
    assert config["lr"] == 1e-3 and config["lora"]["r"] == 4


def test_trackio_local_database(run):
    root, out, env, printed, record = run
    code = ("import json; from trackio import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs('mlxlora', 'run')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    logs = json.loads(res.stdout.strip().splitlines()[-1])
    loss = {r["step"]: r["loss"] for r in logs if "loss" in r}
    assert sorted(loss) == [2, 4] and all(loss[s] == pytest.approx(printed[s], abs=5e-5) for s in loss)
    assert sorted(r["step"] for r in logs if "val_loss" in r) == [0, 2, 4]


def test_missing_library_and_unknown_tracker(tiny_dirs, tmp_path, monkeypatch, cli):
    data = tiny.write_data(tmp_path / "data", [{"text": "hello there"}] * 4)
    args = ["train", "--model", tiny_dirs["llama"], "--data", data, "--iters", 1, "--batch-size", 2]
    tiny.one_line_error(cli(*args, "--adapter-path", tmp_path / "a", "--report-to", "neptune"),
                        "--report-to must be one of wandb, mlflow, tensorboard, trackio, got 'neptune'")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    tiny.one_line_error(cli(*args, "--adapter-path", tmp_path / "b", "--report-to", "wandb"),
                        "--report-to wandb needs the wandb library; pip install wandb")
