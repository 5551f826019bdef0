"""The tokenizer of a GGUF file, rebuilt from its `tokenizer.ggml.*` metadata as a `tokenizers.Tokenizer`
plus tokenizer_config.json: byte-level BPE (gpt2 model) and SentencePiece vocabularies (llama model)."""

from __future__ import annotations

import warnings

from ..errors import ModelError

# tokenizer.ggml.pre -> (split digits one by one, Split regex or None for GPT-2's, ignore_merges)
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": (False, None, False), "gpt-2": (False, None, False), "gpt2": (False, None, False),
    "smollm": (True, None, False), "starcoder": (True, None, False), "refact": (True, None, False),
    "llama-bpe": (False, LLAMA3_RE, True), "llama3": (False, LLAMA3_RE, True),
    "smaug-bpe": (False, LLAMA3_RE, True),
    "qwen2": (False, QWEN2_RE, False), "deepseek-r1-qwen": (False, QWEN2_RE, False),
}

NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # tokenizer.ggml.token_type values


def build_tokenizer(meta: dict):
    """(`tokenizers.Tokenizer`, tokenizer_config dict) from GGUF `tokenizer.ggml.*` metadata."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    tok = _bpe_tokenizer(meta, tokens) if kind == "gpt2" else _spm_tokenizer(meta, tokens, types)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (UNKNOWN, CONTROL)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos")
    post = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    if meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        post.append(processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]))
    if post:
        tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    arch = meta.get("general.architecture")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": token("eos"), "pad_token": token("padding"), "unk_token": token("unknown"),
              "clean_up_tokenization_spaces": False,
              "model_max_length": int(meta.get(f"{arch}.context_length", 2048))}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config


def _bpe_tokenizer(meta: dict, tokens: list):
    """Byte-level BPE (GPT-2 style): vocab + merges, split regex picked by `tokenizer.ggml.pre`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is unknown; using GPT-2's split rule, "
                      "so some texts may tokenize differently from llama.cpp")
    digits, regex, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex is not None:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_tokenizer(meta: dict, tokens: list, types: list):
    """SentencePiece-style vocab as a byte-fallback BPE whose merge order follows the scores.

    llama.cpp's SPM tokenizer merges the adjacent pair whose joined piece scores highest;
    a BPE with merges ranked by that score does the same.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    normal = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    ranked = []
    for t in normal:
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[vocab[t]], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id],
                               fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    # Like llama.cpp, prefix every text run (also one after a special token) with a space,
    # even one that already starts with a space (Metaspace would skip that case).
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok
