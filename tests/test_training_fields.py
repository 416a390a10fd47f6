"""Training-config fields with Megatron semantics, tested by behaviour in one process: the precision
flags (fp16/bf16) and emulated bfloat16 on CPU."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import training_configs as T
from mindspeed_ms.core.config import ConfigValueError, init_configs_from_dict
from mindspeed_ms.training.events import read_events

ms.set_device("CPU")


def _losses(steps):
    return [s["loss"] for s in steps]


# ------------------------------------------------------------------------------------------------
# precision: fp16 / bf16 flags and emulated bfloat16
# ------------------------------------------------------------------------------------------------

def test_bfloat16_compute_trains_on_cpu_close_to_float32(tmp_path):
    settings = {"training_iters": 4}
    fp32 = _losses(T.run(T.make(tmp_path / "fp32", training_config=settings)))
    bf16 = _losses(T.run(T.make(tmp_path / "bf16", training_config=settings,
                                model_config={"compute_dtype": "bfloat16"})))
    assert len(bf16) == 4 and all(np.isfinite(bf16))
    assert bf16[-1] < bf16[0]
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9); the mean over 128 tokens
    # averages most of it out, so the loss stays within 1e-2 of float32 ...
    np.testing.assert_allclose(bf16, fp32, rtol=1e-2)
    # ... but it is rounded: not the float32 run
    assert bf16 != fp32


def test_bf16_flag_sets_the_compute_dtype_and_no_loss_scaling(tmp_path):
    flag = T.run(T.make(tmp_path / "flag", training_config={"training_iters": 4, "bf16": True}))
    explicit = T.run(T.make(tmp_path / "explicit", training_config={"training_iters": 4},
                            model_config={"compute_dtype": "bfloat16"}))
    assert _losses(flag) == _losses(explicit)
    events = read_events(tmp_path / "flag" / "events", kind="step")
    assert all(e["loss_scale"] is None and not e["overflow"] for e in events)
    config = init_configs_from_dict(T.make(tmp_path / "c", training_config={"bf16": True}))
    assert config.model_config.compute_dtype == "bfloat16"


def test_fp16_flag_sets_float16_and_megatrons_dynamic_loss_scale(tmp_path):
    config = init_configs_from_dict(T.make(tmp_path / "c", training_config={"fp16": True}))
    assert config.model_config.compute_dtype == "float16"
    flag = T.run(T.make(tmp_path / "flag", training_config={"training_iters": 4, "fp16": True}))
    # the same run spelled out: float16 compute, dynamic scale from 2**32, factor 2, window 1000
    explicit = T.run(T.make(tmp_path / "explicit", training_config={
        "training_iters": 4, "loss_scale_value": 2.0 ** 32, "loss_scale_factor": 2, "loss_scale_window": 1000},
        model_config={"compute_dtype": "float16"}))
    assert _losses(flag) == _losses(explicit)
    events = read_events(tmp_path / "flag" / "events", kind="step")
    # 2**32 overflows float16 gradients: every step is skipped and the scale halves each time
    assert [e["overflow"] for e in events] == [True] * 4
    assert [e["loss_scale"] for e in events] == [2.0 ** 31, 2.0 ** 30, 2.0 ** 29, 2.0 ** 28]
    # a static loss_scale replaces the dynamic default
    static = init_configs_from_dict(T.make(tmp_path / "s", training_config={"fp16": True, "loss_scale": 128}))
    assert static.training_config.loss_scale_settings() == {"type": "FixedLossScaleUpdateCell",
                                                            "loss_scale_value": 128}


def test_precision_contradictions_are_refused_naming_both_fields(tmp_path):
    with pytest.raises(ConfigValueError, match=r"compute_dtype.*training_config\.fp16"):
        init_configs_from_dict(T.make(tmp_path, training_config={"fp16": True},
                                      model_config={"compute_dtype": "bfloat16"}))
    with pytest.raises(ConfigValueError, match=r"compute_dtype.*training_config\.bf16"):
        init_configs_from_dict(T.make(tmp_path, training_config={"bf16": True},
                                      model_config={"compute_dtype": "float32"}))
    with pytest.raises(ConfigValueError, match=r"loss_scale_value.*bf16"):
        init_configs_from_dict(T.make(tmp_path, training_config={
            "bf16": True, "loss_scale_value": 1024, "loss_scale_factor": 2, "loss_scale_window": 10}))
    with pytest.raises(ConfigValueError, match=r"scale_sense.*bf16"):
        init_configs_from_dict(T.make(tmp_path, training_config={"bf16": True, "scale_sense": {
            "type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024, "scale_factor": 2, "scale_window": 10}}))
    # agreeing values and a static bf16 scale are fine
    init_configs_from_dict(T.make(tmp_path, training_config={"fp16": True}, model_config={"compute_dtype": "fp16"}))
    ok = init_configs_from_dict(T.make(tmp_path, training_config={"bf16": True, "loss_scale": 8.0}))
    assert ok.training_config.loss_scale_settings()["type"] == "FixedLossScaleUpdateCell"


def test_bfloat16_gelu_and_softmax_run_on_cpu():
    from mindspeed_ms.core.fusions import Gelu, Softmax

    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    xb = Tensor(x).astype(ms.bfloat16)
    rounded = Tensor(x).astype(ms.bfloat16).astype(ms.float32)
    for cell in (Gelu(), Softmax()):
        out = cell(xb)
        assert out.dtype == ms.bfloat16
        reference = cell(rounded).asnumpy()
        np.testing.assert_allclose(out.astype(ms.float32).asnumpy(), reference, rtol=1e-2, atol=1e-2)
        grad = ms.grad(lambda t, c=cell: c(t).astype(ms.float32).sum())(xb)
        assert np.isfinite(grad.astype(ms.float32).asnumpy()).all()


# ------------------------------------------------------------------------------------------------
# loss reduction over micro-batches, Megatron's per-token loss, gradient accumulation dtype
# ------------------------------------------------------------------------------------------------

def _masked_micro_batches(seed=3, micro=3, batch=2, seq=32, vocab=66):
    """Micro-batches with very unequal loss masks (8, 64 and 37 counted tokens)."""
    rng = np.random.default_rng(seed)
    counts = [8, 64, 37][:micro]
    items = []
    for count in counts:
        mask = np.zeros((batch, seq), np.float32)
        mask.reshape(-1)[rng.permutation(batch * seq)[:count]] = 1.0
        items.append({"tokens": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
                      "labels": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
                      "loss_mask": mask})
    return items, counts


def _trainer_step_grads(tmp_path, items, training=None, reference_weights=None):
    """The gradients the optimizer receives in the first step, and the reference per-micro-batch
    gradients of the mean loss of each micro-batch times its weight (the model before the step)."""
    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    from mindspeed_ms.training.training import Trainer

    training = dict({"training_iters": 4, "grad_clip_kwargs": None}, **(training or {}))
    ps.destroy_model_parallel()
    config = init_configs_from_dict(T.make(tmp_path, training_config=training,
                                           dataset_config={"batch_size": 2, "micro_batch_num": len(items)}))
    try:
        trainer = Trainer(config, lambda pre_process=True, post_process=True: GPTModel(config.model_config),
                          train_data_loader=list(items))
        module = trainer.model[0].module
        params = trainer.model[0].params
        references, losses = [], []
        for i, item in enumerate(items):
            weight = 1.0 if reference_weights is None else reference_weights[i]

            def loss_fn(item=item, weight=weight):
                loss = module(Tensor(item["tokens"]), None, None, Tensor(item["loss_mask"]),
                              labels=Tensor(item["labels"]))
                return loss * weight, loss
            (_, loss), grads = ms.value_and_grad(loss_fn, None, params, has_aux=True)()
            references.append([g.asnumpy().astype(np.float64) for g in grads])
            losses.append(float(loss.asnumpy()))
        captured = {}
        trainer.optimizer.step = lambda grads: captured.update({k: v.asnumpy() for k, v in grads.items()})
        metrics = trainer.train_step()
        names = [p.name for p in params]
        return [captured[n] for n in names], references, losses, metrics
    finally:
        ps.destroy_model_parallel()


def _combine(references, weights):
    return [sum(w * ref[j] for w, ref in zip(weights, references)) for j in range(len(references[0]))]


@pytest.mark.parametrize("mode", ["mean", "sum", "per_token"])
def test_loss_reductions_give_the_hand_computed_gradients(tmp_path, mode):
    items, counts = _masked_micro_batches()
    training = {"calculate_per_token_loss": True} if mode == "per_token" else {"loss_reduction": mode}
    grads, references, losses, metrics = _trainer_step_grads(tmp_path, items, training)
    total = float(sum(counts))
    weights = {"mean": [1 / 3] * 3, "sum": [1.0] * 3, "per_token": [c / total for c in counts]}[mode]
    expected = _combine(references, weights)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)
    expected_loss = {"mean": np.mean(losses), "sum": np.sum(losses),
                     "per_token": sum(l * c for l, c in zip(losses, counts)) / total}[mode]
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    if mode == "per_token":
        # the micro-batch of 8 tokens weighs 8/109 of the step, not 1/3: the reductions differ
        mean_grads = _combine(references, [1 / 3] * 3)
        assert max(np.abs(g - m).max() for g, m in zip(grads, mean_grads)) > 1e-4


def test_per_token_loss_with_sum_reduction_is_refused(tmp_path):
    with pytest.raises(ConfigValueError, match=r"loss_reduction.*calculate_per_token_loss"):
        init_configs_from_dict(T.make(tmp_path, training_config={"calculate_per_token_loss": True,
                                                                 "loss_reduction": "sum"}))


def test_fp16_gradients_accumulate_in_float16_unless_fp32_is_asked_for(tmp_path):
    items, _ = _masked_micro_batches(micro=2)
    fp16 = {"fp16": True, "loss_scale": 1.0}
    # each micro-batch's loss is halved before the float16 backward, whose small values are
    # float16 subnormals: the reference differentiates the halved losses too
    half, references, _, _ = _trainer_step_grads(tmp_path / "half", items, fp16, [0.5, 0.5])
    full, _, _, _ = _trainer_step_grads(tmp_path / "full", items, dict(fp16, accumulate_allreduce_grads_in_fp32=True))
    # accumulated and reduced in float16: every gradient is a float16 value
    assert all(np.array_equal(g.astype(np.float16).astype(np.float32), g) for g in half)
    # in float32, the sum of the two (float16-valued) micro-batch gradients is kept exactly
    exact = _combine(references, [1.0, 1.0])
    for got, want in zip(full, exact):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert not all(np.array_equal(g.astype(np.float16).astype(np.float32), g) for g in full)
    # in float16, the buffer is rounded after each micro-batch's addition (one rank: the
    # reduction adds no rounding); the norm and bias gradients are float32 before that
    def f16(x):
        return x.astype(np.float32).astype(np.float16).astype(np.float32)
    for got, first, second in zip(half, references[0], references[1]):
        np.testing.assert_array_equal(got, f16(f16(first) + second.astype(np.float32)))


def test_grad_buffer_rounds_each_accumulation_to_its_dtype():
    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.core.distributed import GradBuffer, PerParameterGrads

    ps.destroy_model_parallel()
    ps.initialize_model_parallel()
    try:
        param = ms.Parameter(Tensor(np.zeros(2, np.float32)), name="w")
        group = ps.get_data_parallel_group()
        small = Tensor(np.array([2.0 ** -11, 2.0 ** -11], np.float32))
        for storage_cls in (GradBuffer, PerParameterGrads):
            for dtype, expected in ((None, 1.0 + 2.0 ** -10), (ms.float16, 1.0), (ms.bfloat16, 1.0)):
                storage = storage_cls([param], group, grad_dtype=dtype)
                storage.add([Tensor(np.ones(2, np.float32))])
                storage.add([small])  # 1 + 2^-11 rounds back to 1 in float16 and bfloat16
                storage.add([small])
                storage.reduce()
                assert float(storage.grads()["w"].asnumpy()[0]) == expected, (storage_cls, dtype)
    finally:
        ps.destroy_model_parallel()


# ------------------------------------------------------------------------------------------------
# deterministic_mode
# ------------------------------------------------------------------------------------------------

_DETERMINISTIC_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
import mindspore as ms
ms.set_device("CPU")
import training_configs as T
out = {{}}
settings = {{"training_iters": 4}}
plain = T.run(T.make({tmp!r} + "/plain", training_config=settings))
out["after_plain"] = ms.get_context("deterministic")
runs = [T.run(T.make({tmp!r} + f"/det{{i}}", training_config=settings,
                     parallel_config={{"use_cpu_initialization": True, "deterministic_mode": True}}))
        for i in range(2)]
out["after_deterministic"] = ms.get_context("deterministic")
out["losses"] = [[s["loss"] for s in run] for run in runs]
out["plain"] = [s["loss"] for s in plain]
print("RESULT" + json.dumps(out))
"""


def test_deterministic_mode_switches_mindspore_deterministic_on(tmp_path):
    import json
    import os
    import subprocess
    import sys

    # a fresh process: MindSpore's switch can be set once per process, and stays on
    tests = os.path.dirname(os.path.abspath(__file__))
    script = _DETERMINISTIC_SCRIPT.format(tests=tests, tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(tests))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["after_plain"] == "OFF"  # deterministic_mode False leaves MindSpore's default
    assert out["after_deterministic"] == "ON"
    first, second = out["losses"]
    assert first == second and len(first) == 4  # bit for bit
    np.testing.assert_allclose(first, out["plain"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# eval_metric + best_metric_comparison: the best checkpoint
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric,comparison", [("loss", None), ("perplexity", "greater_equal")])
def test_the_best_checkpoint_by_eval_metric_is_kept(tmp_path, metric, comparison):
    from mindspeed_ms.training import checkpointing

    out = tmp_path / "run"
    training = {"training_iters": 8, "eval_interval": 2, "eval_iters": 2, "save_interval": 2,
                "keep_checkpoint_max": 10, "eval_metric": metric, "best_metric_comparison": comparison}
    T.run(T.make(out, training_config=training))
    evals = read_events(out / "events", kind="eval")
    steps = [e["step"] for e in evals]
    values = [e["val_loss"] if metric == "loss" else float(np.exp(e["val_loss"])) for e in evals]
    assert steps == [2, 4, 6, 8] and len(set(values)) > 1
    if comparison is None:  # 'less': the first of the lowest
        best_step = steps[int(np.argmin(values))]
    else:  # 'greater_equal': the last of the highest
        best_step = steps[len(values) - 1 - int(np.argmax(values[::-1]))]
    tensors, meta = checkpointing.load_checkpoint(out / "best", 0)
    assert meta["step"] == best_step
    assert meta["best_metric"]["name"] == metric
    assert meta["best_metric"]["value"] == pytest.approx(values[steps.index(best_step)], rel=1e-9)
    assert checkpointing.list_steps(checkpointing.checkpoint_dir(out / "best", 0), "network") == [best_step]
    # the very weights of that step (the regular checkpoint of the same step)
    regular, _ = checkpointing.load_checkpoint(out, 0, step=best_step)
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, regular[name])


def test_eval_metric_fields_are_checked_at_load_time(tmp_path):
    with pytest.raises(ConfigValueError, match=r"eval_metric.*'loss', 'perplexity'"):
        init_configs_from_dict(T.make(tmp_path, training_config={"eval_metric": "accuracy", "eval_interval": 2}))
    with pytest.raises(ConfigValueError, match=r"best_metric_comparison.*less_equal"):
        init_configs_from_dict(T.make(tmp_path, training_config={"eval_metric": "loss", "eval_interval": 2,
                                                                 "best_metric_comparison": "smaller"}))
    with pytest.raises(ConfigValueError, match=r"best_metric_comparison.*eval_metric"):
        init_configs_from_dict(T.make(tmp_path, training_config={"best_metric_comparison": "less"}))
    with pytest.raises(ConfigValueError, match=r"eval_metric.*eval_interval"):
        init_configs_from_dict(T.make(tmp_path, training_config={"eval_metric": "loss"}))
    with pytest.raises(ValueError, match="eval_metric.*validation"):
        T.run(T.make(tmp_path / "noval", training_config={"eval_metric": "loss", "eval_interval": 2},
                     dataset_config={"split": "100,0,0"}))


# ------------------------------------------------------------------------------------------------
# dataset fields: pad_token_id, num_workers, dataset_dir
# ------------------------------------------------------------------------------------------------

def test_pad_token_positions_are_masked_out_of_the_loss():
    from mindspeed_ms.core.datasets import build_model_inputs

    samples = np.array([[5, 6, 0, 0, 0], [7, 0, 8, 9, 0]], np.int32)
    inputs = build_model_inputs(samples, pad_token=0)
    np.testing.assert_array_equal(inputs["loss_mask"], [[1, 0, 0, 0], [0, 1, 1, 0]])
    # Megatron's -1 padding: masked, and the ids replaced by 0 for the embedding look-up
    negative = build_model_inputs(np.array([[5, -1, -1]], np.int32), pad_token=-1)
    np.testing.assert_array_equal(negative["loss_mask"], [[0, 0]])
    assert negative["tokens"].min() == 0 and negative["labels"].min() == 0


class _RecordingDataset:
    """A dataset that records which thread reads each sample."""

    def __init__(self, inner):
        self.inner, self.threads = inner, set()

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        import threading

        self.threads.add(threading.current_thread().name)
        return self.inner[index]


def _run_with_provider(tmp_path, dataset_config, iters=4):
    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    from mindspeed_ms.training.training import build_datasets, pretrain

    ps.destroy_model_parallel()
    config = init_configs_from_dict(T.make(tmp_path, training_config={"training_iters": iters},
                                           dataset_config=dataset_config))
    train, valid = build_datasets(config)
    recording = _RecordingDataset(train)
    steps = []
    try:
        pretrain(lambda counts: (recording, valid), lambda pre_process=True, post_process=True:
                 GPTModel(config.model_config), None, all_config=config,
                 step_callbacks=[lambda step, metrics: steps.append(metrics["loss"])])
    finally:
        ps.destroy_model_parallel()
    return steps, recording.threads


def test_pad_token_id_changes_the_training_loss_to_the_unpadded_tokens(tmp_path):
    # the character ' ' is id 1 of tiny Shakespeare's vocabulary: as padding it leaves the loss
    from mindspeed_ms.core.datasets import CharDataset

    space = CharDataset(seq_length=32, split="train", val_fraction=0.1).tokenizer.encode(" ")[0]
    plain, _ = _run_with_provider(tmp_path / "plain", {"num_workers": 0})
    padded, _ = _run_with_provider(tmp_path / "pad", {"num_workers": 0, "pad_token_id": int(space)})
    assert all(np.isfinite(padded)) and padded != plain
    # predicting a space is easy (~1/6 of the characters): without them the first loss is higher
    assert padded[0] > plain[0]


def test_num_workers_read_the_batches_in_worker_threads_with_the_same_losses(tmp_path):
    main, main_threads = _run_with_provider(tmp_path / "w0", {"num_workers": 0})
    workers, worker_threads = _run_with_provider(tmp_path / "w2", {"num_workers": 2})
    assert workers == main  # the same batches, read elsewhere
    assert main_threads == {"MainThread"}
    assert worker_threads and all(name.startswith("mindspeed-data") for name in worker_threads)


def test_dataset_dir_is_where_a_relative_data_path_is_read(tmp_path, monkeypatch):
    from mindspeed_ms.training.training import build_datasets

    corpus = tmp_path / "corpora"
    corpus.mkdir()
    (corpus / "tiny.txt").write_text("abcabcabd " * 400)
    monkeypatch.chdir(tmp_path)
    config = init_configs_from_dict(T.make(tmp_path / "out", dataset_config={
        "dataset_dir": str(corpus), "data_path": "tiny.txt"}))
    train, _ = build_datasets(config)
    assert train.vocab_size == 5  # a, b, c, d and the space: the file under dataset_dir was read
    # not under dataset_dir: as given, relative to the working directory
    (tmp_path / "other.txt").write_text("xyxy " * 400)
    config = init_configs_from_dict(T.make(tmp_path / "out", dataset_config={
        "dataset_dir": str(corpus), "data_path": "other.txt"}))
    assert build_datasets(config)[0].vocab_size == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_parameters_train_on_cpu(tmp_path, dtype):
    from mindspeed_ms.training import checkpointing

    settings = {"training_iters": 4, "save_interval": 4}
    fp32 = _losses(T.run(T.make(tmp_path / "fp32", training_config=settings)))
    half = _losses(T.run(T.make(tmp_path / dtype, training_config=settings, model_config={
        "params_dtype": dtype, "embedding_init_dtype": dtype, "residual_connection_dtype": dtype})))
    assert all(np.isfinite(half)) and half[-1] < half[0]
    np.testing.assert_allclose(half, fp32, rtol=1e-2)
    tensors, _ = checkpointing.load_checkpoint(tmp_path / dtype, 0)
    weight = tensors["language_model.embedding.word_embeddings.weight"].astype(np.float32)
    # the stored (updated) parameters hold values of the low-precision type
    rounded = Tensor(weight).astype(getattr(ms, dtype)).astype(ms.float32).asnumpy()
    np.testing.assert_array_equal(weight, rounded)


def test_per_token_loss_with_an_all_padding_micro_batch_stays_finite(tmp_path):
    items, counts = _masked_micro_batches()
    items[0]["loss_mask"] = np.zeros_like(items[0]["loss_mask"])  # nothing counts in the first
    counts[0] = 0
    grads, references, losses, metrics = _trainer_step_grads(tmp_path, items, {"calculate_per_token_loss": True})
    total = float(sum(counts))
    assert losses[0] == 0.0 and np.isfinite(metrics["loss"])
    expected = _combine(references, [c / total for c in counts])
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)


def test_per_token_evaluation_pools_the_tokens_of_all_micro_batches(tmp_path):
    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.core.datasets import CharDataset
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    from mindspeed_ms.training.training import Trainer

    space = int(CharDataset(seq_length=32, split="train", val_fraction=0.1).tokenizer.encode(" ")[0])

    def val_loss(name, batch, micro, per_token):
        ps.destroy_model_parallel()
        config = init_configs_from_dict(T.make(
            tmp_path / name, training_config={"eval_iters": 2, "calculate_per_token_loss": per_token},
            dataset_config={"batch_size": batch, "micro_batch_num": micro, "pad_token_id": space}))
        try:
            trainer = Trainer(config, lambda pre_process=True, post_process=True: GPTModel(config.model_config))
            return trainer.evaluate()
        finally:
            ps.destroy_model_parallel()

    # the same samples (4 per batch, 2 batches) split into 1 or 2 micro-batches
    pooled = val_loss("a", 4, 1, True)
    assert val_loss("b", 2, 2, True) == pytest.approx(pooled, rel=1e-6)
    # a mean per micro-batch (and per batch) weighs the padded micro-batches differently
    assert val_loss("c", 2, 2, False) != pytest.approx(pooled, rel=1e-6)
