#!/usr/bin/env bash
# One node, N processes (N GPUs; without CUDA, N CPU processes on gloo) via the deepspeed launcher.
#   bash scripts/launch_single_node.sh 8 experiment=llada_gsm8k
#   bash scripts/launch_single_node.sh 2 recipe=grpo rl.deepspeed=zero2 rl.max_steps=10   # CPU smoke
# Everything after N is a Hydra override (see `dllm-rl --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch_env.sh"
NPROC="${1:?usage: launch_single_node.sh NUM_PROCESSES [overrides...]}"
shift
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module recipes "$@"
