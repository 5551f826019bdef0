"""The package's shape: no import cycle (function-level imports included), every import goes down the
layer order below, no module imports another's private name, and no module passes ~400 lines.

LAYERS lists each unit (a top-level module or subpackage of mlxlora) from the bottom up; a unit may
import its own modules and units of lower layers only. Units on one line are peers that may not import
each other.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlxlora"
LAYERS = [
    ["errors", "cache"],
    ["files"],
    ["config", "blas"],
    ["lora", "formats", "data"],
    ["models"],
    ["adapters"],
    ["loss"],
    ["plan"],
    ["inference"],
    ["serve"],
    ["train"],
    ["fuse"],
    ["evaluate"],
    ["cards"],
    ["hub"],
    ["demo"],
    ["commands"],
    ["cli"],
    ["__init__", "__main__"],
]
MAX_LINES = 400


def modules(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} for every .py file under `root`."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def imports(root: Path = PACKAGE) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """({module: modules of the package it imports, anywhere in the file}, [(module, from, private name)]).

    Importing a.b.c also runs a and a.b, so those count as imported too (except the importer's own
    packages). Function-level imports are visited like top-level ones.
    """
    mods = modules(root)
    pkg = root.name
    edges: dict[str, set[str]] = {}
    private = []
    for mod, (f, is_pkg) in mods.items():
        out = edges.setdefault(mod, set())
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                if target.split(".")[0] != pkg:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    targets.append(sub if sub in mods else target)
                    if a.name.startswith("_") and not a.name.startswith("__") and target != mod:
                        private.append((mod, target, a.name))
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == pkg]
            for t in targets:
                parts = t.split(".")
                for i in range(1, len(parts) + 1):
                    p = ".".join(parts[:i])
                    if p in mods and p != mod and not mod.startswith(p + "."):
                        out.add(p)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def rank(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"mlxlora.{name} has no place in LAYERS (tests/test_layout.py): add it")


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, targets in sorted(edges.items()):
        for t in sorted(targets):
            a, b = unit(mod), unit(t)
            if a != b and rank(b) >= rank(a):
                out.append(f"{mod} imports {t} ({b} is not below {a})")
    return out


def test_no_import_cycle():
    edges, _ = imports()
    assert cycles(edges) == []


def test_every_import_goes_down_the_layers():
    edges, _ = imports()
    assert layer_violations(edges) == []


def test_no_private_name_crosses_modules():
    assert imports()[1] == []


def test_no_module_is_too_long():
    long = {m: n for m, (f, _) in modules().items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checks_fail_on_a_planted_cycle_and_an_upward_import(tmp_path):
    """The graph sees function-level imports: a cycle and an upward import planted in a copy are found."""
    import shutil

    copy = tmp_path / "mlxlora"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    # errors (layer 0) imports train (layer 10) inside a function; train imports errors: a cycle.
    with open(copy / "errors.py", "a") as f:
        f.write("\n\ndef _planted():\n    from .train import loop  # noqa: F401\n")
    edges, _ = imports(copy)
    found = cycles(edges)
    assert any("mlxlora.errors" in c and "mlxlora.train.loop" in c for c in found), found
    assert "mlxlora.errors imports mlxlora.train.loop (train is not below errors)" in layer_violations(edges)


def test_fuse_strategy_names_have_one_home():
    from mlxlora.config import FUSE_STRATEGIES
    from mlxlora.fuse.requant import STRATEGIES

    assert tuple(STRATEGIES) == FUSE_STRATEGIES


@pytest.mark.parametrize("command", ["train", "generate", "eval", "plan", "serve", "chat", "fuse", "export-model"])
def test_help_defaults_come_from_the_dataclasses(command):
    """A `[default: X]` in --help equals the dataclass field behind the flag, so help and behaviour cannot drift."""
    import re

    from mlxlora.cli import cli
    from mlxlora.config import (EvalConfig, ExportConfig, FuseConfig, GenerateConfig, LoraConfig, ServeConfig,
                                TrainConfig)

    owner = {"eval": EvalConfig, "generate": GenerateConfig, "chat": GenerateConfig, "serve": ServeConfig,
             "fuse": FuseConfig, "export-model": ExportConfig}.get(command, TrainConfig)
    import dataclasses

    lora = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target": "target_modules"}
    checked = 0
    for param in cli.commands[command].params:
        m = re.search(r"\[default: ([^\]]+)\]", getattr(param, "help", None) or "")
        cls = LoraConfig if param.name in lora and owner is TrainConfig else owner
        fields = {f.name: f for f in dataclasses.fields(cls)}
        f = fields.get(lora.get(param.name, param.name) if cls is LoraConfig else param.name)
        if m is None or f is None:
            continue
        want = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if want is None:  # "not given" means something said in words ("when the tokenizer has one")
            continue
        if isinstance(want, list):
            assert m[1] == ",".join(want), (param.name, m[1], want)
        elif isinstance(want, (int, float)) and not isinstance(want, bool):
            assert float(m[1]) == float(want), (param.name, m[1], want)
        else:
            assert m[1] == str(want), (param.name, m[1], want)
        checked += 1
    assert checked >= 2, command
