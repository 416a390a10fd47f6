"""Shared pytest configuration: the msrun harness as a fixture, and the test markers."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GLOG_v", "3")

from _harness import assert_cases_passed, run_msrun  # noqa: E402  pylint: disable=wrong-import-position

import mindspore as _ms  # noqa: E402  pylint: disable=wrong-import-position

# As mindspeed_ms.runtime.setup_worker does for workers: synchronous PyNative is 2.5-3x faster on
# two cores (the asynchronous launch threads compete with the kernels).
_ms.set_device("CPU")
_ms.set_context(pynative_synchronize=True)

MP_DIR = Path(__file__).resolve().parent / "mp"


@pytest.fixture
def msrun(tmp_path):
    """Run ``tests/mp/<script>`` under msrun and return ``{rank: {case: value}}``.

    Usage: ``values = msrun("comm_cases.py", nprocs=2, args=[...], timeout=300)``; the test fails
    with per-case tracebacks and worker logs if any rank or case failed.
    """

    def _run(script, nprocs, args=(), timeout=600, env=None, expected_cases=None):
        path = Path(script)
        if not path.is_absolute():
            path = MP_DIR / path
        result = run_msrun(path, nprocs, args, workdir=tmp_path, timeout=timeout, env=env)
        return assert_cases_passed(result, expected_cases)

    return _run
