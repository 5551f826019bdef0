"""`--data` beyond a folder of JSONL files: Hub datasets, local datasets, other row shapes, and mixtures.

A source is one `--data` value:

    path/to/folder | file.jsonl    mlxlora's own JSONL split files (used as they are when alone)
    path/to/dataset                a `datasets` folder: save_to_disk output, or parquet / arrow / json files
    ORG/NAME[:CONFIG]              a Hub dataset through `datasets.load_dataset` (HF_HUB_OFFLINE and the
                                   datasets cache are honoured: offline, a cached copy is used)
    any of these + `:WEIGHT`       one part of a mixture (`--data a.jsonl:0.7 --data org/b:0.3`)

Anything but a lone JSONL folder is written once as train/valid/test.jsonl (rows turned into mlxlora's
formats by data/shapes.py) into a folder under the mlxlora cache named by a hash of the sources, the
options and the seed, with `sources.json` saying what each source was, which shape it had and how many
rows it gave; training then reads that folder like any other, with the same masking.

A mixture takes, per split, the largest number of rows that needs no row twice: with weights w_i
(normalised) and n_i rows in source i, total = min_i n_i / w_i, source i gives round(w_i * total) rows
drawn at random (the seed), and the rows are shuffled together (the same seed).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_dir
from ..errors import ConfigError, DataError, RowError
from ..files import atomic_folder
from .rows import SPLITS, read_rows
from .shapes import SHAPES, convert_row, detect_shape, parse_columns

_WEIGHT = re.compile(r"^(?P<name>.+):(?P<weight>\d+(?:\.\d*)?|\.\d+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Our split -> the names datasets commonly use for it, tried in order.
HF_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "val", "dev"), "test": ("test",)}
INSTALL = "pip install datasets (or pip install 'mlxlora[datasets]')"


@dataclass(frozen=True)
class Source:
    """One --data value: spec (as given), name (path or hub id), config (hub config), weight (None: alone)."""

    spec: str
    name: str
    config: str | None
    weight: float | None


def parse_source(spec: str) -> Source:
    """`name[:config][:weight]` -> Source; a local path is never split at ':' unless a weight follows."""
    m = _WEIGHT.match(spec)
    name, weight = (m["name"], float(m["weight"])) if m else (spec, None)
    if weight is not None and weight <= 0:
        raise ConfigError(f"--data {spec}: the weight must be > 0")
    config = None
    if not Path(name).exists() and ":" in name:
        name, config = name.rsplit(":", 1)
    return Source(spec, name, config, weight)


def parse_split_map(spec: str | None) -> dict[str, str]:
    """`train=train,valid=dev,test=test` -> {ours: theirs}; ConfigError for an unknown split of ours."""
    out = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        ours, sep, theirs = part.strip().partition("=")
        if not sep or ours not in SPLITS or not theirs:
            raise ConfigError(f"--split-map {spec!r}: write OURS=THEIRS pairs with OURS one of {', '.join(SPLITS)} "
                              "(e.g. valid=validation)")
        out[ours] = theirs
    return out


def _is_jsonl(path: Path) -> bool:
    # A .jsonl path, or a folder with a split file (even one that is a FIFO or a broken link: rows.py says so).
    return path.suffix == ".jsonl" or path.is_dir() and any(os.path.lexists(path / f"{s}.jsonl") for s in SPLITS)


def needs_preparing(data, split_map=None, columns=None) -> bool:
    """False for what training has always read (one JSONL folder or file, or a path that is not there and
    no Hub id either, for rows.py to explain), with no --columns / --split-map / weight."""
    specs = [data] if isinstance(data, str) else list(data or [])
    if len(specs) != 1 or split_map or columns:
        return bool(specs)
    src = parse_source(specs[0])
    if src.weight is not None:
        return True
    p = Path(src.name)
    if os.path.lexists(p):
        return not _is_jsonl(p)
    return bool(_HUB_ID.match(src.name)) and not src.name.endswith(".jsonl")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"--data: reading a Hub or `datasets` dataset needs the datasets library; {INSTALL}") from None
    return datasets


def _hf_splits(src: Source) -> dict:
    """{their split name: a datasets.Dataset (or a list of dicts)} of one non-JSONL source."""
    datasets = _datasets()
    p = Path(src.name)
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            ds = datasets.load_from_disk(str(p))  # save_to_disk output (arrow files + their state)
        elif p.exists():
            ds = datasets.load_dataset(str(p), src.config)  # a folder (or file) of parquet / arrow / json / csv
        elif _HUB_ID.match(src.name):
            ds = datasets.load_dataset(src.name, src.config)
        else:
            raise DataError(f"--data {src.spec}: no such file or folder, and not a Hub id (ORG/NAME[:CONFIG])")
    except DataError:
        raise
    except (ConnectionError, FileNotFoundError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (HF_HUB_OFFLINE is set: download it once online, or give a local copy)" if \
            datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(f"--data {src.spec}: cannot load it through datasets ({first}){hint}") from None
    if isinstance(ds, datasets.Dataset):
        return {"train": ds}
    return dict(ds)


def _jsonl_splits(src: Source) -> dict:
    p = Path(src.name)
    if p.is_file():
        return {"train": [row for _, row in read_rows(p)]}
    return {s: [row for _, row in read_rows(p / f"{s}.jsonl")] for s in SPLITS if (p / f"{s}.jsonl").is_file()}


def load_source(src: Source, split_map: dict[str, str], columns: dict[str, str]) -> tuple[dict, dict]:
    """({our split: rows in mlxlora formats}, {what it was}) of one source. DataError names the source,
    split and row of a row that does not convert (a mapped column missing, say)."""
    jsonl = _is_jsonl(Path(src.name))
    theirs = _jsonl_splits(src) if jsonl else _hf_splits(src)
    out, info = {}, {"source": src.spec, "kind": "jsonl" if jsonl else "datasets", "splits": {}}
    for ours in SPLITS:
        name = split_map.get(ours) or next((n for n in (ours, *HF_SPLITS[ours]) if n in theirs), None)
        if name is None:
            continue
        if name not in theirs:
            raise DataError(f"--split-map {ours}={name}: {src.spec} has no split {name!r} "
                            f"(splits: {', '.join(theirs)})")
        rows = theirs[name]
        cols = list(rows.column_names) if hasattr(rows, "column_names") else sorted({k for r in rows for k in r})
        shape = None if columns else detect_shape(cols)
        if columns:
            missing = [c for c in columns.values() if c not in cols]
            if missing:
                raise DataError(f"--columns: {src.spec} split {name!r} has no column {', '.join(map(repr, missing))} "
                                f"(columns: {', '.join(cols)})")
        converted = []
        for i, row in enumerate(rows):
            try:
                converted.append(convert_row(dict(row), shape, columns))
            except RowError as e:
                raise DataError(f"--data {src.spec} split {name!r} row {i}: {e}") from None
        out[ours] = converted
        became = ("mapped by --columns " + ",".join(f"{k}={v}" for k, v in columns.items()) if columns
                  else f"{shape}: {SHAPES[shape][1]}" if shape else "unknown")
        info["splits"][ours] = {"from": name, "rows": len(converted), "shape": became}
    if not out:
        raise DataError(f"--data {src.spec}: no train/validation/test split found (splits: {', '.join(theirs)}); "
                        "name them with --split-map, e.g. --split-map train=full")
    return out, info


def mix(parts: list[list[dict]], weights: list[float], seed: int) -> tuple[list[dict], list[int]]:
    """(rows, how many each part gave): the largest mixture in the weights' proportions that repeats no row."""
    total_w = sum(weights)
    shares = [w / total_w for w in weights]
    total = min(len(p) / s for p, s in zip(parts, shares))
    rng = random.Random(seed)
    counts = [min(len(p), round(s * total)) for p, s in zip(parts, shares)]
    rows = [r for p, n in zip(parts, counts) for r in rng.sample(p, n)]
    rng.shuffle(rows)
    return rows, counts


def prepare_data(data, split_map: str | None = None, columns: str | None = None, seed: int = 0,
                 root: Path | None = None) -> str:
    """The --data value(s) as a folder of train/valid/test.jsonl that training and eval read as they are.

    data: one spec or a list of them. Returns `data` itself when it is one JSONL folder / file with no
    option to apply; otherwise the prepared folder (written once; sources.json in it records the sources,
    their shapes, weights and the seed). Raises ConfigError / DataError on one line.
    """
    specs = [data] if isinstance(data, str) else list(data or [])
    if not needs_preparing(specs, split_map, columns):
        return specs[0]
    smap, cols = parse_split_map(split_map), parse_columns(columns)
    sources = [parse_source(s) for s in specs]
    if len(sources) > 1 and any(s.weight is None for s in sources):
        raise ConfigError("--data: several sources make a mixture; give each a weight (e.g. --data a.jsonl:0.7 "
                          "--data org/b:0.3)")
    loaded = [load_source(s, smap, cols) for s in sources]
    key = json.dumps({"sources": [(s.spec, _stamp(s)) for s in sources], "split_map": smap, "columns": cols,
                      "seed": seed}, sort_keys=True)
    out = (root or cache_dir() / "datasets") / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (out / "sources.json").is_file():
        return str(out)
    record = {"sources": [info for _, info in loaded], "seed": seed, "split_map": smap, "columns": cols}
    with atomic_folder(out, force=True, error=DataError, flag="--data") as tmp:
        for split in SPLITS:
            parts = [(s, rows[split]) for s, (rows, _) in zip(sources, loaded) if split in rows]
            if not parts:
                continue
            if len(sources) == 1:
                rows, counts = parts[0][1], [len(parts[0][1])]
            else:
                rows, counts = mix([p for _, p in parts], [s.weight for s, _ in parts], seed)
                record.setdefault("mixture", {})[split] = {s.spec: n for (s, _), n in zip(parts, counts)}
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (tmp / "sources.json").write_text(json.dumps(record, indent=1) + "\n")
    return str(out)


def _stamp(src: Source) -> str:
    # Local sources: their size and modification time, so an edited file is prepared again.
    p = Path(src.name)
    if not p.exists():
        return src.config or ""
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def describe_prepared(folder: str) -> str:
    """What each source became (from sources.json), for `data inspect`; "" for a plain JSONL folder."""
    f = Path(folder) / "sources.json"
    if not f.is_file():
        return ""
    record = json.loads(f.read_text())
    lines = [f"prepared {folder} (seed {record['seed']}):"]
    for src in record["sources"]:
        for split, s in src["splits"].items():
            lines.append(f"  {src['source']} [{s['from']} -> {split}]: {s['rows']} rows, {s['shape']}")
    for split, counts in (record.get("mixture") or {}).items():
        lines.append(f"  mixture {split}: " + ", ".join(f"{k} {v} rows" for k, v in counts.items()))
    return "\n".join(lines)


__all__ = ["Source", "HF_SPLITS", "parse_source", "parse_split_map", "needs_preparing", "load_source", "mix",
           "prepare_data", "describe_prepared"]
