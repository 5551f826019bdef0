"""Tiny models and a byte-level tokenizer built in-process, saved as real model folders.

Every folder written here is what `mlx_lm.load` reads (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json), so tests exercise the real loading paths offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Per-architecture tiny configs (HF config.json keys; mlx-lm reads the same file).
ARCHS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                  num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
                  num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True, max_position_embeddings=512),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64,
                  num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True, max_position_embeddings=512),
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=64,
                   num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                   query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, max_position_embeddings=512),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=64,
                 num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=512, original_max_position_embeddings=512),
}

# Tiny mixture-of-experts configs (4 experts, 2 per token), kept apart from ARCHS so that the shared
# session fixture stays as it was; make_model takes either.
MOE_ARCHS = {
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
                      num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                      rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=512),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=64,
                    num_hidden_layers=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1000000.0,
                    tie_word_embeddings=False, max_position_embeddings=512),
}


def write_data(folder: Path, train: list[dict], valid: list[dict] | None = None) -> Path:
    """A data folder as `--data` reads it: train.jsonl (and valid.jsonl), one JSON row per line."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid)):
        if rows is not None:
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def make_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with no merges (every byte is a token) plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "chat_template": CHATML, "model_max_length": 512,
    }, indent=1))


VOCAB_SIZE = len(SPECIALS) + 256


def make_model(path: Path, arch: str = "llama", quantize: int | None = None, seed: int = 0,
               group_size: int = 32, **overrides) -> Path:
    """Write a tiny random model of `arch` (float32, or quantized to `quantize` bits) with tokenizer."""
    from mlx_lm.utils import _get_classes

    config = dict({**ARCHS, **MOE_ARCHS}[arch], vocab_size=VOCAB_SIZE, torch_dtype="float32",
                  eos_token_id=SPECIALS.index("<|im_end|>"), bos_token_id=None, pad_token_id=0)
    config.update(overrides)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Larger-than-default init so a test can see outputs change.
    params = [(k, (mx.random.normal(v.shape) * 0.08).astype(mx.float32)) if v.ndim >= 2 else (k, v)
              for k, v in tree_flatten(model.parameters())]
    model.load_weights(params)
    if quantize:
        nn.quantize(model, group_size=group_size, bits=quantize)
        config["quantization"] = {"group_size": group_size, "bits": quantize}
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=1))
    make_tokenizer(path)
    return path


def make_bpe_model(path: Path, arch: str = "llama", **overrides) -> Path:
    """make_model plus one BPE merge ("Ġ" + "t" -> id VOCAB_SIZE): llama.cpp refuses a BPE vocabulary without merges."""
    make_model(path, arch, vocab_size=VOCAB_SIZE + 1, **overrides)
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["model"]["vocab"]["Ġt"] = VOCAB_SIZE
    tok["model"]["merges"] = [["Ġ", "t"]]
    (path / "tokenizer.json").write_text(json.dumps(tok))
    return path


def randomize_adapters(model, seed: int = 1, dtype=None):
    """Non-zero lora_b (and random lora_a, perturbed DoRA magnitudes) everywhere, so outputs depend on them."""
    from mlxlora.lora.layers import DoRALinear
    from mlxlora.lora.surgery import adapter_layers

    mx.random.seed(seed)
    for _, layer in adapter_layers(model):
        layer.lora_a = mx.random.normal(layer.lora_a.shape) * 0.1
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
        if isinstance(layer, DoRALinear):
            layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
        if dtype is not None:
            for name in ("lora_a", "lora_b", "m"):
                if name in layer:
                    layer[name] = layer[name].astype(dtype)
    return model


def one_line_error(res, *needles):
    """A CliRunner result that failed the way every mlxlora error must: exit 1, one `Error: ...` line naming `needles`."""
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def run_cli(*args):
    """`mlxlora ARGS...` through Click's CliRunner (arguments str()-ed); exceptions that are not
    MlxloraErrors propagate, so a traceback fails the test."""
    from click.testing import CliRunner

    from mlxlora.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def make_adapter(src, out, config, seed, size=0.1):
    """An adapter folder with random lora_a and NON-ZERO lora_b (and a perturbed DoRA magnitude).

    size: the spread of the random values (0.2 makes greedy text change). Shared by test_multi, test_merge and test_server.
    """
    from mlxlora.adapters import save_adapter
    from mlxlora.lora.layers import DoRALinear
    from mlxlora.lora.surgery import adapter_layers, get_lora_model
    from mlxlora.models import load_base

    model = load_base(str(src)).model
    get_lora_model(model, config)
    mx.random.seed(seed)
    for _, layer in adapter_layers(model):
        layer.lora_a = mx.random.normal(layer.lora_a.shape) * size
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * size
        if isinstance(layer, DoRALinear):
            layer.m = layer.m * (1 + size * mx.random.normal(layer.m.shape))
    return save_adapter(model, out, base_model=str(src))
