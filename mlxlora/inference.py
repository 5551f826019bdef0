"""Generation and evaluation over a base model with an optional adapter (mlx-lm underneath): the one home
of both. `evaluate` is the held-out loss training validates with; `eval_split` is `mlxlora eval`."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import mlx.core as mx

from . import data as D
from .adapters import load_adapter
from .formats import resolve_adapter
from .formats.mlxlora import read_record
from .config import EvalConfig, GenerateConfig
from .data.batches import pad_id
from .loss import loss_sums, to_batch
from .models import Base, load_base


def load_with_adapter(model: str, adapter: str | None = None, ignore_base_mismatch: bool = False, **kw) -> Base:
    """Load a base and, if given, attach an adapter folder (PEFT / mlx-lm / mlxlora format).

    An mlxlora adapter trained on a base with another fingerprint (model_type, quantization, shapes)
    raises AdapterError unless ignore_base_mismatch.
    """
    base = load_base(model, **kw)
    if adapter:
        load_adapter(base.model, adapter, base_info=base.describe(), ignore_base_mismatch=ignore_base_mismatch)
        base.info["chat_template"] = read_record(resolve_adapter(adapter)[0]).get("chat_template")
    base.model.eval()
    return base


def render_prompt(tokenizer, prompt: str, chat: bool | None, recorded: dict | None = None) -> str | list[int]:
    """Apply the chat template when asked (or when available and chat is None).

    recorded: the adapter's `chat_template` record (how its training rows were rendered). A tokenizer
    without a template then gets the template the adapter was trained with (mlxlora's fallback, say),
    also when chat is None: the adapter learned that format, a raw prompt would be out of distribution.
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    learned = (recorded or {}).get("template") if not has_template else None
    if chat or (chat is None and (has_template or learned)):
        messages = [{"role": "user", "content": prompt}]
        if has_template:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if learned and learned != D.FALLBACK_CHAT_TEMPLATE:
            return D.render_template(learned, messages, eos_token=getattr(tokenizer, "eos_token", None) or "")
        return D.fallback_prompt(prompt)
    return prompt


def stream_text(base: Base, prompt: str, cfg: GenerateConfig) -> Iterator[str]:
    """Yield generated text pieces as they are decoded."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(cfg.seed)
    sampler = make_sampler(temp=cfg.temp, top_p=cfg.top_p)
    rendered = render_prompt(base.tokenizer, prompt, cfg.chat, base.info.get("chat_template"))
    for resp in stream_generate(base.model, base.tokenizer, rendered, max_tokens=cfg.max_tokens, sampler=sampler):
        yield resp.text


def generate_text(base: Base, prompt: str, cfg: GenerateConfig | None = None,
                  on_text: Callable[[str], None] | None = None) -> str:
    out = []
    for piece in stream_text(base, prompt, cfg or GenerateConfig()):
        out.append(piece)
        if on_text:
            on_text(piece)
    return "".join(out)


def evaluate(model, split: D.Split, batch_size: int, pad_multiple: int, pad_id: int,
             max_batches: int = -1) -> float | None:
    """Mean target-token loss over a split (batched, one host sync at the end)."""
    if split is None or not split.samples:
        return None
    batches = D.epoch_batches([len(s.ids) for s in split.samples], batch_size, seed=0, epoch=0)
    if max_batches > 0:
        batches = batches[:max_batches]
    total, ntok = mx.array(0.0), mx.array(0.0)
    for idxs in batches:
        lsum, n = loss_sums(model, *to_batch(*D.collate(split.samples, idxs, pad_multiple, pad_id)))
        total, ntok = total + lsum, ntok + n
        mx.eval(total, ntok)  # keep memory bounded: one batch of activations at a time
    return (total / mx.maximum(ntok, 1)).item()


def eval_split(base: Base, data: str, cfg: EvalConfig) -> dict:
    """Mean target-token loss and perplexity of `base` on one split of a data folder (or a .jsonl file)."""
    path = D.split_file(data, cfg.split)
    split = D.load_split(path, base.tokenizer, cfg.max_seq_length)
    loss = evaluate(base.model, split, cfg.batch_size, cfg.pad_multiple, pad_id(base.tokenizer))
    return {"path": str(path), "samples": split.stats.samples, "target_tokens": split.stats.target_tokens,
            "loss": loss, "perplexity": math.exp(loss) if loss is not None else None}
