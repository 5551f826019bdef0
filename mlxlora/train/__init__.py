"""Training: the loop (loop.py) over compiled steps (step.py), the batch plan (batches.py), crash-safe
checkpoints (checkpoint.py), the run record (record.py), progress lines, loss.png, signals and the
start-up memory warning."""

from ..errors import TrainingStopped
from .loop import Trainer, TrainResult, train

__all__ = ["Trainer", "TrainResult", "TrainingStopped", "train"]
