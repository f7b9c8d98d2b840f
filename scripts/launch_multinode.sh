#!/usr/bin/env bash
# Several nodes. Two ways to start the same job (overrides after the mode are Hydra overrides):
#
# 1) torchrun, run once on EVERY node (static rendezvous at MASTER_ADDR:MASTER_PORT):
#      NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#        bash scripts/launch_multinode.sh torchrun experiment=llada_gsm8k
#      (and NODE_RANK=1 on the second node)
#
# 2) deepspeed with a hostfile, run once on the first node (reaches the others with pdsh/ssh;
#    hostfile lines: "<host> slots=<gpus>"):
#      HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash scripts/launch_multinode.sh hostfile experiment=llada_gsm8k
#
# run_dir must be on a filesystem all nodes share (checkpoints are written by every rank).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch_env.sh"
MODE="${1:?usage: launch_multinode.sh torchrun|hostfile [overrides...]}"
shift
MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
case "$MODE" in
  torchrun)
    exec torchrun --nnodes "${NNODES:?set NNODES}" --node_rank "${NODE_RANK:?set NODE_RANK}" \
        --nproc_per_node "${NPROC_PER_NODE:-1}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        -m recipes "$@"
    ;;
  hostfile)
    exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --no_local_rank --module recipes "$@"
    ;;
  *)
    echo "launch_multinode.sh: mode must be torchrun or hostfile, got '$MODE'" >&2
    exit 2
    ;;
esac
