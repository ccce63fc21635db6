#!/usr/bin/env bash
# One process on this machine: python -m alignment_gap.main with the given flags.
#   launch/local.sh --config configs/demo.py:mini --workdir /tmp/demo
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m alignment_gap.main "$@"
