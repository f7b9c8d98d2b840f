# Sourced by scripts/main.sh and scripts/test.sh: create .venv at the repo root and install
# the package with its test, lm-eval and QLoRA extras (torch first, from the pinned CPU wheel, so
# nothing pulls CUDA wheels), then the vLLM rollout backend (scripts/install_vllm.sh; DLLM_RL_VLLM=0 skips it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.dllm-rl-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[dev,lmeval,qlora]"
    if [ "${DLLM_RL_VLLM:-1}" != 0 ]; then
        bash "$ROOT/scripts/install_vllm.sh" "$PY"
    fi
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
