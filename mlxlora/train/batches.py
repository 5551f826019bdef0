"""Which samples go into each optimizer step: length buckets or packed rows, split across ranks.

The plan of an epoch depends only on (data, batch size, world size, seed, epoch), so a resumed
run, and every rank of a distributed run, computes the same plan without talking. With W
ranks the global batch holds W x --batch-size samples (or packed rows) and rank r trains on
slice r of it; gradients are then summed across ranks (step.py), which gives the update of
one rank training on the whole global batch.
"""

from __future__ import annotations

from .. import data as D
from ..data import packing as P
from ..errors import ConfigError
from ..loss.tokens import to_batch
from .checkpoint import TrainerState


class EpochCursor:
    """Walks a plan's global batches (self.plan(epoch)) the way a resumed run repeats exactly."""

    _order = _order_epoch = None

    def take(self, st: TrainerState) -> list:
        """The next global batch; advances `st`, into the next epoch when this one is used up."""
        while True:
            if self._order_epoch != st.epoch:
                self._order, self._order_epoch = self.plan(st.epoch), st.epoch
            if st.batch_in_epoch < len(self._order):
                break
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        st.batch_in_epoch += 1
        return self._order[st.batch_in_epoch - 1]


class BatchPlan(EpochCursor):
    def __init__(self, cfg, split: D.Split, model_type: str | None, pad_id: int, rank: int = 0, world: int = 1):
        self.cfg, self.samples, self.pad_id = cfg, split.samples, pad_id
        self.rank, self.world = rank, world
        self.lengths = [len(s.ids) - 1 for s in self.samples]  # tokens a sample puts in a row
        self.pack_capacity = min(cfg.max_seq_length, max(self.lengths))
        refusal = P.packing_refusal(model_type)
        if cfg.pack and refusal:
            raise ConfigError(f"--pack: {model_type!r} models are not packed: {refusal}; drop --pack")
        self.pad_fraction = P.padding_fraction(self.lengths, self._bucketed(0), False, cfg.pad_multiple)
        self.pack_note = None  # said at start-up when packing would have helped but is refused
        if cfg.pack is None:  # auto: pack when the architecture allows it and buckets still pad > 15 %
            self.pack = refusal is None and self.pad_fraction > 0.15
            if refusal and self.pad_fraction > 0.15:
                self.pack_note = f"packing: off for {model_type!r} models ({refusal})"
        else:
            self.pack = bool(cfg.pack)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world

    def _bucketed(self, epoch: int) -> list:
        return D.epoch_batches([n + 1 for n in self.lengths], self.global_batch, self.cfg.seed, epoch)

    def plan(self, epoch: int) -> list:
        """This epoch's global batches: lists of sample indices, or (packed) lists of rows of indices."""
        if self.pack:
            return P.epoch_packed_batches(self.lengths, self.pack_capacity, self.global_batch, self.cfg.seed, epoch)
        return self._bucketed(epoch)

    def packed_padding(self) -> float:
        return P.padding_fraction(self.lengths, self.plan(0), True, self.cfg.pad_multiple)

    def next(self, st: TrainerState):
        """This rank's grad_accum micro-batches and the GLOBAL non-padding token count; advances `st`."""
        cfg, out, real = self.cfg, [], 0
        while len(out) < cfg.grad_accum:
            batch = self.take(st)
            real += sum(self.lengths[i] for item in batch for i in (item if self.pack else [item]))
            out.append(self._collate(batch))
        return out, real

    def _collate(self, batch: list) -> tuple:
        b = self.cfg.batch_size
        part = batch[self.rank * b:(self.rank + 1) * b]
        empty = not part  # the epoch's last global batch may not reach every rank
        part = part or batch[:1]
        if self.pack:
            arrays = P.collate_packed(self.samples, part, self.cfg.pad_multiple, self.pad_id)
        else:
            arrays = D.collate(self.samples, part, self.cfg.pad_multiple, self.pad_id)
        if empty:
            arrays[2][:] = 0  # no loss, no gradient: this rank only joins the collective
        return to_batch(*arrays)
