"""Which kind of adapter folder a path holds, and reading any kind into mlxlora's terms.

Formats, told apart by their files:
    "mlxlora"  adapter_config.json + adapter_model.safetensors + mlxlora.json  (PEFT's files plus our record)
    "peft"     adapter_config.json + adapter_model.safetensors
    "mlx-lm"   adapter_config.json + adapters.safetensors                      (see convert/mlx_lm.py)
A spec that is no local path but looks like a hub id ("user/name") is fetched first, adapter files only.
PEFT's pickle format (adapter_model.bin) is refused: it is never unpickled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .adapters import CONFIG_FILE, RECORD_FILE, WEIGHTS_FILE, _read_json, _read_safetensors, read_adapter_config
from .config import LoraConfig
from .convert.names import hf_to_mlx
from .convert.peft import EMBEDDING_NAMES, PEFT_PREFIX, from_peft_state
from .errors import AdapterError

FORMATS = ("peft", "mlxlora", "mlx-lm")
MLX_LM_WEIGHTS = "adapters.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
# What a hub download fetches: every file any format needs, nothing else.
HUB_FILES = [CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE, MLX_LM_WEIGHTS]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def detect_adapter(path) -> str:
    """"peft", "mlxlora" or "mlx-lm" for an adapter folder or hub id. Raises AdapterError (one line)."""
    return resolve_adapter(path)[1]


def resolve_adapter(spec) -> tuple[Path, str]:
    """(local folder, format) for an adapter folder or a hub id (downloaded with huggingface_hub)."""
    p = Path(spec).expanduser()
    if p.exists() or not _HUB_ID.match(str(spec)):
        return p, _format_of(p)
    local = _download(str(spec))
    try:
        return local, _format_of(local)
    except AdapterError as e:
        raise AdapterError(f"hub adapter {spec}: {e}") from None


def _format_of(d: Path) -> str:
    if not d.exists():
        raise AdapterError(f"adapter folder {d} does not exist (give the folder that holds {CONFIG_FILE}, "
                           "or a hub id user/name)")
    if not d.is_dir():
        raise AdapterError(f"{d} is a file; give the adapter folder that holds it")
    has = {name for name in (CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE, MLX_LM_WEIGHTS, PICKLE_WEIGHTS)
           if (d / name).is_file()}
    if WEIGHTS_FILE in has or MLX_LM_WEIGHTS in has:
        if CONFIG_FILE not in has:
            raise AdapterError(f"{d}: missing {CONFIG_FILE}")
        if WEIGHTS_FILE in has:
            return "mlxlora" if RECORD_FILE in has else "peft"
        return "mlx-lm"
    if PICKLE_WEIGHTS in has:
        raise AdapterError(f"{d}: only {PICKLE_WEIGHTS} (PEFT's pickle format, never loaded); re-save the adapter "
                           "with PEFT's save_pretrained(..., safe_serialization=True)")
    missing = ", ".join(n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in has)
    raise AdapterError(f"{d}: missing {missing} (PEFT / mlxlora adapter) or {MLX_LM_WEIGHTS} (mlx-lm adapter)")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, auth, network: all one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise AdapterError(f"adapter {repo_id}: no such local folder, and fetching it from the hub failed "
                           f"({type(e).__name__}: {first}); check the id and the network (HF_HUB_OFFLINE?), "
                           "or give a local folder") from None


# ---------------------------------------------------------------- reading any format

@dataclass
class AdapterFiles:
    """An adapter read from disk, in mlxlora's terms.

    tensors: `<mlx module path>.lora_a` (in, r) / `.lora_b` (r, out) / `.m` (out,), embeddings as LoRAEmbedding
    keeps them (lora_a (num, r), lora_b (r, dims)). embeddings: module paths whose adapter is an embedding's.
    tied_head: True when the file says the output head is the adapted embedding, None when it does not say.
    """

    path: Path
    format: str
    config: LoraConfig
    tensors: dict[str, mx.array]
    embeddings: set[str] = field(default_factory=set)
    model_type: str | None = None
    base_model: str | None = None
    tied_head: bool | None = None

    @property
    def module_paths(self) -> list[str]:
        """Adapted module paths in reading order (block by block)."""
        return sorted({n.rpartition(".")[0] for n in self.tensors}, key=natural_key)


def natural_key(path: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in path.split(".")]


def read_adapter(spec) -> AdapterFiles:
    """Read an adapter folder (or hub id) of any format. Raises AdapterError naming the file."""
    path, fmt = resolve_adapter(spec)
    if fmt == "mlx-lm":
        from .convert.mlx_lm import import_mlx_lm, read_mlx_lm_config

        config, tensors = import_mlx_lm(path)
        embeddings = {p for p in {n.rpartition(".")[0] for n in tensors} if p.split(".")[-1] in EMBEDDING_NAMES}
        return AdapterFiles(path, fmt, config, tensors, embeddings,
                            base_model=read_mlx_lm_config(path).get("model"))
    return _read_peft(path, fmt)


def _read_peft(path: Path, fmt: str) -> AdapterFiles:
    peft_cfg = _read_json(path / CONFIG_FILE)
    record = _read_json(path / RECORD_FILE) if fmt == "mlxlora" else {}
    model_type = record.get("model_type")
    config = read_adapter_config(path, model_type)
    raw = _read_safetensors(path / WEIGHTS_FILE)
    tensors, leftover = from_peft_state(raw, model_type)
    embeddings = {hf_to_mlx(k.split(".lora_embedding_")[0].removeprefix(PEFT_PREFIX), model_type)
                  for k in raw if ".lora_embedding_" in k}
    bad = [k for k in leftover if not k.endswith(".base_layer.weight")]  # PEFT's copy of an adapted embedding
    if bad:
        raise AdapterError(f"{path / WEIGHTS_FILE}: tensors that are no LoRA tensor: {', '.join(sorted(bad))}")
    tied = _drop_tied_head_copies(tensors, embeddings) or bool(peft_cfg.get("ensure_weight_tying")) or None
    return AdapterFiles(path, fmt, config, tensors, embeddings, model_type,
                        record.get("base_model") or peft_cfg.get("base_model_name_or_path"), tied)


def _drop_tied_head_copies(tensors: dict, embeddings: set[str]) -> bool:
    """Remove PEFT's view of a tied embedding adapter from the head (lm_head.lora_a == embedding lora_b.T,
    lm_head.lora_b == embedding lora_a.T; ensure_weight_tying saves both). True if there was one."""
    a, b = tensors.get("lm_head.lora_a"), tensors.get("lm_head.lora_b")
    for emb in embeddings:
        ea, eb = tensors.get(f"{emb}.lora_a"), tensors.get(f"{emb}.lora_b")
        if any(x is None for x in (a, b, ea, eb)) or a.shape != eb.T.shape or b.shape != ea.T.shape:
            continue
        if mx.array_equal(a, eb.T).item() and mx.array_equal(b, ea.T).item():
            del tensors["lm_head.lora_a"], tensors["lm_head.lora_b"]
            return True
    return False


__all__ = ["FORMATS", "HUB_FILES", "MLX_LM_WEIGHTS", "AdapterFiles", "detect_adapter", "resolve_adapter",
           "read_adapter", "natural_key"]
