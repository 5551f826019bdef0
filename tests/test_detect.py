"""Adapter format detection: PEFT / mlxlora / mlx-lm folders, hub ids (offline and with a stand-in hub),
pickle-only folders refused without unpickling, and `--adapter` taking every format in the CLI."""

import json
import pickle
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.utils import load_model

import tiny
from mlxlora import LoraConfig, get_lora_model
from mlxlora.adapters import RECORD_FILE, load_adapter, save_adapter
from mlxlora.cli import cli
from mlxlora.adapters import export_mlx_lm
from mlxlora.formats import HUB_FILES, detect_adapter, read_adapter, resolve_adapter
from mlxlora.errors import AdapterError
from mlxlora.lora.surgery import adapter_layers

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9, 250]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same adapter as an mlxlora folder, a plain PEFT folder and an mlx-lm folder; and its logits."""
    root = tmp_path_factory.mktemp("detect")
    model_dir = tiny.make_model(root / "model", "llama")
    model, _ = load_model(model_dir)
    get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], last_n_layers=1))
    mx.random.seed(2)
    for _, layer in adapter_layers(model):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    save_adapter(model, root / "mlxlora", base_model="tiny")
    shutil.copytree(root / "mlxlora", root / "peft")
    (root / "peft" / RECORD_FILE).unlink()
    export_mlx_lm(root / "mlxlora", root / "mlx-lm")
    return dict(root=root, model=model_dir, want=np.array(model(IDS)),
                **{f: root / f for f in ("mlxlora", "peft", "mlx-lm")})


@pytest.mark.parametrize("fmt", ["mlxlora", "peft", "mlx-lm"])
def test_detect_and_load_every_format(folders, fmt):
    assert detect_adapter(folders[fmt]) == fmt
    model, _ = load_model(folders["model"])
    load_adapter(model, folders[fmt])
    assert np.abs(np.array(model(IDS)) - folders["want"]).max() <= 1e-5
    src = read_adapter(folders[fmt])
    assert src.format == fmt and src.module_paths == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert {p: src.config.scale_for(p) for p in src.module_paths} == {p: 2.0 for p in src.module_paths}


def test_pickle_only_folder_is_refused_unread(tmp_path):
    class Boom:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(tmp_path / "unpickled"), "w"))

    d = tmp_path / "bin"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    (d / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(AdapterError, match=r"adapter_model\.bin.*safe_serialization=True"):
        detect_adapter(d)
    with pytest.raises(AdapterError, match="safe_serialization"):
        load_adapter(load_model(tiny.make_model(tmp_path / "m", "llama"))[0], d)
    assert not (tmp_path / "unpickled").exists()


def test_incomplete_folders_name_what_is_missing(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        detect_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="missing adapter_config.json, adapter_model.safetensors .* adapters.safetensors"):
        detect_adapter(tmp_path / "empty")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match=r"w: missing adapter_config\.json$"):
        detect_adapter(tmp_path / "w")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(AdapterError, match="is a file"):
        detect_adapter(tmp_path / "f.txt")


def test_hub_id_offline_is_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "someone/adapter" is no local path
    with pytest.raises(AdapterError) as err:
        detect_adapter("someone/adapter")
    msg = str(err.value)
    assert "\n" not in msg and "someone/adapter" in msg and "HF_HUB_OFFLINE" in msg


def test_hub_id_fetches_only_adapter_files(monkeypatch, folders, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        dest = tmp_path / "snapshot"
        if not dest.exists():
            shutil.copytree(folders["mlx-lm"], dest)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    path, fmt = resolve_adapter("someone/tiny-adapter")
    assert (path, fmt) == (tmp_path / "snapshot", "mlx-lm")
    assert calls == [("someone/tiny-adapter", HUB_FILES)]
    model, _ = load_model(folders["model"])
    load_adapter(model, "someone/tiny-adapter")
    assert np.abs(np.array(model(IDS)) - folders["want"]).max() <= 1e-5
    # a local folder of that name wins over the hub
    shutil.copytree(folders["peft"], tmp_path / "someone" / "tiny-adapter")
    assert detect_adapter("someone/tiny-adapter") == "peft" and len(calls) == 2


def test_cli_adapter_flag_takes_every_format(folders):
    def generate(*adapter):
        res = CliRunner().invoke(cli, ["generate", "--model", str(folders["model"]), *adapter, "--prompt", "hi",
                                       "--max-tokens", "6", "--no-chat"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    texts = {fmt: generate("--adapter", str(folders[fmt])) for fmt in ("mlxlora", "peft", "mlx-lm")}
    assert texts["mlx-lm"] == texts["peft"] == texts["mlxlora"]
    assert generate() != texts["peft"]
