"""Prompt rows for online training (GRPO): the prompt the policy completes and the row's reference answer.

Accepted rows, one JSON object per line (blank lines skipped), one format per file:

    {"prompt": "...", "answer": "..."}                       a user turn
    {"messages": [{"role": ..., "content": ...}, ...], "answer": "..."}   a conversation to continue
    {"prompt": [{"role": ..., "content": ...}, ...], "answer": "..."}     TRL's conversational form, same thing

The prompt is rendered exactly as SFT renders the same turns (data/rows.py): with the tokenizer's chat
template and the generation prompt (the assistant header) when it has one; a plain string prompt without
a template is used as it is; messages without a template use the fallback template. `answer` may be a
string or a number (kept as text); other keys stay on the row and reach user reward functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, RowError
from .chat import FALLBACK_CHAT_TEMPLATE, TokenizerInfo, encode_targets, render_chat
from .rows import ROLES, SplitStats, read_rows, tokenizer_template

PROMPT_ACCEPTED = ('{"prompt": "...", "answer": "..."} or {"messages": [{"role": "user", "content": "..."}], '
                   '"answer": "..."}')


@dataclass
class PromptRow:
    """One prompt. ids: its token ids (generation prompt included); answer: the reference answer or None;
    prompt: the prompt as the row gave it (a string or a message list); row: the whole JSON object."""

    ids: list[int]
    answer: str | None
    prompt: str | list
    row: dict
    line: int


@dataclass
class PromptSplit:
    """A prompt file's rows with what the run record and progress show of a split (stats: tokens are the
    prompts'; none carries loss until completions are sampled) and how prompts were rendered (template:
    "tokenizer", "fallback" or None, as data.rows.Split)."""

    rows: list[PromptRow]
    stats: SplitStats
    template: str | None
    template_text: str | None


def load_prompt_split(path: str | Path, tokenizer, *, need_answer: bool = True,
                      max_prompt_length: int | None = None) -> PromptSplit:
    """load_prompts plus the split's counts and template (see PromptSplit)."""
    rows = load_prompts(path, tokenizer, need_answer=need_answer, max_prompt_length=max_prompt_length)
    info = TokenizerInfo.from_tokenizer(tokenizer)
    chat = info.has_template or isinstance(rows[0].prompt, list)
    template = ("tokenizer" if info.has_template else "fallback") if chat else None
    text = FALLBACK_CHAT_TEMPLATE if template == "fallback" else tokenizer_template(info) if template else None
    stats = SplitStats(str(path), len(rows), len(rows), sum(len(r.ids) for r in rows), 0, 0, 0)
    return PromptSplit(rows, stats, template, text)


def load_prompts(path: str | Path, tokenizer, *, need_answer: bool = True,
                 max_prompt_length: int | None = None) -> list[PromptRow]:
    """Read a prompt JSONL file. Raises DataError "path:line: ..." for a bad row (no prompt, a missing
    answer when need_answer, a conversation ending with the assistant, a prompt over max_prompt_length
    tokens) and for a file without rows."""
    path = Path(path)
    info = TokenizerInfo.from_tokenizer(tokenizer)
    out: list[PromptRow] = []
    first: tuple[str, int] | None = None
    for lineno, row in read_rows(path):
        try:
            fmt, prompt = _prompt_of(row)
            if first is None:
                first = (fmt, lineno)
            elif fmt != first[0]:
                raise RowError(f"a {fmt!r} row, but line {first[1]} is a {first[0]!r} row; use one format per file")
            answer = _answer_of(row, need_answer)
            ids = _encode_prompt(info, prompt)
        except RowError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise DataError(f"{path}:{lineno}: the prompt has {len(ids)} tokens, more than the {max_prompt_length} "
                            "left for it (--max-seq-length minus --max-completion-length); raise --max-seq-length "
                            "or shorten the prompt")
        out.append(PromptRow(ids, answer, prompt, row, lineno))
    if not out:
        raise DataError(f"{path}: the file has no rows; write one JSON object per line, e.g. {PROMPT_ACCEPTED}")
    return out


def _prompt_of(row) -> tuple[str, str | list]:
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}; accepted rows: {PROMPT_ACCEPTED}")
    if "messages" in row:
        return "messages", _conversation(row["messages"], "messages")
    if "prompt" not in row:
        keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
        raise RowError(f"no 'prompt' or 'messages' key (keys: {keys}); accepted rows: {PROMPT_ACCEPTED}")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        return "messages", _conversation(prompt, "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RowError(f"'prompt' must be a non-empty string or a list of messages, got {prompt!r:.40}")
    return "prompt", prompt


def _conversation(messages, key: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{key!r} must be a non-empty list of {{\"role\": ..., \"content\": ...}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise RowError(f"{key}[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}")
    if messages[-1]["role"] == "assistant":
        raise RowError(f"{key} ends with an assistant turn; GRPO samples the assistant's reply, so end with "
                       "the user's turn")
    return messages


def _answer_of(row: dict, need: bool) -> str | None:
    answer = row.get("answer")
    if answer is None:
        if need:
            raise RowError("no 'answer'; the exact-match reward compares the completion's final answer with it "
                           "(add \"answer\": ... or use other --reward functions)")
        return None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise RowError(f"'answer' must be a string or a number, got {type(answer).__name__}")
    return answer if isinstance(answer, str) else str(answer)


def _encode_prompt(info: TokenizerInfo, prompt: str | list) -> list[int]:
    if isinstance(prompt, str) and not info.has_template:
        text = prompt
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = render_chat(info, messages, add_generation_prompt=True)  # the fallback template when none
    ids, _ = encode_targets(info, text, [])
    if info.bos_id is not None and (not ids or ids[0] != info.bos_id):
        ids = [info.bos_id] + ids
    return ids
