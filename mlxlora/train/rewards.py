"""Reward functions for GRPO: the built-ins, user code, and scoring a batch of completions.

A reward function has TRL's signature, so one written for TRL's GRPOTrainer works here unchanged:

    def reward(prompts: list, completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]

`columns` holds every other key of the prompt rows as a list (e.g. `answer`); it returns one float per
completion (None: this function does not score that completion). `--reward` names one per flag:

    exact | format | length            a built-in, weight 1.0
    exact:1.0  format:0.2              a built-in with a weight
    mymodule:function[:weight]         a function of an importable module
    path/to/file.py:function[:weight]  a function of a Python file

Built-ins:
    exact   1.0 when the completion's final answer equals the row's `answer`, else 0.0 (see final_answer);
    format  1.0 when the completion contains a match of --format-pattern (re.search), else 0.0;
    length  -(completion tokens) / --max-completion-length: in [-1, 0], a penalty on long completions.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..config.grpo import BUILTIN_REWARDS, GRPOConfig
from ..errors import ConfigError

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


@dataclass
class Reward:
    """One weighted reward function. name: what progress lines and the run record show (the built-in's
    or the function's name, as TRL names its reward metrics); spec: the --reward that gave it."""

    name: str
    fn: Callable
    weight: float = 1.0
    spec: str = ""


def final_answer(text: str) -> str | None:
    """The final answer a completion states, by the first rule that applies:

    1. the content of the last `\\boxed{...}` (nested braces kept);
    2. the text after the last `####` (GSM8K's marker), up to the end of its line;
    3. the last number (`-3`, `1,000`, `2.5`);
    4. the last non-empty line.
    None for an empty completion.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        return tail[0].strip() if tail else ""
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def same_answer(predicted: str | None, answer: str) -> bool:
    """Whether a final answer equals the reference: numerically when both are numbers (`1,000` = `1000.0`),
    else as text ignoring case, surrounding spaces, `$` signs and a trailing period. A reference with
    `\\boxed{}` or `####` is reduced to its final answer first."""
    if predicted is None:
        return False
    if "\\boxed" in answer or "####" in answer:
        answer = final_answer(answer) or ""
    a, b = _normal(predicted), _normal(answer)
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    return a.casefold() == b.casefold()


def builtin(name: str, cfg: GRPOConfig) -> Callable:
    """The built-in reward function `name` (one of BUILTIN_REWARDS) configured by cfg."""
    if name == "exact":
        def exact(prompts, completions, completion_ids=None, answer=None, **_):
            if answer is None:
                raise ConfigError("--reward exact needs an 'answer' in every prompt row")
            return [float(same_answer(final_answer(c), str(a))) for c, a in zip(completions, answer)]
        return exact
    if name == "format":
        pattern = re.compile(cfg.format_pattern)

        def format(prompts, completions, **_):  # noqa: A001 - the reward's name
            return [float(pattern.search(c) is not None) for c in completions]
        return format
    if name == "length":
        limit = cfg.max_completion_length

        def length(prompts, completions, completion_ids, **_):
            return [-len(ids) / limit for ids in completion_ids]
        return length
    raise ConfigError(f"--reward: unknown built-in {name!r}; built-ins: {', '.join(BUILTIN_REWARDS)}")


def parse_rewards(cfg: GRPOConfig) -> list[Reward]:
    """cfg.rewards (the --reward specs) -> Reward objects; ConfigError naming the bad spec and the fix."""
    out = []
    for spec in cfg.rewards:
        target, weight = _split_weight(spec)
        if ":" not in target:
            if target not in BUILTIN_REWARDS:
                raise ConfigError(f"--reward {spec}: unknown reward {target!r}; use a built-in "
                                  f"({', '.join(BUILTIN_REWARDS)}), module:function or path/to/file.py:function")
            out.append(Reward(target, builtin(target, cfg), weight, spec))
        else:
            out.append(Reward(target.rpartition(":")[2], load_user_reward(target, spec), weight, spec))
    names = [r.name for r in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        twice = [r.spec for r in out if r.name == dup]
        raise ConfigError(f"--reward {twice[0]} and --reward {twice[1]} are both named {dup!r}; give each reward "
                          "once (its weight sets its share), under its own name")
    return out


def load_user_reward(target: str, spec: str | None = None) -> Callable:
    """`module:function` or `path/to/file.py:function` -> the function; ConfigError when it cannot be had."""
    spec = spec or target
    where, _, name = target.rpartition(":")
    if not where or not name:
        raise ConfigError(f"--reward {spec}: write module:function or path/to/file.py:function")
    try:
        if where.endswith(".py") or "/" in where:
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"--reward {spec}: {path} is not a file; give the path of a .py file")
            mod_spec = importlib.util.spec_from_file_location(f"mlxlora_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        if e.name is None or not (where == e.name or where.startswith(e.name + ".")):
            raise ConfigError(f"--reward {spec}: importing {where} failed: ModuleNotFoundError: {e}") from None
        raise ConfigError(f"--reward {spec}: cannot import {where!r} ({e}); give an importable module "
                          "(on PYTHONPATH) or the path of a .py file") from None
    except Exception as e:  # the user's module failed while importing
        raise ConfigError(f"--reward {spec}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        what = "is not callable" if fn is not None else "is not defined there"
        raise ConfigError(f"--reward {spec}: {name!r} {what}; name a function of {where}")
    return fn


def score(rewards: list[Reward], prompts: list, completions: list[str], completion_ids: list[list[int]],
          columns: dict[str, list]) -> np.ndarray:
    """(N, F) float64 rewards of N completions by F functions (NaN where a function returned None).

    Raises ConfigError when a function raises, returns the wrong count or a value that is not a number.
    """
    n = len(completions)
    out = np.empty((n, len(rewards)), dtype=np.float64)
    for j, r in enumerate(rewards):
        try:
            values = r.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except ConfigError:
            raise
        except Exception as e:  # the user's function failed: say where, on one line
            frame = traceback.extract_tb(e.__traceback__)[-1]
            raise ConfigError(f"--reward {r.spec or r.name} raised {type(e).__name__}: {e} (at {frame.filename}:"
                              f"{frame.lineno}); fix the function or drop the --reward") from None
        values = list(values) if values is not None else []
        if len(values) != n:
            raise ConfigError(f"--reward {r.spec or r.name} returned {len(values)} values for {n} completions; "
                              "return one float per completion")
        for i, v in enumerate(values):
            if v is None:
                out[i, j] = np.nan
            elif isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
                raise ConfigError(f"--reward {r.spec or r.name} returned {v!r} for completion {i}; return a finite float "
                                  "(or None to leave it unscored)")
            else:
                out[i, j] = float(v)
    return out


def _split_weight(spec: str) -> tuple[str, float]:
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(weight):
            raise ConfigError(f"--reward {spec}: the weight must be a finite number")
        return head, weight
    return spec, 1.0


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unclosed: no boxed answer


def _normal(s: str) -> str:
    s = s.strip().strip("$").strip()
    return s[:-1].strip() if s.endswith(".") else s


def _as_number(s: str) -> float | None:
    if not _NUMBER.fullmatch(s):
        return None
    return float(s.replace(",", ""))
