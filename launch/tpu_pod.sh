#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: every worker runs the same command (SPMD, one process per
# host); jax.distributed finds the other workers through the TPU metadata server.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--config=configs/vtp_h.py] [--workdir=gs://BUCKET/runs/vtp_h] [--config.KEY=VALUE ...]
#
# Env: REPO_DIR (checkout on the workers, default ~/vtp-jax; same path on every worker),
# PROJECT (gcloud project, default the active one). The checkout and its .venv must exist on every
# worker first, e.g.:
#   gcloud compute tpus tpu-vm ssh TPU --zone=ZONE --worker=all --command="git clone URL ~/vtp-jax && \
#     cd ~/vtp-jax && python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt 'jax[tpu]'"
# The workdir must be shared by all workers (a gs:// bucket): checkpoints are written collectively.
# A pre-empted slice gets SIGTERM: the run saves and exits; re-run this script to resume.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [--config=...] [--workdir=...] [--config.KEY=VALUE ...]" >&2
  exit 2
fi
tpu="$1"; zone="$2"; shift 2
repo="${REPO_DIR:-~/vtp-jax}"
args=("--config=configs/vtp_h.py" "--workdir=gs://CHANGE-ME/runs/vtp_h")
[[ $# -gt 0 ]] && args=("$@")
project=()
[[ -n "${PROJECT:-}" ]] && project=(--project="$PROJECT")
quoted="$(printf ' %q' "${args[@]}")"
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" "${project[@]}" --worker=all \
  --command="cd $repo && . .venv/bin/activate && python launch/main.py$quoted --config.train.distributed.mode=on"
