"""What a user sees at start-up: adapters by module kind, linear-like modules left out, a target that
matches nothing, adapters that get no gradient, packing refused for hybrid models."""

import io

import mlx.core as mx
import pytest
from rich.console import Console

import conformance as C
import tiny
from mlxlora import LoraConfig, TrainConfig
from mlxlora.errors import ConfigError
from mlxlora.lora import report
from mlxlora.lora.layers import LINEAR_TYPES
from mlxlora.lora.surgery import adapter_layers, block_index, find_targets, get_lora_model
from mlxlora.models.load import Base
from mlxlora.train import train


@pytest.fixture(autouse=True)
def eager():
    mx.disable_compile()
    yield
    mx.enable_compile()


@pytest.mark.parametrize("path,kind", [
    ("model.layers.0.self_attn.q_proj", "attention"), ("model.layers.0.self_attn.kv_b_proj", "attention"),
    ("model.layers.1.mlp.down_proj", "MLP"), ("model.layers.1.mlp.gate", "router"),
    ("model.layers.1.block_sparse_moe.router.layer", "router"), ("model.layers.1.mlp.switch_mlp.up_proj", "experts"),
    ("transformer.blocks.1.ffn.experts.0.w1", "experts"), ("model.layers.1.mlp.shared_expert.up_proj", "MLP"),
    ("model.layers.0.mixer.in_proj", "other"), ("backbone.layers.0.mixer.out_proj", "other"),
])
def test_kind_of(path, kind):
    assert report.kind_of(path) == kind


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "llama"])
def test_every_linear_like_module_is_adapted_or_reported(arch):
    """In the adapted blocks, each module with a >= 2-D weight is wrapped or listed with its type."""
    model = C.build(arch)
    get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    adapted = {p for p, _ in adapter_layers(model)}
    reported = dict(report.not_adapted(model))
    blocks = {block_index(p) for p in adapted}
    for path, m in model.named_modules():
        w = m.get("weight") if isinstance(m, dict) else None
        if (isinstance(w, mx.array) and w.ndim >= 2 and block_index(path) in blocks
                and not any(path.startswith(a + ".") for a in adapted) and type(m).__name__ != "Embedding"):
            assert path in adapted or path in reported, path
    assert not set(reported) & adapted
    assert all(not isinstance(m, LINEAR_TYPES) for p, m in model.named_modules() if p in reported)
    counts = report.summary(model)
    assert counts["attention"] == sum(report.kind_of(p) == "attention" for p in adapted) > 0
    lines = report.describe(model)
    assert lines[0].startswith("adapted: ") and f"{counts['attention']} attention" in lines[0]
    for name in set(reported.values()):
        assert any(line.startswith("warning: ") and f" {name} module(s)" in line for line in lines[1:]), name
    if arch == "llama":
        assert reported == {} and len(lines) == 1
    if arch == "deepseek_v3":  # MLA's per-head MultiLinear is not a Linear
        assert "MultiLinear" in reported.values()


def test_all_linear_matching_nothing_lists_the_layers_and_does_not_suggest_itself():
    model = C.build("bitnet")  # every projection is a BitLinear (its forward needs Metal; building is fine)
    with pytest.raises(ConfigError) as e:
        find_targets(model, LoraConfig(target_modules="all-linear"))
    msg = str(e.value)
    assert "BitLinear: " in msg and "q_proj" in msg and "use --target all-linear" not in msg and "\n" not in msg
    with pytest.raises(ConfigError) as e:
        find_targets(C.build("llama"), LoraConfig(target_modules=["nope_proj"]))
    assert "Linear: " in str(e.value) and "q_proj" in str(e.value) and "--target all-linear" in str(e.value)


def _train_in_process(arch, tmp_path, **kw):
    """Train `arch`'s in-process tiny model for 2 steps; the console output."""
    tok_dir = tmp_path / "tok"
    tiny.make_tokenizer(tok_dir)
    from mlx_lm.utils import load_tokenizer

    cfg_dict = C.A.config_for(arch)
    base = Base(model=C.build(arch), tokenizer=load_tokenizer(tok_dir), config=cfg_dict, path=tok_dir, source=arch)
    rows = [{"text": "word " * n} for n in (3, 30, 4, 25, 2, 40)]
    data = tiny.write_data(tmp_path / "data", rows)
    out = io.StringIO()
    cfg = TrainConfig(data=str(data), adapter_path=str(tmp_path / "adapter"), iters=2, batch_size=2, lr=1e-3,
                      lora=LoraConfig(r=4, target_modules="all-linear"), **kw)
    train(cfg, base=base, console=Console(file=out, width=400))
    return out.getvalue()


def test_startup_report_and_dead_adapter_warning(tmp_path):
    text = _train_in_process("glm_moe_dsa", tmp_path)
    assert "adapted: " in text and " attention" in text and " router" in text
    # the DSA indexer's projections only choose which tokens attend: they get no gradient
    assert "got an all-zero gradient in step 1" in text and "indexer" in text


def test_hybrid_packing_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="state across positions"):
        _train_in_process("qwen3_next", tmp_path, pack=True)
    text = _train_in_process("qwen3_next", tmp_path / "auto")
    assert "packing: off for 'qwen3_next' models" in text
