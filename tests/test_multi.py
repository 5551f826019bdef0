"""Many adapters over one base: each equals loading it alone, the base is never copied, rows can mix adapters."""

import gc
import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import tiny
from mlxlora import LoraConfig
from mlxlora.adapters import load_adapter
from mlxlora.cli import cli
from mlxlora.config import EvalConfig
from mlxlora.errors import AdapterError
from mlxlora.inference import eval_split, load_with_adapter
from mlxlora.models import load_base
from mlxlora.lora.multi_layers import MULTI_TYPES
from mlxlora.serve.compare import compare_perplexity, format_perplexity_table
from mlxlora.serve.multi import MultiAdapterModel

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9, 250],
                [1, 90, 3, 44, 5, 66, 7, 88],
                [120, 9, 9, 31, 9, 9, 9, 200],
                [3, 4, 150, 6, 7, 8, 9, 10]])
TOL = 1e-5

# arch -> {adapter name: LoraConfig}: different targets, ranks, DoRA, an embedding (tied head on qwen2)
ADAPTERS = {
    "llama": {"qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
              "dora": LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", use_dora=True),
              "emb": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"], layers_to_transform=[1])},
    "qwen2": {"mlp": LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj", "down_proj"], use_rslora=True),
              "emb": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "k_proj"])},
    "llama-q4": {"all": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                 "dora": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], use_dora=True)},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """arch -> (model folder, {name: adapter folder})."""
    root = tmp_path_factory.mktemp("multi")
    models = {"llama": tiny.make_model(root / "llama", "llama"), "qwen2": tiny.make_model(root / "qwen2", "qwen2"),
              "llama-q4": tiny.make_model(root / "llama-q4", "llama", quantize=4)}
    out = {}
    for arch, adapters in ADAPTERS.items():
        dirs = {name: tiny.make_adapter(models[arch], root / arch / name, cfg, seed)
                for seed, (name, cfg) in enumerate(adapters.items(), start=1)}
        out[arch] = (models[arch], dirs)
    return out


def alone(src, adapter_dir) -> np.ndarray:
    """Logits of a fresh base with one adapter loaded the ordinary way."""
    model = load_base(str(src)).model
    load_adapter(model, adapter_dir)
    return np.array(model(IDS))


def multi_for(src, dirs) -> MultiAdapterModel:
    multi = MultiAdapterModel(load_base(str(src)).model)
    for name, d in dirs.items():
        multi.load_adapter(d, name)
    return multi


def base_arrays(model) -> dict:
    """{(module path, name): array} of every base parameter."""
    return {(p, k): v for p, m in model.named_modules() if not isinstance(m, MULTI_TYPES)
            for k, v in m.items() if isinstance(v, mx.array)}


@pytest.mark.parametrize("arch", list(ADAPTERS))
def test_each_adapter_equals_loading_it_alone(arch, setup):
    src, dirs = setup[arch]
    multi = multi_for(src, dirs)
    base = np.array(load_base(str(src)).model(IDS))
    for name, d in dirs.items():
        multi.set_adapter(name)
        assert multi.active_adapter == name
        ref = alone(src, d)
        diff = float(np.abs(np.array(multi(IDS)) - ref).max())
        print(f"{arch}/{name}: multi vs alone max|diff| {diff:.1e}, adapter effect {np.abs(ref - base).max():.2f}")
        assert np.abs(ref - base).max() > 1e-2  # the adapter really changes the logits
        assert diff <= TOL
    multi.disable_adapter()
    assert multi.active_adapter is None
    assert np.array_equal(np.array(multi(IDS)), base)  # disabled is the base, bit for bit


def test_disable_adapter_as_context_manager(setup):
    src, dirs = setup["llama"]
    multi = multi_for(src, dirs)
    base = np.array(load_base(str(src)).model(IDS))
    multi.set_adapter("qv")
    with_qv = np.array(multi(IDS))
    with multi.disable_adapter():
        assert multi.active_adapter is None
        assert np.array_equal(np.array(multi(IDS)), base)
    assert multi.active_adapter == "qv"
    assert np.array_equal(np.array(multi(IDS)), with_qv)
    with multi.set_adapter("dora"):
        assert not np.allclose(np.array(multi(IDS)), with_qv)
    assert multi.active_adapter == "qv"


@pytest.mark.parametrize("arch", ["llama", "llama-q4"])
def test_base_arrays_are_never_copied_and_memory_grows_by_adapter_bytes(arch, setup):
    src, dirs = setup[arch]
    model = load_base(str(src)).model
    before = base_arrays(model)
    multi = MultiAdapterModel(model)
    gc.collect()
    start = mx.get_active_memory()
    used = start
    for name, d in dirs.items():
        nbytes = multi.load_adapter(d, name).nbytes
        gc.collect()
        grown, used = mx.get_active_memory() - used, mx.get_active_memory()
        print(f"{arch}: loading {name} grew active memory by {grown} bytes; its tensors hold {nbytes} bytes")
        assert abs(grown - nbytes) <= 0.02 * nbytes + 4096
    for name in [*dirs, None]:
        multi.set_adapter(name)
        mx.eval(multi(IDS))
    gc.collect()
    print(f"{arch}: switching grew active memory by {mx.get_active_memory() - used} bytes")
    assert mx.get_active_memory() - used <= 4096

    def check_same_objects():
        modules = dict(model.named_modules())
        for (path, key), arr in before.items():
            layer = modules[path]
            if isinstance(layer, MULTI_TYPES):
                layer = layer.base
            assert layer[key] is arr, f"{path}.{key} was replaced"

    check_same_objects()
    assert any(isinstance(m, MULTI_TYPES) for _, m in model.named_modules())
    for name in dirs:
        multi.delete_adapter(name)
        check_same_objects()
    gc.collect()
    assert abs(mx.get_active_memory() - start) <= 4096  # deleting gives the adapter memory back
    assert not any(isinstance(m, MULTI_TYPES) for _, m in model.named_modules())  # plain layers again
    assert set(base_arrays(model)) == set(before)


@pytest.mark.parametrize("arch", list(ADAPTERS))
def test_mixed_batch_rows_equal_single_adapter_results(arch, setup):
    src, dirs = setup[arch]
    multi = multi_for(src, dirs)
    names = list(dirs)
    single = {}
    for name in [None, *names]:
        with multi.set_adapter(name):
            single[name] = np.array(multi(IDS))
    rows = [names[0], None, names[-1], names[0]]
    multi.set_adapter(names[-1])
    mixed = np.array(multi(IDS, adapter_names=rows))
    for i, name in enumerate(rows):
        diff = float(np.abs(mixed[i] - single[name][i]).max())
        print(f"{arch} row {i} ({name}): max|diff| {diff:.1e}")
        assert diff <= TOL
    assert np.abs(single[names[0]][0] - single[None][0]).max() > 1e-2  # rows really differ by adapter
    # the selection lasts for that call only
    assert multi.active_adapter == names[-1]
    assert np.array_equal(np.array(multi(IDS)), single[names[-1]])
    assert np.array_equal(np.array(multi(IDS, adapter_names=[None] * 4)), single[None])


def test_mixed_batch_errors(setup):
    src, dirs = setup["llama"]
    multi = multi_for(src, dirs)
    with pytest.raises(AdapterError, match="3 entries for a batch of 4"):
        multi(IDS, adapter_names=["qv", None, "qv"])
    with pytest.raises(AdapterError, match="no adapter named 'nope'.*qv, dora, emb"):
        multi(IDS, adapter_names=["qv", None, "nope", None])


def test_delete_keeps_the_others_and_unwraps_unused_layers(setup):
    src, dirs = setup["llama"]
    multi = multi_for(src, dirs)
    multi.set_adapter("emb")
    emb = np.array(multi(IDS))
    multi.delete_adapter("emb")
    assert multi.adapters == ["qv", "dora"] and multi.active_adapter is None
    types = dict(multi.model.named_modules())
    assert not isinstance(types["model.embed_tokens"], MULTI_TYPES)  # only "emb" adapted it
    assert isinstance(types["model.layers.0.self_attn.q_proj"], MULTI_TYPES)
    multi.set_adapter("qv")
    assert float(np.abs(np.array(multi(IDS)) - alone(src, dirs["qv"])).max()) <= TOL
    multi.load_adapter(dirs["emb"], "emb")  # loading again after a delete
    multi.set_adapter("emb")
    assert float(np.abs(np.array(multi(IDS)) - emb).max()) <= TOL


def test_errors_leave_the_model_working(setup, tmp_path):
    src, dirs = setup["llama"]
    multi = multi_for(src, {"qv": dirs["qv"]})
    multi.set_adapter("qv")
    ref = np.array(multi(IDS))
    other = tiny.make_model(tmp_path / "wide", "llama", hidden_size=32, intermediate_size=64)
    bad = tiny.make_adapter(other, tmp_path / "bad", LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), seed=5)
    with pytest.raises(AdapterError, match="does not fit this base"):
        multi.load_adapter(bad, "bad")
    with pytest.raises(AdapterError, match="already loaded"):
        multi.load_adapter(dirs["dora"], "qv")
    with pytest.raises(AdapterError, match="letters, digits"):
        multi.load_adapter(dirs["dora"], "a.b")
    with pytest.raises(AdapterError, match="no adapter named 'zz' \\(loaded: qv\\)"):
        multi.set_adapter("zz")
    with pytest.raises(AdapterError, match="does not exist"):
        multi.load_adapter(tmp_path / "missing", "m")
    assert multi.adapters == ["qv"] and multi.active_adapter == "qv"
    assert np.array_equal(np.array(multi(IDS)), ref)
    single = load_base(str(src)).model
    load_adapter(single, dirs["qv"])
    with pytest.raises(AdapterError, match="already has a single adapter"):
        MultiAdapterModel(single)
    with pytest.raises(AdapterError, match="another MultiAdapterModel"):
        MultiAdapterModel(multi.model)


def test_mlx_lm_format_adapter_loads_too(setup, tmp_path):
    mlx_lm_format = pytest.importorskip("mlxlora.adapters")
    src, dirs = setup["llama"]
    out = mlx_lm_format.export_mlx_lm(dirs["dora"], tmp_path / "mlx-lm")
    assert (out / "adapters.safetensors").is_file()
    multi = multi_for(src, {"qv": dirs["qv"]})
    multi.load_adapter(out, "from_mlx_lm")
    multi.set_adapter("from_mlx_lm")
    diff = float(np.abs(np.array(multi(IDS)) - alone(src, dirs["dora"])).max())
    print(f"mlx-lm folder in a MultiAdapterModel vs the PEFT folder alone: max|diff| {diff:.1e}")
    assert diff <= TOL


def test_generation_with_kv_cache_equals_single_adapter(setup):
    from mlx_lm import generate

    src, dirs = setup["qwen2"]
    base = load_base(str(src))
    multi = MultiAdapterModel(base.model)
    for name, d in dirs.items():
        multi.load_adapter(d, name)
    texts = {}
    for name, d in dirs.items():
        multi.set_adapter(name)
        ours = generate(base.model, base.tokenizer, "Hello", max_tokens=12)
        ref = load_with_adapter(str(src), str(d))
        assert ours == generate(ref.model, ref.tokenizer, "Hello", max_tokens=12)
        texts[name] = ours
    assert len(set(texts.values())) == len(texts)


def write_test_split(folder):
    folder.mkdir()
    rows = [{"text": "The cat sat on the mat."}, {"text": "War: a by-product of the arts of peace."},
            {"text": "Politics: a strife of interests masquerading as a contest of principles."}]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_compare_perplexity(setup, tmp_path):
    src, dirs = setup["llama"]
    data = write_test_split(tmp_path / "data")
    base = load_base(str(src))
    table = compare_perplexity(base, {"qv": str(dirs["qv"]), "dora": str(dirs["dora"])}, str(data), EvalConfig(batch_size=2))
    assert [r["adapter"] for r in table] == ["base", "qv", "dora"]
    assert not any(isinstance(m, MULTI_TYPES) for _, m in base.model.named_modules())  # left bare
    cfg = EvalConfig(batch_size=2)
    assert table[0]["loss"] == pytest.approx(eval_split(load_with_adapter(str(src)), str(data), cfg)["loss"], abs=TOL)
    for row in table[1:]:
        ref = eval_split(load_with_adapter(str(src), str(dirs[row["adapter"]])), str(data), cfg)
        assert row["loss"] == pytest.approx(ref["loss"], abs=TOL)
        assert row["delta_loss"] == pytest.approx(row["loss"] - table[0]["loss"])
        assert row["perplexity"] == pytest.approx(np.exp(row["loss"]), rel=1e-6)
        assert abs(row["delta_loss"]) > 1e-3
    text = format_perplexity_table(table)
    print(text)
    assert text.splitlines()[0].split()[:3] == ["adapter", "loss", "perplexity"]
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["base", "qv", "dora"]


def test_eval_cli_compares_adapters_in_one_table(setup, tmp_path):
    """`mlxlora eval` with several adapters: base row first, each row the numbers of a single `eval` run."""
    src, dirs = setup["llama"]
    data = write_test_split(tmp_path / "data")

    def run(*args):
        res = CliRunner().invoke(cli, ["eval", "--model", str(src), "--data", str(data), "--batch-size", "2", *args])
        assert res.exit_code == 0, res.output
        return res.output.splitlines()

    def single(*args):  # "loss X  perplexity Y" of a one-adapter (or bare) run
        words = run(*args)[-1].split()
        assert words[0] == "loss" and words[2] == "perplexity"
        return float(words[1]), float(words[3])

    out = run("--adapter", f"qv={dirs['qv']}", "--adapter", str(dirs["dora"]))
    assert out[0] == run()[0] and "test.jsonl: 3 samples," in out[0]  # the same split line as a single run
    assert out[1].split()[:3] == ["adapter", "loss", "perplexity"]
    table = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out[2:]}
    assert list(table) == ["base", "qv", "dora"]  # a bare DIR is named after its folder
    refs = {"base": single(), "qv": single("--adapter", str(dirs["qv"])), "dora": single("--adapter", str(dirs["dora"]))}
    for name, (loss, ppl) in refs.items():
        print(f"eval --adapter {name}: loss {loss:.4f} perplexity {ppl:.3f}; table: {table[name]}")
        # the same printed digits (one unit of the last digit allowed: rounding of a ~1e-7 difference)
        assert table[name][0] == pytest.approx(loss, abs=1.01e-4)
        assert table[name][1] == pytest.approx(ppl, abs=1.01e-3)
        if name != "base":
            assert table[name][2] == pytest.approx(loss - refs["base"][0], abs=2.01e-4)
            assert abs(table[name][2]) > 1e-3  # NON-ZERO lora_b: the adapter really moves the loss
    named = run("--adapter", f"only={dirs['qv']}")  # one NAME=DIR also gives the table
    assert [line.split()[0] for line in named[2:]] == ["base", "only"]
    bad = CliRunner().invoke(cli, ["eval", "--model", str(src), "--data", str(data), "--adapter", f"base={dirs['qv']}"])
    assert bad.exit_code != 0 and "reserved for the bare base" in bad.output
