#!/usr/bin/env bash
# Run alignment_gap on every worker of a Cloud TPU VM (pod slice).
#
#   launch/tpu_vm.sh --tpu NAME --zone ZONE [--create ACCELERATOR --version RUNTIME] \
#       [--bucket BUCKET] [--sweep] -- \
#       --config configs/study.py:tpu_v5p_3b --workdir /mnt/gcs/BUCKET/study
#
# configs/study.py:tpu_v5p_3b is sized for a v5p-64 slice (--create v5p-64: 32 chips, mesh
# fsdp 8 x tensor 4). Prove it there before renting it, on any CPU:
#   python -m alignment_gap.compile --config configs/study.py:tpu_v5p_3b --topology v5p-64
#
# Copies this checkout to all workers, installs it with the `tpu` extra (pinned by
# constraints.txt) and starts the same command everywhere:
#   default  one job over all workers: --config.distributed.from_environment=True
#            (jax.distributed.initialize() reads the TPU environment);
#   --sweep  one independent job per worker, each running its share of the study's runs
#            (--config.sweep.shard = the worker's number, --config.sweep.shards = workers).
# --bucket mounts gs://BUCKET at /mnt/gcs/BUCKET on every worker with gcsfuse, so the workdir
# (checkpoints, metrics, datasets, reports) is one shared path on all of them; orbax
# checkpoints need a path every process sees. Not exercised by CI (no TPU here); the
# multi-process and sweep code paths it relies on are tested on CPU with
# launch/local_multiprocess.py.
set -euo pipefail
TPU="" ZONE="" CREATE="" VERSION="" BUCKET="" SWEEP=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --tpu) TPU=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --create) CREATE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;;
    --sweep) SWEEP=1; shift ;;
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
mount=""
if [[ -n "$BUCKET" ]]; then
  mount="sudo mkdir -p /mnt/gcs/$BUCKET && sudo chown \$USER /mnt/gcs/$BUCKET
  mountpoint -q /mnt/gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/gcs/$BUCKET"
fi
if [[ $SWEEP == 1 ]]; then
  # Each worker's number and the worker count, from the TPU VM metadata server.
  md="curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes"
  role="--config.sweep.shard=\$($md/agent-worker-number) \
    --config.sweep.shards=\$($md/worker-network-endpoints | tr ',' '\n' | wc -l)"
else
  role="--config.distributed.from_environment=True"
fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; $mount
  mkdir -p ~/alignment_gap && tar xzf ~/alignment_gap.tgz -C ~/alignment_gap
  cd ~/alignment_gap && python3 -m pip install -q -c constraints.txt -e '.[tpu]'
  python3 -m alignment_gap.main $args $role"
