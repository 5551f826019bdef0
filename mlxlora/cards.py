"""Model cards (README.md) for adapters and fused models shared on the Hugging Face Hub.

A card is YAML front matter (what the Hub indexes: library, base model, tags) plus a short
body: what was trained, on how much data, and how to load it. Cards are built from the
folder's own files (mlxlora.json, adapter_config.json, config.json) and never hold a token
or a local path: a path is shown by its last component only.

A generated card ends with `<!-- mlxlora card {...} -->` holding what it was made from, so an
upload can refresh it (e.g. with the repo id) while a README the user wrote is left alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .files import read_json_or_empty

CARD_FILE = "README.md"
_MARKER = re.compile(r"<!-- mlxlora card (\{.*?\}) -->", re.S)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_DIR = re.compile(r"models--([^/\\]+?)--([^/\\]+)")
_PLACEHOLDER = "<user>/<repo>"


# ---------------------------------------------------------------- names

def hub_id(name) -> str | None:
    """The Hub repo id `name` stands for: "user/model", or a Hugging Face cache snapshot path; else None."""
    if not name:
        return None
    text = str(name)
    m = _CACHE_DIR.search(text)
    if m:
        return f"{m[1]}/{m[2]}"
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists():
        return text
    return None


def display_name(name) -> str | None:
    """A name safe to print in a card: the hub id, else the last component of a path."""
    if not name:
        return None
    return hub_id(name) or Path(str(name).rstrip("/\\")).name or None


def base_license(base) -> str | None:
    """The `license:` of a local base model folder's README front matter, if there is one."""
    if not base:
        return None
    readme = Path(str(base)).expanduser() / CARD_FILE
    try:
        return front_matter(readme.read_text()).get("license") if readme.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------- reading folders

def adapter_summary(adapter_dir) -> dict:
    """What a card says about an adapter folder, from mlxlora.json (or PEFT's adapter_config.json alone).

    Keys (absent when unknown): base_model (as recorded), base_path, rank, alpha, targets, dora,
    rslora, dropout, steps, tokens, final_train_loss, final_val_loss, base_val_loss, samples
    ({split: count}), lr, batch_size, quantize, seconds, written, versions.
    """
    d = Path(adapter_dir)
    peft = read_json_or_empty(d / "adapter_config.json")
    rec = read_json_or_empty(d / "mlxlora.json")
    lora = rec.get("lora_config") or {}
    run = rec.get("run_record") or {}
    train = rec.get("train_config") or {}
    info = {
        "base_model": rec.get("base_model") or peft.get("base_model_name_or_path"),
        "base_path": run.get("base_path"),
        "rank": lora.get("r", peft.get("r")),
        "alpha": lora.get("lora_alpha", peft.get("lora_alpha")),
        "targets": lora.get("target_modules", peft.get("target_modules")),
        "dora": bool(lora.get("use_dora", peft.get("use_dora", False))),
        "rslora": bool(lora.get("use_rslora", peft.get("use_rslora", False))),
        "dropout": lora.get("lora_dropout", peft.get("lora_dropout")),
        "steps": run.get("steps"),
        "tokens": run.get("tokens"),
        "final_train_loss": run.get("final_train_loss"),
        "final_val_loss": run.get("final_val_loss"),
        "base_val_loss": run.get("base_val_loss"),
        "samples": {k: v["samples"] for k, v in (run.get("data") or {}).items()
                    if isinstance(v, dict) and v.get("samples") is not None},
        "lr": train.get("lr"),
        "batch_size": train.get("batch_size"),
        "quantize": train.get("quantize") or (run.get("base_quantization") or {}).get("bits"),
        "seconds": run.get("seconds"),
        "written": run.get("written"),
        "versions": run.get("versions"),
    }
    return {k: v for k, v in info.items() if v not in (None, {}, [])}


def public_summary(info: dict | None) -> dict | None:
    """`info` without local paths: the base shown by hub id or last path component, no base_path."""
    if not info:
        return None
    out = {k: v for k, v in info.items() if k != "base_path"}
    if out.get("base_model"):
        out["base_model"] = display_name(out["base_model"])
    return out


# ---------------------------------------------------------------- front matter

def front_matter(card: str) -> dict:
    """The YAML front matter of a card as a dict ({} when there is none)."""
    import yaml

    m = re.match(r"^---\r?\n(.*?)\r?\n---\r?\n", card, re.S)
    data = yaml.safe_load(m[1]) if m else None
    return data if isinstance(data, dict) else {}


def card_inputs(card: str) -> dict | None:
    """The inputs a generated card was made from, or None for a card mlxlora did not write."""
    m = _MARKER.search(card)
    if not m:
        return None
    try:
        data = json.loads(m[1])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _render(meta: dict, body: list[str], inputs: dict) -> str:
    import yaml

    meta = {k: v for k, v in meta.items() if v is not None}
    marker = json.dumps(inputs, sort_keys=True).replace(">", "\\u003e")
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"
    text += "\n".join(body).rstrip() + "\n\n" + f"<!-- mlxlora card {marker} -->\n"
    return _scrub(text)


def _scrub(text: str) -> str:
    """Last line of defence: no absolute path under the user's home folder survives into a card."""
    home = str(Path.home())
    if len(home) > 1:
        text = re.sub(re.escape(home) + r"[^\s`'\")|]*", lambda m: Path(m[0]).name or "~", text)
    return text


# ---------------------------------------------------------------- bodies

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def _both(info: dict, a: str, b: str, fmt) -> str | None:
    """fmt(info[a], info[b]) when both are known."""
    return fmt(info[a], info[b]) if a in info and b in info else None


def _summary_table(info: dict) -> list[str]:
    """A two-column markdown table of what adapter_summary() found; unknown rows are left out."""
    i = info
    val = _both(i, "base_val_loss", "final_val_loss", lambda b, f: f"{_fmt(b)} → {_fmt(f)}")
    versions = i.get("versions") or {}
    rows = [
        ("method", "DoRA" if i.get("dora") else "LoRA" + (" (rsLoRA scaling)" if i.get("rslora") else "")),
        ("rank / alpha", _both(i, "rank", "alpha", lambda r, a: f"{r} / {a:g}")),
        ("target modules", _fmt(i["targets"]) if "targets" in i else None),
        ("dropout", _fmt(i["dropout"]) if i.get("dropout") else None),
        ("base quantized at load time", f"{i['quantize']}-bit (QLoRA)" if i.get("quantize") else None),
        ("optimizer steps", i.get("steps")),
        ("batch size / peak lr", _both(i, "batch_size", "lr", lambda b, lr: f"{b} / {lr:g}")),
        ("training tokens", i.get("tokens")),
        ("samples", ", ".join(f"{k} {v}" for k, v in i["samples"].items()) if i.get("samples") else None),
        ("final train loss", _fmt(i["final_train_loss"]) if "final_train_loss" in i else None),
        ("validation loss (base → adapter)", val or (_fmt(i["final_val_loss"]) if "final_val_loss" in i else None)),
        ("training time", f"{i['seconds']:.0f} s" if "seconds" in i else None),
        ("trained", i.get("written")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform") or None),
    ]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]


def adapter_card(adapter_dir, *, repo_id: str | None = None, base_model: str | None = None,
                 license: str | None = None) -> str:
    """README.md text for an adapter folder (PEFT format, trained with mlxlora or not).

    base_model: the base's hub id when the folder only records a local path. repo_id: where the
    adapter will live (used in the loading examples). Raises nothing: unknown facts are left out.
    """
    info = adapter_summary(adapter_dir)
    base_id = hub_id(base_model) or hub_id(info.get("base_model"))
    base_shown = base_id or display_name(base_model or info.get("base_model")) or "BASE_MODEL"
    license = license or base_license(info.get("base_path")) or base_license(info.get("base_model"))
    repo = repo_id or _PLACEHOLDER
    tags = ["mlxlora", "lora", "peft", "mlx"] + (["dora"] if info.get("dora") else [])
    meta = {"base_model": base_id, "library_name": "peft", "license": license, "pipeline_tag": "text-generation",
            "tags": tags}
    body = [f"# {repo_id.split('/')[-1] if repo_id else Path(adapter_dir).resolve().name}", "",
            f"A {'DoRA' if info.get('dora') else 'LoRA'} adapter for `{base_shown}`, trained with "
            "mlxlora on MLX and saved in PEFT's format.", ""]
    if not base_id:
        body += [f"The base model was a local folder (`{base_shown}`); use the same weights to load this adapter.", ""]
    body += ["## Training", ""] + _summary_table(info) + [""]
    if (Path(adapter_dir) / "loss.png").is_file():
        body += ["![training and validation loss](loss.png)", ""]
    body += [
        "## Use it", "",
        "With mlxlora:", "", "```bash",
        f"mlxlora generate --model {base_shown} --adapter {repo} --prompt \"Hello\"", "```", "",
        "With PEFT (transformers, PyTorch):", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_shown}")',
        f'model = PeftModel.from_pretrained(base, "{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_shown}")', "```", "",
        "With mlx-lm (convert the adapter to its format first):", "", "```bash",
        f"hf download {repo} --local-dir adapter",
        "mlxlora export-adapter adapter --to mlx-lm adapter-mlx",
        f"mlx_lm.generate --model {base_shown} --adapter-path adapter-mlx --prompt \"Hello\"", "```",
    ]
    if info.get("quantize"):
        body += ["", f"The base was quantized to {info['quantize']} bits while training (QLoRA); the adapter "
                 "itself is float and also applies to the unquantized base."]
    return _render(meta, body, {"kind": "adapter", "base_model": display_name(base_model), "license": license})


def _model_facts(model_dir) -> dict:
    cfg = read_json_or_empty(Path(model_dir) / "config.json")
    q = cfg.get("quantization") or {}
    return {"model_type": cfg.get("model_type"), "bits": q.get("bits"), "group_size": q.get("group_size"),
            "dtype": cfg.get("dtype") or cfg.get("torch_dtype")}


def model_card(model_dir, kind: str = "mlx", base_model: str | None = None, adapter_info: dict | None = None, *,
               repo_id: str | None = None, license: str | None = None) -> str:
    """README.md text for a full model folder: `kind` "mlx" (mlx-lm format) or "hf" (transformers).

    base_model: what it was made from (hub id or path; a path shows as its last component).
    adapter_info: adapter_summary() of the adapter fused into it, if any. Raises ValueError for a bad kind.
    """
    if kind not in ("mlx", "hf"):
        raise ValueError(f"model_card: kind must be 'mlx' or 'hf', got {kind!r}")
    facts = _model_facts(model_dir)
    base_id = hub_id(base_model)
    base_shown = base_id or display_name(base_model)
    license = license or base_license(base_model)
    repo = repo_id or _PLACEHOLDER
    meta = {"base_model": base_id, "library_name": "mlx" if kind == "mlx" else "transformers",
            "license": license, "pipeline_tag": "text-generation",
            "tags": ["mlx", "mlxlora"] if kind == "mlx" else ["mlxlora"]}
    what = "an MLX (mlx-lm) model" if kind == "mlx" else "a transformers model"
    if facts["bits"]:
        what += f", {facts['bits']}-bit (MLX quantization, group size {facts['group_size']})"
    elif facts["dtype"]:
        what += f" in {facts['dtype']}"
    body = [f"# {repo_id.split('/')[-1] if repo_id else Path(model_dir).resolve().name}", "",
            f"This is {what}" + (f", made from `{base_shown}`" if base_shown else "") + " with mlxlora.", ""]
    adapter_info = public_summary(adapter_info)
    if adapter_info:
        body += ["A LoRA adapter is fused into its weights (no adapter is needed to use it):", ""]
        body += _summary_table(adapter_info) + [""]
    body += ["## Use it", ""]
    if kind == "mlx":
        body += ["```bash", "pip install mlx-lm", f"mlx_lm.generate --model {repo} --prompt \"Hello\"",
                 f"mlxlora generate --model {repo} --prompt \"Hello\"", "```", "", "```python",
                 "from mlx_lm import load, generate", "",
                 f'model, tokenizer = load("{repo}")',
                 'print(generate(model, tokenizer, prompt="Hello", max_tokens=64))', "```"]
    else:
        body += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                 f'model = AutoModelForCausalLM.from_pretrained("{repo}")', "```"]
    inputs = {"kind": kind, "base_model": base_id or base_shown, "adapter_info": public_summary(adapter_info),
              "license": license}
    return _render(meta, body, inputs)


__all__ = ["CARD_FILE", "hub_id", "display_name", "base_license", "adapter_summary", "public_summary",
           "front_matter", "card_inputs", "adapter_card", "model_card"]
