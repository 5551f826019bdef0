"""Many expert adapters over one MoE base: each equals loading it alone, generation with the KV cache,
mixed-row batches refused, and weighted merges combined expert by expert."""

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlxlora import LoraConfig
from mlxlora.adapters import load_adapter
from mlxlora.errors import AdapterError
from mlxlora.inference import load_with_adapter
from mlxlora.lora.multi_layers import MultiLoRASwitchLinear
from mlxlora.models import load_base
from mlxlora.serve.merge import add_weighted_adapter, delta_weight
from mlxlora.serve.multi import MultiAdapterModel

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9, 250], [1, 90, 3, 44, 5, 66, 7, 88]])
# 2 rows x 8 tokens x 2 experts = 32 (token, expert) pairs: SwitchGLU's unsorted path; LONG sorts (>= 64)
LONG = mx.array([[5, 17, 33, 100, 200, 7, 9, 250] * 3, [1, 90, 3, 44, 5, 66, 7, 88] * 3])
ADAPTERS = {"all": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            "experts": LoraConfig(r=2, lora_alpha=8, target_modules=["switch_mlp.down_proj", "switch_mlp.up_proj", "gate"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-multi")
    src = tiny.make_model(root / "moe", "qwen3_moe")
    dirs = {name: tiny.make_adapter(src, root / name, cfg, seed, size=0.2)
            for seed, (name, cfg) in enumerate(ADAPTERS.items(), start=1)}
    return src, dirs


def _multi(src, dirs):
    multi = MultiAdapterModel(load_base(str(src)).model)
    for name, d in dirs.items():
        multi.load_adapter(d, name)
    return multi


def test_each_adapter_equals_loading_it_alone(setup):
    src, dirs = setup
    multi = _multi(src, dirs)
    assert sum(isinstance(m, MultiLoRASwitchLinear) for _, m in multi.model.named_modules()) == 6
    bare = load_base(str(src)).model
    for ids in (IDS, LONG):
        base = np.array(bare(ids))
        for name, d in dirs.items():
            multi.set_adapter(name)
            alone = load_base(str(src)).model
            load_adapter(alone, d)
            ref = np.array(alone(ids))
            assert np.abs(ref - base).max() > 1e-2
            assert np.abs(np.array(multi(ids)) - ref).max() <= 1e-5
        multi.disable_adapter()
        assert np.array_equal(np.array(multi(ids)), base)


def test_generation_with_kv_cache_equals_single_adapter(setup):
    from mlx_lm import generate

    src, dirs = setup
    base = load_base(str(src))
    multi = MultiAdapterModel(base.model)
    for name, d in dirs.items():
        multi.load_adapter(d, name)
    for name, d in dirs.items():
        multi.set_adapter(name)
        ref = load_with_adapter(str(src), str(d))
        assert generate(base.model, base.tokenizer, "Hello", max_tokens=10) == \
            generate(ref.model, ref.tokenizer, "Hello", max_tokens=10)


def test_a_batch_mixing_adapters_is_refused_on_experts(setup):
    src, dirs = setup
    multi = _multi(src, dirs)
    with pytest.raises(AdapterError, match="mixing adapters row by row is not supported on MoE experts"):
        multi(IDS, adapter_names=["all", "experts"])
    same = np.array(multi(IDS, adapter_names=["all", "all"]))  # one adapter for every row is fine
    multi.set_adapter("all")
    assert np.array_equal(same, np.array(multi(IDS)))


def test_merges_combine_expert_by_expert(setup):
    from mlxlora.formats import read_adapter

    src, dirs = setup
    a, b = read_adapter(dirs["all"]), read_adapter(dirs["experts"])
    path = "model.layers.1.mlp.switch_mlp.down_proj"
    want = 0.7 * delta_weight(a.layers[path]) - 0.4 * delta_weight(b.layers[path])  # (E, in, out)
    cat = add_weighted_adapter([a, b], [0.7, -0.4], "cat")
    assert cat.layers[path].lora_a.shape == (4, 32, 6) and np.allclose(delta_weight(cat.layers[path]), want, atol=1e-5)
    svd = add_weighted_adapter([a, b], [0.7, -0.4], "svd", svd_rank=6)  # rank 6 holds the whole sum
    assert np.allclose(delta_weight(svd.layers[path]), want, atol=1e-4)
    low = add_weighted_adapter([a, b], [0.7, -0.4], "svd", svd_rank=2)
    err = np.linalg.norm(delta_weight(low.layers[path]) - want) / np.linalg.norm(want)
    assert 0 < err < 1
    multi = _multi(src, dirs)
    multi.add_weighted_adapter(["all", "experts"], [0.7, -0.4], "mix", combination_type="cat")
    multi.set_adapter("mix")
    alone = load_base(str(src)).model
    from mlxlora.adapters import attach
    attach(alone, cat)
    assert np.abs(np.array(multi(IDS)) - np.array(alone(IDS))).max() <= 1e-5


def test_server_answers_with_each_expert_adapter(setup):
    import threading

    from mlxlora.commands.serve import load_engine
    from mlxlora.serve.server import ServeConfig, make_server, serve_forever
    from test_server import PROMPT, direct, request  # the llama server test's helpers

    src, dirs = setup
    engine = load_engine(str(src), {n: str(d) for n, d in dirs.items()})
    srv = make_server(engine, ServeConfig(port=0))
    thread = threading.Thread(target=serve_forever, args=(srv,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        texts = set()
        for name in ["moe", *dirs]:
            status, body = request(url, "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 8})
            assert status == 200, body
            want = direct(src, dirs.get(name), PROMPT, max_tokens=8)
            assert body["choices"][0]["text"] == want["text"]
            texts.add(want["text"])
        assert len(texts) == 3  # base and both adapters answer differently
    finally:
        srv.shutdown()
        thread.join(timeout=30)
