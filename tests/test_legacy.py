"""Folders written by the code before the re-layout (tests/data/legacy, see its README) load unchanged:
adapter folders (LoRA, DoRA, QLoRA) give the logits they gave then, their checkpoints resume, the fused
model loads, and a round trip through today's writer gives back the same tensors."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from mlxlora.adapters import load_adapter, save_adapter
from mlxlora.inference import load_with_adapter
from mlxlora.models import load_base
from mlxlora.train.checkpoint import latest_checkpoint, load_trainer_state

LEGACY = Path(__file__).parent / "data" / "legacy"
EXPECTED = mx.load(str(LEGACY / "expected.safetensors"))
BASES = {"adapter": "base", "dora": "base", "qlora": "base-q4"}


def _max_diff(a, b) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.mark.parametrize("name", ["adapter", "dora", "qlora"])
def test_old_adapter_folders_give_the_same_logits(name):
    loaded = load_with_adapter(str(LEGACY / BASES[name]), str(LEGACY / name))  # fingerprint check included
    got = loaded.model(EXPECTED["ids"])
    assert _max_diff(got, EXPECTED[name]) < 1e-5
    assert _max_diff(loaded.model(EXPECTED["ids"]), load_base(str(LEGACY / BASES[name])).model(EXPECTED["ids"])) > 1e-3


@pytest.mark.parametrize("name", ["adapter", "dora", "qlora"])
def test_old_checkpoints_resume(name, tmp_path):
    """The checkpoint an old run wrote is found, its optimizer moments and trainer state load, and training
    resumed from it continues to the end."""
    from mlxlora import TrainConfig
    from mlxlora.config import LoraConfig
    from mlxlora.train import train
    from mlxlora.train.step import make_optimizer

    run = tmp_path / name
    shutil.copytree(LEGACY / name, run)
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-00000002"
    record = json.loads((ckpt / "mlxlora.json").read_text())
    cfg = TrainConfig(**{**record["train_config"], "lora": LoraConfig.from_dict(record["train_config"]["lora"]),
                         "model": str(LEGACY / BASES[name]), "data": str(LEGACY / "data"),
                         "adapter_path": str(run), "train_file": None, "valid_file": None})
    opt = make_optimizer(cfg, 4)
    state = load_trainer_state(ckpt, opt)
    assert state.step == 2 and opt.state  # moments restored
    result = train(cfg, resume=str(run))
    assert result.steps == 4


def test_old_fused_model_loads_and_gives_the_same_logits():
    fused = load_base(str(LEGACY / "fused-q4"))
    assert _max_diff(fused.model(EXPECTED["ids"]), EXPECTED["fused-q4"]) < 1e-5
    assert json.loads((LEGACY / "fused-q4" / "fuse_report.json").read_text())["strategy"]


@pytest.mark.parametrize("name", ["adapter", "dora"])
def test_old_folder_round_trips_through_the_new_writer(name, tmp_path):
    model = load_base(str(LEGACY / BASES[name])).model
    load_adapter(model, LEGACY / name)
    save_adapter(model, tmp_path / "again", base_model="tiny")
    old, new = (mx.load(str(d / "adapter_model.safetensors")) for d in (LEGACY / name, tmp_path / "again"))
    assert old.keys() == new.keys() and all(mx.array_equal(old[k], new[k]).item() for k in old)
    a, b = (json.loads((d / "adapter_config.json").read_text()) for d in (LEGACY / name, tmp_path / "again"))
    assert {k: v for k, v in a.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in b.items() if k != "base_model_name_or_path"}
