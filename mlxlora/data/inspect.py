"""`mlxlora data inspect`: samples token by token with the part that carries no loss marked."""

from __future__ import annotations

from itertools import groupby

from .chat import TokenizerInfo
from .rows import Split


def inspect_split(split: Split, tokenizer, n: int = 3) -> str:
    """A readable view of the first n samples, token by token, and the split's counts.

    Tokens are separated by '|'; tokens that get no loss are inside [ ]. In ordinary tokens the
    characters '|', '[', ']', '\\', newlines and control characters are backslash-escaped.
    """
    info = TokenizerInfo.from_tokenizer(tokenizer)
    st = split.stats
    share = 100.0 * st.target_tokens / max(st.tokens, 1)
    lines = [f"{st.path}: {st.rows} rows -> {st.samples} samples, {st.tokens} tokens, "
             f"{st.target_tokens} with loss ({share:.1f}%); {st.truncated} truncated, {st.dropped} dropped",
             "tokens are separated by '|'; tokens inside [ ] get no loss"]
    for k, sample in enumerate(split.samples[:n]):
        lines.append(f"--- sample {k}: {len(sample.ids)} tokens, {sum(sample.mask)} with loss")
        lines.append(_marked(info, sample))
    return "\n".join(lines)


def inspect_preference(split, tokenizer, n: int = 3) -> str:
    """inspect_split for a PreferenceSplit: both samples of the first n items (chosen and rejected, or a
    KTO completion with its label and the KL completion), tokens inside [ ] getting no loss."""
    info = TokenizerInfo.from_tokenizer(tokenizer)
    st = split.stats
    kto = split.labels is not None
    lines = [f"{st.path}: {st.rows} rows -> {st.samples} {'KTO rows' if kto else 'pairs'}, {st.tokens} tokens, "
             f"{st.target_tokens} with loss; {st.truncated} truncated, {st.dropped} dropped",
             "tokens are separated by '|'; tokens inside [ ] get no loss"]
    names = ("completion", "KL completion (another row's completion)") if kto else ("chosen", "rejected")
    for k, item in enumerate(split.items[:n]):
        label = f" (label {str(split.labels[k]).lower()})" if kto else ""
        lines.append(f"=== {'row' if kto else 'pair'} {k}{label}")
        for name, sample in zip(names, item):
            lines.append(f"--- {name}: {len(sample.ids)} tokens, {sum(sample.mask)} with loss")
            lines.append(_marked(info, sample))
    return "\n".join(lines)


def _marked(info: TokenizerInfo, sample) -> str:
    runs = []
    for target, group in groupby(zip(sample.ids, sample.mask), key=lambda t: t[1]):
        text = "|".join(_piece(info, tid) for tid, _ in group)
        runs.append(text if target else f"[{text}]")
    return "".join(runs)


def _piece(info: TokenizerInfo, tid: int) -> str:
    piece = info.hf.decode([tid])
    if info.special is not None and info.special.fullmatch(piece):
        return piece  # "<|im_end|>" reads better unescaped
    out = []
    for ch in piece:
        if ch in "|[]\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)
