#!/usr/bin/env python3
"""Build the Devil's Dictionary demo dataset (prompt/completion JSONL).

Source: Ambrose Bierce, *The Devil's Dictionary* (1911 edition, Albert and
Charles Boni; the text is in the public domain), as shipped in dictd format by
the Debian package ``dict-devil`` (version 1.0-13.1 was used to build the
committed files; that package carries the Internet Wiretap 1st Online Edition,
1993).  Install it with ``apt-get install dict-devil``; the database lives in
``/usr/share/dictd/devil.index`` and ``/usr/share/dictd/devil.dict.dz``.

The script parses every dictionary entry into ``(word, pos, definition)``,
cleans the text (wrapped prose lines are joined into paragraphs, verse lines
are kept as line breaks, the repeated headword and the part-of-speech marker
are removed from the definition, the e-text's ``_italic_`` underscores and
dictd's ``{CROSS-REFERENCE}`` braces are dropped) and writes
``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` with rows
``{"prompt": ..., "completion": ...}``.

Usage::

    python examples/devil/make_dataset.py [--source DIR] [--out DIR] [--seed N]
        [--min-chars N] [--max-chars N] [--keep-slurs]

Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from pathlib import Path

PROMPT_TEMPLATE = 'Define "{word}" in the style of The Devil\'s Dictionary.'
MIN_CHARS = 20
MAX_CHARS = 600
DEFAULT_SEED = 1911
# Entries using this racial slur (AFRICAN, MINSTREL) are left out of the demo
# data by default; --keep-slurs keeps them.
SLUR = re.compile(r"\bnigger", re.IGNORECASE)
VALID_FRACTION = 0.05
TEST_FRACTION = 0.05

# dictd's base64 alphabet for the offsets/lengths in the .index file.
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}

# Header of an ordinary entry: "HEADWORD, pos.  Definition ..."
_POS = r"n\.pl\.|n\.|v\.t\.|v\.i\.|v\.|adj\.(?: and n\.)?|adv\.|pp\.|p\.p\.|pron\.|pro\.|x\."
_HEAD = r"[A-Z][A-Z'\-. ]*?(?:(?:,? | \()or [A-Z'\-. ]+\)?[A-Z'\-. ]*?|, [A-Z'\-]+)?"
_HEADER_POS = re.compile(rf"^(?P<head>{_HEAD}),?\s*(?P<pos>{_POS})(?=\s|$)\s*(?P<rest>.*)$")
# Letters of the alphabet: "I is the first letter ...", "W (double U) has ...".
_HEADER_LETTER = re.compile(r"^(?P<head>[A-Z])(?: \([a-z ]+[A-Z]\))?,? [a-z]")
# Headwords without a part of speech: "HABEAS CORPUS.  A writ", "CUI BONO?  [Latin]",
# "LL.D.  Letters", "ABRACADABRA."
_HEADER_BARE = re.compile(r"^(?P<head>[A-Z][A-Z.' ]*?)(?P<stop>[.?])(?:\s{2,}(?P<rest>.*))?$")

# Obvious transcription slips in the e-text (the 1911 text reads as the fix).
_ERRATA = {
    "n ancient Rome, a definite": "In ancient Rome, a definite",
}


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64_VALUE[c]
    return n


def read_entries(source: Path) -> list[str]:
    """Return the raw text of each distinct entry, in dictionary order."""
    index = source / "devil.index"
    data = source / "devil.dict.dz"
    if not data.exists():
        plain = source / "devil.dict"
        data = plain if plain.exists() else data
    if not index.exists() or not data.exists():
        sys.exit(
            f"error: devil.index / devil.dict.dz not found in {source} -- install the Debian package "
            "dict-devil (apt-get install dict-devil) or pass --source DIR"
        )
    opener = gzip.open if data.suffix == ".dz" else open
    with opener(data, "rb") as fh:
        blob = fh.read()
    spans = set()
    for line in index.read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        head, off, length = line.split("\t")[:3]
        if head.startswith("00database") or head.startswith("00-database"):
            continue
        spans.add((_b64(off), _b64(length)))
    entries, seen = [], set()
    for off, length in sorted(spans):
        text = blob[off : off + length].decode("latin-1")
        if text.startswith("00-database") or text in seen:
            continue  # several headwords (babe/baby, ...) share one entry
        seen.add(text)
        entries.append(text)
    return entries


def _inline(text: str) -> str:
    text = text.replace("_", "")  # e-text italics
    text = re.sub(r"\{([^}]*)\}", r"\1", text)  # dictd cross-references
    for bad, good in _ERRATA.items():
        text = text.replace(bad, good)
    return re.sub(r"[ \t]+", " ", text).strip()


def _join_lines(lines: list[str]) -> str:
    out = ""
    for ln in lines:
        ln = ln.strip()
        if not ln:
            continue
        if not out:
            out = ln
        elif out.endswith("-") and not out.endswith("--"):
            out += ln  # compound split at its hyphen ("cannon-" / "shot")
        else:
            out += " " + ln
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_attribution(line: str) -> bool:
    """A right-aligned line (deep indent, ends near the margin): a quote's source."""
    return _indent(line) >= 10 and len(line.rstrip()) >= 60


def _first_letter(line: str) -> str:
    letters = re.sub(r"[^A-Za-z]", "", line)
    return letters[:1]


def _render_block(lines: list[str]) -> list[str]:
    """Render one blank-line-separated block as a list of output paragraphs."""
    tail: list[str] = []
    while lines and _is_attribution(lines[-1]):
        tail.insert(0, lines.pop().strip())
    attribution = "-- " + _inline(" ".join(tail)) if tail else ""
    if not lines:
        return [attribution]
    indents = [_indent(ln) for ln in lines]
    if indents[0] == 0 or (len(lines) > 1 and all(i == 0 for i in indents[1:])):
        # Prose: flush-left, or a paragraph with an indented first line.
        text = _inline(_join_lines(lines))
    elif len(lines) > 1 and (
        sum(_first_letter(ln).islower() for ln in lines[1:]) / (len(lines) - 1) >= 0.4
    ):
        # Indented (quoted) prose: wrapped lines mostly continue in lower case.
        # Paragraphs are marked either by a deeper first line ("first-line
        # indent") or by a shallower one (dialogue: "SPEAKER:  ..." with the
        # continuation lines indented further).
        first, second = indents[0], indents[1]
        if first > second:
            starts = [i for i, ind in enumerate(indents) if ind > second]
            sep = "\n\n"
        elif first < second:
            starts = [i for i, ind in enumerate(indents) if ind == first]
            sep = "\n"
        else:
            starts, sep = [0], ""
        bounds = starts + [len(lines)]
        text = sep.join(
            _inline(_join_lines(lines[bounds[k] : bounds[k + 1]]))
            for k in range(len(starts))
        )
    else:
        # Verse: keep one output line per source line.
        text = "\n".join(_inline(ln) for ln in lines)
    return [text + ("\n" + attribution if attribution else "")]


def parse_entry(text: str) -> dict | None:
    lines = text.rstrip().splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return None
    first = lines[0]
    pos = ""
    m = _HEADER_POS.match(first)
    if m:
        head, pos, rest = m["head"], m["pos"], m["rest"]
    elif _HEADER_LETTER.match(first):
        head, rest = _HEADER_LETTER.match(first)["head"], first  # letter is the subject
    elif _HEADER_BARE.match(first):
        mb = _HEADER_BARE.match(first)
        head, rest = mb["head"], mb["rest"] or ""
        if "." in head:
            head += "."  # abbreviations: LL.D., R.I.P.
    else:
        raise ValueError(f"unrecognised entry header: {first!r}")
    word = re.sub(r"\s+", " ", head).strip().lower()
    body = [rest] + lines[1:]
    blocks: list[list[str]] = [[]]
    for ln in body:
        if ln.strip():
            blocks[-1].append(ln.rstrip())
        elif blocks[-1]:
            blocks.append([])
    paragraphs: list[str] = []
    for block in blocks:
        if not block:
            continue
        if any(_indent(ln) == 0 for ln in block):
            # Prose block: flush-left lines continue a paragraph, and every
            # indented line opens a new one ("...a third.\n    Philippe of ...").
            groups: list[list[str]] = []
            for ln in block:
                if not groups or 0 < _indent(ln) < 10:
                    groups.append([ln])
                else:
                    groups[-1].append(ln)
            for group in groups:
                paragraphs.extend(_render_block(group))
        else:
            paragraphs.extend(_render_block(block))
    definition = ""
    for para in filter(None, paragraphs):
        if not definition:
            definition = para
        elif para[0].islower():
            definition += "\n" + para  # prose resuming after a quoted line
        else:
            definition += "\n\n" + para
    return {"word": word, "pos": pos, "definition": definition}


def parse_dictionary(source: Path) -> list[dict]:
    return [e for e in (parse_entry(t) for t in read_entries(source)) if e]


def to_row(entry: dict) -> dict:
    return {
        "prompt": PROMPT_TEMPLATE.format(word=entry["word"]),
        "completion": entry["definition"],
    }


def split(entries: list[dict], seed: int) -> dict[str, list[dict]]:
    """Deterministic ~90/5/5 split; all senses of one word land in one split."""
    words = sorted({e["word"] for e in entries})
    random.Random(seed).shuffle(words)
    n_valid = round(len(words) * VALID_FRACTION)
    n_test = round(len(words) * TEST_FRACTION)
    bucket = {w: "valid" for w in words[:n_valid]}
    bucket.update({w: "test" for w in words[n_valid : n_valid + n_test]})
    out: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    rank = {w: i for i, w in enumerate(words)}
    for e in sorted(entries, key=lambda e: (rank[e["word"]], e["definition"])):
        out[bucket.get(e["word"], "train")].append(e)
    return out


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=Path("/usr/share/dictd"),
                    help="directory holding devil.index and devil.dict.dz")
    ap.add_argument("--out", type=Path, default=here, help="output directory")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split seed")
    ap.add_argument("--min-chars", type=int, default=MIN_CHARS,
                    help="skip definitions shorter than this")
    ap.add_argument("--max-chars", type=int, default=MAX_CHARS,
                    help="skip definitions longer than this")
    ap.add_argument("--keep-slurs", action="store_true",
                    help="keep the entries that use a racial slur (left out by default)")
    args = ap.parse_args(argv)

    entries = parse_dictionary(args.source)
    n_parsed = len(entries)
    slurs = [] if args.keep_slurs else [e for e in entries if SLUR.search(e["definition"])]
    entries = [e for e in entries if e not in slurs]
    lo, hi = args.min_chars, args.max_chars
    too_long = [e for e in entries if len(e["definition"]) > hi]
    too_short = [e for e in entries if len(e["definition"]) < lo]
    kept = [e for e in entries if lo <= len(e["definition"]) <= hi]
    splits = split(kept, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for e in rows:
                fh.write(json.dumps(to_row(e), ensure_ascii=False) + "\n")
    print(
        f"parsed {n_parsed} entries; kept {len(kept)}, skipped "
        f"{len(too_long)} longer than {hi} chars and {len(too_short)} "
        f"shorter than {lo} chars"
        + (f" (and left out {len(slurs)} using a racial slur)" if slurs else "")
    )
    print("  ".join(f"{k}={len(v)}" for k, v in splits.items()), f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
