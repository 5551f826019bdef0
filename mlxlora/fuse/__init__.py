"""Fusing an adapter into its base: the fuse itself (core.py), re-quantization maths (requant.py),
calibration (calibration.py), held-out losses (heldout.py), storage dtypes and config (storage.py), the
report (report.py) and writing the fused folder (write.py)."""

from ..config import FuseConfig
from .core import fuse_model, fused_config, resolve_strategy
from .report import REPORT_FILE, format_report, summary_line, write_report
from .write import fuse_to_folder, save_fused

__all__ = ["FuseConfig", "fuse_model", "fused_config", "resolve_strategy", "REPORT_FILE", "format_report",
           "summary_line", "write_report", "fuse_to_folder", "save_fused"]
