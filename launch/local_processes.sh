#!/usr/bin/env bash
# N training processes on this machine, joined by jax.distributed over localhost (CPU, gloo):
# the multi-host code path (coordinator, per-process data, collective checkpoints) without a cluster.
#
#   launch/local_processes.sh NUM_PROCESSES --config=configs/vtp_tiny.py --workdir=runs/mp [--config.KEY=VALUE ...]
#
# Env: PORT (coordinator port, default 12355), DEVICES_PER_PROCESS (fake CPU devices each, default 1),
# PYTHON (default python), XLA_FLAGS (kept; the device count is appended). Each process's output
# is prefixed with its index; the
# script exits non-zero if any process fails, and stops the others when one does.
set -euo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config=... --workdir=... [--config.KEY=VALUE ...]" >&2
  exit 2
fi
n="$1"; shift
port="${PORT:-12355}"
here="$(cd "$(dirname "$0")" && pwd)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" JAX_PLATFORMS=cpu \
    "${PYTHON:-python}" "$here/main.py" "$@" \
    --config.train.distributed.mode=on \
    --config.train.distributed.coordinator_address="localhost:$port" \
    --config.train.distributed.num_processes="$n" \
    --config.train.distributed.process_id="$i" \
    > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done
status=0
for p in "${pids[@]}"; do
  if ! wait "$p"; then status=1; cleanup; fi
done
exit "$status"
