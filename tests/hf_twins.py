"""Architectures of the matrix that the installed transformers also implements: a tiny random model
built by transformers, saved by it (so config.json is in transformers-5 form), loaded by mlxlora.

HF_TWINS maps a matrix architecture to the keys its transformers config needs on top of
arch_configs.config_for (rope θ is unusual on purpose: a config read with the default θ differs).
PEFT_TARGETS narrows the adapter where PEFT cannot target what mlx-lm's all-linear wraps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import arch_configs as A
import tiny

THETA = 31337.0
IDS = [[5, 17, 33, 100, 200, 7, 9, 250, 3, 64, 11, 12]]
HF_TWINS = {
    "llama": {}, "qwen2": {}, "qwen3": {}, "qwen3_moe": {}, "mixtral": {}, "olmoe": {}, "granitemoe": {},
    "olmo2": {}, "stablelm": {}, "helium": {}, "phi3": {}, "ernie4_5": {}, "glm4": {}, "granite": {},
    "hunyuan_v1_dense": {}, "internlm3": {}, "ministral3": {}, "nemotron": {}, "phi": {}, "seed_oss": {},
    "smollm3": {}, "mellum": {},
    "gemma": dict(tie_word_embeddings=True), "gemma2": dict(tie_word_embeddings=True),
    "gemma3_text": dict(tie_word_embeddings=True), "cohere": dict(tie_word_embeddings=True),
}
# all-linear unless named here, with the reason.
PEFT_TARGETS = {
    "granitemoe": (["q_proj", "k_proj", "v_proj", "o_proj"],
                   "attention only: mlx-lm's router is a Linear (router.layer) while transformers 5's "
                   "GraniteMoeTopKRouter holds the weight itself, which PEFT cannot target"),
}


def hf_folder(arch: str, folder: Path, torch, transformers) -> Path:
    """Build `arch` in transformers (float32, seed 0, random weights), save_pretrained + tokenizer."""
    cfg = A.config_for(arch)
    model_type = cfg.pop("model_type")
    cfg.update(rope_theta=THETA, pad_token_id=0, bos_token_id=1, eos_token_id=2, **HF_TWINS.get(arch, {}))
    config = transformers.CONFIG_MAPPING[model_type](**cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    tiny.make_tokenizer(folder)
    return folder


def hf_model(folder: Path, torch, transformers):
    # eager attention: gemma2's logit soft-capping is only applied there
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def torch_logits(model, torch) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def saved_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())

# Twins of the matrix where parity is not claimed, with what was measured on 2026-12-02 (transformers 5.24,
# peft 0.21.2): mostly the tiny config does not yet build the same model on both sides.
HF_REFUSED: dict[str, str] = {
    'afmoe': 'base logits equal; all-linear adapter differs in PEFT (rel 6.5e-01): the router or a fused projection is not the same module in transformers 5',
    'apertus': 'the folders differ: RuntimeError The size of tensor a (16) must match the size of tensor b (8) at non-singleton dimension 3',
    'bitnet': 'the folders differ: Missing 14 parameters:',
    'cohere2': 'the folders differ: Received 1 parameters not in model:',
    'dbrx': 'base logits differ (rel 3.2e-02) on the tiny config',
    'deepseek_v2': 'the folders differ: RuntimeError The size of tensor a (4) must match the size of tensor b (2) at non-singleton dimension 3',
    'deepseek_v3': 'the folders differ: RuntimeError The size of tensor a (4) must match the size of tensor b (8) at non-singleton dimension 3',
    'dots1': 'base logits equal; all-linear adapter differs in PEFT (rel 7.7e-01): the router or a fused projection is not the same module in transformers 5',
    'ernie4_5_moe': 'base logits differ (rel 1.6e-01) on the tiny config',
    'exaone': "the folders differ: TypeError ModelArgs.__init__() missing 2 required positional arguments: 'num_layers' and 'layer_norm_epsilon'",
    'exaone4': "transformers cannot build the tiny config: TypeError unsupported operand type(s) for %: 'int' and 'str'",
    'exaone_moe': 'base logits equal; all-linear adapter differs in PEFT (rel 7.7e-01): the router or a fused projection is not the same module in transformers 5',
    'falcon_h1': "PEFT refuses it: ValueError [PEFT:PeftType.LORA] Module 'out_proj' is incompatible with Mamba-based models (model_type='falcon_",
    'glm': 'base logits differ (rel 1.3e-01) on the tiny config',
    'glm4_moe': "the folders differ: TypeError ModelArgs.__init__() missing 1 required positional argument: 'rope_scaling'",
    'gpt2': 'the folders differ: Received 29 parameters not in model:',
    'gpt_bigcode': 'the folders differ: Received 8 parameters not in model:',
    'gpt_neox': 'the folders differ: Missing 4 parameters:',
    'gpt_oss': 'the folders differ: Received 6 parameters not in model:',
    'gptj': 'base logits equal; all-linear adapter differs in PEFT (rel 8.6e-01): the router or a fused projection is not the same module in transformers 5',
    'jamba': 'base logits differ (rel 1.3e-01) on the tiny config',
    'lfm2': 'the folders differ: Received 1 parameters not in model:',
    'lfm2_moe': "transformers cannot build the tiny config: TypeError 'NoneType' object is not subscriptable",
    'llama4_text': 'the folders differ: Received 7 parameters not in model:',
    'mamba': "PEFT refuses it: ValueError [PEFT:PeftType.LORA] Module 'out_proj' is incompatible with Mamba-based models (model_type='mamba')",
    'mamba2': "PEFT refuses it: ValueError [PEFT:PeftType.LORA] Module 'out_proj' is incompatible with Mamba-based models (model_type='mamba2'",
    'minimax': 'the folders differ: Received 8 parameters not in model:',
    'nanochat': 'the folders differ: Received 13 parameters not in model:',
    'olmo3': 'base logits differ (rel 2.0e-01) on the tiny config',
    'phimoe': 'the folders differ: Missing 9 parameters:',
    'qwen2_moe': 'base logits differ (rel 1.1e-01) on the tiny config',
    'qwen3_next': 'the folders differ: Received 6 parameters not in model:',
    'starcoder2': 'the folders differ: Missing 12 parameters:',
}
