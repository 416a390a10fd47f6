"""Which layers of a pipeline stage (and virtual chunk) recompute what.

Pure Python (no MindSpore): the model asks :func:`layers_for_value` / :func:`resolve_recompute`
for the local layer indices that get full, selective (core attention) and communication
(sequence-parallel all-gather) recomputation.

Value forms of ``recompute`` / ``select_recompute`` / ``select_comm_recompute`` (MindFormers):
``None``/``False`` (none), ``True`` (every layer), an int ``n`` (the first n layers of each stage
or chunk), a list with one int per pipeline stage (``[4, 4]``: the first 4 layers of each stage)
or, with virtual pipelining, one row per virtual chunk with one int per stage
(``[[4, 4], [4, 2]]``: chunk 1 of stage 1 recomputes 2 layers). The nested layout is the one of
``parallel_config.num_layer_list`` (``(vpp, pp)``), as the guide ties ``select_comm_recompute`` to
``layer_list``. A string holding such a literal (the guide quotes them: ``"[[4,4],[4,2]]"``) is
read as the literal; any other string (MindFormers' operator-name patterns) is refused, since here
selective recomputation means the core attention and communication recomputation means the
sequence-parallel all-gather.
"""

from typing import Any, Dict, FrozenSet, Optional

from ._checks import parse_literal
from .fields import ConfigValueError, Invalid

__all__ = ["RECOMPUTE_KEYS", "layers_for_value", "resolve_recompute", "check_recompute_shapes",
           "model_values", "parallel_values"]

#: Keys of ``parallel_config.recompute_config`` (the guide's ``train_config.recompute_config``).
RECOMPUTE_KEYS = ("recompute", "select_recompute", "select_comm_recompute")

_FORMS = "None, a bool, a layer count, a list by pipeline stage or rows by virtual chunk"


def _count(config: str, field: str, value: Any, n: Any) -> int:
    # bool is an int subclass: a bool inside a list is as ambiguous as a string, refuse it.
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigValueError(config, field, value, "layer counts are integers >= 0",
                               f"entry {n!r} is not a layer count")
    return n


def layers_for_value(value: Any, *, num_layers: int, pp_rank: int = 0, pp_size: int = 1,
                     vpp_rank: Optional[int] = None, vpp_size: Optional[int] = None,
                     config: str = "ModelParallelConfig",
                     field: str = "recompute") -> FrozenSet[int]:
    """Local layer indices (0-based, within this stage/chunk) selected by one recompute value.

    Args:
        value: None, a bool, an int or a per-stage (per-stage-and-chunk) list.
        num_layers: Layers in this stage's chunk.
        pp_rank: This pipeline stage.
        pp_size: Number of pipeline stages.
        vpp_rank: This virtual chunk (None without virtual pipelining).
        vpp_size: Chunks per stage (None or 1 without virtual pipelining).
        config: Config class name, for error messages.
        field: Field name, for error messages.

    Returns:
        frozenset of local layer indices.

    Raises:
        ConfigValueError: a string, a negative count or a list whose shape does not match
            pp (and vpp).
    """
    vpp = vpp_size if vpp_size and vpp_size > 1 else 1
    if isinstance(value, str):
        try:
            parsed = parse_literal(value)
        except Invalid:
            parsed = value
        if isinstance(parsed, str):
            raise ConfigValueError(config, field, value, _FORMS,
                                   "operator-name patterns are not supported: selective "
                                   "recomputation here is the core attention, communication "
                                   "recomputation the sequence-parallel all-gather")
        value = parsed
    if value is None or value is False:
        return frozenset()
    if value is True:
        return frozenset(range(num_layers))
    if isinstance(value, int):
        return frozenset(range(min(_count(config, field, value, value), num_layers)))
    if isinstance(value, (list, tuple)):
        nested = [isinstance(v, (list, tuple)) for v in value]
        if vpp > 1:
            if not value or not all(nested) or len(value) != vpp \
                    or any(len(row) != pp_size for row in value):
                raise ConfigValueError(
                    config, field, value,
                    f"{vpp} rows (one per virtual chunk) of {pp_size} counts (one per pipeline "
                    f"stage), the layout of num_layer_list",
                    f"virtual pipelining has {vpp} chunks per stage and {pp_size} stage(s)")
            entry = value[vpp_rank or 0][pp_rank]
        else:
            if any(nested):
                raise ConfigValueError(
                    config, field, value, f"a list of {pp_size} counts (one per pipeline stage)",
                    "nested lists are rows by virtual chunk, but virtual pipelining is off")
            if len(value) != pp_size:
                raise ConfigValueError(
                    config, field, value, f"a list of {pp_size} counts (one per pipeline stage)",
                    f"pipeline_model_parallel_size is {pp_size}, the list has {len(value)} "
                    f"entries")
            entry = value[pp_rank]
        return frozenset(range(min(_count(config, field, value, entry), num_layers)))
    raise ConfigValueError(config, field, value, _FORMS)


def resolve_recompute(model: Dict[str, Any], parallel: Dict[str, Any], *, num_layers: int,
                      pp_rank: int = 0, pp_size: int = 1, vpp_rank: Optional[int] = None,
                      vpp_size: Optional[int] = None) -> Dict[str, FrozenSet[int]]:
    """Resolve every recompute setting into local layer sets for this stage/chunk.

    Args:
        model: model_config values: recompute_granularity, recompute_method,
            recompute_num_layers, select_recompute, select_comm_recompute.
        parallel: parallel_config values: recompute, select_recompute, select_comm_recompute,
            recompute_config (a dict with those keys).
        num_layers, pp_rank, pp_size, vpp_rank, vpp_size: as in :func:`layers_for_value`.

    Returns:
        dict with keys ``full``, ``selective``, ``comm`` (local layer index sets) and
        ``uniform_chunk`` (Megatron's uniform method: layers recomputed as one unit per chunk of
        this many layers; 0 otherwise).

    Raises:
        ConfigValueError: conflicting settings (naming both fields) or a wrong list shape.
    """
    pc = dict(parallel)
    names = {key: key for key in RECOMPUTE_KEYS}  # where each value came from, for errors
    rc = pc.get("recompute_config") or {}
    if not isinstance(rc, dict):
        raise ConfigValueError("ModelParallelConfig", "recompute_config", rc,
                               "a dict with keys recompute, select_recompute, select_comm_recompute")
    for key, val in rc.items():
        if key not in RECOMPUTE_KEYS:
            raise ConfigValueError("ModelParallelConfig", "recompute_config", rc,
                                   "keys recompute, select_recompute, select_comm_recompute",
                                   f"unknown key {key!r}")
        if pc.get(key) not in (None, False) and val not in (None, False) and pc[key] != val:
            raise ConfigValueError("ModelParallelConfig", f"recompute_config.{key}", val,
                                   f"the same value as parallel_config.{key} ({pc[key]!r})",
                                   "both fields set the same recomputation differently")
        if val not in (None, False):
            pc[key] = val
            names[key] = f"recompute_config.{key}"
    where = dict(num_layers=num_layers, pp_rank=pp_rank, pp_size=pp_size,
                 vpp_rank=vpp_rank, vpp_size=vpp_size)

    def pick(field: str) -> FrozenSet[int]:
        mv, pv = model.get(field), pc.get(field)
        a = layers_for_value(mv, config="TransformerConfig", field=field, **where)
        b = layers_for_value(pv, field=names[field], **where)
        if mv not in (None, False) and pv not in (None, False) and a != b:
            raise ConfigValueError("ModelParallelConfig", names[field], pv,
                                   f"the layers of model_config.{field} ({mv!r}) or unset",
                                   "model_config and parallel_config disagree")
        return a | b

    full = layers_for_value(pc.get("recompute"), field=names["recompute"], **where)
    selective = pick("select_recompute")
    comm = pick("select_comm_recompute")
    granularity = model.get("recompute_granularity")
    method = model.get("recompute_method")
    count = int(model.get("recompute_num_layers") or 1)
    uniform = 0
    if granularity not in (None, "full", "selective"):
        raise ConfigValueError("TransformerConfig", "recompute_granularity", granularity,
                               "None, 'full' or 'selective'")
    if granularity == "full":
        if method not in ("uniform", "block"):
            raise ConfigValueError("TransformerConfig", "recompute_method", method,
                                   "'uniform' or 'block'",
                                   "recompute_granularity='full' needs a method")
        if method == "block":
            mfull = frozenset(range(min(count, num_layers)))
        else:
            mfull, uniform = frozenset(range(num_layers)), count
        if pc.get("recompute") not in (None, False) and full != mfull:
            raise ConfigValueError(
                "ModelParallelConfig", names["recompute"], pc.get("recompute"),
                f"unset, or the same layers as model_config.recompute_granularity='full' "
                f"(method {method!r}, recompute_num_layers {count})",
                "model_config.recompute_granularity and parallel_config.recompute disagree")
        full = mfull
    elif granularity == "selective":
        selective = selective | frozenset(range(num_layers))
    # A fully recomputed layer already recomputes its attention and its all-gathers.
    return {"full": full, "selective": selective - full, "comm": comm - full,
            "uniform_chunk": uniform}


def _values(config: Any, names) -> Dict[str, Any]:
    return {name: getattr(config, name, None) for name in names}


def model_values(config: Any) -> Dict[str, Any]:
    """The recompute fields of a TransformerConfig (or any object with those attributes)."""
    return _values(config, ("recompute_granularity", "recompute_method", "recompute_num_layers",
                            "select_recompute", "select_comm_recompute"))


def parallel_values(config: Any) -> Dict[str, Any]:
    """The recompute fields of a ModelParallelConfig (or any object with those attributes)."""
    return _values(config, RECOMPUTE_KEYS + ("recompute_config",))


def check_recompute_shapes(parallel: Dict[str, Any], model: Optional[Dict[str, Any]] = None, *,
                           pp_size: int = 1, vpp_size: Optional[int] = None,
                           num_layers: int = 1, sequence_parallel: Optional[bool] = None) -> None:
    """Resolve the settings for every pipeline stage and virtual chunk, so that a list of the
    wrong shape or a conflict is refused when the config is built, not in one worker.

    Args:
        parallel: as in :func:`resolve_recompute`.
        model: as in :func:`resolve_recompute` (None: parallel_config alone).
        pp_size: Pipeline stages.
        vpp_size: Virtual chunks per stage (None or 1: no interleaving).
        num_layers: Layers per chunk, where known (only bounds the sets; shapes do not need it).
        sequence_parallel: parallel_config.sequence_parallel; False refuses communication
            recomputation (None: not checked).

    Raises:
        ConfigValueError: as :func:`resolve_recompute`; select_comm_recompute without sequence
            parallelism (it recomputes the sequence-parallel all-gather, of which there is none).
    """
    if sequence_parallel is False:
        rc = parallel.get("recompute_config") or {}
        for config, field, value in (("TransformerConfig", "select_comm_recompute",
                                      (model or {}).get("select_comm_recompute")),
                                     ("ModelParallelConfig", "select_comm_recompute",
                                      parallel.get("select_comm_recompute")),
                                     ("ModelParallelConfig", "recompute_config.select_comm_recompute",
                                      rc.get("select_comm_recompute") if isinstance(rc, dict) else None)):
            if value not in (None, False, 0, "", [], "False"):
                raise ConfigValueError(
                    config, field, value, "None/False while parallel_config.sequence_parallel is False",
                    "communication recomputation re-runs the sequence-parallel all-gather in the "
                    "backward; without sequence_parallel the layers have no all-gather to recompute")
    vpp = vpp_size if vpp_size and vpp_size > 1 else 1
    for v in range(vpp):
        for p in range(pp_size):
            resolve_recompute(model or {}, parallel, num_layers=num_layers, pp_rank=p,
                              pp_size=pp_size, vpp_rank=v if vpp > 1 else None, vpp_size=vpp)
