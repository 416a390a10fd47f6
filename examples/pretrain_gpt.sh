#!/usr/bin/env bash
# Launch examples/pretrain_gpt.py on N local workers with msrun (the GPT guide's launch script).
#   bash examples/pretrain_gpt.sh [CONFIG] [WORKERS]
# On Ascend set MINDSPEED_DEVICE_TARGET=Ascend; the HCCL settings below are the guide's.
set -euo pipefail
CONFIG=${1:-examples/configs/shakespeare_char_small.yaml}
WORKERS=${2:-2}
PORT=${MASTER_PORT:-8848}
if [ "${MINDSPEED_DEVICE_TARGET:-CPU}" = "Ascend" ]; then
  export HCCL_BUFFSIZE=200
  export HCCL_EXEC_TIMEOUT=600
  export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-'0,1,2,3,4,5,6,7'}
fi
cd "$(dirname "$0")/.."
msrun --worker_num="$WORKERS" --local_worker_num="$WORKERS" --master_port="$PORT" --log_dir=msrun_log \
      --join=True --cluster_time_out=300 examples/pretrain_gpt.py --config "$CONFIG"
