#!/usr/bin/env bash
# Run alignment_gap on every worker of a Cloud TPU VM (pod slice), joined by jax.distributed.
#
#   launch/tpu_vm.sh --tpu NAME --zone ZONE [--create ACCELERATOR --version RUNTIME] -- \
#       --config configs/study.py:tpu_v5p_3b --workdir /mnt/disks/persist/study
#
# Copies this checkout to all workers, installs it with the `tpu` extra (pinned by
# constraints.txt), and starts the same command everywhere with
# --config.distributed.from_environment=True (jax.distributed.initialize() reads the TPU
# environment). Not exercised by CI (no TPU here); the multi-process code path it relies on is
# tested on CPU with launch/local_multiprocess.py.
set -euo pipefail
TPU="" ZONE="" CREATE="" VERSION=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --tpu) TPU=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --create) CREATE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
shift || true
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "--tpu and --zone are required" >&2; exit 2; }
cd "$(dirname "$0")/.."
if [[ -n "$CREATE" ]]; then
  gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "$CREATE" \
    --version "${VERSION:?--version is required with --create}"
fi
bundle=$(mktemp -d)/alignment_gap.tgz
git archive --format=tar.gz -o "$bundle" HEAD
gcloud compute tpus tpu-vm scp "$bundle" "$TPU":~/alignment_gap.tgz --zone "$ZONE" --worker=all
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/alignment_gap && tar xzf ~/alignment_gap.tgz -C ~/alignment_gap
  cd ~/alignment_gap && python3 -m pip install -q -c constraints.txt -e '.[tpu]'
  python3 -m alignment_gap.main $args --config.distributed.from_environment=True"
