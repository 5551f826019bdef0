"""The fast-BLAS environment: several ranks on one host share the cores instead of fighting for them."""

import json
import os

import pytest

from mlxlora.blas import fast_blas_env, local_ranks


def _hostfile(tmp_path, hosts):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([[f"{h}:{5000 + i}"] for i, h in enumerate(hosts)]))
    return str(path)


def test_local_ranks_counts_ranks_sharing_this_host(tmp_path):
    hosts = _hostfile(tmp_path, ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.1"])
    assert local_ranks({"MLX_HOSTFILE": hosts, "MLX_RANK": "0"}) == 3
    assert local_ranks({"MLX_HOSTFILE": hosts, "MLX_RANK": "2"}) == 1
    assert local_ranks({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 4
    assert local_ranks({}) == 1  # not launched by mlx.launch
    assert local_ranks({"MLX_HOSTFILE": str(tmp_path / "missing"), "MLX_RANK": "0"}) == 1


def test_blas_threads_split_between_local_ranks(tmp_path):
    base = fast_blas_env({})
    if base is None:
        pytest.skip("no mlx-cpu reference BLAS to replace here (macOS or a GPU build)")
    assert "OPENBLAS_NUM_THREADS" not in base  # alone: OpenBLAS picks its own thread count
    two = {"MLX_HOSTFILE": _hostfile(tmp_path, ["127.0.0.1", "127.0.0.1"]), "MLX_RANK": "1"}
    assert fast_blas_env(two)["OPENBLAS_NUM_THREADS"] == str(max(1, os.cpu_count() // 2))
    assert "OPENBLAS_NUM_THREADS" not in fast_blas_env(dict(two, OPENBLAS_NUM_THREADS="3"))  # the user's wins


def test_probe_refuses_a_blas_that_crashes_and_remembers(tmp_path):
    """A BLAS build that kills the process (as cmeel-openblas 0.3.31 does with SIGILL on a Zen 2 KVM guest)
    is refused by a child-process probe, and the verdict is cached so the child runs once."""
    from mlxlora.blas import probe

    fake = tmp_path / "fake-mlx" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"not really a library")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake-mlx"))
    assert probe(lib, env, tmp_path) is False
    (verdict,) = tmp_path.glob("probe-*.json")
    record = json.loads(verdict.read_text())
    assert record["ok"] is False and record["why"] == "exit status -4"
    # Cached: even an environment that would pass is not run again for the same build.
    assert probe(lib, dict(os.environ), tmp_path) is False


def test_probe_accepts_a_working_environment(tmp_path):
    from mlxlora.blas import probe

    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"x")
    assert probe(lib, dict(os.environ), tmp_path) is True
    assert json.loads(next(tmp_path.glob("probe-*.json")).read_text())["ok"] is True
