#!/usr/bin/env bash
# One process on this machine: python -m alignment_gap.main with the given flags, from where you
# are (relative --config and --workdir paths are read from here; the venv is the checkout's).
#   launch/local.sh --config configs/demo.py:mini --workdir /tmp/demo
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
exec "${PYTHON:-$root/.venv/bin/python}" -m alignment_gap.main "$@"
