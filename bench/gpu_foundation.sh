#!/usr/bin/env bash
# The GPU run of issue 19 (`bench/foundation.py` at 250m and 770m, bfloat16) as one call on a
# lent GPU machine. Its image holds Python 3.12 and jax 0.11.2 with the CUDA 13 plugin, but not
# ml-collections and no flax of a version we know; our pinned jax 0.10.2 cannot travel (jaxlib
# and the CUDA plugin's wheels are 85 + 124 MB, over a call's 64 MiB). This code ran its
# foundation bench on jax 0.11.2 with flax 0.12.12 (CPU, Python 3.12), so the two small wheels
# below travel and the image's jax does the rest.
#
#   bash bench/gpu_foundation.sh --wheels   # here, once: the wheels into .whl/ (git-ignored)
#   then the device tool's run: command "bash bench/gpu_foundation.sh", carry [".whl"]
#
# Prints the card, the versions and the bench's tables; the JSON goes to $OUT (else bench/out).
# PYTHON and FOUNDATION_ARGS override the interpreter and the bench's arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(flax==0.12.12 ml-collections==1.1.0)

if [[ "${1:-}" == "--wheels" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp -d .whl "${WHEELS[@]}"
  ls -l .whl
  exit 0
fi

PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_site .whl/*.whl
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
  || echo "nvidia-smi: not found"
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
read -r -a ARGS <<< "${FOUNDATION_ARGS:---sizes 250m,770m --sampler_sizes 250m,770m --dtype bfloat16}"
timeout 420 $PY bench/foundation.py "${ARGS[@]}" --out "${OUT:-bench/out}/foundation_gpu.json"
