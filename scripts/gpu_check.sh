#!/usr/bin/env bash
# The GPU path end to end on tiny LLaDA/Dream checkpoints; prints one summary line (scripts/gpu_check.py).
#   bash scripts/gpu_check.sh               # on a machine with CUDA (2 GPUs used when present)
#   bash scripts/gpu_check.sh --allow-cpu   # CPU smoke run of the same commands
# Needs the package installed (bash scripts/test.sh once, or pip install -e . on the GPU machine) and, for
# the rollout.backend=vllm runs, vLLM's GPU build: pip install vllm==0.32.* (or --skip-vllm).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch_env.sh"
exec python scripts/gpu_check.py "$@"
