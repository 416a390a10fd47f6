"""A 2-rank training run whose rank 1 is killed (SIGKILL) after step 5.

Usage: train_kill.py <output_dir>. Used by tests/test_training_failure_mp.py, which checks what the
dead run leaves behind: a non-zero exit, readable events and loadable checkpoints.
"""

import os
import signal
import sys

from mindspeed_ms.runtime import setup_worker
import training_configs as T


def main():
    rank = setup_worker()
    data = T.make(sys.argv[1], training_config={"training_iters": 12, "save_interval": 2, "keep_checkpoint_max": 3})

    def maybe_die(step, metrics):
        if rank == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.core.config import init_configs_from_dict
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    from mindspeed_ms.training.training import pretrain

    all_config = init_configs_from_dict(data)
    ps.destroy_model_parallel()
    pretrain(None, lambda pre_process=True, post_process=True: GPTModel(all_config.model_config), None,
             all_config=all_config, step_callbacks=[maybe_die])


if __name__ == "__main__":
    main()
