#!/usr/bin/env bash
# The main job: the default recipe (SFT, diffu-GRPO, self-distillation) on the embedded tiny model.
# Extra arguments are Hydra overrides, e.g. `bash scripts/main.sh seed=1 rl.max_steps=50`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec dllm-rl "$@"
