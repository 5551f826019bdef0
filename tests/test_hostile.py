"""Nothing the user has is lost: outputs never overlap inputs, --force swaps in only complete results, stale
staging is swept, and every failed write (disk full, read-only, a file for a parent) is one line.

Every case runs the real CLI (CliRunner, or a subprocess where the process itself must fail: a file-size
limit, a signal) and checks the exit code, the one `Error:` line and that the files there before are
byte-identical after.
"""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest

import tiny
from mlxlora import LoraConfig, TrainConfig
from mlxlora.errors import AdapterError, TrainingStopped
from mlxlora.train import train
from mlxlora.train.checkpoint import list_checkpoints

ROWS = [{"prompt": f"Say {w}.", "completion": f"{w} {w}!"} for w in ["apple", "river", "stone", "cloud"]]
TRAIN = ["--iters", 2, "--batch-size", 2, "--rank", 2, "--alpha", 4, "--val-every", 100]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model = tiny.make_model(root / "model", "llama")
    data = tiny.write_data(root / "data", ROWS, ROWS[:2])
    adapter = tiny.make_adapter(model, root / "adapter", LoraConfig(r=2, lora_alpha=4), seed=1)
    return root, model, data, adapter


def snap(*paths) -> dict:
    """{file path: sha256} of every file under `paths` (a folder or a file)."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        out.update({str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or ".run-" in p.name)


# ------------------------------------------------------------------ 1. an output overlapping an input

OVERLAP = {
    "train --adapter-path = --model": (["train", "--model", "{M}", "--data", "{D}", "--adapter-path", "{M}", "--force",
                                        *TRAIN], ["--adapter-path", "is the --model input itself"]),
    "train --adapter-path = --data": (["train", "--model", "{M}", "--data", "{D}", "--adapter-path", "{D}", "--force",
                                       *TRAIN], ["is the --data input itself"]),
    "train --adapter-path inside --data": (["train", "--model", "{M}", "--data", "{D}", "--adapter-path", "{D}/run",
                                            *TRAIN], ["is inside the --data input"]),
    "train --adapter-path holds --model": (["train", "--model", "{M}", "--data", "{D}", "--adapter-path", "{R}",
                                            "--force", *TRAIN], ["holds the --model input"]),
    "train --adapter-path = a link to --model": (["train", "--model", "{M}", "--data", "{D}", "--adapter-path",
                                                  "{L}", "--force", *TRAIN], ["is the --model input itself"]),
    "fuse --out = --model": (["fuse", "--model", "{M}", "--adapter", "{A}", "--out", "{M}", "--force"],
                             ["--out", "is the --model input itself"]),
    "fuse --out = --adapter": (["fuse", "--model", "{M}", "--adapter", "{A}", "--out", "{A}", "--force"],
                               ["is the --adapter input itself"]),
    "export-adapter OUT = DIR": (["export-adapter", "{A}", "--to", "peft", "{A}", "--force"], ["OUT", "is the DIR input"]),
    "export-adapter OUT inside DIR": (["export-adapter", "{A}", "--to", "gguf", "{A}/x.gguf", "--model", "{M}"],
                                      ["is inside the DIR input"]),
    "export-model --out = --model": (["export-model", "--model", "{M}", "--out", "{M}", "--force"],
                                     ["is the --model input itself"]),
    "convert --out = --model": (["convert", "--model", "{M}", "--out", "{M}", "--force"], ["is the --model input"]),
}


@pytest.mark.parametrize("case", list(OVERLAP))
def test_output_overlapping_an_input_is_refused(env, case):
    root, model, data, adapter = env
    link = root / "model-link"
    if not link.is_symlink():
        link.symlink_to(model)
    args, needles = OVERLAP[case]
    args = [str(a).format(M=model, D=data, A=adapter, R=root, L=link) for a in args]
    before = snap(model, data, adapter)
    tiny.one_line_error(tiny.run_cli(*args), *needles)
    assert snap(model, data, adapter) == before
    assert not leftovers(root) and not leftovers(model)


# ------------------------------------------------------------------ 2. --force keeps the old adapter until the new one is whole

def _cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), adapter_path=str(out), iters=4, batch_size=2, lr=3e-3,
                val_every=100, save_every=2, report_every=1, seed=3, lora=LoraConfig(r=2, lora_alpha=4))
    return TrainConfig(**{**base, **kw})


def test_interrupted_force_run_keeps_the_old_adapter_and_resume_alone_finishes_it(env, tmp_path):
    root, model, data, adapter = env
    old = tmp_path / "old"
    tiny.run_cli("export-adapter", adapter, "--to", "peft", old)
    (old / "notes.txt").write_text("mine")
    before = snap(old)

    def interrupt(st):
        if st.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingStopped) as e:
        train(_cfg(model, data, old, force=True), callbacks=[interrupt])
    assert snap(old) == before  # the old folder is untouched, even with --force
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".old.run-")]
    assert f"{old} is unchanged" in str(e.value) and f"mlxlora train --resume {staging}" in str(e.value)
    assert [p.name for p in list_checkpoints(staging / "checkpoints")] == ["step-00000002"]

    # The command the message prints, alone: the checkpoint's own config supplies every other flag.
    res = tiny.run_cli("train", "--resume", staging)
    assert res.exit_code == 0, res.output
    assert not staging.exists() and not leftovers(tmp_path)
    rec = json.loads((old / "mlxlora.json").read_text())
    assert rec["run_record"]["steps"] == 4 and not (old / "notes.txt").exists()  # replaced, only now


def test_symlinked_adapter_path_with_force_replaces_the_target(env, tmp_path):
    root, model, data, adapter = env
    target = tmp_path / "real"
    tiny.run_cli("export-adapter", adapter, "--to", "peft", target)
    link = tmp_path / "link"
    link.symlink_to(target)
    res = tiny.run_cli("train", "--model", model, "--data", data, "--adapter-path", link, "--force", *TRAIN)
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and (target / "mlxlora.json").is_file() and not leftovers(tmp_path)


def test_stale_staging_of_killed_writers_is_swept_and_live_ones_kept(env, tmp_path):
    root, model, data, adapter = env
    out = tmp_path / "out"
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead_pid = 2**22 + 12345  # beyond Linux's pid_max default range: no such process
        names = {f".out.tmp-{dead_pid}-abcdef": "dead", ".out.tmp-deadbeef": "legacy",
                 f".out.old-{dead_pid}-123456": "dead", f".out.tmp-{live.pid}-fedcba": "live"}
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"x" * 1000)
        res = tiny.run_cli("export-adapter", adapter, "--to", "mlx-lm", out)
        assert res.exit_code == 0, res.output
        assert leftovers(tmp_path) == [f".out.tmp-{live.pid}-fedcba"]
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------ 3. failed writes: one line, nothing lost

def test_disk_full_at_the_final_save_names_the_checkpoint_and_resume_finishes(env, tmp_path, monkeypatch):
    root, model, data, adapter = env
    out = tmp_path / "run"
    real = mx.save_safetensors

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fill_disk(st):
        if st.step == 3:  # checkpoint 2 is written; the final save meets a full disk
            monkeypatch.setattr(mx, "save_safetensors", full)

    with pytest.raises(AdapterError) as e:
        train(_cfg(model, data, out), callbacks=[fill_disk])
    msg = str(e.value)
    assert "\n" not in msg and "could not write the final adapter" in msg and "No space left on device" in msg
    assert "step-00000002" in msg and f"mlxlora train --resume {out}" in msg
    monkeypatch.setattr(mx, "save_safetensors", real)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert not leftovers(out) and not (out / "adapter_model.safetensors").exists()
    res = tiny.run_cli("train", "--resume", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "mlxlora.json").read_text())["run_record"]["steps"] == 4


def test_read_only_file_system_is_one_line(env, tmp_path, monkeypatch):
    root, model, data, adapter = env

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(mx, "save_safetensors", read_only)
    res = tiny.run_cli("fuse", "--model", model, "--adapter", adapter, "--out", tmp_path / "fused")
    tiny.one_line_error(res, "--out", "Read-only file system", "nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "fuse", "export-model", "convert", "export-adapter"])
def test_parent_that_is_a_file_and_an_unwritable_place_are_one_line(env, tmp_path, command):
    root, model, data, adapter = env
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for out, needle in ((blocker / "sub", "is a file, not a folder"),
                        (Path("/sys/mlxlora-test-out"), "Operation not permitted")):  # sysfs refuses new entries
        args = {"train": ["train", "--model", model, "--data", data, "--adapter-path", out, *TRAIN],
                "fuse": ["fuse", "--model", model, "--adapter", adapter, "--out", out],
                "export-model": ["export-model", "--model", model, "--out", out],
                "convert": ["convert", "--model", model, "--out", out],
                "export-adapter": ["export-adapter", adapter, "--to", "mlx-lm", out]}[command]
        tiny.one_line_error(tiny.run_cli(*args), str(out), needle)
    assert blocker.read_text() == "mine"


CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from click.testing import CliRunner
    from mlxlora.cli import cli
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    out = []
    for args in json.loads(sys.argv[1]):
        r = CliRunner().invoke(cli, args)
        out.append([r.exit_code, r.output, repr(r.exception) if r.exception and r.exit_code != 1 else None])
    print(json.dumps(out))
""")


def test_a_real_full_disk_is_one_line_in_every_writing_command(env, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes every write past 60 kB fail for real (EFBIG), like a full disk."""
    root, model, data, adapter = env
    old = tmp_path / "fused"
    old.mkdir()
    (old / "keep.txt").write_text("old fuse")
    cmds = [["train", "--model", model, "--data", data, "--adapter-path", tmp_path / "run", "--rank", 32,
             "--target", "all-linear", "--iters", 1, "--batch-size", 2, "--save-every", 100],
            ["fuse", "--model", model, "--adapter", adapter, "--out", old, "--force"],
            ["export-model", "--model", model, "--out", tmp_path / "hf"],
            ["convert", "--model", model, "--out", tmp_path / "mlx"]]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([[str(a) for a in c] for c in cmds])],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, MLXLORA_BLAS_ACTIVE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (code, output, exc), cmd in zip(results, cmds):
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert code == 1 and exc is None, (cmd[0], output, exc)
        assert len(errors) == 1 and "could not write" in errors[0] and "Traceback" not in output, output
    assert "could not write the final adapter" in results[0][1]
    assert (old / "keep.txt").read_text() == "old fuse" and sorted(p.name for p in old.iterdir()) == ["keep.txt"]
    assert not leftovers(tmp_path) and not (tmp_path / "hf").exists() and not (tmp_path / "mlx").exists()


# ------------------------------------------------------------------ 4. signals during fuse / export

SLOW_CHILD = textwrap.dedent("""
    import sys, time
    import mlx_lm.utils, mlxlora.formats as formats
    real_save, real_write = mlx_lm.utils.save_model, formats.WRITERS["mlx-lm"]
    def slow(write):
        def run(*a, **k):
            write(*a, **k)
            print("writing", flush=True)
            time.sleep(60)
        return run
    mlx_lm.utils.save_model = slow(real_save)          # the staging folder is half-written when the signal comes
    formats.WRITERS["mlx-lm"] = slow(real_write)
    from mlxlora.cli import main
    main(sys.argv[1:])
""")


@pytest.mark.parametrize("command,sig", [("fuse", signal.SIGTERM), ("export-adapter", signal.SIGINT)])
def test_a_signal_during_fuse_or_export_removes_the_staging_and_keeps_the_old_output(env, tmp_path, command, sig):
    root, model, data, adapter = env
    jobs = {"fuse": (["fuse", "--model", model, "--adapter", adapter, "--out"], tmp_path / "fused"),
            "export-adapter": (["export-adapter", adapter, "--to", "mlx-lm"], tmp_path / "mlx")}
    for args, out in [jobs[command]]:
        out.mkdir()
        (out / "keep.txt").write_text("old")
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *map(str, args), str(out), "--force"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, MLXLORA_BLAS_ACTIVE="1"))
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
        name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and f"stopped by {name}" in errors[0] and "Traceback" not in err, err
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not leftovers(tmp_path)
