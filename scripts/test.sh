#!/usr/bin/env bash
# The test command. Default: the fast suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m distributed` or `bash scripts/test.sh -m slow`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m pytest "$@"
