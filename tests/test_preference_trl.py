"""TRL is the reference implementation: same tiny transformers model, same adapter (non-zero lora_b), same
token batch -> mlxlora's loss equals TRL's own trainer loss code within 1e-4 (relative), adapter gradients too.

TRL side: DPOTrainer._compute_loss and KTOTrainer._compute_loss (PEFT model, reference = adapter disabled),
ORPOTrainer / CPOTrainer(loss_type="simpo", cpo_alpha=0).get_batch_loss_metrics, each a real trainer built
on the PEFT model; the batch is mlxlora's own collated pairs written in TRL's batch layout.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load_model
from safetensors.torch import load_file

import tiny
from mlxlora import LoraConfig
from mlxlora.adapters import save_adapter
from mlxlora.config import PreferenceConfig
from mlxlora.data import load_preference_split
from mlxlora.data.batches import pad_id
from mlxlora.loss.preference import preference_sums
from mlxlora.lora.surgery import adapter_parameters, adapter_tensors, get_lora_model
from mlxlora.models import load_base
from mlxlora.models.hf_export import export_hf
from mlxlora.train import preference as P

pytestmark = pytest.mark.peer

PAIRS = [{"prompt": "Define a cat.", "chosen": "A cat: a soft, indifferent automaton.", "rejected": "A small pet."},
         {"prompt": "Define love.", "chosen": "Love: a temporary insanity.", "rejected": "A strong feeling."},
         {"prompt": "Define war.", "chosen": "War: politics by other means, louder.", "rejected": "A conflict."}]
KTO = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
       for r in PAIRS for side in ("chosen", "rejected")][:4]
CASES = {  # name -> (PreferenceConfig kwargs, data kind)
    "dpo-sigmoid": (dict(method="dpo", beta=0.5), "pairs"),
    "dpo-ipo": (dict(method="dpo", beta=0.5, loss_type="ipo"), "pairs"),
    "dpo-hinge": (dict(method="dpo", beta=0.5, loss_type="hinge"), "pairs"),
    "orpo": (dict(method="orpo", beta=0.3), "pairs"),
    "simpo": (dict(method="simpo", beta=2.0, gamma=0.8, label_smoothing=0.1), "pairs"),
    "kto": (dict(method="kto", beta=0.4, desirable_weight=1.3, undesirable_weight=0.7), "kto"),
}
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("trl")
    root = tmp_path_factory.mktemp("trl")
    src = tiny.make_model(root / "mlx", "llama")
    model, config = load_model(src)
    hf = export_hf(model, config, src, root / "hf")
    base = load_base(str(hf))  # mlxlora loads the transformers folder itself
    get_lora_model(base.model, LORA)
    tiny.randomize_adapters(base.model, seed=4)
    moved = {k: v + 0.05 * mx.random.normal(v.shape) for k, v in adapter_parameters(base.model).items()}
    adapter = save_adapter(base.model, root / "adapter", base_model=str(hf))
    with adapter_tensors(base.model, moved):  # the same adapter after some training: the --init-adapter case
        save_adapter(base.model, root / "moved", base_model=str(hf))
    for kind, rows in (("pairs", PAIRS), ("kto", KTO)):
        (root / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, hf, adapter, root, moved


def _mlxlora(base, split, cfg, init=None):
    """Loss and adapter gradients; init: the --init-adapter's tensors (the reference), else the base is."""
    pid = pad_id(base.tokenizer)
    ref = P.reference_logps(base.model, split, 8, 8, pid, tensors=init) if cfg.needs_reference else None
    batch = P.collate_items(split, list(range(len(split.items))), 8, pid, ref)
    fn = lambda model, *b: preference_sums(model, *b, cfg=cfg)  # noqa: E731
    (lsum, count, _), grads = nn.value_and_grad(base.model, fn)(base.model, *batch)
    grads = {k: np.array(v) / count.item() for k, v in adapter_grads(grads).items()}
    return (lsum / count).item(), grads, batch


def adapter_grads(grads):
    from mlx.utils import tree_flatten

    return {k: v for k, v in tree_flatten(grads) if k.endswith(("lora_a", "lora_b"))}


def _torch_batch(batch, b):
    """mlxlora's (2B, L) batch as full token ids, attention masks and completion masks (TRL's layout)."""
    import torch

    inputs, targets, mask, real = (np.array(a) for a in (batch[0], batch[1], batch[2], batch[4]))
    ids = torch.tensor(np.concatenate([inputs[:, :1], targets], axis=1), dtype=torch.long)
    ones = np.ones((len(ids), 1), np.int64)
    att = torch.tensor(np.concatenate([ones, real.astype(np.int64)], axis=1))
    comp = torch.tensor(np.concatenate([0 * ones, mask.astype(np.int64)], axis=1))
    return ids, att, comp


def _trainer(kw, model, tok, out, peft_config):
    """The TRL trainer of kw's method; peft_config: TRL wraps `model` with a new adapter (reference = adapter
    disabled); None: `model` is a PeftModel whose loaded adapter TRL copies as the frozen reference."""
    from datasets import Dataset

    common = dict(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4)
    rows = Dataset.from_list(KTO if kw["method"] == "kto" else PAIRS)
    if kw["method"] == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer

        args = Config(beta=kw["beta"], loss_type=[kw.get("loss_type", "sigmoid")], **common)
    elif kw["method"] == "kto":
        from trl import KTOConfig as Config, KTOTrainer as Trainer

        args = Config(beta=kw["beta"], desirable_weight=kw["desirable_weight"],
                      undesirable_weight=kw["undesirable_weight"], **common)
    elif kw["method"] == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer

        args = Config(beta=kw["beta"], **common)
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer

        args = Config(loss_type="simpo", cpo_alpha=0.0, beta=kw["beta"], simpo_gamma=kw["gamma"],
                      label_smoothing=kw["label_smoothing"], **common)
    return Trainer(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=peft_config)


def _trl_loss(trainer, kw, ids, att, comp, b, labels):
    import torch

    model = trainer.model
    if kw["method"] == "dpo":
        out = trainer._compute_loss(model, {"input_ids": ids, "attention_mask": att, "completion_mask": comp}, False)
    elif kw["method"] == "kto":
        out = trainer._compute_loss(model, {
            "input_ids": ids[:b], "attention_mask": att[:b], "completion_mask": comp[:b],
            "KL_input_ids": ids[b:], "KL_attention_mask": att[b:], "KL_completion_mask": comp[b:],
            "label": torch.tensor(labels)}, False)
    else:
        lab = ids.masked_fill(comp == 0, -100)
        batch = {"chosen_input_ids": ids[:b], "chosen_attention_mask": att[:b], "chosen_labels": lab[:b],
                 "rejected_input_ids": ids[b:], "rejected_attention_mask": att[b:], "rejected_labels": lab[b:]}
        out = trainer.get_batch_loss_metrics(model, batch)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name, reference", [(n, "base") for n in CASES] + [("dpo-sigmoid", "init"), ("kto", "init")])
def test_loss_and_adapter_gradients_equal_trl(setup, name, reference, tmp_path):
    """reference "base": a new adapter holding our tensors (reference = adapter off, in both). "init": the
    adapter was loaded (--init-adapter / PeftModel.from_pretrained) and has since moved; the reference is
    the adapter as loaded, in both."""
    import peft
    import torch
    import transformers

    base, hf, adapter, root, moved = setup
    kw, kind = CASES[name]
    cfg = PreferenceConfig(**kw)
    split = load_preference_split(root / f"{kind}.jsonl", base.tokenizer, 512, kind, kl_group=4)
    if reference == "init":
        init = dict(adapter_parameters(base.model))
        with adapter_tensors(base.model, moved):
            ours, our_grads, batch = _mlxlora(base, split, cfg, init=init)
    else:
        ours, our_grads, batch = _mlxlora(base, split, cfg)

    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    if reference == "init":
        model = peft.PeftModel.from_pretrained(hf_model, str(adapter), is_trainable=True)
        trainer = _trainer(kw, model, tok, tmp_path / "out", None)
        assert "ref" in trainer.model.peft_config  # TRL's frozen copy of the loaded adapter
        policy = root / "moved"
    else:
        lora = peft.LoraConfig(r=LORA.r, lora_alpha=LORA.lora_alpha, target_modules=LORA.target_modules)
        trainer = _trainer(kw, hf_model, tok, tmp_path / "out", lora)
        assert "ref" not in trainer.model.peft_config
        policy = adapter
    result = peft.set_peft_model_state_dict(trainer.model, load_file(str(policy / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    b = len(split.items)
    ids, att, comp = _torch_batch(batch, b)
    loss = _trl_loss(trainer, kw, ids, att, comp, b, split.labels or [])
    loss.backward()
    theirs = loss.item()
    assert abs(ours - theirs) <= 1e-4 * abs(theirs), (name, ours, theirs)
    trivial = {"sigmoid": np.log(2), "hinge": 1.0, "ipo": (1 / (2 * cfg.beta)) ** 2}.get(cfg.loss_type)
    if cfg.method == "dpo":  # the reference differs from the policy: not the value at policy == reference
        assert abs(theirs - trivial) > 1e-2, theirs

    torch_grads = {n: p.grad.numpy() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert len(torch_grads) == len(our_grads) == 2 * 3 * 2  # 3 targets x 2 layers x (A, B)
    worst = 0.0
    for key, g in our_grads.items():
        path, which = key.rsplit(".", 1)
        tname = f"base_model.model.{path}.lora_{which[-1].upper()}.default.weight"
        tg = torch_grads[tname].T  # PEFT (r, in) / (out, r) -> ours (in, r) / (r, out)
        scale = np.abs(tg).max()
        assert scale > 0, tname
        worst = max(worst, np.abs(g - tg).max() / scale)
    assert worst < 1e-4, (name, worst)
