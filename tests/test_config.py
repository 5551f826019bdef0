"""Config file + flags merge into one TrainConfig; unknown keys and bad values are errors naming the key."""

import pytest

from mlxlora.config import ALL_LINEAR, FLAG_FIELDS, TrainConfig, build_train_config, load_config_file
from mlxlora.errors import ConfigError


def test_flags_override_file_and_map_to_lora_fields(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("rank: 32\nalpha: 64\nlr: 1e-4\nbatch-size: 2\ntarget: q_proj,v_proj,o_proj\ndora: true\n")
    cfg = build_train_config(load_config_file(f), {"rank": 4, "iters": 7, "alpha": None})
    assert cfg.lora.r == 4  # flag wins
    assert cfg.lora.lora_alpha == 64.0  # file value kept where no flag given
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.batch_size == 2 and cfg.iters == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj", "o_proj"] and cfg.lora.use_dora


def test_defaults_come_from_the_dataclasses_only():
    cfg = build_train_config(None, {})
    assert cfg == TrainConfig()
    assert build_train_config(None, {"target": "all-linear"}).lora.target_modules == ALL_LINEAR
    # every flag name maps to a real dataclass field
    assert set(FLAG_FIELDS) >= {"rank", "alpha", "dropout", "target", "layers", "dora", "rslora", "lr", "iters"}


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("rank: 8\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown key 'learning_rate'"):
        build_train_config(load_config_file(f), {}, source=str(f))


@pytest.mark.parametrize("values, flag", [
    ({"rank": 0}, "r "), ({"alpha": -1}, "lora_alpha"), ({"lr": 0}, "--lr"), ({"lr": "fast"}, "lr"),
    ({"batch_size": 0}, "--batch-size"), ({"epochs": 1, "iters": 3}, "--epochs or --iters"),
    ({"schedule": "step"}, "--schedule"), ({"quantize": 7}, "--quantize"), ({"rank": "8"}, "r "),
])
def test_bad_values(values, flag):
    with pytest.raises(ConfigError, match=flag):
        build_train_config(None, values)


def test_bad_yaml_names_line(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("rank: 8\nalpha: [1, 2\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: not valid YAML"):
        load_config_file(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")


def test_adapter_shape_flags_with_init_adapter_are_refused_not_ignored():
    # --init-adapter continues that adapter as saved: a --rank next to it would silently do nothing.
    with pytest.raises(ConfigError, match=r"--init-adapter runs/sft: .*so --alpha, --rank would be ignored; drop them"):
        build_train_config(None, {"init_adapter": "runs/sft", "rank": 32, "alpha": 64, "rank_pattern": None})
    assert build_train_config(None, {"init_adapter": "runs/sft", "beta": 0.2}).init_adapter == "runs/sft"
    # a checkpoint's stored config (resume) carries the lora section: that is not the user giving it
    cfg = build_train_config(None, {}, stored={"init_adapter": "runs/sft", "lora": {"r": 8}})
    assert cfg.init_adapter == "runs/sft"
