"""training_config.enable_compile_cache / compile_cache_path: MindSpore's compile cache, keyed safely.

The runs that use the cache start fresh processes (MindSpore reads the cache path once per process).
"""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import training_configs as T
from _logs import LogLines
from mindspeed_ms.core.config import init_configs_from_dict
from mindspeed_ms.training import compile_cache

CHILD = Path(__file__).resolve().parent / "_train_child.py"


def _child(tmp_path, name, data, timeout=300):
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(data), encoding="utf-8")
    env = dict(os.environ, MINDSPEED_JIT="1")
    env.pop(compile_cache.ENABLE_ENV, None)
    env.pop(compile_cache.PATH_ENV, None)
    proc = subprocess.Popen([sys.executable, str(CHILD), str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and nothing else
            proc.wait()
    assert proc.returncode == 0, (out + err)[-3000:]
    return json.loads(out.strip().splitlines()[-1]), out + err


def _data(tmp_path, name, cache_dir, **model_config):
    return T.make(tmp_path / name, training_config={"training_iters": 3, "enable_compile_cache": True,
                                                     "compile_cache_path": str(cache_dir)},
                  model_config=dict({"num_layers": 2}, **model_config))


def _mindir(directory):
    return sorted(p.name for p in Path(directory).rglob("*.mindir"))


@pytest.mark.slow  # four fresh training processes
def test_second_start_loads_the_cache_and_trains_identically(tmp_path):
    cache = tmp_path / "cache"
    first, first_log = _child(tmp_path, "first", _data(tmp_path, "first", cache))
    saved = _mindir(cache)
    assert saved, "the first run saved no compiled graph"
    assert "compile cache empty, saving graphs" in first_log
    assert (next(p for p in cache.iterdir() if p.is_dir()) / compile_cache.MARKER).exists()
    second, second_log = _child(tmp_path, "second", _data(tmp_path, "second", cache))
    assert "compile cache found, loading graphs" in second_log
    assert _mindir(cache) == saved  # loaded, nothing new compiled
    assert [s["loss"] for s in second["steps"]] == [s["loss"] for s in first["steps"]]
    assert [s["grad_norm"] for s in second["steps"]] == [s["grad_norm"] for s in first["steps"]]
    # a different model of the same code gets its own directory (a cache keyed only by the
    # compile order runs the wrong graph: NaN, measured)
    other, _ = _child(tmp_path, "other", _data(tmp_path, "other", cache, num_layers=3))
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2
    assert all(s["loss"] == s["loss"] for s in other["steps"])  # finite, not NaN


def _fake_saved(directory, names):
    graphs = Path(directory) / "rank_0" / "graph_cache"
    graphs.mkdir(parents=True)
    for name in names:
        (graphs / name).write_bytes(b"x")


def test_a_run_whose_graphs_were_not_all_saved_leaves_no_cache(tmp_path, fresh_process_state):
    logger, lines = _logger()
    all_config = _all_config(tmp_path)
    cache = compile_cache.activate(all_config, logger=logger)
    # what MindSpore leaves when it fails to save a differentiated graph: no _before_opt companion
    _fake_saved(cache.directory, ["compile_cache_0.mindir", "compile_cache_0grad.mindir",
                                  "compile_cache_0grad_forward.mindir", "compile_cache_1.mindir"])
    cache.close(success=True)
    assert not list(cache.directory.rglob("*.mindir"))
    assert any("could not save every graph" in line for line in lines.lines)
    compile_cache._PROCESS["path"] = None  # as in a new process
    again = compile_cache.activate(all_config, logger=logger)
    assert not again.active and compile_cache.ENABLE_ENV not in os.environ


def test_a_failed_run_leaves_no_cache_and_a_complete_one_is_loaded(tmp_path, fresh_process_state):
    all_config = _all_config(tmp_path)
    cache = compile_cache.activate(all_config)
    _fake_saved(cache.directory, ["compile_cache_0grad.mindir", "compile_cache_0grad_before_opt.mindir"])
    cache.close(success=False)
    assert not list(cache.directory.rglob("*.mindir"))
    compile_cache._PROCESS["path"] = None
    cache = compile_cache.activate(all_config)
    assert not cache.loading
    _fake_saved(cache.directory, ["compile_cache_0grad.mindir", "compile_cache_0grad_before_opt.mindir"])
    cache.close(success=True)
    compile_cache._PROCESS["path"] = None
    cache = compile_cache.activate(all_config)
    assert cache.active and cache.loading
    cache.close()
    assert len(list(cache.directory.rglob("*.mindir"))) == 2


def _all_config(tmp_path, name="run", cache_dir=None, **model_config):
    return init_configs_from_dict(_data(tmp_path, name, cache_dir or tmp_path / "cache", **model_config))


def test_directory_is_keyed_by_what_shapes_the_graphs(tmp_path, monkeypatch):
    monkeypatch.delenv("ENABLE_LAZY_INLINE", raising=False)
    base = compile_cache.cache_directory(_all_config(tmp_path))
    assert base.parent == (tmp_path / "cache").resolve()
    assert compile_cache.cache_directory(_all_config(tmp_path, name="elsewhere")) == base  # output_dir only
    assert compile_cache.cache_directory(_all_config(tmp_path, num_layers=3)) != base
    assert compile_cache.cache_directory(_all_config(tmp_path), rank=1, world_size=2) != base
    monkeypatch.setenv("ENABLE_LAZY_INLINE", "0")
    assert compile_cache.cache_directory(_all_config(tmp_path)) != base


def test_default_path_is_under_output_dir(tmp_path):
    all_config = _all_config(tmp_path)
    all_config.training_config.compile_cache_path = None
    assert compile_cache.cache_directory(all_config).parent == (tmp_path / "run" / "compile_cache").resolve()


@pytest.fixture
def fresh_process_state(monkeypatch):
    monkeypatch.setitem(compile_cache._PROCESS, "path", None)
    monkeypatch.delenv(compile_cache.ENABLE_ENV, raising=False)
    monkeypatch.delenv(compile_cache.PATH_ENV, raising=False)


def _logger():
    logger = logging.getLogger("test_compile_cache")
    logger.setLevel(logging.INFO)
    handler = LogLines()
    logger.addHandler(handler)
    return logger, handler


def test_off_by_default_and_when_nothing_compiles(tmp_path, fresh_process_state):
    all_config = _all_config(tmp_path)
    logger, lines = _logger()
    all_config.training_config.enable_compile_cache = False
    assert not compile_cache.activate(all_config, logger=logger).active
    all_config.training_config.enable_compile_cache = True
    cache = compile_cache.activate(all_config, compiles=False, logger=logger)
    assert not cache.active and not (tmp_path / "cache").exists()
    assert any("nothing to cache" in line for line in lines.lines)
    assert compile_cache.ENABLE_ENV not in os.environ


def test_second_run_in_one_process_is_not_cached(tmp_path, fresh_process_state, monkeypatch):
    logger, lines = _logger()
    monkeypatch.setitem(compile_cache._PROCESS, "path", str(tmp_path / "used_before"))
    cache = compile_cache.activate(_all_config(tmp_path), logger=logger)
    assert not cache.active
    assert compile_cache.ENABLE_ENV not in os.environ
    assert any("once per process" in line for line in lines.lines)


def test_open_sets_and_close_restores_the_switch(tmp_path, fresh_process_state, monkeypatch):
    # the path is recorded as used for this process: keep MindSpore's own state out of it by
    # not compiling anything while the switch is on
    cache = compile_cache.activate(_all_config(tmp_path))
    try:
        assert cache.active
        assert os.environ[compile_cache.ENABLE_ENV] == "1"
        assert os.environ[compile_cache.PATH_ENV] == str(cache.directory)
    finally:
        cache.close()
    assert compile_cache.ENABLE_ENV not in os.environ
