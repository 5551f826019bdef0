"""Preference data: chosen/rejected pairs (DPO, ORPO, SimPO) and labelled rows (KTO), in TRL's standard forms.

    {"prompt": "...", "chosen": "...", "rejected": "..."}                      strings
    {"prompt": [{"role": "user", ...}, ...], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}]}                                  conversational
    {"prompt": ..., "completion": ..., "label": true | false}                  KTO (either form)

"system" (a string) is optional in every form. Each side is rendered exactly as SFT renders the row
{"prompt", "completion"} (strings) or {"messages": prompt + completion} (conversational): the chat
template, or the prompt and completion joined plus EOS when the tokenizer has none; loss only on the
completion's tokens (rows.encode_row). A split is a list of items of two samples each: (chosen, rejected)
for pairs, (completion, KL completion) for KTO, where the KL completion is this prompt with the
completion of another row of its batch (TRL's rotation by one within consecutive groups of batch size),
which KTO uses to estimate the policy's KL from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import ConfigError, DataError, RowError
from .chat import FALLBACK_CHAT_TEMPLATE, TokenizerInfo
from .rows import Sample, SplitStats, encode_row, read_rows, tokenizer_template

PAIR_ACCEPTED = ('{"prompt": ..., "chosen": ..., "rejected": ...} (strings, or a list of messages and lists of '
                 'assistant messages; "system" optional)')
KTO_ACCEPTED = '{"prompt": ..., "completion": ..., "label": true|false} ("system" optional)'


@dataclass
class PreferenceSplit:
    """items[i] = (chosen, rejected) for pairs, (completion, KL completion) for KTO; labels: KTO's
    desirability per item (None for pairs). stats counts both samples of every item."""

    items: list[tuple[Sample, Sample]]
    stats: SplitStats
    labels: list[bool] | None = None
    template: str | None = None
    template_text: str | None = None

    @cached_property
    def samples(self) -> list[Sample]:
        """Every sample, the first of each item then the second (how a batch is laid out)."""
        return [a for a, _ in self.items] + [b for _, b in self.items]


def load_preference_split(path: str | Path, tokenizer, max_seq_length: int, kind: str = "pairs",
                          kl_group: int = 1) -> PreferenceSplit:
    """Read a preference JSONL split (kind "pairs" or "kto"), tokenize, mask and truncate both samples of each row.

    A row with no completion token left within max_seq_length is dropped (counted). kl_group: KTO's batch
    size, within which completions are rotated for the KL samples. Raises DataError "path:line: ..." for
    a bad row (missing side, identical chosen and rejected, empty completion, wrong type).
    """
    path = Path(path)
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ConfigError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}")
    info = TokenizerInfo.from_tokenizer(tokenizer)
    parsed, lines = [], []
    for lineno, row in read_rows(path):
        try:
            parsed.append(_pair_row(row) if kind == "pairs" else _kto_row(row))
        except RowError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        lines.append(lineno)
    if not parsed:
        accepted = PAIR_ACCEPTED if kind == "pairs" else KTO_ACCEPTED
        raise DataError(f"{path}: the file has no rows; write one JSON object per line, e.g. {accepted}")
    if kind == "kto":  # (system, prompt, completion, label) -> add the KL partner's completion
        parsed = [(s, p, c, _kl_partner(parsed, i, kl_group), label) for i, (s, p, c, label) in enumerate(parsed)]
    items, labels, truncated, dropped = [], [], 0, 0
    for lineno, row in zip(lines, parsed):
        system, prompt, first, second = row[:4]
        try:
            pair = [_side(info, system, prompt, side) for side in (first, second)]
        except RowError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        cut = any(len(s.ids) > max_seq_length for s in pair)
        pair = [Sample(s.ids[:max_seq_length], s.mask[:max_seq_length]) for s in pair]
        if not all(any(s.mask) for s in pair):
            dropped += 1
            continue
        truncated += cut
        items.append(tuple(pair))
        if kind == "kto":
            labels.append(row[4])
    if not items:
        raise DataError(f"{path}: all {len(parsed)} rows were dropped: no completion token is left within "
                        f"--max-seq-length={max_seq_length}; raise --max-seq-length")
    both = [s for item in items for s in item]
    stats = SplitStats(str(path), len(parsed), len(items), sum(len(s.ids) for s in both),
                       sum(sum(s.mask) for s in both), truncated, dropped)
    template = "tokenizer" if info.has_template else "fallback" if _any_chat(parsed) else None
    text = FALLBACK_CHAT_TEMPLATE if template == "fallback" else tokenizer_template(info) if template else None
    return PreferenceSplit(items, stats, labels if kind == "kto" else None, template, text)


def preference_kind(path: str | Path) -> str | None:
    """"pairs" or "kto" when the first row of a JSONL file is a preference row, else None (SFT or unreadable)."""
    try:
        for _, row in read_rows(Path(path)):
            if isinstance(row, dict) and "chosen" in row and "rejected" in row:
                return "pairs"
            if isinstance(row, dict) and "completion" in row and "label" in row:
                return "kto"
            return None
    except DataError:
        return None
    return None


def _side(info: TokenizerInfo, system, prompt, completion) -> Sample:
    # One (prompt, completion) as SFT tokenizes it; loss only on the completion.
    if isinstance(prompt, str) and system is None:
        ids, mask = encode_row({"prompt": prompt, "completion": completion}, info)
        return Sample(ids, mask)
    head = [{"role": "system", "content": system}] if system is not None else []
    head += [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    tail = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    skip = sum(m.get("role") == "assistant" for m in head)
    ids, mask = encode_row({"messages": head + tail}, info, skip_assistant=skip)
    return Sample(ids, mask)


def _any_chat(parsed) -> bool:
    return any(row[0] is not None or not isinstance(row[1], str) for row in parsed)


def _kl_partner(parsed: list, i: int, group: int):
    # TRL's KL completions: within consecutive groups, (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}).
    start = i - i % group
    end = min(start + group, len(parsed))
    j = end - 1 if i == start else i - 1
    return parsed[j][2]


def _pair_row(row) -> tuple:
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object; accepted rows: {PAIR_ACCEPTED}")
    if "completion" in row and "label" in row:
        raise RowError("a KTO row (prompt, completion, label); train it with --method kto, or write "
                       f"{PAIR_ACCEPTED}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        has = ", ".join(repr(k) for k in row) or "none"
        raise RowError(f"no {' or '.join(repr(k) for k in missing)} (keys: {has}); a preference row is {PAIR_ACCEPTED}")
    system, prompt = _system(row), _prompt(row["prompt"])
    chosen, rejected = (_completion(row[k], k, isinstance(prompt, str)) for k in ("chosen", "rejected"))
    if chosen == rejected:
        raise RowError("'chosen' and 'rejected' are identical, so there is nothing to prefer; fix or remove the row")
    return system, prompt, chosen, rejected


def _kto_row(row) -> tuple:
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object; accepted rows: {KTO_ACCEPTED}")
    if "chosen" in row or "rejected" in row:
        raise RowError(f"a chosen/rejected pair; train it with --method dpo, orpo or simpo, or write {KTO_ACCEPTED}")
    missing = [k for k in ("prompt", "completion", "label") if k not in row]
    if missing:
        has = ", ".join(repr(k) for k in row) or "none"
        raise RowError(f"no {' or '.join(repr(k) for k in missing)} (keys: {has}); a KTO row is {KTO_ACCEPTED}")
    if not isinstance(row["label"], bool):
        raise RowError(f"'label' must be true or false, got {row['label']!r}")
    prompt = _prompt(row["prompt"])
    return _system(row), prompt, _completion(row["completion"], "completion", isinstance(prompt, str)), row["label"]


def _system(row: dict):
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError("'system' must be a string")
    return system


def _prompt(prompt):
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
        raise RowError("'prompt' must be a string or a non-empty list of messages like "
                       '[{"role": "user", "content": "..."}]')
    return prompt


def _completion(value, key: str, string_prompt: bool):
    if string_prompt:
        if not isinstance(value, str):
            raise RowError(f"{key!r} must be a string like 'prompt' (or make both lists of messages)")
        if not value.strip():
            raise RowError(f"{key!r} is empty; give the completion text or remove the row")
        return value
    if not isinstance(value, list) or not value:
        raise RowError(f"{key!r} must be a non-empty list of assistant messages, since 'prompt' is a list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            raise RowError(f"{key}[{i}] must be an assistant message {{\"role\": \"assistant\", \"content\": ...}}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise RowError(f"{key}[{i}]['content'] is empty; give the completion text or remove the row")
    return value
