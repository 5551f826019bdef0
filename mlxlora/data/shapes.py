"""Rows of other shapes -> the row formats of rows.py (text, prompt/completion, messages), so training masks
them as it masks its own (loss on the completion / the assistant turns only).

Recognised shapes, in the order they are tried (the first whose columns a row has):

    messages       OpenAI chat: {"messages": [{"role", "content"}, ...]}     -> kept as it is
    conversations  ShareGPT: {"conversations": [{"from", "value"}, ...]}     -> messages (human->user, gpt->assistant)
    alpaca         {"instruction", "input"?, "output"}                      -> prompt = instruction (+ blank line + input)
    completion     {"prompt", "completion"}                                 -> kept
    text           {"text"}                                                 -> kept

`--columns prompt=instruction,completion=output` names the columns instead (fields: text, prompt,
completion, messages): a row then becomes exactly those fields, whatever else it holds.
"""

from __future__ import annotations

from ..errors import ConfigError, RowError

FIELDS = ("text", "prompt", "completion", "messages")
# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function_response": "tool", "observation": "tool"}
SHAPES = {  # shape -> (columns that identify it, what it becomes)
    "messages": (("messages",), "chat rows (messages kept as they are)"),
    "sharegpt": (("conversations",), "chat rows (conversations: human -> user, gpt -> assistant)"),
    "alpaca": (("instruction", "output"), "prompt/completion rows (prompt = instruction + input, completion = output)"),
    "completion": (("prompt", "completion"), "prompt/completion rows (kept as they are)"),
    "text": (("text",), "text rows (kept as they are)"),
}


def parse_columns(spec: str | None) -> dict[str, str]:
    """`prompt=instruction,completion=output` -> {"prompt": "instruction", "completion": "output"}; ConfigError."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        field, sep, column = part.strip().partition("=")
        if not sep or not field or not column:
            raise ConfigError(f"--columns {spec!r}: write FIELD=COLUMN pairs, e.g. prompt=instruction,completion=output")
        if field not in FIELDS:
            raise ConfigError(f"--columns {spec!r}: {field!r} is not a field; use {', '.join(FIELDS)}")
        out[field] = column
    kinds = {"text": {"text"}, "completion": {"prompt", "completion"}, "messages": {"messages"}}
    if not any(set(out) == k for k in kinds.values()):
        raise ConfigError(f"--columns {spec!r}: map text=COL, or prompt=COL,completion=COL, or messages=COL")
    return out


def detect_shape(columns) -> str | None:
    """The first shape of SHAPES whose identifying columns are all in `columns`, or None."""
    cols = set(columns)
    return next((name for name, (need, _) in SHAPES.items() if set(need) <= cols), None)


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list):
        raise RowError("'conversations' must be a list of {\"from\": ..., \"value\": ...} turns")
    messages = []
    for i, t in enumerate(turns):
        who = t.get("from") if isinstance(t, dict) else None
        if who not in SHAREGPT_ROLES:
            raise RowError(f"conversations[{i}]: unknown speaker {who!r}; use one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[who], "content": t.get("value")})
    return messages


def convert_row(row: dict, shape: str | None, columns: dict[str, str]) -> dict:
    """One source row as a row of rows.py. RowError names what is missing."""
    if columns:
        missing = [c for c in columns.values() if c not in row]
        if missing:
            raise RowError(f"no column {', '.join(map(repr, missing))} for --columns (columns: {', '.join(row)})")
        out = {field: row[col] for field, col in columns.items()}
        if "messages" in out and isinstance(out["messages"], list) and out["messages"] \
                and isinstance(out["messages"][0], dict) and "from" in out["messages"][0]:
            out["messages"] = _sharegpt(out["messages"])  # ShareGPT turns under another column name
        return out
    if shape == "sharegpt":
        return {"messages": _sharegpt(row["conversations"])}
    if shape == "alpaca":
        extra = row.get("input") or ""
        prompt = row["instruction"] + (f"\n\n{extra}" if extra else "")
        return {"prompt": prompt, "completion": row["output"]}
    if shape == "messages":
        return {k: row[k] for k in ("messages", "tools") if row.get(k) is not None}
    if shape == "completion":
        return {"prompt": row["prompt"], "completion": row["completion"]}
    if shape == "text":
        return {"text": row["text"]}
    raise RowError(f"no known columns (columns: {', '.join(row)}); pass --columns, e.g. "
                   "--columns prompt=instruction,completion=output")


__all__ = ["FIELDS", "SHAPES", "SHAREGPT_ROLES", "parse_columns", "detect_shape", "convert_row"]
