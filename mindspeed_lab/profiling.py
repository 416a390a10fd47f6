"""Profiled runs in the lab: the operators that took the most time, as a table.

A run profiles itself when its config sets ``training_config.profile`` (steps
``profile_step_start..profile_step_end``; see ``mindspeed_ms.training.profiling`` for what each
device records). In a notebook::

    from mindspeed_lab.profiling import top_operators
    top_operators(job.run_dir / "output" / "profile")      # a pandas DataFrame, shown as a table

Reading needs pandas only (no MindSpore import in the notebook kernel).
"""

from __future__ import annotations

import os
from typing import List, Optional, Union

__all__ = ["top_operators", "profile_runs"]


def top_operators(path: Union[str, os.PathLike], n: int = 20, run: Optional[str] = None):
    """The slowest operator types of the newest profiled run under ``path`` (a DataFrame).

    Columns: ``op_type``, ``calls``, ``total_ms``, ``avg_ms``, ``percent``, ``device``.
    See :func:`mindspeed_ms.training.profiling.top_operators`.
    """
    from mindspeed_ms.training.profiling import top_operators as _top  # pylint: disable=import-outside-toplevel

    return _top(str(path), n=n, run=run)


def profile_runs(path: Union[str, os.PathLike]) -> List[str]:
    """The profiled-run directories under ``path``, oldest first."""
    from mindspeed_ms.training.profiling import profile_runs as _runs  # pylint: disable=import-outside-toplevel

    return _runs(str(path))
