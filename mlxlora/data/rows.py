"""Dataset files -> token ids + loss masks (batching lives in data/batches.py, packing in data/packing.py).

A split is one JSONL file, one JSON object per line (blank lines are skipped), all rows in one
of these formats:

    {"text": "..."}                              loss on every token
    {"prompt": "...", "completion": "..."}       loss on the completion and EOS only
    {"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}    (tools optional)
                                                 loss on every assistant turn + its end-of-turn token

Chat rows are rendered with the tokenizer's chat template (or chat.FALLBACK_CHAT_TEMPLATE when
it has none); see mlxlora/chat.py for how assistant turns are located exactly. A prompt /
completion row is, like in mlx-lm, a user turn + an assistant turn when the tokenizer has a
chat template; without one the two strings are concatenated as they are, plus EOS.

Text and completion samples end with EOS (appended when missing). BOS is prepended when the
tokenizer adds one to plain text and the sample does not already start with it. mask[0] is
always False: the first token is never predicted. Samples longer than max_seq_length are cut
at the end; a sample with no target token left is dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError, RowError
from ..files import path_problem
from .chat import FALLBACK_CHAT_TEMPLATE, TokenizerInfo, chat_targets, encode_targets

SPLITS = ("train", "valid", "test")
# Message roles chat templates know (OpenAI's, plus Llama 3's ipython for tool results).
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
ACCEPTED = ('{"text": ...}, {"prompt": ..., "completion": ...} or '
            '{"messages": [{"role": ..., "content": ...}, ...]} (optionally with "tools": [...])')


@dataclass
class Sample:
    """One training sequence. ids: token ids; mask: same length, True where the token gets loss."""

    ids: list[int]
    mask: list[bool]


@dataclass
class SplitStats:
    """Counts for one split. rows = samples + dropped; truncated counts kept samples that were cut;
    tokens and target_tokens count the kept samples."""

    path: str
    rows: int
    samples: int
    tokens: int
    target_tokens: int
    truncated: int
    dropped: int


@dataclass
class Split:
    """A split's samples and counts. template: how its rows were rendered: "tokenizer" (its chat
    template), "fallback" (FALLBACK_CHAT_TEMPLATE: the tokenizer has none) or None (plain text, or
    prompt + completion joined as they are); template_text: that template's Jinja text."""

    samples: list[Sample]
    stats: SplitStats
    template: str | None = None
    template_text: str | None = None


def find_split_files(data: str | Path | None, train_file: str | Path | None = None,
                     valid_file: str | Path | None = None,
                     test_file: str | Path | None = None, require_train: bool = True) -> dict[str, Path]:
    """Map split name -> file: {data}/{train,valid,test}.jsonl, overridden by explicit files.

    "train" is present unless require_train=False (for eval / inspect); "valid" and "test" only
    when found. Raises DataError naming every missing folder / file with its flag at once.
    """
    explicit = {"train": train_file, "valid": valid_file, "test": test_file}
    problems, files, explained = [], {}, set()
    folder = Path(data) if data is not None else None
    if folder is not None and not folder.is_dir():
        what = ("is a file, not a folder (for one file use --train-file)" if folder.is_file()
                else path_problem(folder) or "is not a folder")
        problems.append(f"--data: {folder} {what}")
        folder = None
    for split in SPLITS:
        given = explicit[split]
        if given is not None:
            problem = path_problem(given) or ("is a folder; give the .jsonl file" if Path(given).is_dir() else None)
            if problem is None:
                files[split] = Path(given)
            else:
                problems.append(f"--{split}-file: {given} {problem}")
        elif folder is not None and (folder / f"{split}.jsonl").is_file():
            files[split] = folder / f"{split}.jsonl"
        elif folder is not None and os.path.lexists(folder / f"{split}.jsonl"):
            f = folder / f"{split}.jsonl"
            problems.append(f"--data: {f} {path_problem(f) or 'is a folder, not a .jsonl file'}")
            explained.add(split)
    if require_train and "train" not in files and train_file is None and "train" not in explained:
        if folder is not None:
            found = sorted(p.name for p in folder.iterdir())
            problems.append(f"--data: {folder} has no train.jsonl (found: {', '.join(found) or 'nothing'}); "
                            "name the training file train.jsonl or pass --train-file")
        elif data is None:
            problems.append("no training data: give --data DIR (with train.jsonl) or --train-file FILE")
    if problems:
        raise DataError("; ".join(problems))
    return files


def split_file(data: str | Path, split: str, flag: str = "--data") -> Path:
    """The file of `split` named by `data`: a .jsonl file itself, or `{data}/{split}.jsonl`.

    Raises DataError naming `flag` when `data` is neither (missing folder, or no such split in it).
    """
    p = Path(data)
    if p.is_file():
        return p
    if not p.is_dir() and os.path.lexists(p):
        raise DataError(f"{flag}: {data} {path_problem(p) or 'is not a file or folder'}")
    if p.is_dir() and os.path.lexists(p / f"{split}.jsonl"):
        return p / f"{split}.jsonl"  # a FIFO or a link loop there: load_split says what it is
    what = f"has no {split}.jsonl" if p.is_dir() else "does not exist"
    raise DataError(f"{flag}: {data} {what}; give a .jsonl file or a folder with {split}.jsonl"
                    + (" (or pass --split)" if p.is_dir() and flag == "--data" else ""))


def load_split(path: str | Path, tokenizer, max_seq_length: int) -> Split:
    """Read a JSONL split, tokenize and mask every row, truncate to max_seq_length tokens.

    tokenizer: mlx-lm TokenizerWrapper or HF tokenizer. Raises DataError "path:line: ..." for a
    bad row, and DataError for an empty file or one whose samples are all dropped.
    """
    path = Path(path)
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ConfigError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}")
    info = TokenizerInfo.from_tokenizer(tokenizer)
    samples: list[Sample] = []
    rows = truncated = dropped = dropped_long = 0
    first: tuple[str, int] | None = None  # (format, line) of the first row
    for lineno, row in read_rows(path):
        rows += 1
        try:
            fmt = row_format(row)
            if first is None:
                first = (fmt, lineno)
            elif fmt != first[0]:
                raise RowError(f"a {fmt!r} row, but line {first[1]} is a {first[0]!r} row; "
                               "use one format per file")
            ids, mask = _encode_row(row, fmt, info)
        except RowError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if mask:
            mask[0] = False  # the first token is never predicted
        cut = len(ids) > max_seq_length
        ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        if not any(mask):
            dropped += 1
            dropped_long += cut
            continue
        truncated += cut
        samples.append(Sample(ids, mask))
    if rows == 0:
        raise DataError(f"{path}: the file has no rows; write one JSON object per line, e.g. {ACCEPTED}")
    if not samples:
        why = (f"{dropped_long} are longer than --max-seq-length={max_seq_length} and have no target "
               "token within it; raise --max-seq-length" if dropped_long else "none has a token to learn")
        raise DataError(f"{path}: all {rows} rows were dropped: {why}")
    stats = SplitStats(str(path), rows, len(samples), sum(len(s.ids) for s in samples),
                       sum(sum(s.mask) for s in samples), truncated, dropped)
    template = None
    if first[0] == "chat" or (first[0] == "completion" and info.has_template):
        template = "tokenizer" if info.has_template else "fallback"
    text = FALLBACK_CHAT_TEMPLATE if template == "fallback" else tokenizer_template(info) if template else None
    return Split(samples, stats, template, text)


def tokenizer_template(info: TokenizerInfo) -> str | None:
    """The tokenizer's chat template text (the default one when it has several), or None."""
    t = getattr(info.hf, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default") or next(iter(t.values()), None)
    return t if isinstance(t, str) else None


def read_rows(path: str | Path):
    """(line number, parsed JSON value) for each non-blank line of a JSONL file; DataError naming file:line."""
    yield from _read_rows(Path(path))


def _read_rows(path: Path):
    # Yields (line number, parsed JSON value) for each non-blank line.
    problem = path_problem(path)
    if problem:  # a FIFO would block the read forever; a link loop reads as "does not exist"
        raise DataError(f"{path} {problem}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors write one): not data
        raw = raw[3:]
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer with too many digits, deep nesting
            raise DataError(f"{path}:{lineno}: cannot read this JSON ({e or type(e).__name__})") from None


def row_format(row) -> str:
    """"text", "completion" or "chat" for a parsed row; RowError when it is none of them."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {_json_type(row)}; accepted rows: {ACCEPTED}")
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        has, missing = ("prompt", "completion") if "prompt" in row else ("completion", "prompt")
        if missing not in row:
            raise RowError(f"has {has!r} but no {missing!r}; a prompt/completion row needs both")
        return "completion"
    if "text" in row:
        return "text"
    keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
    raise RowError(f"no 'text', 'prompt'/'completion' or 'messages' key (keys: {keys}); "
                   f"accepted rows: {ACCEPTED}")


def encode_row(row: dict, info: TokenizerInfo, skip_assistant: int = 0) -> tuple[list[int], list[bool]]:
    """One row (any format of ACCEPTED) as SFT tokenizes it: (ids, mask), mask[0] False, not truncated.

    skip_assistant: the first N assistant turns of a chat row get no loss (a preference prompt's own
    turns). Raises RowError.
    """
    ids, mask = _encode_row(row, row_format(row), info, skip_assistant)
    if mask:
        mask[0] = False
    return ids, mask


def _encode_row(row: dict, fmt: str, info: TokenizerInfo, skip: int = 0) -> tuple[list[int], list[bool]]:
    if fmt == "text":
        text = _string(row, "text")
        ids, mask = encode_targets(info, text, [(0, len(text))])
        return _add_bos(info, *_add_eos(info, ids, mask))
    tools = _tools(row)
    if fmt == "completion":
        prompt, completion = _string(row, "prompt"), _string(row, "completion")
        if not info.has_template and not tools:
            text = prompt + completion
            ids, mask = encode_targets(info, text, [(len(prompt), len(text))])
            return _add_bos(info, *_add_eos(info, ids, mask))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        messages = _messages(row)
    text, spans = chat_targets(info, messages, tools)
    return _add_bos(info, *encode_targets(info, text, spans[skip:]))


def _add_eos(info: TokenizerInfo, ids: list[int], mask: list[bool]):
    if info.eos_id is None:
        return ids, mask
    if not ids or ids[-1] != info.eos_id:
        return ids + [info.eos_id], mask + [True]
    mask[-1] = True  # the text already ends with EOS: still learn to stop
    return ids, mask


def _add_bos(info: TokenizerInfo, ids: list[int], mask: list[bool]):
    if info.bos_id is not None and (not ids or ids[0] != info.bos_id):
        return [info.bos_id] + ids, [False] + mask
    return ids, mask


def _string(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string, got {_json_type(value)}")
    return value


def check_messages(row: dict) -> list[dict]:
    """A chat row's messages, checked as training checks them; RowError (no file/line) when malformed."""
    return _messages(row)


def _messages(row: dict) -> list[dict]:
    messages = row["messages"]
    example = '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'messages' must be a non-empty list like {example}, got {_json_type(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object like {{\"role\": ..., \"content\": ...}}, "
                           f"got {_json_type(m)}")
        if not isinstance(m.get("role"), str):
            raise RowError(f"messages[{i}] needs a string 'role' ({', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise RowError(f"messages[{i}]: unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        if not (isinstance(content, str) or (content is None and m.get("tool_calls"))):
            raise RowError(f"messages[{i}]['content'] must be a string, got "
                           f"{_json_type(content) if 'content' in m else 'nothing'}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("the conversation has no assistant message, so nothing to learn; "
                       "add an assistant turn or remove the row")
    return messages


def _tools(row: dict) -> list | None:
    tools = row.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError(f"'tools' must be a list of tool objects (JSON schemas), got {_json_type(tools)}")
    return tools or None


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
