"""The training loop: data → compiled steps → validation → checkpoints → the adapter folder."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import data as D
from ..adapters import load_adapter, load_adapter_weights, save_adapter
from ..config import TrainConfig
from ..data.batches import pad_id
from ..data.sources import prepare_data
from ..errors import AdapterError, ConfigError, TrainingStopped
from ..adapters import RECORD_FILE
from ..files import read_json_or_empty, write_failure
from ..formats.record import nonfinite_tensors
from ..inference import evaluate
from ..lora.surgery import adapter_parameters, count_parameters, get_lora_model
from ..loss.chunked import model_chunk_rows
from ..loss.tokens import loss_sums
from .notes import report_adapted, report_dead
from .trees import assign_tree, copy_tree, jsonable
from ..models import Base, load_base
from ..plan import machine_memory
from .batches import BatchPlan
from .checkpoint import (TrainerState, best_checkpoint, latest_checkpoint, latest_path, list_checkpoints,
                         load_trainer_state, remove_stale_temps, save_checkpoint, write_final)
from .folders import check_inputs, plan_run_folder
from .memory import MemoryGuard, auto_fit, batch_shapes, memory_warning, resume_hint
from . import grpo as G
from . import preference as P
from .plot import plot_losses
from .progress import Progress
from .record import resume_drift, run_record
from .signals import StopSignals
from .step import Stepper, grad_checkpoint_blocks, make_optimizer
from .trackers import check_trackers, report_to


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    base_val_loss: float | None
    tokens: int
    seconds: float


class Trainer:
    """One training run. `run()` trains to the end (or to a stop) and writes the adapter folder."""

    def __init__(self, cfg: TrainConfig, base: Base | None = None, resume: str | None = None, console=None,
                 callbacks=()):
        self.cfg, self.resume, self.callbacks = cfg, resume, list(callbacks)
        self.out = Path(cfg.adapter_path)
        # Under mlx.launch every rank runs this; alone, the group has size 1.
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.run_dir = self.out
        if self.rank == 0:  # rank 0 owns the output folder (others would race its creation)
            check_inputs(cfg, resume)
            self.run_dir = plan_run_folder(self.out, cfg.force, resume)
        if cfg.model is None and base is None:
            raise ConfigError("--model is required (a model folder, a .gguf file or a hub id)")
        self.method = cfg.preference.method
        if cfg.pack and self.method != "sft":
            raise ConfigError(f"--pack: --method {self.method} keeps both samples of an item whole; drop --pack")
        # Hub / `datasets` sources, other row shapes and mixtures: prepared once as a JSONL folder (data/sources.py)
        data = prepare_data(cfg.data, cfg.split_map, cfg.columns, cfg.seed) if cfg.data is not None else None
        files = D.find_split_files(data, cfg.train_file, cfg.valid_file)
        self.base = base or load_base(cfg.model, quantize=cfg.quantize, group_size=cfg.q_group_size, dtype=cfg.dtype)
        tok = self.base.tokenizer
        fit_line = None
        if cfg.auto_fit:  # before the data is cut to --max-seq-length and batched
            cfg, fit_line = auto_fit(cfg, self.base)
            self.cfg = cfg
        if self.method == "sft":
            load = lambda f: D.load_split(f, tok, cfg.max_seq_length)  # noqa: E731
        else:
            kind = "kto" if self.method == "kto" else "pairs"
            load = lambda f: D.load_preference_split(f, tok, cfg.max_seq_length, kind, cfg.batch_size)  # noqa: E731
        if self.method == "grpo":  # prompt rows, reward functions and their plan (train/grpo.py); no validation
            self.rewards, self.train_split, grpo_plan = G.load_grpo(cfg, files, tok, self.rank, self.world)
            self.valid_split = None
        else:
            self.train_split = load(files["train"])
            self.valid_split = load(files["valid"]) if "valid" in files else None
        if (cfg.save_best or cfg.early_stop) and self.valid_split is None:
            flag = "--save-best" if cfg.save_best else "--early-stop"
            raise ConfigError(f"{flag} needs validation data: add valid.jsonl to --data or pass --valid-file")
        self.files = files
        self.pad_id = pad_id(tok)
        self.progress = Progress(console, quiet=self.rank != 0)
        if self.method == "sft":
            self.batches = BatchPlan(cfg, self.train_split, self.base.config.get("model_type"), self.pad_id,
                                     self.rank, self.world)
        else:
            self.batches = grpo_plan if self.method == "grpo" else P.PairPlan(cfg, self.train_split, self.pad_id,
                                                                               self.rank, self.world)
        self.valid_ref, self.ref_tensors, self.metrics = None, None, {}
        if self.batches.pack:
            self.progress.note(f"packing: rows of up to {self.batches.pack_capacity} tokens; padding "
                               f"{100 * self.batches.pad_fraction:.0f}% → {100 * self.batches.packed_padding():.0f}%")
        if self.method != "sft":
            self.progress.note("method: " + ", ".join(f"{k} {v}" for k, v in cfg.method_params().items()))
        if getattr(self.batches, "pack_note", None):  # SFT's BatchPlan only (pairs and prompts never pack)
            self.progress.note(self.batches.pack_note)
        if self.world > 1:
            self.progress.note(f"data parallel: {self.world} ranks × batch {cfg.batch_size} = global batch "
                               f"{self.batches.global_batch}")
        if self.train_split.template == "fallback":
            self.progress.console.print(
                f"[yellow]warning: the tokenizer of {cfg.model or self.base.source} has no chat template; chat rows "
                "are rendered with mlxlora's fallback format (### User: / ### Assistant:); it is recorded in the "
                "adapter and generate / chat / serve use the same[/yellow]")
        if fit_line:
            self.progress.note(fit_line)
        warning = memory_warning(cfg, self.base, self.batches.pack_capacity)
        if warning:
            self.progress.console.print(f"[yellow]{warning}[/yellow]")
        self.early_stopped = False

    # -- schedule -----------------------------------------------------------------
    def total_steps(self) -> int:
        cfg = self.cfg
        if cfg.iters is not None:
            return cfg.iters
        n_batches = len(self.batches.plan(0))
        return max(1, math.ceil((cfg.epochs or 1) * n_batches / cfg.grad_accum))

    # -- run ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, model = self.cfg, self.base.model
        mx.random.seed(cfg.seed)
        self.base_info = self.base.describe()  # before wrapping
        if cfg.init_adapter is not None:  # start from it; a reference method keeps a copy of its tensors
            load_adapter(model, cfg.init_adapter, base_info=self.base_info,
                         ignore_base_mismatch=cfg.ignore_base_mismatch)
            self.ref_tensors = dict(adapter_parameters(model))
        else:
            get_lora_model(model, cfg.lora)
        if cfg.grad_checkpoint:
            grad_checkpoint_blocks(model)
        total = self.total_steps()
        optimizer = make_optimizer(cfg, total)
        optimizer.init(model.trainable_parameters())
        st = TrainerState()
        if self.resume is not None:
            st = self._restore(optimizer)
        if self.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise AdapterError(f"--adapter-path {self.out}: cannot create {self.run_dir} ({write_failure(e)}); "
                                   "choose another --adapter-path") from None
        report_adapted(self.progress, model)  # once the output folder exists: a bad --adapter-path stays one line
        if cfg.preference.needs_reference:
            self._reference(model)
        # the loss's chunk of tokens: sized from the head's vocabulary and this machine's memory
        chunk = model_chunk_rows(model, machine_memory()[0])
        if self.method == "grpo":
            stepper = G.make_stepper(model, optimizer, self.base.tokenizer, cfg, self.rewards, self.pad_id,
                                     self.ref_tensors)
        else:
            sft = self.method == "sft"
            stepper = Stepper(model, optimizer, cfg.clip_grad, group=self.group,
                              loss_fn=loss_sums if sft else P.loss_fn(cfg), chunk=chunk if sft else None)
        trainable, n_params = count_parameters(model)
        self.progress.start(total, st.step, trainable, n_params, self.train_split.stats, cfg)
        base_val = None
        if self.valid_split is not None and st.step == 0:
            base_val = self._validate(model)
            st.val_log.append([0, base_val])
            self.first_val_metrics = getattr(self, "val_metrics", None)
        t0, stop = time.perf_counter(), StopSignals(self.run_dir, self.rank, self.world)
        try:
            self._loop(model, optimizer, stepper, st, total, stop)
        except RuntimeError as e:
            if self.world == 1:
                raise
            # A peer rank died: the ring reports it here unless mlx.launch's SIGTERM came first.
            raise TrainingStopped(stop.message(f"lost a peer rank ({str(e).splitlines()[0]})")) from None
        finally:
            stop.restore()
        if stop.hit:
            path = self._checkpoint(model, optimizer, st)
            kept = "" if self.run_dir == self.out else f"{self.out} is unchanged; "
            raise TrainingStopped(f"interrupted ({stop.how}) at step {st.step}/{total}; checkpoint saved to {path}; {kept}"
                                  f"continue with: mlxlora train --resume {self.run_dir}")
        if self.early_stopped:
            self._finish_early(model, st)
        val = self._validate(model) if self.valid_split is not None else None
        if val is not None and (not st.val_log or st.val_log[-1][0] != st.step):
            st.val_log.append([st.step, val])
            if self._improved(st, val) and cfg.save_best:
                self._checkpoint(model, optimizer, st, best=True)
        seconds = time.perf_counter() - t0
        self._save_final(model, st, val, base_val, seconds)
        self.progress.finish(st, val, self.out)
        last = st.train_log[-1][1] if st.train_log else None
        return TrainResult(self.out, st.step, last, val, base_val, st.tokens, seconds)

    def _loop(self, model, optimizer, stepper, st, total, stop):
        cfg = self.cfg
        window_tokens, window_t, bad_in_row = 0, time.perf_counter(), 0
        limit = int(cfg.memory_limit * 2**30) if cfg.memory_limit else machine_memory()[0]
        guard = MemoryGuard(limit) if limit else None
        while st.step < total and not stop.hit:
            model.train()
            batches, real_tokens = self.batches.next(st)
            shapes = batch_shapes(cfg, batches) if guard is not None else None
            if guard is not None and (why := guard.check(shapes, after=False)):
                self._memory_stop(model, optimizer, st, why)
            # Dropout noise depends on (seed, step) only, so a resumed run draws the same masks.
            mx.random.seed(cfg.seed * 1_000_003 + st.step)
            before = (model.trainable_parameters(), copy_tree(optimizer.state))
            loss, ntok, norm = stepper.step(batches)
            mx.eval(loss, ntok, norm, model.state, optimizer.state)
            loss_v = loss.item()
            st.step += 1
            if not (math.isfinite(loss_v) and math.isfinite(norm.item())):
                # Undo the update: parameters and optimizer moments go back to the last good values.
                model.update(before[0])
                assign_tree(optimizer.state, before[1])
                st.nonfinite_skipped += 1
                bad_in_row += 1
                self.progress.note(f"step {st.step}: non-finite loss/gradient, update skipped "
                                   f"({bad_in_row} in a row, {st.nonfinite_skipped} in all)")
                if bad_in_row >= cfg.max_nonfinite:
                    raise TrainingStopped(f"{bad_in_row} non-finite steps in a row at step {st.step}; "
                                          "lower --lr or check the data; the last good checkpoint is under "
                                          f"{self.run_dir / 'checkpoints'}")
                continue
            bad_in_row = 0
            if self.method == "grpo":  # tokens are the sampled completions'; the step's rewards, KL, lengths
                real_tokens, self.metrics = int(ntok.item()), G.step_metrics(stepper.last)
                st.method_log.append([st.step, self.metrics])
            if st.step == 1:
                report_dead(self.progress, stepper)
            st.tokens += real_tokens
            window_tokens += real_tokens
            tps = window_tokens / max(time.perf_counter() - window_t, 1e-9)
            lr = optimizer.learning_rate
            lr = float(lr.item()) if isinstance(lr, mx.array) else float(lr)
            st.train_log.append([st.step, loss_v, lr, tps])
            val = None
            if self.valid_split is not None and st.step % cfg.val_every == 0 and st.step < total:
                val = self._validate(model)
                st.val_log.append([st.step, val])
            if self.method not in ("sft", "grpo"):
                self.metrics = P.metric_means(stepper.metrics, self.method)
            extra = G.stats_text(stepper.last) if self.method == "grpo" else P.metrics_text(self.metrics)
            self.progress.update(st, loss_v, val, tps, report=(st.step % cfg.report_every == 0 or st.step == total),
                                 extra=extra)
            if st.step % cfg.report_every == 0:
                window_tokens, window_t = 0, time.perf_counter()
            best = val is not None and self._improved(st, val) and cfg.save_best
            if (st.step % cfg.save_every == 0 and st.step < total) or best:
                self._checkpoint(model, optimizer, st, best=best)
            for cb in self.callbacks:
                cb(st)
            if guard is not None and (why := guard.check(shapes, after=True)):
                self._memory_stop(model, optimizer, st, why)
            if cfg.early_stop and st.bad_vals >= cfg.early_stop:
                self.early_stopped = True
                break

    def _memory_stop(self, model, optimizer, st, why: str):
        path = self._checkpoint(model, optimizer, st)
        raise TrainingStopped(f"memory guard at step {st.step}: {why}; checkpoint saved to {path}; "
                              f"resume with less memory: {resume_hint(self.cfg, self.run_dir)}")

    @staticmethod
    def _improved(st: TrainerState, val: float) -> bool:
        """Track the best validation loss after step 0; False counts toward --early-stop."""
        if st.best_val is None or val < st.best_val:
            st.best_val, st.best_step, st.bad_vals = val, st.step, 0
            return True
        st.bad_vals += 1
        return False

    def _finish_early(self, model, st: TrainerState) -> None:
        """--early-stop fired: with --save-best, the final adapter becomes the best checkpoint's."""
        msg = (f"early stop at step {st.step}: validation loss has not improved for {self.cfg.early_stop} "
               f"validation(s) (best {st.best_val:.4f} at step {st.best_step})")
        best = best_checkpoint(self.run_dir / "checkpoints") if self.cfg.save_best else None
        if best is not None:
            load_adapter_weights(model, best)
            msg += f"; the final adapter is the best checkpoint {best.name}"
        else:
            msg += "; the final adapter is the last step's (add --save-best to keep the best one)"
        self.progress.note(msg)

    def _validate(self, model) -> float | None:
        model.eval()
        if self.method == "sft":
            v = evaluate(model, self.valid_split, self.cfg.batch_size, self.cfg.pad_multiple, self.pad_id,
                         self.cfg.val_batches)
        else:
            v, self.val_metrics = P.validate(model, self.valid_split, self.cfg, self.pad_id, self.valid_ref,
                                             self.cfg.val_batches)
        model.train()
        return v

    def _reference(self, model) -> None:
        """The reference log-probs of every train and valid sample, once (see train/preference.py)."""
        t0 = time.perf_counter()
        kw = dict(batch_size=self.cfg.batch_size, pad_multiple=self.cfg.pad_multiple, pad_id=self.pad_id,
                  tensors=self.ref_tensors)
        self.batches.ref = P.reference_logps(model, self.train_split, **kw)
        if self.valid_split is not None:
            self.valid_ref = P.reference_logps(model, self.valid_split, **kw)
        which = f"the adapter {self.cfg.init_adapter} frozen" if self.ref_tensors else "the base (adapter off)"
        self.progress.note(f"reference: {which}; log-probs of {len(self.batches.ref)} train samples computed in "
                           f"{time.perf_counter() - t0:.1f}s")

    # -- files --------------------------------------------------------------------
    def _extra(self, st: TrainerState, **final) -> dict:
        final.setdefault("base_shapes", self.base_info["shapes"])
        final.setdefault("base_content", self.base_info["content"])
        final.setdefault("method", self.cfg.method_params())
        if st.method_log:
            final.setdefault("method_log", st.method_log)
        if self.metrics:  # the last step's (training batch), and validation's at step 0 and at the end
            final.setdefault("method_metrics", self.metrics)
        for key, attr in (("val_method_metrics_start", "first_val_metrics"), ("val_method_metrics", "val_metrics")):
            if getattr(self, attr, None):
                final.setdefault(key, getattr(self, attr))
        if self.early_stopped:
            final.update(early_stopped_at=st.step, best_step=st.best_step, best_val_loss=st.best_val)
        split = self.train_split
        template = {"source": split.template, "template": split.template_text} if split.template else None
        return {"train_config": jsonable(asdict(self.cfg)), "chat_template": template,
                "run_record": run_record(self.base, self.files, {"train": self.train_split, "valid": self.valid_split},
                                         self.cfg, st, resumed_from=self.resume, **final)}

    def _write_adapter(self, folder: Path, st: TrainerState, **final) -> None:
        save_adapter(self.base.model, folder, base_model=self.base.source, extra=self._extra(st, **final))

    def _checkpoint(self, model, optimizer, st, best: bool = False):
        if self.rank != 0:
            return latest_path(self.run_dir / "checkpoints", st)
        return save_checkpoint(self.run_dir / "checkpoints", st, lambda d: self._write_adapter(d, st), optimizer,
                               keep=self.cfg.keep_checkpoints, best=best)

    def _save_final(self, model, st, val, base_val, seconds):
        """Write the adapter files at the top of the run folder (checkpoints/ stays beside them), then, for a
        --force run in a staging folder, swap it in for the old adapter folder."""
        if self.rank != 0:
            return
        bad = nonfinite_tensors(dict(tree_flatten(model.trainable_parameters())))
        if bad:
            ckpts = list_checkpoints(self.run_dir / "checkpoints")
            raise TrainingStopped(f"the trained adapter holds NaN or infinity ({len(bad)} tensor(s), e.g. {bad[0]}); "
                                  "it was not saved; lower --lr or check the data"
                                  + (f"; the last checkpoint is {ckpts[-1]}" if ckpts else ""))
        write_final(self.run_dir, self.out, st, lambda d: self._write_adapter(
            d, st, final_val_loss=val, base_val_loss=base_val, seconds=seconds),
            after=lambda d: plot_losses(st.train_log, st.val_log, d / "loss.png", note=self.progress.note))

    def _restore(self, optimizer) -> TrainerState:
        if self.rank == 0:  # a killed run's half-written checkpoint is never read; clear it away
            remove_stale_temps(self.run_dir / "checkpoints")
            for tmp in self.run_dir.glob(".tmp-final-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        ckpt = latest_checkpoint(Path(self.resume))
        load_adapter_weights(self.base.model, ckpt, base_info=self.base_info,
                             ignore_base_mismatch=self.cfg.ignore_base_mismatch)
        st = load_trainer_state(ckpt, optimizer)
        self.progress.note(f"resuming from {ckpt} (step {st.step})")
        drift = resume_drift(read_json_or_empty(ckpt / RECORD_FILE), self.cfg, self.files)
        if drift:
            self.progress.console.print(f"[yellow]warning: --resume does not continue exactly, since the checkpoint "
                                        f"was written: {'; '.join(drift)}[/yellow]")
        return st


def train(cfg: TrainConfig, base: Base | None = None, resume: str | None = None, console=None,
          callbacks=()) -> TrainResult:
    """Train an adapter as configured; returns a summary. Raises MlxloraError subclasses on bad input.

    callbacks: functions called with the TrainerState after every optimizer step.
    """
    check_trackers(cfg)
    trainer = Trainer(cfg, base=base, resume=resume, console=console, callbacks=callbacks)
    with report_to(trainer):  # --report-to: wandb / mlflow / tensorboard / trackio (train/trackers.py)
        return trainer.run()
