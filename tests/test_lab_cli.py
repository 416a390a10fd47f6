"""python -m mindspeed_lab: `report DIR` works from an events directory; `run`/`demo` say they are not there yet."""

import json
import subprocess
import sys
from pathlib import Path

from mindspeed_lab.__main__ import main
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


def test_report_errors_and_unavailable_commands(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no events" in capsys.readouterr().err
    assert main(["run", "cfg.yaml", "--workers", "2"]) == 2
    assert "not available yet" in capsys.readouterr().err
    assert main(["demo"]) == 2
    assert "not available yet" in capsys.readouterr().err
