"""Fixtures shared by the whole suite (helpers that are plain functions live in tests/tiny.py).

tiny_dirs: one tiny random model folder per architecture of tiny.ARCHS, written once per session; tests
must not change these folders (copy one first). ids: a fixed batch of token ids for logit comparisons.
"""

import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import tiny` from every test module

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> a tiny float32 model folder (config.json, model.safetensors, tokenizer), shared read-only."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: tiny.make_model(root / arch, arch) for arch in tiny.ARCHS}


@pytest.fixture(scope="session")
def tiny_bpe_dirs(tmp_path_factory):
    """arch -> a tiny float32 model folder whose tokenizer has a BPE merge (tiny.make_bpe_model), shared read-only."""
    root = tmp_path_factory.mktemp("tiny-bpe-models")
    return {arch: tiny.make_bpe_model(root / arch, arch) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def ids():
    """A (2, 12) batch of token ids inside tiny.VOCAB_SIZE."""
    return mx.array([[5, 60, 61, 62, 70, 80, 90, 100, 33, 34, 35, 36], [7, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])


@pytest.fixture
def cli():
    """tiny.run_cli: run `mlxlora ARGS...` in-process and get Click's result."""
    return tiny.run_cli
