"""The tokenizer of a model folder as GGUF `tokenizer.*` metadata (what llama.cpp tokenizes with).

Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2/3) become llama.cpp's "gpt2" model:
the vocabulary in id order, the merges, the token types (added special tokens are CONTROL, other
added tokens USER_DEFINED) and `tokenizer.ggml.pre`, the name of llama.cpp's split rule, read from
tokenizer.json's pre-tokenizer through PRE_TOKENIZERS (the inverse of models/gguf_tokenizer.py's table).
Whether a BOS/EOS is added is read off the tokenizer itself (encode a letter), not guessed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..files import read_json
from .gguf_tokenizer import LLAMA3_RE, QWEN2_RE

# tokenizer.json pre-tokenizer, as a tuple of steps -> llama.cpp's tokenizer.ggml.pre
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_RE), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_RE), ("ByteLevel", False)): "qwen2",
}
NORMAL, USER_DEFINED, CONTROL, UNUSED = 1, 4, 3, 5  # tokenizer.ggml.token_type values


@dataclass
class VocabInfo:
    """What the Modelfile needs from the tokenizer."""

    chat_template: str | None
    eos: str | None
    specials: list[str]


def _steps(pre: dict | None) -> tuple:
    """tokenizer.json's pre_tokenizer as ((type, key parameter), ...), Sequences flattened."""
    if not pre:
        return ()
    if pre.get("type") == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _steps(p))
    kind = pre.get("type")
    if kind == "ByteLevel":
        return ((kind, bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return ((kind, bool(pre.get("individual_digits"))),)
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        return ((kind, pattern.get("Regex", pattern.get("String"))),)
    return ((kind, None),)


def pre_tokenizer_name(tokenizer: dict, where: Path) -> str:
    """llama.cpp's name for the split rule of `tokenizer` (tokenizer.json's dict); warns on an unknown one."""
    steps = _steps(tokenizer.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(steps)
    if name is None:
        warnings.warn(f"{where}: llama.cpp has no pre-tokenizer known to mlxlora for {steps!r}; writing "
                      "'default', so llama.cpp may split some texts differently from this tokenizer")
        return "default"
    return name


def _content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def add_tokenizer(writer, folder: Path, n_vocab: int) -> VocabInfo:
    """Write the `tokenizer.*` metadata of the tokenizer in `folder` into `writer` (a GGUFWriter).

    n_vocab: rows of the embedding; missing ids are padded as unused `[PAD<id>]` tokens.
    Raises ModelError for a missing tokenizer.json or a kind llama.cpp's "gpt2" model cannot hold.
    """
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no tokenizer.json; GGUF export needs the model's fast tokenizer")
    tj = read_json(path, ModelError)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelError(f"{path}: GGUF export supports byte-level BPE tokenizers (GPT-2 style) only; this one is "
                         f"{model.get('type')} with a {(tj.get('decoder') or {}).get('type')} decoder")
    tokens: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in tj.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    n = max(n_vocab, max(tokens) + 1)
    if n > n_vocab:
        raise ModelError(f"{path}: the tokenizer has {n} tokens but the embedding only {n_vocab} rows")
    table = [tokens.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ModelError(f"{path}: the BPE tokenizer has no merges; llama.cpp refuses to load such a vocabulary")

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tj, path))
    writer.add_token_list([t for t, _ in table])
    writer.add_token_types([ty for _, ty in table])
    writer.add_token_merges(merges)

    config = read_json(Path(folder) / "tokenizer_config.json", ModelError) \
        if (Path(folder) / "tokenizer_config.json").is_file() else {}
    ids = {t: i for i, (t, _) in enumerate(table)}
    special = {key: _content(config.get(f"{key}_token")) for key in ("bos", "eos", "unk", "pad")}
    for key, handler in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                         ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if special[key] in ids:
            handler(ids[special[key]])
    encoded = Tokenizer.from_file(str(path)).encode("a").ids  # what the tokenizer adds around a text
    writer.add_add_bos_token(bool(encoded) and special["bos"] in ids and encoded[0] == ids[special["bos"]])
    writer.add_add_eos_token(bool(encoded) and special["eos"] in ids and encoded[-1] == ids[special["eos"]])
    template = config.get("chat_template")
    jinja = Path(folder) / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template:
        writer.add_chat_template(template)
    return VocabInfo(template, special["eos"] if special["eos"] in ids else None,
                     [t for t, ty in table if ty == CONTROL])


__all__ = ["PRE_TOKENIZERS", "VocabInfo", "add_tokenizer", "pre_tokenizer_name"]
