"""Small training configurations shared by the training tests (single process and msrun jobs)."""

import copy

BASE = {
    "training_config": {"seed": 1234, "training_iters": 6, "log_interval": 1, "wrap_with_ddp": True,
                        "grad_clip_kwargs": {"grad_clip_type": "ClipGlobalNorm", "clip_value": 1.0}},
    "parallel_config": {"use_cpu_initialization": True},
    "dataset_config": {"dataset_type": "char", "batch_size": 4, "micro_batch_num": 1, "seq_length": 32,
                       "seed": 7},
    "optimizer_config": {"optimizer_type": "AdamW", "learning_rate": 3.0e-3, "min_lr": 3.0e-4,
                         "lr_decay_style": "cosine", "lr_warmup_iters": 2, "weight_decay": 0.1,
                         "betas": [0.9, 0.99]},
    "model_config": {"vocab_size": 66, "seq_length": 32, "num_layers": 2, "num_attention_heads": 4,
                     "hidden_size": 64, "ffn_hidden_size": 256, "init_method_std": 0.02},
}


def make(output_dir, **sections):
    """BASE with per-section overrides: ``make(dir, training_config={...}, dataset_config={...})``."""
    data = copy.deepcopy(BASE)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    data["training_config"]["output_dir"] = str(output_dir)
    return data


class StopTraining(KeyboardInterrupt):
    """Raised by a step callback to stop a run the way a user's interrupt does."""


def run(data, stop_after=None):
    """Train with ``data`` in this process; returns the per-step metrics list.

    Args:
        data: The config dict (see :func:`make`).
        stop_after: Interrupt the run after this step (its metrics are kept).
    """
    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.core.config import init_configs_from_dict
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    from mindspeed_ms.training.training import pretrain

    ps.destroy_model_parallel()
    all_config = init_configs_from_dict(data)
    steps = []

    def record(step, metrics):
        steps.append(dict(metrics, step=step))
        if stop_after is not None and step >= stop_after:
            raise StopTraining(f"stopped after step {step}")

    def provider(pre_process=True, post_process=True):
        return GPTModel(all_config.model_config, pre_process=pre_process, post_process=post_process)

    try:
        pretrain(None, provider, None, all_config=all_config, step_callbacks=[record])
    except StopTraining:
        pass
    finally:
        ps.destroy_model_parallel()
    return steps
