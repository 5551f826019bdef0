"""Load a base model through mlx-lm: a local HF/MLX folder, a GGUF file, or a hub id.

mlxlora never re-implements architectures: whatever `mlx_lm` can build, we can adapt.
On the CPU backend, float weights are computed in float32 (float16/bfloat16 matmuls are
10-20x slower there) and quantized layers use the dequantize+matmul fast path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_unflatten

from ..cache import cache_dir
from ..config import DTYPE_NAMES, GROUP_SIZES, check_dtype
from ..errors import ModelError, choice_error
from ..files import path_problem
from ..lora.quant import on_cpu, use_fast_cpu_path
from .fingerprint import content_hash, describe_base, fingerprint
from .gguf import convert_gguf
from .hf_config import normalize

MX_DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}  # dtype names -> mlx dtypes


@dataclass
class Base:
    """A loaded base model: the mlx-lm module, its tokenizer, its config and where it came from."""

    model: nn.Module
    tokenizer: object
    config: dict
    path: Path
    source: str
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """What check_base compares an adapter's run record with (describe_base), from the fingerprint and
        content hash load_base computed; take it while the model is bare."""
        return describe_base(self.model, self.config, self.info.get("fingerprint"), self.info.get("content"))


def resolve_model_path(spec: str) -> Path:
    """A local folder for `spec` (folder, .gguf file, or hub id). Raises ModelError with the fix."""
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"--model: GGUF file {p} does not exist")
        digest = hashlib.sha256(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_dir() / "gguf" / f"{p.stem}-{digest}"
        if not (out / "config.json").is_file():
            convert_gguf(p, out)
        return out
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"--model: {p} is not a folder (expected config.json + *.safetensors, or a .gguf file)")
        return p
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if p.is_symlink() or looks_like_path:
        problem = path_problem(p) or "does not exist"
        raise ModelError(f"--model: {spec} {problem} (give a model folder, a .gguf file or a hub id user/name)")
    try:
        from mlx_lm.utils import _download

        return _download(spec)
    except Exception as e:  # network/offline/auth errors from huggingface_hub
        raise ModelError(f"--model: could not fetch hub id {spec!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "check the id and network (HF_HUB_OFFLINE?), or pass a local folder") from None


def _check_folder(path: Path) -> None:
    missing = [n for n in ("config.json",) if not (path / n).is_file()]
    weights = list(path.glob("model*.safetensors"))
    if not weights:
        pickles = [w.name for w in path.glob("*.bin")] + [w.name for w in path.glob("*.pt")]
        if pickles:
            missing.append(f"*.safetensors (found {', '.join(pickles)}: pickle files are never loaded; "
                           "convert them to safetensors with transformers' save_pretrained(safe_serialization=True))")
        else:
            missing.append("model*.safetensors")
    if missing:
        raise ModelError(f"--model: {path} is missing {'; '.join(missing)}")


def quantize_model(model: nn.Module, bits: int, group_size: int) -> int:
    """Quantize (in place) every layer that can be and whose input width divides by `group_size`.

    Returns how many layers were quantized (0: the model is unchanged).
    """
    new = []
    for path, m in model.named_modules():
        if not (hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0):
            continue
        try:
            new.append((path, m.to_quantized(group_size=group_size, bits=bits, mode="affine")))
        except TypeError:  # a layer whose to_quantized predates `mode` (afm7's FusedLinear)
            new.append((path, m.to_quantized(group_size, bits)))
    if new:
        model.update_modules(tree_unflatten(new))
    return len(new)


def load_base(spec: str, quantize: int | None = None, group_size: int = 64, dtype: str | None = None,
              trust_remote_code: bool = False) -> Base:
    """Load a base model and tokenizer with mlx-lm; optionally quantize at load time.

    dtype: compute dtype of float parameters; default float32 on CPU, the checkpoint's own elsewhere.
    """
    from mlx_lm.utils import load_config, load_model, load_tokenizer

    path = resolve_model_path(spec)
    _check_folder(path)
    try:
        added = normalize(load_config(path))  # transformers-5 keys -> mlx-lm's, on a copy
        model, config = load_model(path, model_config=added, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        raise ModelError(f"--model: mlx-lm could not load {path}: {str(e).splitlines()[0]}") from None
    target = MX_DTYPES[check_dtype(dtype)] if dtype else (mx.float32 if on_cpu() else None)
    if target is not None:
        model.update(tree_map(lambda a: a.astype(target) if mx.issubdtype(a.dtype, mx.floating) else a,
                              model.parameters()))
    if quantize:
        if "quantization" in config:
            raise ModelError(f"--quantize {quantize}: {spec} is already quantized "
                             f"({config['quantization'].get('bits')}-bit); drop --quantize")
        if group_size not in GROUP_SIZES:
            raise choice_error("--q-group-size", group_size, GROUP_SIZES, ModelError)
        if not quantize_model(model, quantize, group_size):
            raise ModelError(f"--quantize {quantize} --q-group-size {group_size}: no layer of {spec} has an input "
                             f"width divisible by {group_size}, so nothing would be quantized; pass a smaller "
                             f"--q-group-size ({', '.join(str(g) for g in GROUP_SIZES if g < group_size) or 'none'})")
        config = dict(config, quantization={"group_size": group_size, "bits": quantize})
    use_fast_cpu_path(model)
    mx.eval(model.parameters())
    return Base(model=model, tokenizer=tokenizer, config=config, path=path, source=spec,
                info={"fingerprint": fingerprint(model, config), "content": content_hash(model)})
