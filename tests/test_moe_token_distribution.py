"""The MoE token-distribution files and tool (12 layers with dense gaps, >10 layers)."""

import io
import subprocess
import sys

import numpy as np
import pytest

from mindspeed_ms.tools.moe_token_distribution import (FILE_PATTERN, hot_experts, load_token_distribution, main,
                                                       plot_token_distribution, save_token_distribution)

MOE_LAYERS = [1, 3, 5, 7, 9, 10, 11]       # 12 layers, dense layers 0, 2, 4, 6, 8 in between
STEPS = [1, 2, 3, 9, 10, 11, 100]           # 10 must sort after 9, 100 after 11
NUM_EXPERTS = 6


def _counts(layer, step):
    base = np.arange(NUM_EXPERTS) * (layer + 1) + step
    base[(layer + step) % NUM_EXPERTS] += 1000   # a layer/step-dependent hot expert
    return base


@pytest.fixture
def npy_dir(tmp_path):
    d = tmp_path / "token_distribution"
    for layer in MOE_LAYERS:
        for step in STEPS:
            save_token_distribution(d, layer, step, _counts(layer, step))
    (d / "layer-1_notes.txt").write_text("not a record")
    (d / "xlayer-1_5.npy").write_bytes(b"")   # not matching the anchored pattern
    return d


def test_writer_file_names_and_contents(tmp_path):
    path = save_token_distribution(tmp_path / "td", 10, 3, [4, 0, 2])
    assert path.name == "layer-10_3.npy"
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), [4, 0, 2])
    assert [p.name for p in (tmp_path / "td").iterdir()] == ["layer-10_3.npy"]   # no temporary left
    with pytest.raises(ValueError, match="counts"):
        save_token_distribution(tmp_path, 0, 0, [[1, 2]])
    with pytest.raises(ValueError, match="counts"):
        save_token_distribution(tmp_path, 0, 0, [1.5, 2])
    with pytest.raises(ValueError, match="layer"):
        save_token_distribution(tmp_path, -1, 0, [1])


def test_pattern_keeps_layer_1_and_10_apart():
    assert FILE_PATTERN.match("layer-1_10.npy").groups() == ("1", "10")
    assert FILE_PATTERN.match("layer-10_1.npy").groups() == ("10", "1")
    assert FILE_PATTERN.match("layer-1_10.npy.tmp") is None
    assert FILE_PATTERN.match("xlayer-1_1.npy") is None


def test_load_groups_by_layer_and_sorts_steps_numerically(npy_dir):
    data = load_token_distribution(npy_dir)
    assert sorted(data) == MOE_LAYERS
    for layer in MOE_LAYERS:
        steps, counts = data[layer]
        assert steps.tolist() == STEPS
        assert counts.shape == (len(STEPS), NUM_EXPERTS)
        for row, step in zip(counts, STEPS):
            np.testing.assert_array_equal(row, _counts(layer, step))


def test_tool_plots_each_moe_layer_and_reports_hot_experts(npy_dir, tmp_path):
    out = io.StringIO()
    prefix = tmp_path / "plots"
    hot = plot_token_distribution(12, 2, npy_dir, prefix, out=out)
    assert sorted(hot) == MOE_LAYERS
    for layer in MOE_LAYERS:
        png = prefix / f"layer-{layer}_token_distribution.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        last = _counts(layer, STEPS[-1])
        assert hot[layer] == list(np.argsort(-last, kind="stable")[:2])
        assert hot[layer][0] == (layer + 100) % NUM_EXPERTS
    assert sorted(p.name for p in prefix.iterdir()) == sorted(f"layer-{L}_token_distribution.png" for L in MOE_LAYERS)
    report = out.getvalue()
    assert "Skipped layer(s) without token distribution files (dense layers?): [0, 2, 4, 6, 8]" in report
    assert f"Layer-10 hot experts (top 2 of 6 at step 100): {hot[10]}" in report


def test_tool_edge_cases(npy_dir, tmp_path):
    out = io.StringIO()
    hot = plot_token_distribution(10, 99, npy_dir, tmp_path / "p", out=out)   # layers 0..9 only
    assert sorted(hot) == [1, 3, 5, 7, 9] and len(hot[1]) == NUM_EXPERTS      # clamped to E
    assert "Ignoring files of layer(s) [10, 11]" in out.getvalue()
    with pytest.raises(ValueError, match="no layer"):
        plot_token_distribution(1, 1, npy_dir, tmp_path / "q", out=out)       # only layer 0: dense
    with pytest.raises(FileNotFoundError, match="npy_files_load_path"):
        plot_token_distribution(2, 1, tmp_path / "missing", tmp_path / "q")
    with pytest.raises(ValueError, match="hot_expert_num"):
        plot_token_distribution(2, -1, npy_dir, tmp_path / "q")
    save_token_distribution(npy_dir, 3, 1000, [1, 2])
    with pytest.raises(ValueError, match="experts"):
        load_token_distribution(npy_dir)
    assert hot_experts([5, 9, 9, 1], 3) == [1, 2, 0]


def test_main_and_module_entry_point(npy_dir, tmp_path, capsys):
    assert main(["--num_layers", "12", "--hot_expert_num", "1", "--npy_files_load_path", str(npy_dir),
                 "--save_path_prefix", str(tmp_path / "m")]) == 0
    assert "Layer-11 hot experts" in capsys.readouterr().out
    assert main(["--num_layers", "1", "--hot_expert_num", "1", "--npy_files_load_path", str(npy_dir),
                 "--save_path_prefix", str(tmp_path / "m")]) == 2
    proc = subprocess.run([sys.executable, "-m", "mindspeed_ms.tools.moe_token_distribution", "--num_layers", "12",
                           "--hot_expert_num", "2", "--npy_files_load_path", str(npy_dir), "--save_path_prefix",
                           str(tmp_path / "cli")], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.count("hot experts") == len(MOE_LAYERS)
    assert (tmp_path / "cli" / "layer-11_token_distribution.png").is_file()
