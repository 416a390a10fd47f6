"""Training runs that also report the final weights, for the pipeline equivalence tests.

Used in the test process (the single-process reference) and in the msrun workers
(``tests/mp/pipeline_cases.py``). Weights are compared through per-parameter statistics keyed by
layout-independent names: transformer layers by their global layer index, so the same key names
the same weight whichever stage, chunk or tensor-parallel rank holds it.
"""

import contextlib
import io
import re
import sys

import numpy as np
from mindspore import Tensor

STAT_NAMES = ("sum_sq", "sum", "sum_abs")
_LAYER_SUFFIX = re.compile(r"\.layers\.\d+\.(.+)$")
_CHUNK_PREFIX = re.compile(r"^model_chunk\d+\.")


def _key(param, layer_of):
    number = layer_of.get(id(param))
    if number is not None:
        match = _LAYER_SUFFIX.search(param.name)
        return f"layer{number - 1}.{match.group(1)}"
    name = _CHUNK_PREFIX.sub("", param.name)
    if name == "word_embeddings.weight":  # the last stage's copy of the tied embedding
        return "word_embeddings_copy"
    if name == "language_model.embedding.word_embeddings.weight":
        return "word_embeddings"
    return name


def weight_stats(chunks):
    """``{key: [sum of squares, sum, sum of |w|]}`` of every trainable weight of this rank's chunks.

    Tensor-parallel shards are summed over the tensor-parallel group, so every rank reports
    whole-weight values; the statistics do not depend on how fused weights are laid out.
    """
    from mindspeed_ms.core import communication as comm
    from mindspeed_ms.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    out = {}
    for chunk in chunks:
        module = chunk.module
        layer_of = {}
        encoder = getattr(module.language_model, "encoder", None)
        if encoder is not None:
            for layer in encoder.iter_layers():
                for p in layer.get_parameters():
                    layer_of[id(p)] = layer.layer_number
        for p in chunk.params:
            w = p.asnumpy().astype(np.float64)
            stats = np.array([np.sum(w * w), np.sum(w), np.sum(np.abs(w))])
            if getattr(p, "tensor_model_parallel", False) and tp_group.size > 1:
                stats = comm.all_reduce(Tensor(stats), tp_group).asnumpy()
            out[_key(p, layer_of)] = [float(v) for v in stats]
    return out


class _Tee(io.TextIOBase):
    """Writes through to ``stream`` and keeps a copy (the trainer logs to the current sys.stdout)."""

    def __init__(self, stream):
        super().__init__()
        self._stream = stream
        self.copy = io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self._stream.write(text)

    def flush(self):
        self._stream.flush()


def train(data):
    """Train with the config dict ``data`` in this process.

    Returns:
        ``{"steps": [per-step metrics], "weights": weight_stats, "pp_rank", "tp_rank", "dp_rank",
        "last_stage", "log_losses"}``; ``log_losses`` is the ``Loss:`` field of every step's log
        line, as printed (``None`` on stages without a loss).
    """
    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.core.config import init_configs_from_dict
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    from mindspeed_ms.training.training import Trainer

    ps.destroy_model_parallel()
    all_config = init_configs_from_dict(data)
    steps = []

    def provider(pre_process=True, post_process=True):
        return GPTModel(all_config.model_config, pre_process=pre_process, post_process=post_process)

    try:
        trainer = Trainer(all_config, provider,
                          step_callbacks=[lambda step, m: steps.append(
                              {"step": step, **{k: m[k] for k in ("loss", "lr", "grad_norm", "overflow")}})])
        tee = _Tee(sys.stdout)
        with contextlib.redirect_stdout(tee):
            trainer.run()
        log_losses = re.findall(r"Loss: (\S+?),?(?:\s|$)", tee.copy.getvalue())
        return {"steps": steps, "log_losses": log_losses, "weights": weight_stats(trainer.model),
                "pp_rank": ps.get_pipeline_model_parallel_rank(),
                "tp_rank": ps.get_tensor_model_parallel_rank(),
                "dp_rank": ps.get_data_parallel_rank(),
                "last_stage": ps.is_pipeline_last_stage(ignore_virtual=True)}
    finally:
        ps.destroy_model_parallel()
