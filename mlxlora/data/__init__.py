"""Data: dataset rows -> token ids + loss masks (rows.py; chat turns in chat.py), length-bucketed batches
(batches.py), sequence packing (packing.py) and `data inspect` (inspect.py)."""

from .batches import collate, epoch_batches
from .chat import FALLBACK_CHAT_TEMPLATE, TokenizerInfo, fallback_prompt, render_fallback_template, render_template
from .inspect import inspect_preference, inspect_split
from .preference import PreferenceSplit, load_preference_split, preference_kind
from .rows import (ACCEPTED, SPLITS, Sample, Split, SplitStats, check_messages, find_split_files, load_split, read_rows,
                   row_format, split_file)

__all__ = ["collate", "epoch_batches", "FALLBACK_CHAT_TEMPLATE", "TokenizerInfo", "fallback_prompt",
           "render_fallback_template", "render_template", "inspect_split", "inspect_preference", "PreferenceSplit",
           "load_preference_split", "preference_kind", "ACCEPTED", "SPLITS", "Sample", "Split", "SplitStats",
           "check_messages", "find_split_files", "load_split", "read_rows", "row_format", "split_file"]
