"""Chat rendering and exact loss masks for assistant turns.

A `{"messages": [...]}` row is rendered to text with the tokenizer's chat template, tokenized
once, and each token is a target when its character span overlaps an assistant turn's span.
The span of assistant message i is found by rendering prefixes of the conversation:

    start = end of render(messages[:i], add_generation_prompt=True)   # after the role header
    end   = end of render(messages[:i+1])                             # the turn, as a prefix

and is then cut just after the LAST special token inside it: the end-of-turn token
(`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, EOS). What the template writes after that token
(the newline before the next turn) is not a target; role headers and system / user / tool turns
never are. Spans come from comparing rendered text, never from guessing role markers, so this
is exact for any template that writes each turn as it goes (ChatML, Llama-3, Gemma, ...). The
text is tokenized as a whole (what the model sees); a token straddling a span edge (BPE merging
header and content) is a target, since predicting it is part of producing the reply.

Some templates render an earlier assistant turn differently once later turns follow (Qwen3
drops the empty think block from past turns), so render(messages[:i+1]) is not a prefix of the
full text. Then the turn's end-of-turn token is read from that render and the span ends at its
first occurrence after `start` in the full text.

Base models without a chat template use FALLBACK_CHAT_TEMPLATE, which renders:

    ### System:
    {content}

    ### User:
    {content}

    ### Assistant:
    {content}{eos_token}

with a blank line between turns; only the assistant content and EOS get loss.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any

from ..errors import RowError

# The one home of the fallback template (a Jinja chat template, as in tokenizer_config.json).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


@dataclass
class TokenizerInfo:
    """What the data layer needs from a tokenizer, read once per split.

    tokenizer: what the caller passed (mlx-lm TokenizerWrapper or HF tokenizer); renders templates.
    hf: the HF tokenizer underneath; encodes text. bos_id: set only when the tokenizer adds BOS
    to plain text. special: regex matching any special token's text, or None.
    """

    tokenizer: Any
    hf: Any
    bos_id: int | None
    eos_id: int | None
    eos_token: str
    special: re.Pattern | None
    has_template: bool

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenizerInfo":
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        hf = tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
        bos_id = getattr(hf, "bos_token_id", None)
        if bos_id is not None and hf.encode("a", add_special_tokens=True)[:1] != [bos_id]:
            bos_id = None
        specials = set(getattr(hf, "all_special_tokens", None) or [])
        for tok in (getattr(hf, "added_tokens_decoder", None) or {}).values():
            if getattr(tok, "special", False):
                specials.add(str(tok))
        specials.discard("")
        special = None
        if specials:  # longest first, so "<|eot|>" never shadows "<|eot_id|>"
            special = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        flag = getattr(tokenizer, "has_chat_template", None)
        has_template = flag if isinstance(flag, bool) else getattr(hf, "chat_template", None) is not None
        return cls(tokenizer, hf, bos_id, getattr(hf, "eos_token_id", None),
                   getattr(hf, "eos_token", None) or "", special, has_template)


def render_fallback_template(messages: list[dict], eos_token: str = "",
                             add_generation_prompt: bool = False) -> str:
    """Render `messages` with FALLBACK_CHAT_TEMPLATE (for tokenizers without a chat template)."""
    return _fallback().render(messages=messages, eos_token=eos_token,
                              add_generation_prompt=add_generation_prompt)


def render_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                    eos_token: str = "", bos_token: str = "") -> str:
    """Render a recorded chat template (Jinja text) in a sandbox, as tokenizers render theirs."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            eos_token=eos_token, bos_token=bos_token)


def _raise(message):
    raise ValueError(message)


def fallback_prompt(prompt: str) -> str:
    """A one-turn generation prompt in the fallback template, as training rendered user turns."""
    return render_fallback_template([{"role": "user", "content": prompt}], add_generation_prompt=True)


@functools.lru_cache(maxsize=1)
def _fallback():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment().from_string(FALLBACK_CHAT_TEMPLATE)


def render_chat(info: TokenizerInfo, messages: list[dict], tools: list | None = None,
                add_generation_prompt: bool = False) -> str:
    """The conversation as text, by the tokenizer's chat template or the fallback. Raises RowError."""
    if not info.has_template:
        if tools:
            raise RowError("this tokenizer has no chat template, and the fallback template cannot "
                           "render 'tools'; remove 'tools' or use a model with a chat template")
        if any(not isinstance(m.get("content"), str) for m in messages):
            raise RowError("this tokenizer has no chat template, and the fallback template renders "
                           "only string 'content' (no tool calls); use a model with a chat template")
        return render_fallback_template(messages, info.eos_token, add_generation_prompt)
    try:
        text = info.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # jinja errors, raise_exception(...) in the template, custom renderers
        raise RowError(f"the chat template cannot render this conversation: {_one_line(e)}") from None
    if not isinstance(text, str):
        raise RowError(f"the chat template returned {type(text).__name__}, not text")
    return text


def chat_targets(info: TokenizerInfo, messages: list[dict],
                 tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character spans that get loss (see module docstring).

    Returns (text, spans): spans are [start, end) offsets into text, one per assistant message.
    Raises RowError when the template fails, ignores `tools`, or drops an assistant turn.
    """
    full = render_chat(info, messages, tools)
    if tools and full == render_chat(info, messages, None):
        raise RowError("the chat template ignores 'tools' (it cannot render tool definitions); "
                       "remove 'tools' from the row or use a model whose template supports tools")
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        head = render_chat(info, messages[:i], tools, add_generation_prompt=True)
        start = _turn_start(head, full)
        upto = render_chat(info, messages[:i + 1], tools)
        if full.startswith(upto):
            eot = _last_special(info, full, start, len(upto))
            end = eot.end() if eot else len(upto)
        else:
            eot = _last_special(info, upto, len(os.path.commonprefix([head, upto])), len(upto))
            found = full.find(eot.group(0), start) if eot else -1
            if found < 0:
                raise RowError(f"cannot find where assistant message {i} ends in the rendered chat; "
                               "the chat template renders it differently once later turns follow")
            end = found + len(eot.group(0))
        if end <= start:
            raise RowError(f"the chat template renders assistant message {i} as nothing")
        spans.append((start, end))
    return full, spans


def _turn_start(head: str, full: str) -> int:
    # Where the assistant content begins in full: just after the header `head` renders.
    if full.startswith(head):
        return len(head)
    at = full.find(head)  # e.g. BOS written only before the first message, and this is message 0
    if at >= 0:
        return at + len(head)
    return len(os.path.commonprefix([head, full]))  # the generation prompt adds more than the turn has


def _last_special(info: TokenizerInfo, text: str, start: int, end: int) -> re.Match | None:
    # The last special token (the end-of-turn token) inside text[start:end], or None.
    last = None
    if info.special is not None:
        for last in info.special.finditer(text, start, end):
            pass
    return last


def encode_targets(info: TokenizerInfo, text: str,
                   spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Tokenize text (no special tokens added); a token is a target when it overlaps a span.

    Uses the tokenizer's character offsets; a tokenizer without them tokenizes the pieces
    between span boundaries separately. Raises RowError for text that is not valid Unicode.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(f"the text contains an unpaired surrogate {text[e.start]!r}; "
                       "write valid Unicode (e.g. a whole emoji, not half of it)") from None
    try:
        enc = info.hf(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc.get("offset_mapping")  # pure-Python tokenizers leave it out
    except (NotImplementedError, ValueError):  # ... or refuse (MistralCommonBackend)
        offsets = None
    if offsets is None:
        return _encode_pieces(info, text, spans)
    mask = [any(b > s and a < e for s, e in spans) for a, b in offsets]
    return list(enc["input_ids"]), mask


def _encode_pieces(info: TokenizerInfo, text: str, spans: list[tuple[int, int]]):
    cuts = sorted({0, len(text), *(c for span in spans for c in span)})
    ids, mask = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = info.hf.encode(text[a:b], add_special_tokens=False)
        ids += piece
        mask += [any(s <= a and b <= e for s, e in spans)] * len(piece)
    return ids, mask


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
