"""MindSpore's compile cache for the compiled training step (``training_config.enable_compile_cache``).

With the cache on, MindSpore saves every graph it compiles (``mindspore.jit``: the model chunk,
the optimizer update, the gradient statistics) as MindIR under
``<path>/rank_<RANK_ID>/graph_cache/`` and, in a later process, loads them instead of compiling
again. MindSpore 2.10 switches it with the environment variables ``MS_COMPILER_CACHE_ENABLE`` and
``MS_COMPILER_CACHE_PATH`` (the ``set_context`` arguments of the same names are deprecated); what
was measured here on CPU shapes how they are set:

* MindSpore names the cached graphs by the order they are compiled in (``compile_cache_0``,
  ``compile_cache_1``, ...) and checks only the Python source they come from. A cache written by
  a 24-layer model and loaded by an 8-layer model of the same code runs the wrong graph and gives
  NaN, silently. The directory is therefore keyed by everything that shapes the graphs: the whole
  config (except where outputs go), the switches read from the environment, the world size and
  rank, the MindSpore version and the source of ``mindspeed_ms``.
* ``MS_COMPILER_CACHE_PATH`` is read once per process (a later change is ignored) and the graph
  counter runs on for the whole process, so only the first run of a process uses the cache;
  a later run in the same process compiles as usual and says why.
* ``MS_COMPILER_CACHE_ENABLE`` is read at every compilation: it is set for the run and restored
  afterwards, so compilations outside the run are not cached.
* A graph that MindSpore cannot save as MindIR (Python objects left in it, e.g. ``ops.one_hot``'s
  isinstance checks or a ``Tensor`` built inside ``construct``) is logged as an error and left
  out, and the next start then fails in the backward pass ("Can not find top cell"). A
  differentiated graph ``compile_cache_<i>grad`` is saved with its ``..._before_opt`` companion;
  without it the save failed. So a directory is only loaded from when the run that filled it
  ended successfully with every companion present (a marker file says so); otherwise its files
  are removed, and a configuration whose graphs cannot be saved is marked so and runs uncached.

Nothing is cached when nothing compiles (a PyNative run, see :mod:`.compilation`); the run says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import mindspore as ms

__all__ = ["ENABLE_ENV", "PATH_ENV", "MARKER", "cache_directory", "CompileCache", "activate"]

ENABLE_ENV = "MS_COMPILER_CACHE_ENABLE"
PATH_ENV = "MS_COMPILER_CACHE_PATH"

# Fields that decide where outputs go or how the cache itself is found, not what compiles.
_NOT_GRAPH_SHAPING = {("training_config", "output_dir"), ("training_config", "compile_cache_path"),
                      ("training_config", "enable_compile_cache"), ("training_config", "profile_save_path")}
# Environment switches that change the compiled graphs.
_ENV_SWITCHES = ("MINDSPEED_JIT", "MINDSPEED_JIT_MIN_STEPS", "ENABLE_LAZY_INLINE", "ENABLE_LAZY_INLINE_NO_PIPELINE",
                 "MS_DEV_JIT_SYNTAX_LEVEL")

_PROCESS: Dict[str, Any] = {"path": None}  # the first cache directory this process used
_SOURCE_DIGEST: Optional[str] = None


def _source_digest() -> str:
    """SHA-1 over the Python source of the ``mindspeed_ms`` package (computed once per process)."""
    global _SOURCE_DIGEST  # pylint: disable=global-statement
    if _SOURCE_DIGEST is None:
        root = Path(__file__).resolve().parents[1]
        digest = hashlib.sha1()
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
        _SOURCE_DIGEST = digest.hexdigest()
    return _SOURCE_DIGEST


def _graph_shaping_config(all_config) -> Dict[str, Any]:
    data = all_config.to_dict()
    return {section: {k: v for k, v in values.items() if (section, k) not in _NOT_GRAPH_SHAPING}
            for section, values in data.items() if isinstance(values, dict)}


def cache_directory(all_config, rank: int = 0, world_size: int = 1) -> Path:
    """Where this run's compiled graphs are cached: ``<compile_cache_path>/<key>``.

    ``compile_cache_path`` defaults to ``<output_dir>/compile_cache``. The key is a digest of
    everything that shapes the graphs (see the module docstring), so a run only ever loads graphs
    compiled by a run of the same configuration, code and layout.
    """
    tc = all_config.training_config
    base = tc.compile_cache_path or os.path.join(tc.output_dir or ".", "compile_cache")
    key = {
        "config": _graph_shaping_config(all_config),
        "env": {name: os.environ.get(name) for name in _ENV_SWITCHES},
        "world_size": int(world_size),
        "rank": int(rank),
        "mindspore": ms.__version__,
        "source": _source_digest(),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(base).resolve() / digest


class CompileCache:
    """The compile cache of one training run: on between :meth:`open` and :meth:`close`.

    Args:
        all_config: The run's AllConfig (``training_config.enable_compile_cache`` switches it).
        rank, world_size: This process's place in the job.
        compiles: Whether the run compiles anything (else there is nothing to cache).
        logger: Where the decision is reported.
    """

    def __init__(self, all_config, rank: int = 0, world_size: int = 1, compiles: bool = True,
                 logger: Optional[logging.Logger] = None):
        self.all_config = all_config
        self.rank = rank
        self.world_size = world_size
        self.compiles = compiles
        self.logger = logger or logging.getLogger("mindspeed_ms")
        self.directory: Optional[Path] = None
        self.active = False
        self.loading = False
        self._saved_enable: Optional[str] = None

    def open(self) -> "CompileCache":
        """Switch MindSpore's compile cache on for this run, when the config asks and it is safe."""
        if not bool(self.all_config.training_config.enable_compile_cache):
            return self
        if not self.compiles:
            self.logger.info("compile cache: nothing to cache, this run compiles no graph (PyNative mode)")
            return self
        directory = cache_directory(self.all_config, self.rank, self.world_size)
        used = _PROCESS["path"]
        if used is not None:
            self.logger.warning("compile cache off for this run: MindSpore reads %s once per process and this "
                                "process cached graphs under %s already (a later run would be numbered after "
                                "them); start a new process to use the cache", PATH_ENV, used)
            return self
        directory.mkdir(parents=True, exist_ok=True)
        marker = _read_marker(directory)
        if marker.get("cacheable") is False:
            self.logger.warning("compile cache off: MindSpore could not save every graph of this configuration "
                                "(%s, see %s)", marker.get("reason"), directory / MARKER)
            return self
        hit = bool(marker.get("complete"))
        if not hit:
            _clear(directory)  # a run that did not finish, or files of unknown origin
        os.environ[PATH_ENV] = str(directory)
        self._saved_enable = os.environ.get(ENABLE_ENV)
        os.environ[ENABLE_ENV] = "1"
        _PROCESS["path"] = str(directory)
        self.directory = directory
        self.active = True
        self.loading = hit
        self.logger.info("compile cache %s: %s", "found, loading graphs" if hit else "empty, saving graphs",
                         directory)
        return self

    def close(self, success: bool = True) -> None:
        """Stop caching (compilations after the run are not saved) and judge what was saved.

        Args:
            success: Whether the run ended normally. A cache filled by a run that did not is
                removed; so is one that misses a graph MindSpore failed to save (the
                configuration is then marked as not cacheable).
        """
        if not self.active:
            return
        if self._saved_enable is None:
            os.environ.pop(ENABLE_ENV, None)
        else:
            os.environ[ENABLE_ENV] = self._saved_enable
        self.active = False
        if self.loading or self.directory is None:
            return
        if not success:
            _clear(self.directory)
            return
        files = sorted(p.name for p in self.directory.glob("rank_*/graph_cache/*.mindir"))
        missing = [name.replace(".mindir", "_before_opt.mindir") for name in files
                   if name.endswith("grad.mindir") and name.replace(".mindir", "_before_opt.mindir") not in files]
        if missing:
            _clear(self.directory)
            reason = "no " + ", ".join(missing)
            _write_marker(self.directory, {"cacheable": False, "reason": reason})
            self.logger.warning("compile cache: MindSpore could not save every graph of this run (%s); this "
                                "configuration runs uncached from now on", reason)
            return
        _write_marker(self.directory, {"complete": True, "files": files})
        self.logger.info("compile cache: %d graphs saved under %s", len(files), self.directory)


MARKER = "mindspeed_compile_cache.json"


def _read_marker(directory: Path) -> Dict[str, Any]:
    try:
        return json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_marker(directory: Path, data: Dict[str, Any]) -> None:
    (directory / MARKER).write_text(json.dumps(data, indent=1), encoding="utf-8")


def _clear(directory: Path) -> None:
    """Remove what MindSpore saved under ``directory`` (and the marker)."""
    for child in directory.glob("rank_*"):
        shutil.rmtree(child, ignore_errors=True)
    (directory / MARKER).unlink(missing_ok=True)


def activate(all_config, rank: int = 0, world_size: int = 1, compiles: bool = True,
             logger: Optional[logging.Logger] = None) -> CompileCache:
    """:class:`CompileCache` opened (``close()`` it when the run ends)."""
    return CompileCache(all_config, rank, world_size, compiles, logger).open()
