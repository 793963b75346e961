#!/usr/bin/env bash
# Runs one codi-jax command as N cooperating processes on this machine (multi-host rehearsal):
#   launch/local_processes.sh N DEVICES_PER_PROCESS codi-jax demo --workdir outputs/mp
# Each process sees DEVICES_PER_PROCESS simulated CPU devices; together they form one global mesh.
# If any process fails, or the launcher is stopped, the others are stopped too (a process whose
# peer died would otherwise wait for it forever); the exit status is the first failure's.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]" >&2
  exit 2
fi
n=$1; devices=$2; shift 2
port=${CODI_PORT:-$((20000 + RANDOM % 20000))}
pids=()
stop_all() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop_all EXIT
trap 'exit 143' TERM INT
for ((i = 0; i < n; i++)); do
  CODI_COORDINATOR="127.0.0.1:${port}" CODI_NUM_PROCESSES="$n" CODI_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
    "$@" &
  pids+=($!)
done
for ((i = 0; i < n; i++)); do
  wait -n || exit $?
done
