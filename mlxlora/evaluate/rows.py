"""The rows `eval --generate` answers: a prompt to continue (token ids) and the reference answer.

A prompt/completion row asks its prompt (as a user turn when the tokenizer has a chat template, else
the text as it is, as training rendered it) and its reference is the completion. A chat row asks the
conversation up to its last assistant turn (the tokenizer's chat template, else mlxlora's fallback
template) and its reference is that turn. A text row has no reference: it is refused, naming the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import data as D
from ..errors import DataError, RowError


@dataclass
class EvalRow:
    """One question. line: where it is in its file; prompt: what is shown in the report; ids: the
    rendered prompt's token ids; reference: the expected answer; row: the parsed JSON row."""

    line: int
    prompt: str
    ids: list[int]
    reference: str
    row: dict


def split_turns(row: dict) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content) of a chat row; RowError if it has none."""
    messages = D.check_messages(row)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    reference = messages[last].get("content")
    if not isinstance(reference, str) or not reference.strip():
        raise RowError(f"messages[{last}]: the last assistant turn has no text to compare answers with")
    if last == 0:
        raise RowError("the conversation starts with the assistant turn: there is nothing to answer")
    return messages[:last], reference


def _encode(tokenizer, text: str) -> list[int]:
    # As mlx-lm's stream_generate encodes a text prompt: BOS added unless the text already starts with it.
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos)))


def _ids(rendered) -> list[int]:
    if hasattr(rendered, "input_ids"):  # a BatchEncoding from apply_chat_template
        rendered = rendered["input_ids"]
    return [int(t) for t in rendered]


def render_row(tokenizer, row: dict) -> tuple[str, list[int], str]:
    """(prompt shown, prompt token ids, reference) of one parsed row; RowError when it has no reference."""
    fmt = D.row_format(row)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    tools = row.get("tools") or None
    if fmt == "text":
        raise RowError("a 'text' row has no reference answer; eval --generate needs prompt/completion rows "
                       "or 'messages' rows that end with an assistant turn")
    if fmt == "completion":
        prompt, reference = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(reference, str):
            raise RowError("'prompt' and 'completion' must be strings")
        if not reference.strip():
            raise RowError("the completion is empty: there is no reference to compare answers with")
        messages = [{"role": "user", "content": prompt}]
        if not has_template:
            return prompt, _encode(tokenizer, prompt), reference
    else:
        messages, reference = split_turns(row)
        prompt = messages[-1].get("content") or ""
        if not has_template:
            text = D.render_fallback_template(messages, add_generation_prompt=True)
            return prompt, _encode(tokenizer, text), reference
    kw = {"tools": tools} if tools else {}
    return prompt, _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kw)), reference


def read_eval_rows(path: str | Path, tokenizer) -> list[EvalRow]:
    """Every row of a JSONL split as an EvalRow; DataError "file:line: ..." for a row without a reference."""
    rows = []
    for line, row in D.read_rows(path):
        try:
            prompt, ids, reference = render_row(tokenizer, row)
        except RowError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        rows.append(EvalRow(line, prompt, ids, reference, row))
    if not rows:
        raise DataError(f"{path}: the file has no rows to answer; write prompt/completion or messages rows")
    return rows


__all__ = ["EvalRow", "split_turns", "render_row", "read_eval_rows"]
