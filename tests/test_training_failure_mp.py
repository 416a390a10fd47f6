"""A killed worker: the run exits non-zero, nothing is left running, the events are readable to the
last complete line, and the last complete checkpoint loads."""

import pytest

from _harness import run_msrun
from mindspeed_ms.training import checkpointing
from mindspeed_ms.training.events import read_events

import conftest


@pytest.mark.multiprocess
def test_killed_worker_leaves_a_usable_run(tmp_path):
    out = tmp_path / "run"
    result = run_msrun(conftest.MP_DIR / "train_kill.py", 2, [str(out)], workdir=tmp_path, timeout=600)
    assert not result.timed_out
    assert result.returncode != 0
    events = read_events(out / "events")
    steps = {rank: [e["step"] for e in events if e["kind"] == "step" and e["rank"] == rank] for rank in (0, 1)}
    assert steps[1] == [1, 2, 3, 4, 5]  # killed in the step-5 callback, after its event
    assert steps[0][:5] == [1, 2, 3, 4, 5] and max(steps[0]) <= 6
    assert all(e["kind"] != "run_end" or e["rank"] != 1 for e in events)
    for rank in (0, 1):
        assert checkpointing.latest_step(out, rank) == 4
        tensors, meta = checkpointing.load_checkpoint(out, rank)
        assert meta["step"] == 4 and tensors
