"""Experiment tracking (`train --report-to wandb,mlflow,tensorboard,trackio`) through each library's own client.

Every tracker gets the run's resolved config once (flattened: `lora.r`, ...) and, at each progress line
(every --report-every steps and the last), the same numbers the line shows: loss, lr, tokens_per_sec,
peak_memory_gb, epoch, plus val_loss at every validation (step 0's and the final one included).
Where each library writes is its own setting: wandb's WANDB_MODE / WANDB_DIR / WANDB_PROJECT, mlflow's
MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, trackio's TRACKIO_DIR; TensorBoard event files go in
ADAPTER_PATH/tensorboard. Only rank 0 of a distributed run reports.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from ..config import TRACKERS
from ..errors import ConfigError

PIP = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard", "trackio": "trackio"}
PROJECT = "mlxlora"


def parse_report_to(value) -> list[str]:
    """`wandb,mlflow` (or a list) -> ["wandb", "mlflow"]; ConfigError naming an unknown tracker."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    names = [n.strip().lower() for n in names if n and n.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"--report-to {','.join(unknown)}: not a tracker; use any of {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def _import(name: str, module: str | None = None):
    import importlib

    try:
        return importlib.import_module(module or name)
    except ImportError:
        raise ConfigError(f"--report-to {name} needs the {name} library; pip install {PIP[name]}") from None


def flatten(config: dict, prefix: str = "") -> dict:
    """{"lora": {"r": 8}} -> {"lora.r": 8}; lists become comma-joined strings."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return out


class _Wandb:
    def __init__(self, config: dict, name: str, folder: Path):
        self.wandb = _import("wandb")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=name, config=config,
                                   reinit="finish_previous")

    def log(self, metrics: dict, step: int):
        self.run.log(metrics, step=step)

    def finish(self):
        self.run.finish()


class _Mlflow:
    def __init__(self, config: dict, name: str, folder: Path):
        self.mlflow = _import("mlflow")
        if not os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            self.mlflow.set_experiment(PROJECT)
        self.run = self.mlflow.start_run(run_name=name)
        params = {k: ("" if v is None else str(v))[:500] for k, v in flatten(config).items()}
        self.mlflow.log_params(params)

    def log(self, metrics: dict, step: int):
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self):
        self.mlflow.end_run()


class _TensorBoard:
    def __init__(self, config: dict, name: str, folder: Path):
        _import("tensorboard")
        from tensorboard.plugins.text.summary_v2 import text_pb  # no TensorFlow needed
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(folder / "tensorboard"))
        text = "\n".join(f"    {k}: {v}" for k, v in flatten(config).items())
        self._add(text_pb("config", text), 0)

    def _add(self, summary, step: int):
        import time

        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def log(self, metrics: dict, step: int):
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._add(Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]), step)
        self.writer.flush()

    def finish(self):
        self.writer.close()


class _Trackio:
    def __init__(self, config: dict, name: str, folder: Path):
        self.trackio = _import("trackio")
        self.run = self.trackio.init(project=PROJECT, name=name, config=config)

    def log(self, metrics: dict, step: int):
        self.trackio.log(metrics, step=step)

    def finish(self):
        self.trackio.finish()


OPENERS = {"wandb": _Wandb, "mlflow": _Mlflow, "tensorboard": _TensorBoard, "trackio": _Trackio}


class Reporter:
    """The trackers of one run, fed from the TrainerState after every step (a Trainer callback)."""

    def __init__(self, trackers: list, report_every: int, total: int):
        self.trackers, self.report_every, self.total = trackers, report_every, total
        self._val_sent = 0
        self._st = None

    def __call__(self, st) -> None:
        self._st = st
        metrics = {}
        if st.train_log and st.train_log[-1][0] == st.step and (st.step % self.report_every == 0 or st.step == self.total):
            _, loss, lr, tps = st.train_log[-1][:4]
            metrics = {"loss": float(loss), "lr": float(lr), "tokens_per_sec": float(tps),
                       "peak_memory_gb": mx.get_peak_memory() / 1e9, "epoch": st.epoch + 1}
        self._send(metrics, st)

    def _send(self, metrics: dict, st) -> None:
        pending = st.val_log[self._val_sent:]
        self._val_sent = len(st.val_log)
        by_step: dict[int, dict] = {}
        for step, val in pending:
            by_step.setdefault(int(step), {})["val_loss"] = float(val)
        if metrics:
            by_step.setdefault(st.step, {}).update(metrics)
        for step in sorted(by_step):
            for t in self.trackers:
                t.log(by_step[step], step)

    def finish(self) -> None:
        if self._st is not None:
            self._send({}, self._st)  # the final validation comes after the last step
        for t in self.trackers:
            t.finish()


MODULES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard", "trackio": "trackio"}


def check_trackers(cfg) -> None:
    """Import the library of every tracker cfg.report_to names: a missing one is one line, before the model loads."""
    for n in parse_report_to(cfg.report_to):
        _import(n, MODULES[n])


@contextmanager
def report_to(trainer):
    """Open the trackers cfg.report_to names for `trainer` (rank 0 only), hook them in, close them after."""
    cfg = trainer.cfg
    names = parse_report_to(cfg.report_to) if trainer.rank == 0 else []
    if not names:
        yield None
        return
    config = cfg.to_dict()
    name = Path(cfg.adapter_path).name
    opened = []
    try:
        for n in names:
            try:
                opened.append(OPENERS[n](config, name, trainer.run_dir))
            except ConfigError:
                raise
            except Exception as e:  # the library's own refusal (a bad tracking URI, no login...): one line
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise ConfigError(f"--report-to {n}: {n} could not start a run ({why}); check its settings "
                                  "(environment variables such as WANDB_MODE, MLFLOW_TRACKING_URI)") from None
        reporter = Reporter(opened, cfg.report_every, trainer.total_steps())
        trainer.callbacks = [*trainer.callbacks, reporter]
        yield reporter
        reporter.finish()
    except BaseException:
        for t in opened:
            try:
                t.finish()
            except Exception:  # the run's own error is the one to show
                pass
        raise


__all__ = ["TRACKERS", "parse_report_to", "flatten", "Reporter", "check_trackers", "report_to"]
