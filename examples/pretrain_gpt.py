#!/usr/bin/env python
"""Pre-train a GPT model with mindspeed_ms (the GPT guide's flow).

configs (YAML) -> device and context -> parallel groups -> seed -> data -> model_provider -> pretrain

One process:   python examples/pretrain_gpt.py --config examples/configs/shakespeare_char_small.yaml
N processes:   msrun --worker_num=N --local_worker_num=N --master_port=8848 --log_dir=msrun_log \\
                     --join=True examples/pretrain_gpt.py --config CFG.yaml
(see pretrain_gpt.sh). Outputs (checkpoints, events, logs) go to training_config.output_dir, or
to --output.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindspeed_ms.core.config import init_configs_from_yaml  # noqa: E402
from mindspeed_ms.core.parallel_state import is_pipeline_first_stage, is_pipeline_last_stage  # noqa: E402,F401
from mindspeed_ms.runtime import setup_worker  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--output", default=None, help="override training_config.output_dir")
    parser.add_argument("--training-iters", type=int, default=None, help="override training_config.training_iters")
    parser.add_argument("--device-target", default=None, choices=["CPU", "Ascend", "GPU"],
                        help="device (default: $MINDSPEED_DEVICE_TARGET or CPU)")
    parser.add_argument("--mode", default="pynative", choices=["pynative", "graph"])
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    all_config = init_configs_from_yaml(args.config)
    if args.output:
        all_config.training_config.output_dir = args.output
    if args.training_iters is not None:
        all_config.training_config.training_iters = args.training_iters
    setup_worker(device_target=args.device_target, mode=args.mode,
                 deterministic=bool(all_config.parallel_config.deterministic_mode))

    # imports that pull in the model come after the device is set
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    from mindspeed_ms.training.training import initialize_parallel_from_config, pretrain

    initialize_parallel_from_config(all_config.parallel_config)

    def model_provider_func(pre_process=True, post_process=True):
        """The GPT model of this pipeline stage."""
        return GPTModel(all_config.model_config, pre_process=pre_process, post_process=post_process)

    pretrain(train_valid_test_datasets_provider=None, model_provider_func=model_provider_func, model_type=None,
             forward_step_func=None, process_non_loss_data_func=None, all_config=all_config)


if __name__ == "__main__":
    main()
