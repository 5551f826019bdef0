"""Share adapters and models: export a transformers folder, write its card, upload to the Hugging Face Hub.

Uploads go through huggingface_hub's `HfApi` (create_repo, then one create_commit). The token
comes from the argument, HF_TOKEN or huggingface_hub's login cache; it is handed to HfApi and
never printed, logged or written. Checkpoints and hidden/temporary files are not uploaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .cards import CARD_FILE, adapter_card, adapter_summary, base_license, card_inputs, model_card
from .config import ExportConfig
from .errors import HubError, MlxloraError, ModelError
from .files import atomic_write_text, check_disjoint, check_output, read_json, safetensors_header, write_failure
from .inference import load_with_adapter
from .lora.surgery import fuse_model
from .models import resolve_model_path
from .models.export_gguf import check_gguf_exportable, export_gguf
from .models.hf_export import check_exportable, export_hf

# Never uploaded: training checkpoints, hidden files/folders (our atomic-write temporaries are
# hidden), editor/temporary leftovers. fnmatch patterns on paths relative to the folder.
IGNORE_PATTERNS = ["checkpoints/*", "checkpoints", ".*", "*/.*", "*.tmp", "*.part", "*~", "__pycache__/*",
                   "*/__pycache__/*"]
LOGIN_HINT = ("log in with `hf auth login` (or set HF_TOKEN to a write token from "
              "https://huggingface.co/settings/tokens)")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# JSON files that record local paths (the base folder, data files, a resumed run). Their uploaded
# copies show only each absolute path's last component; the local files stay as they are.
PUBLIC_JSON = ("mlxlora.json", "adapter_config.json", "fuse_report.json")
_ABS_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/])")




# ---------------------------------------------------------------- folders and cards

def folder_kind(path) -> str:
    """"adapter" (adapter_config.json), "mlx" (mlx-lm model) or "hf" (transformers model). Raises HubError."""
    d = Path(path)
    if not d.is_dir():
        raise HubError(f"{d} is not a folder; give an adapter folder (mlxlora train) or a model folder "
                       "(mlxlora fuse / export-model)")
    if (d / "adapter_config.json").is_file():
        return "adapter"
    if not (d / "config.json").is_file():
        raise HubError(f"{d} holds neither adapter_config.json (an adapter) nor config.json (a model); "
                       "nothing to upload")
    config = read_json(d / "config.json", HubError)
    if "quantization" in config:
        return "mlx"
    return "mlx" if any(_safetensors_format(f) == "mlx" for f in sorted(d.glob("*.safetensors"))) else "hf"


def _safetensors_format(path: Path) -> str | None:
    """The `format` metadata of a safetensors file ("mlx" when mlx-lm wrote it, "pt" for transformers)."""
    try:
        return (safetensors_header(path).get("__metadata__") or {}).get("format")
    except MlxloraError:
        return None


def ensure_card(folder, kind: str | None = None, *, repo_id: str | None = None, base_model: str | None = None,
                adapter_info: dict | None = None) -> bool:
    """Write README.md if it is missing, or refresh it if mlxlora wrote it; a user's own README is kept.

    Returns True when the card was (re)written. The stored inputs of an earlier generated card
    (base model, license, fused adapter summary) are kept unless given again.
    """
    d = Path(folder)
    kind = kind or folder_kind(d)
    readme = d / CARD_FILE
    license = None
    if readme.is_file():
        inputs = card_inputs(readme.read_text(errors="replace"))
        if inputs is None:
            return False
        base_model = base_model or inputs.get("base_model")
        adapter_info = adapter_info or inputs.get("adapter_info")
        license = inputs.get("license")
    if kind == "adapter":
        text = adapter_card(d, repo_id=repo_id, base_model=base_model, license=license)
    else:
        text = model_card(d, kind, base_model=base_model, adapter_info=adapter_info, repo_id=repo_id, license=license)
    try:
        atomic_write_text(readme, text)
    except OSError as e:
        raise HubError(f"{readme}: cannot write the model card ({write_failure(e)}); make the folder writable "
                       "or add a README.md yourself") from None
    return True


# ---------------------------------------------------------------- upload

def resolve_token(token: str | None = None) -> str:
    """The token to upload with: `token`, else HF_TOKEN, else huggingface_hub's login cache. Raises HubError."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as e:  # e.g. HF_OIDC_RESOURCE set but the token exchange failed
        raise HubError(f"could not get a Hugging Face token ({type(e).__name__}); {LOGIN_HINT}") from None
    if not found:
        raise HubError(f"no Hugging Face token found: {LOGIN_HINT}")
    return found


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid Hub model id "user/name"; else HubError naming --repo."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise HubError(f"--repo: {repo_id!r} is not a Hub repo id; write it as user/name (or org/name)")
    return repo_id


def upload(path, repo_id: str, *, private: bool = False, message: str | None = None, token: str | None = None,
           endpoint: str | None = None, base_model: str | None = None, adapter_info: dict | None = None) -> str:
    """Upload an adapter or model folder to the Hub model repo `repo_id`; returns the commit URL.

    Creates the repo if needed (private when `private`), writes or refreshes README.md (a card
    the user wrote is kept), then uploads every file except checkpoints/ and hidden/temporary
    files in one commit; the uploaded JSON records hold no local paths (public_json). base_model: the base's hub id for the card, when the folder records only a local
    path. Raises HubError (one line, never containing the token) when there is no token, the
    folder is not an adapter/model, or the Hub refuses.
    """
    d = Path(path)
    kind = folder_kind(d)
    check_repo_id(repo_id)
    tok = resolve_token(token)
    ensure_card(d, kind, repo_id=repo_id, base_model=base_model, adapter_info=adapter_info)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=tok)
    operations = upload_operations(d, base_model)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, repo_type="model",
                                 commit_message=message or f"Upload {kind} with mlxlora")
    except _hub_errors() as e:
        raise HubError(_explain(e, repo_id, api.endpoint).replace(tok, "<token>")) from None
    return str(info.commit_url)


def upload_operations(folder: Path, base_model: str | None = None) -> list:
    """The commit that uploads `folder`: every file but IGNORE_PATTERNS, PUBLIC_JSON files made public."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=public_json(folder / name, base_model)
                               if name in PUBLIC_JSON else str(folder / name))
            for name in filter_repo_objects(names, ignore_patterns=IGNORE_PATTERNS)]


def public_json(path: Path, base_model: str | None = None) -> bytes:
    """The contents of JSON file `path` with every absolute local path cut to its last component;
    PEFT's base_model_name_or_path becomes `base_model` (a hub id) when given. A file that is not
    JSON is returned unchanged."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw

    def clean(value, key=None):
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and _ABS_PATH.match(value):
            if key == "base_model_name_or_path" and base_model:
                return base_model
            return re.split(r"[\\/]", value.rstrip("/\\"))[-1]
        return value

    return (json.dumps(clean(data), indent=2) + "\n").encode()


def upload_after_fuse(out_dir, repo_id: str, *, adapter=None, base_model: str | None = None, **kw) -> str:
    """Upload a folder `mlxlora fuse` just wrote: its card names the base and summarizes the fused adapter.

    adapter: the adapter folder that was fused (for the card's training summary). Other keywords
    go to upload(). Raises HubError like upload().
    """
    info = adapter_summary(adapter) if adapter else None
    if base_model is None and info:
        base_model = info.get("base_model")
    return upload(out_dir, repo_id, base_model=base_model, adapter_info=info, **kw)


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [HfHubHTTPError, OfflineModeIsEnabled, ConnectionError]
    for mod in ("httpx2", "httpx", "requests"):  # the transport huggingface_hub uses, by version
        try:
            m = __import__(mod)
        except ImportError:
            continue
        base = getattr(m, "HTTPError", None) or getattr(m, "RequestException", None)
        if base is not None:
            errors.append(base)
    return tuple(errors)


def _explain(e: BaseException, repo_id: str, endpoint: str) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to upload"
    status = getattr(getattr(e, "response", None), "status_code", None)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if status == 401:
        return f"the Hub rejected the token (401) uploading to {repo_id}: {LOGIN_HINT}"
    if status == 403:
        return f"no write access to {repo_id} (403): use a token with write permission, or your own namespace"
    if status is not None:
        return f"upload to {repo_id} failed ({status}): {first}"
    return f"could not reach {endpoint} to upload {repo_id} ({type(e).__name__}: {first}); check the network"


# ---------------------------------------------------------------- export for transformers

def export_model(model: str, out, *, adapter=None, config: ExportConfig | None = None, force: bool = False,
                 base_model: str | None = None) -> Path:
    """Write `model` (optionally with `adapter` fused in float) as a transformers folder with a card,
    or with config.format "gguf" as one llama.cpp GGUF file (config.gguf_type) plus an Ollama Modelfile.

    model: anything load_base takes. Quantized layers are dequantized; hf weights are written in
    config.dtype, sharded above config.max_shard_size. Raises ModelError (unsupported
    architecture, existing `out` without force, bad dtype/size, K-quant without llama-quantize) or AdapterError.
    """
    cfg = config or ExportConfig()
    out = Path(out)
    check_disjoint(out, {"--model": model, "--adapter": adapter}, flag="--out", error=ModelError)
    check_output(out, force=force, flag="--out", error=ModelError)
    src = resolve_model_path(model)
    try:
        model_type = json.loads((src / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None  # load_base below names what is missing
    gguf = cfg.format == "gguf"
    if model_type is not None:  # before loading: fail in a second, not after minutes
        check_gguf_exportable(model_type, cfg.gguf_type) if gguf else check_exportable(model_type)
    base = load_with_adapter(model, adapter)
    if adapter:
        fuse_model(base.model, dequantize=True)
    if gguf:
        return export_gguf(base.model, base.config, base.path, out, cfg.gguf_type, force=force, flag="--out")
    card = model_card(out, "hf", base_model=base_model or model,
                      adapter_info=adapter_summary(adapter) if adapter else None, license=base_license(base.path))
    export_hf(base.model, base.config, base.path, out, cfg.dtype, force=force, max_shard_size=cfg.max_shard_size,
              extra_files={CARD_FILE: card}, flag="--out")  # the card goes in with the weights, atomically
    return out


__all__ = ["HubError", "ExportConfig", "IGNORE_PATTERNS", "folder_kind", "ensure_card", "resolve_token",
           "upload", "upload_after_fuse", "export_model"]
