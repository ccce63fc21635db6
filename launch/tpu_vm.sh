#!/usr/bin/env bash
# Run alignment_gap on every worker of a Cloud TPU VM (pod slice).
#
#   launch/tpu_vm.sh --tpu NAME --zone ZONE [--create ACCELERATOR --version RUNTIME] \
#       [--bucket BUCKET] [--sweep] [--python PYTHON] -- \
#       --config configs/study.py:tpu_v5p_3b --workdir /mnt/gcs/BUCKET/study
#
# configs/study.py:tpu_v5p_3b is sized for a v5p-64 slice (--create v5p-64: 32 chips, mesh
# fsdp 8 x tensor 4). Prove it there before renting it, on any CPU:
#   python -m alignment_gap.compile --config configs/study.py:tpu_v5p_3b --topology v5p-64
#
# Copies this checkout's tracked files (uncommitted edits included) to all workers, installs it
# with the `tpu` extra (pinned by constraints.txt) under the workers' `python3` (3.11 or newer:
# a runtime image whose python3 is older stops here, naming it; --python names another
# interpreter on the workers) and starts the same command everywhere, detached from this SSH
# session (a dropped connection does not stop the run): each worker's output goes to
# ~/alignment_gap-<UTC time>-<pid>.log there (~/alignment_gap.log links to the newest; earlier
# launches' logs stay) and is followed here until the run ends:
#   default  one job over all workers: --config.distributed.from_environment=True
#            (jax.distributed.initialize() reads the TPU environment);
#   --sweep  one independent job per worker, each running its share of the study's runs
#            (--config.sweep.shard = the worker's number, --config.sweep.shards = workers,
#            --config.sweep.launch = this launch's UTC time and pid, the same on every worker).
# --bucket mounts gs://BUCKET at /mnt/gcs/BUCKET on every worker with gcsfuse, so the workdir
# (checkpoints, metrics, datasets, reports) is one shared path on all of them; orbax
# checkpoints need a path every process sees. Not exercised by CI (no TPU here); the
# multi-process and sweep code paths it relies on are tested on CPU with
# launch/local_multiprocess.py.
set -euo pipefail
TPU="" ZONE="" CREATE="" VERSION="" BUCKET="" SWEEP=0 PYTHON=python3
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --tpu) TPU=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --create) CREATE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;;
    --sweep) SWEEP=1; shift ;;
    --python) PYTHON=$2; shift 2 ;;
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
# The working tree's tracked files as a dangling commit (no ref or file changes); empty if clean.
snapshot=$(git -c user.name=tpu_vm.sh -c user.email=tpu_vm.sh@localhost stash create)
git archive --format=tar.gz -o "$bundle" "${snapshot:-HEAD}"
gcloud compute tpus tpu-vm scp "$bundle" "$TPU":~/alignment_gap.tgz --zone "$ZONE" --worker=all
args=$(printf '%q ' "$@")
mount=""
if [[ -n "$BUCKET" ]]; then
  mount="sudo mkdir -p /mnt/gcs/$BUCKET && sudo chown \$USER /mnt/gcs/$BUCKET
  mountpoint -q /mnt/gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/gcs/$BUCKET"
fi
if [[ $SWEEP == 1 ]]; then
  # Each worker's number and the worker count, from the TPU VM metadata server.
  # The endpoint list is comma-separated with no newline at its end: count fields, not lines.
  md="curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes"
  roles="shard=\$($md/agent-worker-number || :); shards=\$($md/worker-network-endpoints | awk -F, '{print NF}')
  [ -n \"\$shard\" ] && [ -n \"\$shards\" ] || { echo \"error: the metadata server gave no worker number or count\" >&2; exit 2; }"
  launch_id="tpu-$(date -u +%Y%m%dT%H%M%S)-$$"
  role="--config.sweep.shard=\$shard --config.sweep.shards=\$shards --config.sweep.launch=$launch_id"
else
  roles=":"
  role="--config.distributed.from_environment=True"
fi
need="import sys; sys.exit(sys.version_info < (3, 11))"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; $mount
  $PYTHON -c '$need' || { echo \"error: \$($PYTHON --version 2>&1) on \$(hostname); alignment_gap needs Python >= 3.11: pass --python with one there (e.g. uv python install 3.11)\" >&2; exit 2; }
  $roles
  mkdir -p ~/alignment_gap && tar xzf ~/alignment_gap.tgz -C ~/alignment_gap
  cd ~/alignment_gap && $PYTHON -m pip install -q -c constraints.txt -e '.[tpu]'
  log=~/alignment_gap-\$(date -u +%Y%m%d-%H%M%S)-\$\$.log  # a relaunch keeps the last run's log
  : > \$log; ln -sfn \$log ~/alignment_gap.log
  nohup $PYTHON -m alignment_gap.main $args $role >> \$log 2>&1 < /dev/null &
  run=\$!; tail -n +1 -f --pid=\$run \$log; wait \$run"
