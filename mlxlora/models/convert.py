"""`mlxlora convert`: an MLX model folder from a transformers folder / hub id (mlx-lm's convert) or a .gguf file."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from ..files import atomic_folder, check_disjoint
from .gguf import convert_gguf
from .load import resolve_model_path


def convert_model(model: str, out_dir, quantize: int | None = None, q_group_size: int | None = None,
                  dtype: str | None = None, force: bool = False, requantize: bool | None = None) -> Path:
    """An MLX model folder from a transformers folder / hub id (mlx-lm's convert) or a .gguf file.

    quantize: bits (2-8); q_group_size and dtype go to mlx-lm (its defaults when None). GGUF files go
    through `mlxlora.models.gguf.convert_gguf` (group size 32, no dtype; `requantize`
    re-quantizes Q2_K/Q3_K/Q6_K to MLX groups instead of keeping them float16). Atomic; an existing
    non-empty `out_dir` is replaced only with `force`. Raises ModelError.
    """
    check_disjoint(out_dir, {"--model": model}, flag="--out", error=ModelError)
    if str(model).lower().endswith(".gguf"):
        given = [flag for flag, v in (("--q-group-size", q_group_size), ("--dtype", dtype)) if v is not None]
        if given:
            raise ModelError(f"{' and '.join(given)}: not used for a .gguf model (GGUF blocks are 32 wide, "
                             "weights keep their type); drop them")
        return Path(convert_gguf(model, out_dir, force=bool(force), quantize_bits=quantize, flag="--out",
                                 keep_float=not requantize))
    if requantize is not None:
        raise ModelError("--requantize: only used for a .gguf --model (its Q2_K/Q3_K/Q6_K tensors); drop it")
    from mlx_lm.convert import convert

    src = resolve_model_path(str(model))
    check_disjoint(out_dir, {"--model": str(src)}, flag="--out", error=ModelError)
    with atomic_folder(out_dir, force=force, error=ModelError, flag="--out") as tmp:
        try:
            convert(str(src), str(tmp / "model"), quantize=quantize is not None, q_bits=quantize,
                    q_group_size=q_group_size, dtype=dtype)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ModelError(f"--model {model}: mlx-lm could not convert it ({str(e).splitlines()[0]})") from None
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
    return Path(out_dir)
