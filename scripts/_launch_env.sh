# Sourced by the launchers: use the repository's .venv when there is one (never installs).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then
    export PATH="$ROOT/.venv/bin:$PATH"
fi
cd "$ROOT"
export WANDB_MODE="${WANDB_MODE:-offline}"
