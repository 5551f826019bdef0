"""Preference training (dpo, orpo, simpo, kto): batches of items, the reference pass, validation, metrics.

A batch of B items is one (2B, L) array: the first samples of the items (chosen / KTO completions), then
the second ones (rejected / KTO KL completions), as TRL's concatenated forward. Items are bucketed by
their longer sample and split across ranks exactly like SFT samples (train/batches.py).

The reference (dpo, kto) is never a second model: it is the base with the adapter layers swapped out
(lora.surgery.adapters_off), or, after --init-adapter, that adapter's tensors swapped in (a copy of the
adapter only). Its log-probs are computed once per run, before the first step (and again on --resume),
in a fixed order, so a resumed run sees the same values bit for bit.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np

from .. import data as D
from ..config import TrainConfig
from ..data.preference import PreferenceSplit
from ..loss.preference import METRICS, preference_sums, sequence_logps
from ..loss.tokens import to_batch
from ..lora.surgery import adapter_tensors, adapters_off
from .batches import EpochCursor
from .checkpoint import TrainerState


def collate_items(split: PreferenceSplit, idxs: list[int], pad_multiple: int, pad_id: int, ref: np.ndarray | None):
    """Items idxs as the batch preference_sums takes: (inputs, targets, mask, rows, real, ref, weight, label)."""
    n = len(split.items)
    both = list(idxs) + [n + i for i in idxs]  # firsts, then seconds (split.samples' order)
    samples = split.samples
    inputs, targets, mask = D.collate(samples, both, pad_multiple, pad_id)  # (2B, L)
    real = np.zeros_like(mask)
    for row, i in enumerate(both):
        real[row, :len(samples[i].ids) - 1] = 1.0
    arrays = to_batch(inputs, targets, mask)
    ref_v = ref[both] if ref is not None else np.zeros(len(both), np.float32)
    label = np.array([split.labels[i] for i in idxs] if split.labels is not None else [False] * len(idxs))
    return (arrays[0], arrays[1], arrays[2], arrays[4], mx.array(real), mx.array(ref_v.astype(np.float32)),
            mx.ones((len(idxs),), dtype=mx.float32), mx.array(label))


class PairPlan(EpochCursor):
    """BatchPlan's counterpart for preference items (no packing: both samples of an item stay whole)."""

    pack = False

    def __init__(self, cfg: TrainConfig, split: PreferenceSplit, pad_id: int, rank: int = 0, world: int = 1):
        self.cfg, self.split, self.pad_id, self.rank, self.world = cfg, split, pad_id, rank, world
        self.lengths = [max(len(a.ids), len(b.ids)) - 1 for a, b in split.items]
        self.pack_capacity = min(cfg.max_seq_length, max(self.lengths))
        self.ref = None

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world

    def plan(self, epoch: int) -> list:
        return D.epoch_batches([n + 1 for n in self.lengths], self.global_batch, self.cfg.seed, epoch)

    def next(self, st: TrainerState):
        """This rank's grad_accum micro-batches and the GLOBAL non-padding token count; advances `st`."""
        cfg, out, real = self.cfg, [], 0
        while len(out) < cfg.grad_accum:
            batch = self.take(st)
            real += sum(len(s.ids) - 1 for i in batch for s in self.split.items[i])
            b = cfg.batch_size
            part = batch[self.rank * b:(self.rank + 1) * b]
            arrays = collate_items(self.split, part or batch[:1], cfg.pad_multiple, self.pad_id, self.ref)
            if not part:  # the epoch's last global batch may not reach every rank: join with zero weight
                arrays = arrays[:6] + (mx.zeros_like(arrays[6]),) + arrays[7:]
            out.append(arrays)
        return out, real


def reference_logps(model, split: PreferenceSplit, batch_size: int, pad_multiple: int, pad_id: int,
                    tensors: dict | None = None) -> np.ndarray:
    """The reference's summed completion log-probs of every sample of `split` (split.samples' order), (2N,).

    tensors: the frozen adapter's tensors (--init-adapter) to swap in; None runs the bare base. Computed in
    index order in batches of batch_size items, with the model in eval mode (no dropout).
    """
    was_training = model.training
    model.eval()
    n, out = len(split.items), np.zeros(2 * len(split.items), np.float32)
    ctx = adapter_tensors(model, tensors) if tensors is not None else adapters_off(model)
    with ctx:
        for start in range(0, n, batch_size):
            idxs = list(range(start, min(start + batch_size, n)))
            inputs, targets, mask, rows = collate_items(split, idxs, pad_multiple, pad_id, None)[:4]
            logps, _ = sequence_logps(model, inputs, targets, mask, rows)
            mx.eval(logps)
            values = np.array(logps)
            out[idxs] = values[:len(idxs)]
            out[[n + i for i in idxs]] = values[len(idxs):]
    if was_training:
        model.train()
    return out


def validate(model, split: PreferenceSplit, cfg: TrainConfig, pad_id: int, ref: np.ndarray | None,
             max_batches: int = -1) -> tuple[float, dict]:
    """Mean loss over the validation items and the mean metrics (metric_means) there, model in eval mode."""
    fn = partial(preference_sums, cfg=cfg.preference)
    total, count, metrics, n = 0.0, 0.0, None, len(split.items)
    for k, start in enumerate(range(0, n, cfg.batch_size)):
        if 0 <= max_batches <= k:
            break
        idxs = list(range(start, min(start + cfg.batch_size, n)))
        lsum, cnt, m = fn(model, *collate_items(split, idxs, cfg.pad_multiple, pad_id, ref))
        mx.eval(lsum, cnt, m)
        total, count = total + lsum.item(), count + cnt.item()
        metrics = m if metrics is None else metrics + m
    return total / max(count, 1), metric_means(metrics, cfg.preference.method)


def metric_means(sums, method: str) -> dict:
    """{name: value} from preference_sums' metric sums: per-item means (KTO: per desirable / undesirable row)."""
    if sums is None or sums.size != len(METRICS):
        return {}
    v = dict(zip(METRICS, np.array(sums).tolist()))
    nc, nr = max(v["n_chosen"], 1), max(v["n_rejected"], 1)
    n = max(v["n_chosen"], 1) if method != "kto" else max(v["n_chosen"] + v["n_rejected"], 1)
    out = {"margin": v["margin"] / n, "chosen_reward": v["chosen_reward"] / nc,
           "rejected_reward": v["rejected_reward"] / nr, "chosen_logp": v["chosen_logp"] / nc,
           "rejected_logp": v["rejected_logp"] / nr}
    if method == "kto":
        out["kl"] = v["kl"] / n
    else:
        out = {"accuracy": v["accuracy"] / n, **out}
    return out


def metrics_text(means: dict) -> str:
    """The progress-line part: "acc 0.75 · margin 0.12 · chosen -41.2 / rejected -44.0"."""
    if not means:
        return ""
    parts = [f"acc {means['accuracy']:.2f}"] if "accuracy" in means else []
    parts.append(f"margin {means['margin']:.3f}")
    parts.append(f"logp chosen {means['chosen_logp']:.2f} / rejected {means['rejected_logp']:.2f}")
    if "kl" in means:
        parts.append(f"kl {means['kl']:.3f}")
    return " · ".join(parts)


def loss_fn(cfg: TrainConfig):
    """The Stepper objective of cfg's preference method."""
    return partial(preference_sums, cfg=cfg.preference)
