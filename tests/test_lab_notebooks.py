"""The tutorial notebooks run end to end headless (nbclient, kernel python3) with small settings.

``MINDSPEED_LAB_SMALL=1`` selects tiny settings and ``MINDSPEED_LAB_RUNS`` puts the run directories
into the test's tmp_path; the notebooks assert their own results (same loss curves, overflows in
the events, ...), so a failed check fails the cell and the test. Afterwards no process of any job
the notebook started may be left (found by run directory, stopped by job tag).
"""

import os
from pathlib import Path

import nbformat
import pytest

from lab_scripts.cleanup import stop_jobs_under
from mindspeed_lab import presets

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert [n[:2] for n in NAMES] == ["01", "02", "03", "04", "05"], NAMES
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3", name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} has saved outputs"


def execute(name, tmp_path, monkeypatch, timeout=900):
    """Run one notebook in a fresh python3 kernel; returns the executed notebook."""
    from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel

    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("MINDSPEED_LAB_SMALL", "1")
    monkeypatch.setenv("MINDSPEED_LAB_RUNS", str(runs))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless; the lab renders its figures to PNG itself
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        leftovers = stop_jobs_under(runs)
    assert not leftovers, f"{name} left processes behind: {leftovers}"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    return nb


def outputs_text(nb):
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.get("output_type") == "stream")


def images(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


@pytest.mark.notebook
def test_01_quickstart(tmp_path, monkeypatch):
    nb = execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    text = outputs_text(nb)
    assert "succeeded" in text and "must divide the world size 2" in text
    assert len(images(nb)) >= 2  # the live dashboard's image and the report's training plot


@pytest.mark.notebook
def test_02_gpt_pretraining_parallel_layouts(tmp_path, monkeypatch):
    nb = execute("02_gpt_pretraining_parallel_layouts.ipynb", tmp_path, monkeypatch)
    text = outputs_text(nb)
    assert "vocab_size=65 must be divisible by tensor_model_parallel_size=2" in text
    assert text.count("succeeded") >= 2


@pytest.mark.notebook
def test_03_tuning_runs_real_jobs_next_to_estimates(tmp_path, monkeypatch):
    """The tuner's real-run part with 2 workers: the notebook's last cell asserts that both layouts
    succeeded, measured step time and peak RSS, and that their loss curves coincide."""
    nb = execute("03_parallel_strategy_tuning.ipynb", tmp_path, monkeypatch)
    assert "fastest here:" in outputs_text(nb)
    assert len(list((tmp_path / "runs").glob("layout-*"))) == 2


@pytest.mark.notebook
def test_04_moe_token_distribution(tmp_path, monkeypatch):
    nb = execute("04_moe_token_distribution.ipynb", tmp_path, monkeypatch)
    assert ("synthetic run" in outputs_text(nb)) != presets.moe_enabled()
    assert len(images(nb)) >= 3


@pytest.mark.notebook
def test_05_loss_scaling_overflows_skips_recovery(tmp_path, monkeypatch):
    nb = execute("05_loss_scaling.ipynb", tmp_path, monkeypatch)
    text = outputs_text(nb)
    assert "dynamic   overflows at steps [1" in text and "adaptive  overflows at steps [1" in text
