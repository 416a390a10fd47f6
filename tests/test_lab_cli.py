"""python -m mindspeed_lab: report, the progress bar, argument and config errors, and real run/demo jobs."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lab_scripts.cleanup import stop_jobs_under
from mindspeed_lab import presets
from mindspeed_lab.__main__ import main
from mindspeed_lab.cli import ProgressBar, _eta, format_duration
from mindspeed_lab.report import summarize, write_report
from mindspeed_lab.events import read_events
from test_lab_plots import PNG_MAGIC, write_events

REPO = Path(__file__).resolve().parents[1]


def test_report_command_writes_plots_and_summary(tmp_path):
    run = tmp_path / "run"
    write_events(run / "output" / "events", steps=6)
    (run / "job.json").write_text(json.dumps({"name": "demo-job", "status": "succeeded", "error": None}))
    proc = subprocess.run([sys.executable, "-m", "mindspeed_lab", "report", str(run), "--dpi", "40"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for name in ("training.png", "loss_scale.png", "moe_tokens.png", "moe_imbalance.png"):
        assert (run / name).read_bytes().startswith(PNG_MAGIC), name
    page = (run / "summary.html").read_text()
    assert "<h1>Run summary</h1>" in page and "demo-job" in page
    for image in ("training.png", "loss_scale.png", "moe_tokens.png", "moe_imbalance.png"):
        assert f'src="{image}"' in page
    assert "summary: " in proc.stdout


def test_report_without_moe_and_into_another_dir(tmp_path):
    events = tmp_path / "events"
    write_events(events, steps=4, layers=())
    files = write_report(events, tmp_path / "out", dpi=30)
    assert sorted(files) == ["loss_scale", "summary", "training"]
    facts = summarize(read_events(events))
    assert facts["steps"] == 4 and facts["first_loss"] == 5.0 and facts["final_loss"] == 1.25
    assert facts["overflow_steps"] == 1 and facts["final_val_loss"] == 6.0 / 3


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no events" in capsys.readouterr().err


def test_progress_bar_and_eta():
    out = io.StringIO()
    bar = ProgressBar(100, out, width=10, min_interval_s=0.0)
    assert bar.render(25, 2.34567, 1234.4, 75.0, "running") == \
        "[##........] 25/100 | loss 2.3457 | 1,234 tok/s | ETA 1:15 | running"
    assert ProgressBar(None, out).render(3) == "step 3"
    bar.update(1, 4.0)
    bar.update(1, 4.0)   # the same step again: no new line off a terminal
    bar.update(2, 3.9, force=True)
    assert out.getvalue().count("\n") == 2 and bar.lines == 2
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "--:--"
    summary = pd.DataFrame({"step": [1, 2, 3], "time": [10.0, 12.0, 14.0], "step_time_ms": [2000.0] * 3})
    assert _eta(summary, 10) == pytest.approx(14.0)   # 7 steps left at 2 s each
    assert _eta(summary, 3) == 0.0 and _eta(summary, None) is None


def test_bad_configs_and_arguments_exit_2_without_starting_anything(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    data = presets.load_preset("tiny")
    data["parallel_config"] = {"tensor_model_parallel_size": 4}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["run", str(cfg), "--workers", "2", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cannot run on 2 worker(s)" in err and "must divide the world size 2" in err
    assert not (tmp_path / "r").exists()
    assert main(["run", str(tmp_path / "missing.yaml"), "--workers", "2"]) == 2
    assert "an existing YAML file or a preset" in capsys.readouterr().err
    assert main(["run", str(cfg), "--workers", "0"]) == 2
    assert "--workers: got 0; allowed: an integer >= 1" in capsys.readouterr().err
    assert main(["demo", "--preset", "nope"]) == 2
    assert "preset: got 'nope'" in capsys.readouterr().err


def lines_of(stream_text):
    return [ln for ln in stream_text.splitlines() if ln.strip()]


@pytest.mark.multiprocess
def test_run_and_demo_commands_train_and_leave_plots(tmp_path):
    """``run CFG --workers 2 --output DIR`` and the zero-argument ``demo`` (tiny settings), side by
    side: both train for real on 2 workers, print a progress bar, and leave PNGs and summary.html."""
    env = dict(os.environ, MINDSPEED_LAB_SMALL="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    run_dir = tmp_path / "run"
    procs = {
        "run": subprocess.Popen([sys.executable, "-m", "mindspeed_lab", "run",
                                 str(REPO / "mindspeed_lab" / "presets" / "tiny.yaml"), "--workers", "2",
                                 "--output", str(run_dir), "--training-iters", "3"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True),
        "demo": subprocess.Popen([sys.executable, "-m", "mindspeed_lab", "demo"], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True),
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        leftovers = stop_jobs_under(tmp_path)
    assert not leftovers, leftovers
    for name, (code, _, err) in results.items():
        assert code == 0, f"{name}: exit {code}\n{err}"

    _, _, err = results["run"]
    progress = [ln for ln in lines_of(err) if ln.startswith("[")]
    assert progress[-1].startswith("[" + "#" * 30 + "] 3/3 | loss ") and "tok/s | ETA 0:00" in progress[-1]
    assert any("/3 | loss" in ln for ln in progress[:-1])  # progress while it ran
    assert "report: training.png, loss_scale.png, summary.html" in err
    for name in ("training.png", "loss_scale.png"):
        assert (run_dir / name).read_bytes().startswith(PNG_MAGIC)
    assert "Run summary" in (run_dir / "summary.html").read_text()
    reader = read_events(run_dir)
    assert reader.run_info()["status"] == "success" and reader.run_info()["world_size"] == 2

    _, _, err = results["demo"]
    assert "mindspeed_lab demo: a 2-layer GPT" in err and "6 steps" in err
    demo_dirs = list((tmp_path / "runs").glob("demo-*"))
    assert len(demo_dirs) == 1
    demo = demo_dirs[0]
    assert f"open {demo / 'summary.html'}" in err
    steps = read_events(demo).steps
    assert sorted(steps["rank"].unique()) == [0, 1]
    # the demo's dynamic loss scaling starts too high for float16: the first step overflows
    first = steps[(steps["rank"] == 0) & (steps["step"] == 1)].iloc[0]
    assert bool(first["overflow"]) and first["loss_scale"] == 2.0 ** 19
    for name in ("training.png", "loss_scale.png", "summary.html"):
        assert (demo / name).is_file()
    if presets.moe_enabled():  # the MoE demo: token counts recorded and plotted
        assert "4 experts per MoE layer" in err and "preset 'demo_moe'" in err
        tokens = read_events(demo).moe_tokens
        assert sorted(tokens["layer"].unique()) == [0, 1] and sorted(tokens["step"].unique()) == list(range(1, 7))
        assert len(list((demo / "output" / "token_distribution").glob("layer-*_*.npy"))) == 12
        for name in ("moe_tokens.png", "moe_imbalance.png", "moe_capacity.png"):
            assert (demo / name).read_bytes().startswith(PNG_MAGIC)


def test_report_of_a_profiled_run_has_the_top_operators(tmp_path):
    """The layout MindSpore's profiler leaves on CPU (FRAMEWORK/cpu_op_type_info_<n>.csv per profiled run)."""
    run = tmp_path / "run"
    write_events(run / "output" / "events", steps=3, layers=())
    for rank, scale in ((1, 10.0), (0, 1.0)):
        framework = run / "output" / "profile" / f"rank_{rank}" / f"host_{rank}_1_ascend_ms" / "FRAMEWORK"
        framework.mkdir(parents=True)
        (framework / "cpu_op_type_info_0.csv").write_text(
            "op_type,type_occurrences,total_compute_time\n"
            f"MatMul,40,{30.0 * scale}\nSoftmax,8,{6.0 * scale}\nAdd,100,{4.0 * scale}\n")
    files = write_report(run, dpi=30)
    table = pd.read_csv(files["top_operators"])
    assert list(table["op_type"]) == ["MatMul", "Softmax", "Add"]        # rank 0's run, slowest first
    assert table["total_ms"].tolist() == [30.0, 6.0, 4.0] and table["calls"].tolist() == [40, 8, 100]
    assert abs(table["percent"].sum() - 100.0) < 1e-9
    page = files["summary"].read_text()
    assert "top operators" in page and "<td>MatMul</td>" in page
    # not profiled: no table, no file
    other = tmp_path / "plain"
    write_events(other / "output" / "events", steps=3, layers=())
    assert "top_operators" not in write_report(other, dpi=30)
