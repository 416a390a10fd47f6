"""Compiled execution of the training step (``mindspore.jit``) and when it is used.

PyNative mode launches every operator from Python; on a small model that launch overhead, not the
arithmetic, sets the step time (see docs/performance.md). The training loop therefore compiles what
it can with ``mindspore.jit`` (``capture_mode='ast'``):

* the model chunk's ``construct`` as one graph. It runs inside the schedule's PyNative
  ``value_and_grad``, which differentiates the graph as a whole (its backward is compiled too),
  so any ``forward_step_func`` and schedule keep working. The graph computes exactly what the
  PyNative path computes (the same kernels; equal losses and gradients, measured).
* the optimizer's update of all parameters, and the gradient statistics (norm, finiteness), as
  graphs (see :mod:`mindspeed_ms.core.optimizer.optimizer`).

What cannot be compiled runs in PyNative mode, and the run says why once in the log:

* tensor and sequence parallelism compile: the region mappings switch to their graph collectives
  (``core.communication.graph_collectives``; sum-AllReduce compiles on CPU, sub-groups included);
* context or expert parallelism inside the model: their collectives (ring exchanges, uneven
  all-to-all with host-side split sizes) are still the eager ones;
* pipeline stages compile: a stage's input hidden states (``set_input_tensor``) are passed to
  the graph as an argument (``GPTModel.construct_with_input``), not read from an attribute, which
  a graph would freeze as a constant; the schedule and the transfers stay in Python;
* dropout and recomputation draw their masks from numpy random streams (exactly reproducible
  and checkpointable), which a graph would freeze as well;
* emulated float16/bfloat16 compute on CPU compiles: the casts that round to the low-precision
  type survive graph compilation (the same overflows and skipped steps under fp16 loss scaling;
  losses within a few units of the 6th digit, from the compiled kernel forms of ``core.fusions``);
* MoE layers, flash attention and end-of-document masks (host-side logic);
* a model that fails to compile: it falls back at its first call.

When: ``MINDSPEED_JIT`` = ``auto`` (default), ``1``/``on`` or ``0``/``off``/``pynative`` (the
switch for debugging: forces PyNative everywhere). Compiling costs a few seconds of CPU once per
model (about 2-8 s on the project's 2-core machine) and saves most of the launch overhead on every
step after that, so ``auto`` compiles a run of at least ``MINDSPEED_JIT_MIN_STEPS`` optimizer steps
(default 20, about the break-even on that machine) and runs shorter ones, such as most tests, in
PyNative mode.
"""

from __future__ import annotations

import dis
import enum
import hashlib
import logging
import os
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import mindspore as ms

from mindspeed_ms.core import fusions
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.tensor_parallel.mappings import use_graph_collectives
from mindspeed_ms.core.precision import native_low_precision_matmul

__all__ = ["JIT_ENV", "JIT_MIN_STEPS_ENV", "jit_setting", "jit_min_steps", "compile_decision",
           "model_compile_blockers", "compile_cell", "CompiledConstruct", "LAZY_INLINE_ENV",
           "LAZY_INLINE_NO_PIPELINE_ENV", "lazy_inline_decision", "lazy_inline_policy",
           "lazy_inline_key", "apply_lazy_inline"]

JIT_ENV = "MINDSPEED_JIT"
JIT_MIN_STEPS_ENV = "MINDSPEED_JIT_MIN_STEPS"
_DEFAULT_MIN_STEPS = 20

_ON = ("1", "on", "true", "yes", "jit", "graph")
_OFF = ("0", "off", "false", "no", "pynative", "eager")


def jit_setting() -> str:
    """``'auto'``, ``'on'`` or ``'off'`` from ``MINDSPEED_JIT``.

    Raises:
        ValueError: an unknown value.
    """
    value = os.environ.get(JIT_ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in _ON:
        return "on"
    if value in _OFF:
        return "off"
    raise ValueError(f"{JIT_ENV} must be 'auto', 'on'/'1' or 'off'/'0'/'pynative', got {value!r}")


def jit_min_steps() -> int:
    """Shortest run that ``auto`` compiles (``MINDSPEED_JIT_MIN_STEPS``, default 20)."""
    raw = os.environ.get(JIT_MIN_STEPS_ENV, "")
    try:
        return max(0, int(raw)) if raw.strip() else _DEFAULT_MIN_STEPS
    except ValueError:
        raise ValueError(f"{JIT_MIN_STEPS_ENV} must be an integer, got {raw!r}") from None


def compile_decision(training_iters: int) -> tuple:
    """Whether this run compiles, and why (for the log).

    Returns:
        ``(compile, reason)``.
    """
    setting = jit_setting()
    if setting == "off":
        return False, f"{JIT_ENV}={os.environ.get(JIT_ENV)} forces PyNative mode"
    if ms.get_context("mode") != ms.PYNATIVE_MODE:
        return False, "the run is in graph mode already"
    if setting == "on":
        return True, f"{JIT_ENV}={os.environ.get(JIT_ENV)}"
    minimum = jit_min_steps()
    if training_iters < minimum:
        return False, (f"{training_iters} steps are fewer than {JIT_ENV}_MIN_STEPS={minimum}: compiling would cost "
                       f"more than it saves (set {JIT_ENV}=1 to compile anyway)")
    return True, f"{JIT_ENV}=auto and {training_iters} steps >= {minimum}"


def model_compile_blockers(module, model_config=None) -> List[str]:
    """Reasons why ``module`` (a model chunk) must run in PyNative mode; empty when it compiles.

    Args:
        module: The model chunk (an ``nn.Cell``, usually a GPTModel).
        model_config: Its TransformerConfig (default: ``module.config``).
    """
    # a chunk that is no legacy Module may have no config: then only the checks on its cells apply
    config = model_config if model_config is not None else getattr(module, "config", None)
    reasons = []
    if ps.get_context_parallel_world_size() > 1:
        reasons.append("context parallelism (eager collectives inside attention)")
    if ps.get_expert_model_parallel_world_size() > 1:
        reasons.append("expert parallelism (eager all-to-all)")
    if ps.get_pipeline_model_parallel_world_size() > 1 and not _takes_stage_input_argument(module):
        reasons.append(f"pipeline parallelism ({type(module).__name__} takes its stage input only through "
                       "set_input_tensor, which a graph would freeze; GPTModel.construct_with_input takes it "
                       "as an argument)")
    if config is not None and int(config.moe_config.num_experts) > 1:
        reasons.append("MoE layers (host-side routing statistics)")
    if config is not None and (float(config.hidden_dropout) > 0 or float(config.attention_dropout) > 0):
        reasons.append("dropout (masks come from numpy random streams)")
    if (config is not None and config.recompute_granularity is not None) or any(
            getattr(cell, "recomputes", False) for _, cell in module.cells_and_names()):
        reasons.append("recomputation (replays numpy random streams)")
    if config is not None and bool(config.use_flash_attention):
        reasons.append("flash attention")
    if not native_low_precision_matmul() and any(p.dtype == ms.bfloat16 for p in module.get_parameters()):
        reasons.append("bfloat16 parameters on CPU (no bfloat16 Assign: the optimizer replaces their data)")
    if getattr(module, "eod", None) is not None:
        reasons.append("end-of-document masks built from the tokens on the host")
    if any(float(getattr(cell, "dropout_prob", 0.0) or 0.0) > 0 for _, cell in module.cells_and_names()
           if type(cell).__name__ == "LoraAdapter"):
        reasons.append("LoRA dropout (masks come from numpy random streams)")
    if jit_setting() != "on" and type(module).__name__ not in _KNOWN_TO_COMPILE:
        reasons.append(f"{type(module).__name__} is not known to compile (set {JIT_ENV}=1 to try)")
    return reasons


# Model classes whose constructs are written to compile (no parallel_state look-ups, numpy or
# eager-only collectives on the single-rank path). Others compile only when MINDSPEED_JIT=1.
_KNOWN_TO_COMPILE = ("GPTModel",)


class CompiledConstruct:
    """Calls a cell through its ``construct`` compiled with ``ms.jit``, or in PyNative if it cannot.

    The cell itself is left unchanged (calling it directly runs PyNative mode): MindSpore parses
    ``cell.construct`` when it compiles, so the compiled entry point is this callable, which the
    data-parallel wrapper calls instead of the cell (``DistributedDataParallel.forward_fn``).
    A graph is compiled per mode (training and evaluation are separate MindSpore phases). If the
    first call of a mode fails to compile, that mode calls the cell from then on and a warning
    says why; an error after a successful compilation is a real error and propagates.
    The cell's layers use their graph-only kernel forms
    (:func:`mindspeed_ms.core.fusions.use_graph_kernels`) while it compiles, and go back to the
    PyNative ones if no mode compiled.
    Its transformer layers are marked for ``mindspore.lazy_inline`` when
    :func:`lazy_inline_decision` says so (:func:`apply_lazy_inline`).

    Args:
        cell: The cell.
        logger: Where the fallback is reported.
        capture_mode: ``'ast'`` (the only mode that compiles the model here; ``'bytecode'`` fails
            on MindSpore 2.10 with "out of bci range" and falls back to eager).
    """

    def __init__(self, cell, logger: Optional[logging.Logger] = None, capture_mode: str = "ast"):
        self.cell = cell
        self.eager: Callable = cell
        # A pipeline stage's input (set_input_tensor) becomes the graph's first argument: a tensor
        # held in an attribute would be frozen into the graph as a constant.
        self.stage_input = ps.get_pipeline_model_parallel_world_size() > 1 and _takes_stage_input_argument(cell)
        target = cell.construct_with_input if self.stage_input else cell.construct
        # the first stage has no input: a placeholder keeps the graph's signature
        self.no_stage_input = ms.Tensor(np.zeros((1,), np.float32)) if self.stage_input else None
        self.compiled: Callable = ms.jit(target, capture_mode=capture_mode)
        self.logger = logger or logging.getLogger("mindspeed_ms")
        self.state: Dict[bool, str] = {}  # training flag -> 'compiled' | 'eager'
        fusions.use_graph_kernels(cell)
        # the region mappings' graph collectives (tensor/sequence parallelism): they also run
        # eagerly, so a mode that falls back to PyNative keeps them unless nothing compiled
        use_graph_collectives(cell)
        self.lazy_inline_layers = apply_lazy_inline(cell, self.logger)

    def __call__(self, *args, **kwargs):
        if not self.stage_input:
            return self._call(self.compiled, args, kwargs)
        received = self.cell.take_input_tensor()
        graph_input = self.no_stage_input if received is None else received

        def compiled(*a, **k):
            return self.compiled(graph_input, *a, **k)

        try:
            return self._call(compiled, args, kwargs, received)
        finally:
            self.cell.set_input_tensor(received)

    def _call(self, compiled, args, kwargs, stage_input=None):
        mode = bool(self.cell.training)
        state = self.state.get(mode)
        if state == "eager":
            return self._eager(args, kwargs, stage_input)
        if state == "compiled":
            return compiled(*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError, NameError, AttributeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if _pynative_grad_active():
                # A failed compilation inside value_and_grad leaves MindSpore's PyNative
                # differentiation without its top cell ("Can not find top cell for backward"),
                # so this step cannot continue eagerly: say how to run without compiling.
                raise RuntimeError(f"{type(self.cell).__name__} does not compile with mindspore.jit ({first}); "
                                   f"run with {JIT_ENV}=0 (PyNative mode)") from err
            self.state[mode] = "eager"
            if "compiled" not in self.state.values():
                fusions.use_graph_kernels(self.cell, enabled=False)  # the graph-only forms are slow eagerly
                use_graph_collectives(self.cell, enabled=False)  # the eager ones are timed
            self.logger.warning("compiled execution: %s (%s) does not compile (%s); it runs in PyNative mode",
                                type(self.cell).__name__, "training" if mode else "evaluation", first)
            return self._eager(args, kwargs, stage_input)
        self.state[mode] = "compiled"
        return out

    def _eager(self, args, kwargs, stage_input):
        if self.stage_input:
            self.cell.set_input_tensor(stage_input)
        return self.eager(*args, **kwargs)


def _takes_stage_input_argument(module) -> bool:
    """Whether ``module`` takes a pipeline stage's input as an argument (``construct_with_input``)."""
    return hasattr(module, "construct_with_input")


def _pynative_grad_active() -> bool:
    """Whether a PyNative ``grad``/``value_and_grad`` is recording right now."""
    try:
        from mindspore.graph.api import _pynative_executor  # pylint: disable=import-outside-toplevel

        return bool(_pynative_executor.requires_grad())
    except (ImportError, AttributeError):  # pragma: no cover - another MindSpore version
        return True


def compile_cell(cell, logger: Optional[logging.Logger] = None) -> CompiledConstruct:
    """The compiled entry point of ``cell`` (a :class:`CompiledConstruct`)."""
    return CompiledConstruct(cell, logger)


def describe(decision: Dict[str, Any]) -> str:
    """One log line from :func:`compile_decision` and the blockers found."""
    if not decision.get("compile"):
        return f"compiled execution off: {decision.get('reason')}"
    blockers = decision.get("blockers") or []
    if blockers:
        return "model in PyNative mode (" + "; ".join(blockers) + "); optimizer compiled"
    return "model chunk and optimizer compiled with mindspore.jit (" + str(decision.get("reason")) + ")"


LAZY_INLINE_ENV = "ENABLE_LAZY_INLINE"
LAZY_INLINE_NO_PIPELINE_ENV = "ENABLE_LAZY_INLINE_NO_PIPELINE"

# MindSpore's default lazy-inline policy keeps each reused layer a called subgraph down to the
# backend. The CPU backend of MindSpore 2.10 cannot run such a call (measured: "Input[0] must be a
# Primitive ValueNode, but get ValueNode<FuncGraph> ..._construct", in forward and backward, under
# mindspore.jit and GRAPH_MODE alike), so elsewhere than on Ascend the layer is parsed once and
# inlined at the front end (policy "front"), which compiles and gives identical results.
_BACKEND_SUBGRAPH_DEVICES = ("Ascend",)


def lazy_inline_decision(pipeline_size: int, device_target: Optional[str] = None,
                         setting: Optional[bool] = None) -> tuple:
    """Whether compiled transformer layers use ``mindspore.lazy_inline``, and why (for the log).

    ``setting`` (``parallel_config.lazy_inline``) decides when it is not None. Otherwise the rules
    are MindFormers' (docs/performance.md, "Lazy inline"): on by default with pipeline parallelism
    (``pipeline_size > 1``); ``ENABLE_LAZY_INLINE=0`` switches it off;
    ``ENABLE_LAZY_INLINE_NO_PIPELINE=1`` switches it on without pipelining. The device decides the
    policy (:func:`lazy_inline_policy`), not whether it is on.

    Args:
        pipeline_size: The pipeline-parallel world size.
        device_target: ``'Ascend'``, ``'CPU'``, ... (default: MindSpore's context).
        setting: ``parallel_config.lazy_inline``: True, False or None (the environment rules).

    Returns:
        ``(enabled, reason)``.

    Raises:
        ValueError: an environment variable other than '0' or '1'.
    """
    off = os.environ.get(LAZY_INLINE_ENV, "").strip()
    no_pp = os.environ.get(LAZY_INLINE_NO_PIPELINE_ENV, "").strip()
    for name, value in ((LAZY_INLINE_ENV, off), (LAZY_INLINE_NO_PIPELINE_ENV, no_pp)):
        if value not in ("", "0", "1"):
            raise ValueError(f"{name} must be '0' or '1', got {value!r}")
    device = device_target if device_target is not None else ms.get_context("device_target")
    policy = lazy_inline_policy(device)
    how = ("reused subgraphs" if policy is None else
           f"policy 'front': parsed once, inlined at the front end, as the {device} backend cannot run "
           "reused subgraphs")
    if setting is not None:
        if not setting:
            return False, "parallel_config.lazy_inline=False"
        return True, f"lazy inline on the transformer layer (parallel_config.lazy_inline=True; {how})"
    if off == "0":
        return False, f"{LAZY_INLINE_ENV}=0 switches lazy inline off"
    if int(pipeline_size) <= 1 and no_pp != "1":
        return False, (f"no pipeline parallelism (set {LAZY_INLINE_NO_PIPELINE_ENV}=1 or "
                       "parallel_config.lazy_inline=True to use lazy inline without it)")
    why = f"pipeline size {pipeline_size}" if int(pipeline_size) > 1 else f"{LAZY_INLINE_NO_PIPELINE_ENV}=1"
    return True, f"lazy inline on the transformer layer ({why}; {how})"


def lazy_inline_policy(device_target: Optional[str] = None) -> Optional[str]:
    """The ``policy`` argument of ``mindspore.lazy_inline`` for this device.

    None (reused subgraphs down to the backend) on Ascend, ``'front'`` elsewhere (see above).
    """
    device = device_target if device_target is not None else ms.get_context("device_target")
    return None if device in _BACKEND_SUBGRAPH_DEVICES else "front"


# Attributes that differ between otherwise identical layers without entering their graphs:
# MindSpore's per-instance bookkeeping and the layer's index (the layer's graph reads its
# consequences, e.g. CoreAttention.coeff, which are part of the key).
_KEY_SKIP = frozenset(("_create_time", "_id", "_scope", "_cell_init_args", "_phase", "_compile_phase",
                       "_jit_graph_name", "layer_number", "lazy_inline_key"))
_PLAIN = (bool, int, float, str, type(None))


def _plain(value) -> Optional[str]:
    if isinstance(value, _PLAIN) or isinstance(value, enum.Enum):
        return repr(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return repr(value)
    if isinstance(value, ms.Tensor) and not isinstance(value, ms.Parameter):
        return f"Tensor{tuple(value.shape)}{value.dtype}:{hashlib.sha1(value.asnumpy().tobytes()).hexdigest()}"
    return None


def lazy_inline_key(layer) -> str:
    """A digest of everything in ``layer`` that can enter its compiled graph.

    MindSpore reuses one subgraph for every cell with the same lazy-inline key, whatever constants
    the cells hold (measured: four cells that differ only in a float attribute, given one key,
    all compute with the first one's value). The key therefore covers, for the layer and each
    cell inside it, the cell type, its plain attributes (numbers, strings, enums, tuples of them,
    constant tensors by content) and its parameters' shapes and dtypes; layers equal in all of
    these share a graph, any other difference gives them different graphs.
    """
    parts = []
    for name, cell in layer.cells_and_names():
        parts.append(f"{name}:{type(cell).__module__}.{type(cell).__qualname__}")
        for attr, value in sorted(vars(cell).items()):
            if attr in _KEY_SKIP:
                continue
            text = _plain(value)
            parts.append(f"{name}.{attr}={text}" if text is not None else f"{name}.{attr}:{type(value).__name__}")
        for pname, param in cell.parameters_and_names(expand=False):
            parts.append(f"{name}.{pname}:{tuple(param.shape)}{param.dtype}{param.requires_grad}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _built_layer_init(self):  # pylint: disable=unused-argument
    """What ``mindspore.lazy_inline`` wraps when it marks a layer after construction; the layer is
    built already, so there is nothing to run."""


_built_layer_init.__name__ = "__init__"  # the decorator accepts __init__ functions only


def apply_lazy_inline(module, logger: Optional[logging.Logger] = None,
                      device_target: Optional[str] = None) -> List[Any]:
    """Mark the transformer layers of ``module`` for ``mindspore.lazy_inline`` when the decision says so.

    Called when the model chunk is about to be compiled (:class:`CompiledConstruct`), after
    everything that changes the layers (LoRA, selective recomputation, graph kernel forms), so the
    key (:func:`lazy_inline_key`) sees the layers as they compile. The marking is MindSpore's own
    decorator applied to the built layer, with ``attrs`` naming the key; it only matters to graph
    compilation (PyNative calls are unchanged).

    Args:
        module: The model chunk.
        logger: Where the decision is logged (once per reason).
        device_target: Default: MindSpore's context.

    Returns:
        The marked layers (empty when lazy inline is off).
    """
    from mindspeed_ms.legacy.model.transformer import \
        ParallelTransformerLayer  # pylint: disable=import-outside-toplevel

    # any cell may be compiled (compile_cell); one without a model config follows the environment rule
    config = getattr(module, "config", None)
    setting = config.parallel_config.lazy_inline if config is not None else None
    enabled, reason = lazy_inline_decision(ps.get_pipeline_model_parallel_world_size(), device_target, setting)
    layers = [cell for _, cell in module.cells_and_names() if isinstance(cell, ParallelTransformerLayer)]
    if not layers:
        return []
    _log_once(logger, f"lazy inline {'on' if enabled else 'off'}: {reason}")
    if not enabled:
        return []
    mark = ms.lazy_inline(_built_layer_init, attrs="lazy_inline_key", policy=lazy_inline_policy(device_target))
    marked = []
    for layer in layers:
        _native_softmax(layer)
        unsafe = sorted({type(c).__name__ for _, c in layer.cells_and_names() if _bprop_reads_output(c)})
        if unsafe:
            _log_once(logger, f"lazy inline skipped on {type(layer).__name__}: it holds cells whose custom bprop "
                              f"reads the forward output ({', '.join(unsafe)}), which a shared layer graph gets wrong")
            continue
        layer.lazy_inline_key = lazy_inline_key(layer)
        mark(layer)
        marked.append(layer)
    return marked


def _log_once(logger: Optional[logging.Logger], message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        (logger or logging.getLogger("mindspeed_ms")).info("%s", message)


def _bprop_reads_output(cell) -> bool:
    """Whether ``cell`` has a custom ``bprop`` that uses its ``out`` argument.

    Under lazy inline MindSpore 2.10 hands such a bprop the output of the last call of the shared
    layer graph, not of its own call (measured: three stacked cells whose softmax bprop reads
    ``out`` get wrong gradients in all but the last; a bprop that reads only its inputs, and
    MindSpore's own softmax, are right).
    """
    bprop = getattr(type(cell), "bprop", None)
    code = getattr(bprop, "__code__", None)
    if code is None or code.co_argcount < 3:
        return False
    out_name = code.co_varnames[code.co_argcount - 2]  # bprop(self, *inputs, out, dout)
    for ins in dis.get_instructions(bprop):
        if ins.opname.startswith("LOAD_") and (ins.argval == out_name or
                                               (isinstance(ins.argval, tuple) and out_name in ins.argval)):
            return True
    return False


def _native_softmax(layer) -> None:
    """Attention softmax of a lazy-inline layer: MindSpore's kernel and backward (see
    :func:`_bprop_reads_output`; the CPU form's backward reads the forward output)."""
    for _, cell in layer.cells_and_names():
        if isinstance(cell, fusions.Softmax) and getattr(cell, "last_axis", None) is not None:
            cell.last_axis = None


_LOGGED: set = set()
