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
        runs = []
        for target, group in groupby(zip(sample.ids, sample.mask), key=lambda t: t[1]):
            text = "|".join(_piece(info, tid) for tid, _ in group)
            runs.append(text if target else f"[{text}]")
        lines.append("".join(runs))
    return "\n".join(lines)


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
