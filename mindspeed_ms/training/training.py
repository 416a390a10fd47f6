"""pretrain(): the training loop.

One step (Megatron's order, training-features.md sections 1, 2 and 5):

1. forward/backward over ``micro_batch_num`` micro-batches with the loss multiplied by the loss
   scale (gradients accumulate in the data-parallel storage);
2. gradient reduction over data-parallel ranks (once per step), unscaling folded into it, then the
   sequence-parallel and tied-embedding fix-ups;
3. overflow check on every rank's gradients, agreed over all ranks;
4. loss-scale update (static, dynamic or adaptive);
5. on overflow the update is skipped; otherwise the global gradient norm (logged unclipped),
   clipping, the optimizer step and the learning-rate schedule step.

Around it: evaluation every ``eval_interval`` steps, checkpoints every ``save_interval`` steps,
the guide's log line every ``log_interval`` steps, and the event stream (run_start, step, eval,
moe_tokens, checkpoint, run_end — written also when the run fails, before the error propagates).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.distributed import DistributedDataParallel, finalize_model_grads
from mindspeed_ms.core.optimizer import OptimizerParamScheduler, get_megatron_optimizer
from mindspeed_ms.core.pipeline_parallel.schedules import get_forward_backward_func
from mindspeed_ms.core.tensor_parallel.random import get_rng_tracker, model_parallel_seed
from mindspeed_ms.training import checkpointing, compilation, compile_cache
from mindspeed_ms.training.events import EventWriter, format_log_line
from mindspeed_ms.runtime import apply_deterministic
from mindspeed_ms.training.loss_scale import build_loss_scaler

__all__ = ["pretrain", "Trainer", "build_datasets", "default_get_batch", "default_forward_step",
           "initialize_parallel_from_config", "get_logger"]


class _CurrentStdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time.

    A plain ``StreamHandler(sys.stdout)`` keeps the stream of the moment it was created; after a notebook
    cell, pytest's capture or a redirect replaces ``sys.stdout``, its lines would go to a stale stream.
    """

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def get_logger() -> logging.Logger:
    """The training logger: ``<time> - INFO - <message>`` on stdout (msrun puts it in the worker log)."""
    logger = logging.getLogger("mindspeed_ms")
    if not logger.handlers:
        handler = _CurrentStdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def initialize_parallel_from_config(parallel_config, virtual_pipeline_size: Optional[int] = None) -> None:
    """``initialize_model_parallel`` with the sizes of a ModelParallelConfig.

    Args:
        parallel_config: The ModelParallelConfig.
        virtual_pipeline_size: Model chunks per pipeline rank as ``validate_for_world_size``
            derives them: from ``num_layers_per_virtual_pipeline_stage`` (Megatron's
            ``--num-layers-per-virtual-pipeline-stage``) or a per-chunk ``num_layer_list`` when
            ``virtual_pipeline_model_parallel_size`` is not given. Used only then.

    If the parallel groups exist already, only a derived virtual pipeline size is recorded
    (when none is set).
    """
    vpp = parallel_config.virtual_pipeline_model_parallel_size
    if vpp is None and virtual_pipeline_size is not None and virtual_pipeline_size > 1:
        vpp = virtual_pipeline_size
    if ps.model_parallel_is_initialized():
        if vpp is not None and ps.get_virtual_pipeline_model_parallel_world_size() is None:
            ps.set_virtual_pipeline_model_parallel_world_size(vpp)
        return
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel_config.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel_config.context_parallel_size,
        expert_model_parallel_size=parallel_config.expert_model_parallel_size,
        ulysses_degree_in_cp=parallel_config.ulysses_degree_in_cp
        if parallel_config.context_parallel_algo == "hybrid_cp_algo" else None)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def build_datasets(all_config):
    """Train and validation datasets from ``dataset_config`` (char, mmap or synthetic).

    Returns:
        ``(train_dataset, valid_dataset_or_None)``; each yields ``int32[seq_length + 1]`` samples.
    """
    from mindspeed_ms.core import datasets as D  # pylint: disable=import-outside-toplevel

    dc, mc, tc = all_config.dataset_config, all_config.model_config, all_config.training_config
    seq = int(dc.seq_length or mc.seq_length)
    seed = int(dc.seed if dc.seed is not None else (tc.seed or 1234))
    kind = dc.dataset_type
    if kind == "char":
        path = _data_path(dc, "char") or None
        val_fraction = _validation_fraction(dc.split)
        train = D.CharDataset(seq_length=seq, split="train", val_fraction=val_fraction, path=path, seed=seed,
                              num_samples=_lazy_samples(all_config))
        valid = D.CharDataset(seq_length=seq, split="validation", val_fraction=val_fraction, path=path,
                              seed=seed + 1, tokenizer=train.tokenizer) if val_fraction > 0 else None
        if train.vocab_size > mc.vocab_size:
            raise ValueError(f"model_config.vocab_size ({mc.vocab_size}) is smaller than the character vocabulary "
                             f"of {path or 'tinyshakespeare'} ({train.vocab_size})")
        return train, valid
    if kind == "mmap":
        if not dc.data_path:
            raise ValueError("dataset_config.data_path must name the <prefix> of a .bin/.idx token dataset "
                             "when dataset_type is 'mmap'")
        indexed = D.IndexedDataset(_data_path(dc, "mmap"))
        parts = D.split_documents(len(indexed), dc.split)
        train = D.GPTDataset(indexed, seq, num_samples=_train_samples(all_config), seed=seed, document_ids=parts[0])
        valid = D.GPTDataset(indexed, seq, num_samples=None, seed=seed + 1, document_ids=parts[1]) \
            if len(parts) > 1 and len(parts[1]) else None
        return train, valid
    if kind == "synthetic":
        return (D.SyntheticDataset(mc.vocab_size, seq, _lazy_samples(all_config), seed=seed),
                D.SyntheticDataset(mc.vocab_size, seq, 4096, seed=seed + 1))
    raise ValueError(f"dataset_config.dataset_type must be one of ['char', 'mmap', 'synthetic'], got {kind!r}")


def _data_path(dataset_config, kind: str):
    """``data_path``, looked up under ``dataset_dir`` first when it is relative.

    ``dataset_dir/data_path`` is used when it exists there (the file for 'char', the ``.bin`` of
    the prefix for 'mmap'); otherwise ``data_path`` as given (relative to the working directory),
    whose absence the dataset reports.
    """
    path = dataset_config.data_path
    if not isinstance(path, str) or not path or os.path.isabs(path) or not dataset_config.dataset_dir:
        return path
    inside = os.path.join(dataset_config.dataset_dir, path)
    probe = inside + ".bin" if kind == "mmap" else inside
    return inside if os.path.exists(probe) else path


def _validation_fraction(split) -> float:
    from mindspeed_ms.core.datasets import parse_split  # pylint: disable=import-outside-toplevel

    parts = parse_split(split)
    return float(parts[1]) if len(parts) > 1 else 0.0


def _global_batch(all_config) -> int:
    dc = all_config.dataset_config
    return int(dc.batch_size) * int(dc.micro_batch_num) * ps.get_data_parallel_world_size()


def _train_samples(all_config) -> int:
    tc = all_config.training_config
    return max(int(all_config.dataset_config.train_samples or 0), int(tc.training_iters or 1) * _global_batch(all_config))


# Random-window and synthetic datasets are lazy (sample i depends only on the seed and i), so their
# length need not follow the run length; a fixed, large one keeps the sampler state valid when a
# resumed run trains for more steps than the first one planned.
_LAZY_DATASET_SAMPLES = 1 << 24


def _lazy_samples(all_config) -> int:
    return int(all_config.dataset_config.train_samples or 0) or _LAZY_DATASET_SAMPLES


def default_get_batch(data_iterator) -> Dict[str, Tensor]:
    """Next micro-batch as model inputs (tokens, position_ids, attention_mask, loss_mask, labels)."""
    batch = next(data_iterator)
    if isinstance(batch, dict):
        return {k: (None if v is None else (v if isinstance(v, Tensor) else Tensor(v))) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        names = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
        return {k: (None if v is None else Tensor(v)) for k, v in zip(names, batch)}
    raise TypeError(f"a batch must be a dict of model inputs or a tuple (tokens, labels, loss_mask, ...), got "
                    f"{type(batch).__name__}")


def default_forward_step(data_iterator, model, get_batch_func: Callable = default_get_batch):
    """Megatron's forward step for GPTModel: the model returns the loss when labels are given."""
    batch = get_batch_func(data_iterator)
    output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"),
                   batch.get("loss_mask"), labels=batch.get("labels"))
    return output, None


class _MicroBatches:
    """Iterator over the micro-batches of one step built from dataset indices."""

    def __init__(self, dataset, index_batches: Sequence[np.ndarray], dataset_config):
        from mindspeed_ms.core.datasets import build_model_inputs  # pylint: disable=import-outside-toplevel

        self._items = []
        eod = dataset_config.eos_token_id
        needs_eod = dataset_config.reset_position_ids or dataset_config.reset_attention_mask \
            or dataset_config.eod_mask_loss
        for indices in index_batches:
            samples = np.stack([np.asarray(dataset[int(i)], np.int32) for i in indices])
            inputs = build_model_inputs(samples, eod_token=eod if needs_eod else None,
                                        eod_mask_loss=dataset_config.eod_mask_loss,
                                        reset_position_ids=dataset_config.reset_position_ids,
                                        reset_attention_mask=dataset_config.reset_attention_mask,
                                        build_attention_mask=bool(dataset_config.reset_attention_mask),
                                        pad_token=dataset_config.pad_token_id)
            self._items.append(inputs)
        self._pos = 0

    @classmethod
    def from_items(cls, items) -> "_MicroBatches":
        """The micro-batches ``items`` as they are (already model inputs)."""
        batches = cls.__new__(cls)
        batches._items = list(items)
        batches._pos = 0
        return batches

    @property
    def items(self) -> list:
        """The micro-batches of the step."""
        return self._items

    def __iter__(self):
        return self

    def __next__(self):
        if self._pos >= len(self._items):
            raise StopIteration
        item = self._items[self._pos]
        self._pos += 1
        return item


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------

class Trainer:
    """Everything one training run needs, built from an AllConfig (see :func:`pretrain`)."""

    def __init__(self, all_config, model_provider_func: Callable, forward_step_func: Optional[Callable] = None,
                 get_batch_func: Optional[Callable] = None, train_data_loader: Optional[Iterable] = None,
                 valid_data_loader: Optional[Iterable] = None,
                 train_valid_test_datasets_provider: Optional[Callable] = None,
                 step_callbacks: Sequence[Callable] = ()):
        from mindspeed_ms.core.config import validate_for_world_size  # pylint: disable=import-outside-toplevel
        from mindspeed_ms.core.config.effects import report_device_bound  # pylint: disable=import-outside-toplevel

        self.all_config = all_config
        self.tc = all_config.training_config
        self.dc = all_config.dataset_config
        self.mc = all_config.model_config
        self.oc = all_config.optimizer_config
        self.logger = get_logger()
        # before anything runs: MindSpore's deterministic kernels and reduction order
        apply_deterministic(bool(all_config.parallel_config.deterministic_mode), self.logger)
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()
        # the layout rules first: their messages name the fields, and they derive the virtual
        # pipeline size that num_layers_per_virtual_pipeline_stage asks for
        sizes = validate_for_world_size(all_config, self.world_size)
        initialize_parallel_from_config(all_config.parallel_config, sizes["virtual_pipeline_size"])
        # Ascend-only switches the user set are named once, so that none is ignored silently.
        report_device_bound(all_config, comm.device_target(), self.logger)
        self.output_dir = self.tc.output_dir
        self.events = EventWriter(self.output_dir, self.rank)
        self.step_callbacks = list(step_callbacks)
        self.seed = int(self.tc.seed if self.tc.seed is not None else 1234)
        model_parallel_seed(self.seed)
        self.get_batch_func = get_batch_func or default_get_batch
        self.forward_step_func = forward_step_func or (
            lambda it, model: default_forward_step(it, model, self.get_batch_func))
        iters = self._training_iters()
        self.training_iters = iters
        compile_now, reason = compilation.compile_decision(iters)
        self.compilation: Dict[str, Any] = {"compile": compile_now, "reason": reason, "blockers": []}
        self.model = self._build_model(model_provider_func)
        params = [p for chunk in self.model for p in chunk.params]
        # ZeRO level z1 (optimizer states sharded) is what the distributed optimizer does.
        distributed = bool(self.tc.use_distributed_optimizer) or \
            all_config.parallel_config.zero_level == "z1"
        self.optimizer = get_megatron_optimizer(self.oc, params, self.tc.grad_clip_kwargs,
                                                use_distributed_optimizer=distributed)
        if compile_now:
            self.optimizer.enable_compiled_update()
        self.logger.info(compilation.describe(self.compilation))
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, max_lr=self.oc.learning_rate, min_lr=self.oc.min_lr,
            lr_warmup_iters=self.oc.lr_warmup_iters, lr_decay_iters=self.oc.lr_decay_iters or iters,
            lr_decay_style=self.oc.lr_decay_style, lr_wsd_decay_iters=self.oc.lr_wsd_decay_iters,
            lr_wsd_decay_style=self.oc.lr_wsd_decay_style,
            start_weight_decay=self.oc.start_weight_decay if self.oc.start_weight_decay is not None
            else self.oc.weight_decay,
            end_weight_decay=self.oc.end_weight_decay if self.oc.end_weight_decay is not None
            else self.oc.weight_decay,
            weight_decay_incr_iters=iters, weight_decay_incr_style=self.oc.weight_decay_incr_style,
            use_checkpoint_opt_param_scheduler=self.oc.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=self.oc.override_opt_param_scheduler)
        # one resolved view of the loss scaling: the fields, scale_sense, or fp16's dynamic default
        self.scaler = build_loss_scaler(self.tc.loss_scale_settings())
        self.loss_scale_param = Parameter(Tensor(self.scaler.get_loss_scale() if self.scaler else 1.0, ms.float32),
                                          name="loss_scale", requires_grad=False)
        self._setup_data(train_data_loader, valid_data_loader, train_valid_test_datasets_provider)
        if self.tc.eval_metric is not None and self.valid_dataset is None and self.valid_loader_source is None:
            raise ValueError(f"training_config.eval_metric={self.tc.eval_metric!r} needs validation data: a "
                             f"dataset_config.split with a validation part, or valid_data_loader")
        # the best eval_metric value so far and its step (restored on resume)
        self.best_metric: Optional[Dict[str, Any]] = None
        self.step = 0
        self.moe_hooks = _moe_hooks(self.model, self)

    # -------------------------------------------------------------------------------- building
    def _build_model(self, model_provider_func) -> List[DistributedDataParallel]:
        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        chunks = []
        for v in range(vpp or 1):
            if vpp is not None:
                ps.set_virtual_pipeline_model_parallel_rank(v)
            module = model_provider_func(pre_process=ps.is_pipeline_first_stage(),
                                         post_process=ps.is_pipeline_last_stage())
            lora_config = self.all_config.lora_config
            if lora_config.use_lora:
                from mindspeed_ms.core.tensor_parallel.lora import apply_lora  # pylint: disable=import-outside-toplevel

                adapted = apply_lora(module, lora_config)
                self.logger.info("LoRA adapters on %d cells; base weights frozen", len(adapted))
            if vpp is not None:
                # every chunk names its parameters alike; gradients, optimizer state and
                # checkpoints are keyed by name, so each chunk gets its own prefix
                for param in module.get_parameters():
                    param.name = f"model_chunk{v}.{param.name}"
            module.set_train(True)
            chunk = DistributedDataParallel(module, wrap_with_ddp=bool(self.tc.wrap_with_ddp),
                                            bucket_size=self.tc.bucket_size, grad_dtype=self._grad_dtype())
            if self.compilation["compile"]:
                chunk.use_compiled_buffers()
                blockers = compilation.model_compile_blockers(module, self.mc)
                self.compilation["blockers"] = blockers
                if not blockers:
                    chunk.forward_fn = compilation.compile_cell(module, self.logger)
            chunks.append(chunk)
        if vpp is not None:
            ps.set_virtual_pipeline_model_parallel_rank(0)
        return chunks

    def _grad_dtype(self):
        """dtype of gradient accumulation and reduction, as Megatron chooses its gradient buffers.

        float32 with ``accumulate_allreduce_grads_in_fp32``; otherwise the dtype Megatron's
        parameters have, float16 under ``fp16`` (the parameters here stay float32, like Megatron's
        float32 main copy). ``bf16`` always accumulates in float32 (Megatron switches
        ``accumulate_allreduce_grads_in_fp32`` on for bfloat16).
        """
        if self.tc.fp16 and not self.tc.accumulate_allreduce_grads_in_fp32:
            return ms.float16
        return None

    def _training_iters(self) -> int:
        iters = int(self.tc.training_iters or 0)
        if iters <= 0 and self.tc.epochs:
            samples = int(self.dc.train_samples or 0)
            if samples <= 0:
                raise ValueError("training_config.epochs needs dataset_config.train_samples (or set training_iters)")
            iters = int(self.tc.epochs) * max(1, samples // _global_batch(self.all_config))
        if iters <= 0:
            raise ValueError(f"training_config.training_iters must be positive (or set epochs), got "
                             f"{self.tc.training_iters}")
        return iters

    def _setup_data(self, train_data_loader, valid_data_loader, provider):
        from mindspeed_ms.core.datasets import DataParallelBatchSampler  # pylint: disable=import-outside-toplevel

        self.train_loader = iter(train_data_loader) if train_data_loader is not None else None
        self.valid_loader_source = valid_data_loader
        self._loader_pool: Optional[ThreadPoolExecutor] = None
        self._prefetched: Dict[int, Any] = {}
        self.train_dataset = self.valid_dataset = None
        self.sampler = None
        if self.train_loader is not None:
            return
        if provider is not None:
            datasets = provider([_train_samples(self.all_config), 0, 0])
            self.train_dataset = datasets[0]
            self.valid_dataset = datasets[1] if len(datasets) > 1 else None
        else:
            self.train_dataset, self.valid_dataset = build_datasets(self.all_config)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.sampler = DataParallelBatchSampler(
            len(self.train_dataset), self.dc.batch_size, self.dc.micro_batch_num, dp, dp_rank,
            drop_remainder=bool(self.dc.drop_remainder), shuffle=bool(self.dc.shuffle), seed=int(self.dc.seed or 0))
        if int(self.dc.num_workers or 0) > 0:
            self._loader_pool = ThreadPoolExecutor(max_workers=int(self.dc.num_workers),
                                                   thread_name_prefix="mindspeed-data")

    def _micro_batch_iterator(self) -> Iterator:
        if self.train_loader is not None:
            return self.train_loader
        self.current_epoch = self.sampler.epoch
        batches = self._batches_of_step(self.sampler.step)
        self.sampler.set_consumed_samples(self.sampler.consumed_samples + self.sampler.global_batch_size)
        return batches

    def _batches_of_step(self, step: int) -> "_MicroBatches":
        """The micro-batches of sampler step ``step``, read by the data workers when there are any.

        ``dataset_config.num_workers`` > 0: a pool of that many threads reads and assembles the
        samples of the next ``num_workers`` steps while the current one trains (the sample indices
        are fixed by the sampler, so the batches are the same as without workers); 0 reads them
        here, when the step starts. Threads, not processes: the datasets are numpy arrays and
        memory maps whose reads release the interpreter lock.
        """
        def indices(s):
            return self.sampler.micro_batches(self.sampler.local_batch(s))

        if self._loader_pool is None:
            return _MicroBatches(self.train_dataset, indices(step), self.dc)
        future = self._prefetched.pop(step, None)
        for stale in [s for s in self._prefetched if s < step]:  # a resume moved the sampler back
            self._prefetched.pop(stale).cancel()
        if future is None:
            future = self._loader_pool.submit(_MicroBatches, self.train_dataset, indices(step), self.dc)
        for ahead in range(step + 1, step + 1 + int(self.dc.num_workers)):
            if ahead not in self._prefetched:
                self._prefetched[ahead] = self._loader_pool.submit(_MicroBatches, self.train_dataset,
                                                                   indices(ahead), self.dc)
        return future.result()

    def _close_loader(self) -> None:
        if self._loader_pool is not None:
            self._loader_pool.shutdown(wait=False, cancel_futures=True)
            self._loader_pool = None
            self._prefetched = {}

    # ---------------------------------------------------------------------------------- a step
    def train_step(self) -> Dict[str, Any]:
        """One optimizer step; returns the step's metrics."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        scale = float(self.scaler.get_loss_scale()) if self.scaler else 1.0
        forward_backward = get_forward_backward_func()
        set_moe_loss_scale(scale)
        data, weights, token_counts = self._step_data()
        losses = forward_backward(
            forward_step_func=self.forward_step_func, data_iterator=data,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=int(self.dc.micro_batch_num), seq_length=self.mc.seq_length,
            micro_batch_size=int(self.dc.batch_size), forward_only=False, loss_scale=scale,
            loss_weights=weights)
        grads = finalize_model_grads(self.model, grad_scale=1.0 / scale)
        found_inf = _global_overflow(grads, self.model)
        overflow = found_inf
        if self.scaler is not None:
            self.scaler(self.loss_scale_param, found_inf)
        elif found_inf and self.tc.check_for_nan_in_grad:
            raise RuntimeError(f"non-finite gradients at step {self.step + 1} (check_for_nan_in_grad is set)")
        lr = float(self.scheduler.lr)
        grad_norm = None
        if not overflow:
            grads, grad_norm = self.optimizer.clip_and_norm(grads)
            self.optimizer.step(grads)
            self.scheduler.step()
        if token_counts is not None:
            loss = _reduce_per_token_loss(losses, *token_counts)
        elif self.tc.loss_reduction == "sum":
            loss = _reduce_loss(losses, reduction="sum")
        else:
            loss = _reduce_loss(losses)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "overflow": bool(overflow), "loss_scale_used": scale}

    def _per_token_weights(self, data):
        """The micro-batches of ``data``, their per-token weights and ``(counts, total)``.

        ``total`` is the number of counted tokens over the micro-batches of all data-parallel ranks.
        """
        items = data if isinstance(data, _MicroBatches) else \
            _MicroBatches.from_items([next(data) for _ in range(int(self.dc.micro_batch_num))])
        counts = [_loss_token_count(item) for item in items.items]
        group = ps.get_data_parallel_group()
        total = float(sum(counts))
        if group.size > 1:
            total = float(comm.all_reduce(Tensor(np.array([total], np.float32)), group).asnumpy()[0])
        if total <= 0:
            raise ValueError(f"calculate_per_token_loss: a batch of step {self.step + 1} has no unmasked token "
                             "(every loss_mask entry is 0)")
        dp = ps.get_data_parallel_world_size()
        return items, [c * dp / total for c in counts], (counts, total)

    def _step_data(self):
        """The step's micro-batches, the weight of each one's loss, and the token counts.

        Megatron's reductions of the micro-batch losses (each micro-batch's loss is the mean over
        its unmasked tokens):

        * ``loss_reduction: mean`` (default): weight ``1 / micro_batch_num`` each; gradients are
          the mean over micro-batches (and over data-parallel ranks).
        * ``loss_reduction: sum``: weight 1 each; gradients are the sum over micro-batches.
        * ``calculate_per_token_loss``: the step's loss is the sum over every unmasked token of the
          step divided by their number over all micro-batches and data-parallel ranks, so a
          micro-batch with more tokens counts more. Its weight is ``n_i * dp / N`` (``n_i`` its
          tokens, ``N`` the step's total; ``dp`` undoes the mean of the data-parallel reduction).

        Returns:
            ``(iterator, weights or None, (local counts, global total) or None)``.
        """
        data = self._micro_batch_iterator()
        num = int(self.dc.micro_batch_num)
        if self.tc.calculate_per_token_loss:
            return self._per_token_weights(data)
        if self.tc.loss_reduction == "sum":
            return data, [1.0] * num, None
        return data, None, None

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> Optional[float]:
        """Mean validation loss over ``eval_iters`` batches (averaged over data-parallel ranks; with
        ``calculate_per_token_loss`` the mean over every counted token of those batches)."""
        if self.valid_dataset is None and self.valid_loader_source is None:
            return None
        for chunk in self.model:
            chunk.module.set_train(False)
        try:
            forward_backward = get_forward_backward_func()
            total, count = 0.0, 0
            iterator = iter(self.valid_loader_source) if self.valid_loader_source is not None else None
            dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            per_rank = int(self.dc.batch_size) * int(self.dc.micro_batch_num)
            for i in range(int(self.tc.eval_iters or 1)):
                if iterator is None:
                    start = (i * dp + dp_rank) * per_rank
                    indices = [(start + j) % len(self.valid_dataset) for j in range(per_rank)]
                    micro = np.asarray(indices).reshape(int(self.dc.micro_batch_num), int(self.dc.batch_size))
                    data = _MicroBatches(self.valid_dataset, list(micro), self.dc)
                else:
                    data = iterator
                token_counts = None
                if self.tc.calculate_per_token_loss:
                    data, _, token_counts = self._per_token_weights(data)
                losses = forward_backward(forward_step_func=self.forward_step_func, data_iterator=data,
                                          model=self.model if len(self.model) > 1 else self.model[0],
                                          num_microbatches=int(self.dc.micro_batch_num),
                                          seq_length=self.mc.seq_length, micro_batch_size=int(self.dc.batch_size),
                                          forward_only=True)
                if token_counts is not None:
                    # Megatron's per-token evaluation: every counted token of every batch weighs alike
                    value = _reduce_per_token_loss(losses, *token_counts)
                    weight = token_counts[1]
                else:
                    value, weight = _reduce_loss(losses), 1.0
                if value is not None:
                    total += value * weight
                    count += weight
            return total / count if count else None
        finally:
            for chunk in self.model:
                chunk.module.set_train(True)

    # --------------------------------------------------------------------------------- checkpoints
    def _checkpoint_state(self):
        """``(tensors, meta)`` of this rank's training state at the current step."""
        if self.moe_hooks is not None:
            self.moe_hooks.before_checkpoint()
        tensors = {p.name: p.asnumpy() for chunk in self.model for p in chunk.module.get_parameters()}
        opt_tensors, opt_meta = self.optimizer.state_dict()
        tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
        meta = {"optimizer": opt_meta, "scheduler": self.scheduler.state_dict(),
                "loss_scale": self.scaler.state_dict() if self.scaler else None,
                "sampler": self.sampler.state_dict() if self.sampler else None,
                "rng": _jsonable_rng(get_rng_tracker().get_states()),
                "parallel": ps.get_parallel_sizes(), "world_size": self.world_size,
                "best_metric": self.best_metric}
        return tensors, meta

    def save(self) -> None:
        """Write this rank's checkpoint of the current step."""
        tensors, meta = self._checkpoint_state()
        path = checkpointing.save_checkpoint(self.output_dir, self.rank, self.step, tensors, meta,
                                             prefix=self.tc.prefix, ckpt_format=self.tc.ckpt_format,
                                             crc_check=bool(self.tc.crc_check),
                                             keep_checkpoint_max=int(self.tc.keep_checkpoint_max))
        self.events.checkpoint(self.step, str(path))
        self.logger.info("saved checkpoint of step %d to %s", self.step, path)

    def best_dir(self) -> str:
        """Where the best checkpoint by ``eval_metric`` is kept: ``<output_dir>/best`` (a run
        directory of its own: ``checkpointing.load_checkpoint(best_dir, rank)`` and
        ``load_checkpoint: <output_dir>/best`` read it)."""
        return os.path.join(self.output_dir, "best")

    def _keep_if_best(self, val_loss: float) -> bool:
        """Save the best checkpoint when this evaluation's ``eval_metric`` beats the best so far.

        The comparison is ``best_metric_comparison`` (default ``less``) of the new value against
        the best one; the first evaluation always counts. Every rank evaluates the same
        data-parallel mean, so all ranks decide alike.
        """
        name = self.tc.eval_metric
        if name is None:
            return False
        value = _eval_metric_value(name, val_loss)
        comparison = self.tc.best_metric_comparison or "less"
        best = self.best_metric
        if best is not None and not _COMPARISONS[comparison](value, best["value"]):
            return False
        self.best_metric = {"name": name, "value": value, "step": self.step, "comparison": comparison}
        tensors, meta = self._checkpoint_state()
        path = checkpointing.save_checkpoint(self.best_dir(), self.rank, self.step, tensors, meta,
                                             prefix=self.tc.prefix, ckpt_format=self.tc.ckpt_format,
                                             crc_check=bool(self.tc.crc_check), keep_checkpoint_max=1)
        self.logger.info("best %s %.6f at step %d: saved to %s", name, value, self.step, path)
        return True

    def resume(self) -> bool:
        """Load the latest checkpoint every rank has (resume_training / load_checkpoint)."""
        source = self.tc.load_checkpoint or (self.output_dir if self.tc.resume_training else "")
        if not source:
            return False
        mine = checkpointing.latest_step(source, self.rank)
        # agree on the newest step that every rank has completely written
        agreed = comm.all_reduce(Tensor(np.array([-1 if mine is None else mine], np.int64)), op="min")
        step = int(agreed.asnumpy()[0])
        if step < 0:
            if self.tc.load_checkpoint:
                raise checkpointing.CheckpointError(f"load_checkpoint={self.tc.load_checkpoint!r}: no complete "
                                                    f"checkpoint for every rank")
            self.logger.info("resume_training: no checkpoint in %s, starting from scratch", source)
            return False
        tensors, meta = checkpointing.load_checkpoint(source, self.rank, step, prefix=self.tc.prefix)
        for chunk in self.model:
            for p in chunk.module.get_parameters():
                if p.name not in tensors:
                    raise checkpointing.CheckpointError(f"parameter {p.name} missing from the checkpoint of step {step}")
                p.set_data(Tensor(tensors[p.name]).astype(p.dtype))
        if not self.tc.no_load_optim:
            self.optimizer.load_state_dict({k[len("optimizer."):]: v for k, v in tensors.items()
                                            if k.startswith("optimizer.")}, meta["optimizer"])
            self.scheduler.load_state_dict(meta["scheduler"])
            if self.scaler is not None and meta.get("loss_scale"):
                self.scaler.load_state_dict(meta["loss_scale"], loss_scale=self.loss_scale_param)
        if meta.get("best_metric") and meta["best_metric"].get("name") == self.tc.eval_metric:
            self.best_metric = meta["best_metric"]
        if self.sampler is not None and meta.get("sampler") and not self.tc.new_dataset:
            self.sampler.load_state_dict(meta["sampler"])
        if not self.tc.no_load_rng and meta.get("rng"):
            get_rng_tracker().set_states(_rng_from_json(meta["rng"]))
        self.step = step
        self.logger.info("resumed from step %d (%s)", step, source)
        return True

    # ------------------------------------------------------------------------------------- run
    def run(self) -> Dict[str, Any]:
        """Train for ``training_iters`` steps; returns the last metrics."""
        tc = self.tc
        self.events.run_start(self.world_size, ps.get_parallel_sizes(), _config_dict(self.all_config),
                              training_iters=self.training_iters)
        status, error = "success", None
        last: Dict[str, Any] = {}
        # training_config.enable_compile_cache: MindSpore's cache of the graphs compiled in this run
        cache = compile_cache.activate(self.all_config, self.rank, self.world_size,
                                       bool(self.compilation["compile"]), self.logger)
        try:
            self.resume()
            tokens_per_step = _global_batch(self.all_config) * int(self.mc.seq_length)
            profiler = _Profiler(self.tc, self.output_dir)
            while self.step < self.training_iters:
                profiler.before_step(self.step + 1)
                start = time.perf_counter()
                metrics = self.train_step()
                self.step += 1
                elapsed = time.perf_counter() - start
                profiler.after_step(self.step)
                metrics["step_time_ms"] = elapsed * 1000.0
                metrics["tokens_per_s"] = tokens_per_step / elapsed if elapsed > 0 else 0.0
                last = metrics
                self._after_step(metrics)
                if tc.eval_interval and self.step % int(tc.eval_interval) == 0:
                    self._run_eval()
                if tc.save_interval and self.step % int(tc.save_interval) == 0:
                    self.save()
            if tc.eval_interval and self.step % int(tc.eval_interval) != 0:
                self._run_eval()
            if self.moe_hooks is not None:
                self.moe_hooks.on_train_end()
        except KeyboardInterrupt as err:
            status, error = "stopped", err
            raise
        except BaseException as err:  # noqa: B902 - write the failure, then let it propagate
            status, error = "failed", err
            self.logger.error("training failed at step %d: %s\n%s", self.step + 1, err, traceback.format_exc())
            raise
        finally:
            cache.close(status == "success")
            self._close_loader()
            self.events.run_end(status, error, step=self.step)
            self.events.close()
        return last

    def _after_step(self, metrics):
        scale = float(self.scaler.get_loss_scale()) if self.scaler else None
        window = getattr(self.scaler, "current_window", None) if self.scaler else None
        epoch = getattr(self, "current_epoch", 0)
        extra = {}
        if self.moe_hooks is not None:
            extra = self.moe_hooks.on_step_end(self.step, self.events)
        self.events.step(epoch, self.step, metrics["loss"], metrics["lr"], metrics["grad_norm"], scale, window,
                         metrics["overflow"], metrics["step_time_ms"], metrics["tokens_per_s"],
                         loss_scale_used=metrics["loss_scale_used"], **extra)
        for callback in self.step_callbacks:
            callback(self.step, metrics)
        interval = int(self.tc.log_interval or 1)
        if self.step % interval == 0 or self.step == 1:
            self.logger.info(format_log_line(epoch, self.step, metrics["loss"], metrics["step_time_ms"],
                                             finite_grads=not metrics["overflow"], loss_scale=scale,
                                             learning_rate=metrics["lr"], grad_norm=metrics["grad_norm"]))

    def _run_eval(self):
        val = self.evaluate()
        if val is None:
            return
        self.events.eval(self.step, val)
        self.logger.info("Validation at step %d: val_loss %.6f", self.step, val)
        self._keep_if_best(val)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _global_overflow(grads: Dict[str, Tensor], model) -> bool:
    """Whether any rank has a non-finite gradient (agreed over all ranks)."""
    local = False
    for chunk in model:
        if not chunk.grads_finite():
            local = True
            break
    flag = comm.all_reduce(Tensor(np.array([1.0 if local else 0.0], np.float32)), op="max")
    return bool(flag.asnumpy()[0] > 0)


_COMPARISONS = {"less": lambda new, best: new < best, "less_equal": lambda new, best: new <= best,
                "greater": lambda new, best: new > best, "greater_equal": lambda new, best: new >= best}


def _eval_metric_value(name: str, val_loss: float) -> float:
    """The value of ``eval_metric`` from the validation loss."""
    if name == "loss":
        return float(val_loss)
    if name == "perplexity":
        return float(np.exp(min(val_loss, 700.0)))  # exp overflows float64 beyond ~709
    raise ValueError(f"training_config.eval_metric must be one of ['loss', 'perplexity'], got {name!r}")


def _loss_token_count(batch) -> float:
    """Tokens of a micro-batch that count in the loss: its ``loss_mask`` sum (all labels without one)."""
    if isinstance(batch, dict):
        mask, labels = batch.get("loss_mask"), batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        mask, labels = (batch[2] if len(batch) > 2 else None), batch[1]
    else:
        raise TypeError(f"calculate_per_token_loss counts the tokens of each micro-batch from its loss_mask: a batch "
                        f"must be a dict of model inputs or a tuple (tokens, labels, loss_mask, ...), got "
                        f"{type(batch).__name__}")
    if mask is not None:
        return float(np.asarray(mask.asnumpy() if isinstance(mask, Tensor) else mask, np.float64).sum())
    if labels is None:
        raise ValueError("calculate_per_token_loss needs labels or a loss_mask in every micro-batch")
    return float(np.prod(labels.shape))


def _reduce_per_token_loss(losses, counts, total) -> Optional[float]:
    """Megatron's per-token loss: sum over every counted token of the step / their number."""
    has = 1.0 if losses else 0.0
    local = sum(float(l.asnumpy()) * c for l, c in zip(losses, counts)) if losses else 0.0
    group = ps.get_data_parallel_group()
    if group.size > 1:
        local, has = comm.all_reduce(Tensor(np.array([local, has], np.float32)), group).asnumpy().tolist()
    return local / total if has else None


def _reduce_loss(losses, reduction: str = "mean") -> Optional[float]:
    """Mean (or sum) over micro-batches, then the mean over data-parallel ranks (None where no loss
    is computed)."""
    if not losses:
        value, has = 0.0, 0.0
    else:
        values = [float(l.asnumpy()) for l in losses]
        value = float(np.sum(values) if reduction == "sum" else np.mean(values))
        has = 1.0
    group = ps.get_data_parallel_group()
    if group.size > 1:
        both = comm.all_reduce(Tensor(np.array([value * has, has], np.float32)), group)
        value, has = both.asnumpy().tolist()
        value = value / has if has else 0.0
    return value if has else None


def _config_dict(all_config) -> Dict[str, Any]:
    try:
        return all_config.to_dict()
    except Exception:  # pylint: disable=broad-except
        return {}


def _jsonable_rng(states):
    import json  # pylint: disable=import-outside-toplevel

    return json.loads(json.dumps(states, default=int))


def _rng_from_json(states):
    return states


class _Profiler:
    """MindSpore's Profiler for steps ``profile_step_start..profile_step_end`` when ``profile`` is set."""

    def __init__(self, training_config, output_dir):
        self.enabled = bool(training_config.profile)
        # kept as they were: a step 0 (the fields allow it) has always meant step 1 and step 5, and an
        # empty save path the output directory's profile folder (None is the field's derived value)
        self.start = int(training_config.profile_step_start or 1)
        self.end = int(training_config.profile_step_end or 5)
        self.path = training_config.profile_save_path or os.path.join(output_dir, "profile")
        self.tc = training_config
        self.profiler = None

    def before_step(self, step):
        if not self.enabled or step != self.start or self.profiler is not None:
            return
        from mindspeed_ms.training.profiling import start_profiler  # pylint: disable=import-outside-toplevel

        self.profiler = start_profiler(self.tc, self.path)

    def after_step(self, step):
        if self.profiler is not None and step >= self.end:
            from mindspeed_ms.training.profiling import stop_profiler  # pylint: disable=import-outside-toplevel

            stop_profiler(self.profiler, self.path)
            self.profiler = None
            self.enabled = False


_MOE_LOSS_SCALE = {"value": 1.0}


def set_moe_loss_scale(scale: float) -> None:
    """Tell the MoE auxiliary-loss scaler the loss scale of this step (no-op without MoE)."""
    try:
        from mindspeed_ms.legacy.model.moe import moe_utils  # pylint: disable=import-outside-toplevel
    except ImportError:
        return
    setter = getattr(moe_utils, "set_aux_loss_scale", None)
    if setter is not None:
        setter(scale)


def _moe_hooks(model, trainer):
    """The MoE per-step hooks (token counts, cold/hot experts), or None for dense models."""
    try:
        from mindspeed_ms.legacy.model.moe import training_hooks  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return training_hooks.build(model, trainer)


# ----------------------------------------------------------------------------------------------
# the documented entry point
# ----------------------------------------------------------------------------------------------

def pretrain(train_valid_test_datasets_provider, model_provider_func, model_type, forward_step_func=None,
             process_non_loss_data_func=None, **kwargs):
    """Pre-training entry point.

    Args:
        train_valid_test_datasets_provider: ``f([train, valid, test] sample counts) -> datasets``
            (optional: without it the datasets come from ``dataset_config``).
        model_provider_func: ``f(pre_process=True, post_process=True) -> model``.
        model_type: Model type (kept for API compatibility).
        forward_step_func: ``f(data_iterator, model) -> (output, loss_func)``; default: the
            model returns the loss.
        process_non_loss_data_func: Kept for API compatibility.
        **kwargs: ``all_config`` (required), ``train_data_loader`` / ``valid_data_loader``
            (iterables of micro-batches, instead of the datasets), ``get_batch_func``
            (``f(data_iterator) -> dict of model inputs``), ``step_callbacks``.

    Returns:
        The metrics of the last step.

    Raises:
        ValueError: ``all_config`` is not given.
    """
    del model_type, process_non_loss_data_func
    all_config = kwargs.get("all_config")
    if all_config is None:
        raise ValueError("pretrain() needs all_config=<AllConfig> in its keyword arguments")
    trainer = Trainer(all_config, model_provider_func, forward_step_func=forward_step_func,
                      get_batch_func=kwargs.get("get_batch_func"),
                      train_data_loader=kwargs.get("train_data_loader"),
                      valid_data_loader=kwargs.get("valid_data_loader"),
                      train_valid_test_datasets_provider=train_valid_test_datasets_provider,
                      step_callbacks=kwargs.get("step_callbacks", ()))
    return trainer.run()

