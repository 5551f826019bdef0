"""mlxlora's adapter folders: PEFT's two files plus `mlxlora.json`, our record.

    adapter_config.json         PEFT's LoraConfig (peft.PeftModel.from_pretrained reads the folder as is)
    adapter_model.safetensors   PEFT's tensor names and orientation (formats/peft.py)
    mlxlora.json                the exact LoraConfig, adapted module paths, format version, model_type,
                                base model, and what training adds (train_config, run_record)

The exact LoraConfig in mlxlora.json wins over the one PEFT's file gives (it keeps `last_n_layers`,
mlx-lm names in patterns, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import LoraConfig
from ..errors import AdapterError, ConfigError
from ..files import read_json
from . import peft
from .record import AdapterRecord

RECORD_FILE = "mlxlora.json"
FORMAT_VERSION = 1
OWN_KEYS = ("format_version", "lora_config", "adapted_modules", "model_type", "base_model")


def accepts(folder: Path) -> bool:
    return peft.accepts(folder) and (folder / RECORD_FILE).is_file()


def read_record(folder: Path) -> dict:
    """mlxlora.json of an adapter folder as a dict ({} when the folder has none)."""
    f = Path(folder) / RECORD_FILE
    return read_json(f) if f.is_file() else {}


def record_config(record: dict, where: Path) -> LoraConfig:
    """The exact LoraConfig stored in an mlxlora.json dict. Raises AdapterError naming the file."""
    try:
        return LoraConfig.from_dict(record["lora_config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise AdapterError(f"{where}: bad lora_config ({e})") from None


def read(folder: Path) -> AdapterRecord:
    """An mlxlora adapter folder as an AdapterRecord (meta: every mlxlora.json key but its own)."""
    folder = Path(folder)
    rec = read_record(folder)
    config = record_config(rec, folder / RECORD_FILE)
    out = peft.read(folder, config=config, model_type=rec.get("model_type"), fmt="mlxlora")
    _check_agree(out.source_config or {}, config, folder)
    out.base_model = rec.get("base_model") or out.base_model
    out.meta = {k: v for k, v in rec.items() if k not in OWN_KEYS}
    return out


def _check_agree(peft_cfg: dict, config: LoraConfig, folder: Path) -> None:
    """Refuse a folder whose adapter_config.json (what PEFT reads) and mlxlora.json disagree on the scale:
    PEFT and mlxlora would then apply the same tensors differently."""
    pairs = (("r", peft_cfg.get("r", 8), config.r), ("lora_alpha", peft_cfg.get("lora_alpha", 8), config.lora_alpha),
             ("use_rslora", bool(peft_cfg.get("use_rslora", False)), config.use_rslora),
             ("use_dora", bool(peft_cfg.get("use_dora", False)), config.use_dora))
    diffs = [f"{k} {a!r} vs {b!r}" for k, a, b in pairs if (float(a) != float(b) if k in ("r", "lora_alpha") else a != b)]
    if diffs:
        raise AdapterError(f"{folder}: {peft.CONFIG_FILE} and {RECORD_FILE} disagree ({'; '.join(diffs)}); PEFT and "
                           f"mlxlora would apply the tensors with different scales; restore the edited file or "
                           f"re-export the adapter")


def write(record: AdapterRecord, folder: Path) -> None:
    """PEFT's files plus mlxlora.json into `folder` (an empty staging folder)."""
    peft.write(record, folder)
    own = {"format_version": FORMAT_VERSION, "lora_config": record.config.to_dict(),
           "adapted_modules": record.module_paths, "model_type": record.model_type,
           "base_model": record.base_model}
    clash = sorted(set(own) & set(record.meta))
    if clash:
        raise AdapterError(f"save_adapter: extra may not set {', '.join(clash)} (mlxlora.json's own keys)")
    (folder / RECORD_FILE).write_text(json.dumps({**own, **record.meta}, indent=2, default=str) + "\n")


__all__ = ["RECORD_FILE", "FORMAT_VERSION", "accepts", "read", "read_record", "record_config", "write"]
