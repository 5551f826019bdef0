"""`mlxlora export-model`: what it writes loads in transformers (torch, CPU, no MLX) with MLX's logits.

Checked against the real peer: AutoModelForCausalLM.from_pretrained on the export, logits within
1e-4 in float32 for llama and qwen2 (tied head), with a non-zero adapter fused in, sharded into
3+ files (the index compared with the one transformers' own save_pretrained writes), and from a
4-bit base (dequantized).
"""

import json

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlxlora import LoraConfig, get_lora_model
from mlxlora.adapters import save_adapter
from mlxlora.cards import front_matter
from mlxlora.config import parse_size
from mlxlora.models.hf_export import INDEX_FILE, shard_names
from mlxlora.errors import ConfigError
from mlxlora.hub import ExportConfig, export_model
from mlxlora.inference import load_with_adapter
from mlxlora.lora.surgery import adapter_layers

pytestmark = pytest.mark.peer

IDS = [[5, 17, 33, 100, 200, 7, 9, 250, 3, 64, 2, 1]]
TOL = 1e-4
SHARD = "40KB"  # the tiny llama is 429 kB in float32: 12 shards (embed_tokens and lm_head, 66 kB each, alone)


@pytest.fixture(scope="module")
def peers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (model folder, adapter folder with random non-zero lora_a/lora_b)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for arch in ("llama", "qwen2"):
        src = tiny.make_model(root / arch / "model", arch)
        base = load_with_adapter(str(src))
        get_lora_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        mx.random.seed(7)
        for _, layer in adapter_layers(base.model):
            layer.lora_a = mx.random.normal(layer.lora_a.shape) * 0.2
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.2
        out[arch] = (src, save_adapter(base.model, root / arch / "adapter", base_model=str(src)))
    return out


def hf_logits(peers, folder, dtype="float32"):
    torch, transformers = peers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy(), model


def mlx_logits(model_dir, adapter=None):
    base = load_with_adapter(str(model_dir), str(adapter) if adapter else None)
    return np.array(base.model(mx.array(IDS)).astype(mx.float32))


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_plain_matches_mlx(arch, models, peers, tmp_path):
    src, _ = models[arch]
    out = export_model(str(src), tmp_path / "hf")
    got, _ = hf_logits(peers, out)
    diff = max_diff(mlx_logits(src), got)
    print(f"{arch} plain export max|diff| {diff:.2e}")
    assert diff < TOL
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32" and "quantization" not in cfg
    gen = peers[1].GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == tiny.SPECIALS.index("<|im_end|>") and gen.pad_token_id == 0
    assert {"tokenizer.json", "tokenizer_config.json", "README.md", "model.safetensors"} <= {p.name for p in out.iterdir()}
    tok = peers[1].AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_with_fused_adapter_matches_mlx_adapter(arch, models, peers, tmp_path):
    src, adapter = models[arch]
    out = export_model(str(src), tmp_path / "hf", adapter=str(adapter))
    got, _ = hf_logits(peers, out)
    want = mlx_logits(src, adapter)
    diff = max_diff(want, got)
    moved = max_diff(mlx_logits(src), want)
    print(f"{arch} fused export max|diff| {diff:.2e} (the adapter moves logits by {moved:.2f})")
    assert moved > 0.1  # the adapter matters, so a fuse that dropped it would fail below
    assert diff < TOL
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "base_model" not in meta  # a local base has no hub id
    assert "| rank / alpha | 4 / 8 |" in card and str(tmp_path) not in card and str(src.parent) not in card


def test_sharded_export_is_what_transformers_writes(models, peers, tmp_path):
    src, adapter = models["llama"]
    out = export_model(str(src), tmp_path / "hf", adapter=str(adapter), config=ExportConfig(max_shard_size=SHARD))
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    got, hf = hf_logits(peers, out)
    assert max_diff(mlx_logits(src, adapter), got) < TOL
    # transformers' own save_pretrained with the same limit: same files, same index, byte for byte in JSON terms
    again = tmp_path / "resaved"
    hf.save_pretrained(again, max_shard_size=SHARD)
    theirs = json.loads((again / INDEX_FILE).read_text())
    assert index == theirs
    assert shards == sorted(p.name for p in again.glob("model-*.safetensors"))
    from safetensors import safe_open

    for file in shards:  # each shard holds exactly the tensors the index maps to it, as "pt" files
        with safe_open(str(out / file), "np") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == file}


def test_quantized_base_exports_dequantized(peers, tmp_path):
    src = tiny.make_model(tmp_path / "q", "qwen2", quantize=4)
    out = export_model(str(src), tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert all(f.get_tensor(k).dtype == np.float32 for k in names)
    assert not [k for k in names if k.endswith((".scales", ".biases"))]
    assert "quantization" not in json.loads((out / "config.json").read_text())
    got, _ = hf_logits(peers, out)
    diff = max_diff(mlx_logits(src), got)
    print(f"4-bit qwen2 dequantized export max|diff| {diff:.2e}")
    assert diff < TOL


def test_bfloat16_export(models, peers, tmp_path):
    src, _ = models["llama"]
    out = export_model(str(src), tmp_path / "hf", config=ExportConfig(dtype="bfloat16"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    header = json.loads((out / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (out / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    got, hf = hf_logits(peers, out, dtype="bfloat16")
    assert str(hf.dtype) == "torch.bfloat16"
    assert max_diff(mlx_logits(src), got) < 0.1  # bf16 rounding of weights and activations


def test_shard_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("4GiB") == 4 * 2**30
    assert parse_size(1234) == 1234 and parse_size("1.5KB") == 1500
    for bad in ("", "five GB", "-1MB", "0", "12XB"):
        with pytest.raises(ConfigError, match="--max-shard-size"):
            parse_size(bad)
    w = {"a": mx.zeros((10,)), "b": mx.zeros((30,)), "c": mx.zeros((5,)), "d": mx.zeros((20,))}  # 40/120/20/80 B
    # as transformers: b (over the limit) gets a shard of its own at once; a + c = 60 B, then d would pass 100
    assert shard_names(w, 100) == [["b"], ["a", "c"], ["d"]]
    assert shard_names(w, 140) == [["a"], ["b", "c"], ["d"]]  # b + c = 140 fits exactly
    assert shard_names(w, 1000) == [["a", "b", "c", "d"]]


run = tiny.run_cli


one_line_error = tiny.one_line_error


def test_cli_export_model(models, peers, tmp_path):
    src, adapter = models["qwen2"]
    out = tmp_path / "qwen2-hf"
    res = run("export-model", "--model", src, "--adapter", adapter, "--out", out, "--max-shard-size", SHARD,
              "--base-model", "Qwen/Qwen2-0.5B")
    assert res.exit_code == 0, res.output
    assert "model.safetensors.index.json" in res.output
    got, _ = hf_logits(peers, out)
    assert max_diff(mlx_logits(src, adapter), got) < TOL
    meta = front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "Qwen/Qwen2-0.5B" and meta["library_name"] == "transformers"
    before = sorted(p.name for p in out.iterdir())
    one_line_error(run("export-model", "--model", src, "--out", out), "--force", str(out))
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched without --force
    res = run("export-model", "--model", src, "--out", out, "--force")
    assert res.exit_code == 0 and not (out / INDEX_FILE).exists() and (out / "model.safetensors").is_file()


def test_cli_export_rejects_unsupported_architecture(models, tmp_path):
    src, _ = models["llama"]
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in src.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(dict(cfg, model_type="mamba")))
    one_line_error(run("export-model", "--model", odd, "--out", tmp_path / "o"), "'mamba'", "not supported",
                   "EXPORT_TABLE", "llama")
    assert not (tmp_path / "o").exists()
    one_line_error(run("export-model", "--model", src, "--out", tmp_path / "o", "--max-shard-size", "lots"),
                   "--max-shard-size")
