#!/usr/bin/env bash
# Submits launch/slurm.sbatch with a chosen layout, from the repository root, after creating its
# log folder (sbatch cannot write into a missing one):
#   launch/slurm.sh --nodes 2 --gpus-per-node 8 [--per-node] [--init auto] [--dry-run] \
#       [--partition gpu --time 24:00:00 ...any sbatch option] -- codi-jax train ...
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/slurm.sh [--nodes N] [--gpus-per-node G] [--per-node] [--init explicit|auto]
                       [--dry-run] [SBATCH_OPTION ...] -- COMMAND [ARGS...]
  --nodes N          nodes (default 2)
  --gpus-per-node G  GPUs on each node (default 8)
  --per-node         one process per node with all G GPUs (default: one process per GPU)
  --init MODE        explicit: CODI_COORDINATOR from the first node (default);
                     auto: CODI_DISTRIBUTED=auto, jax.distributed.initialize() detects SLURM
  --dry-run          print the sbatch command instead of running it (DRY_RUN=1)
Other options go to sbatch unchanged (--partition=gpu, --time=24:00:00, --account=..., ...).
EOF
}

nodes=2 gpus=8 per_node=0 init=explicit dry_run=${DRY_RUN:-0}
sbatch_args=()
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --nodes) nodes=${2:?--nodes needs a value}; shift ;;
    --gpus-per-node) gpus=${2:?--gpus-per-node needs a value}; shift ;;
    --per-node) per_node=1 ;;
    --init) init=${2:?--init needs a value}; shift ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) sbatch_args+=("$1") ;;
  esac
  shift
done
fail() { echo "error: $*" >&2; exit 2; }
[ $# -gt 0 ] || { usage >&2; fail "no command after --"; }
[[ $nodes =~ ^[1-9][0-9]*$ ]] || fail "--nodes must be a positive integer, got '$nodes'"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || fail "--gpus-per-node must be a positive integer, got '$gpus'"
[[ $init =~ ^(explicit|auto)$ ]] || fail "--init must be explicit or auto, got '$init'"

tasks=$gpus
[ "$per_node" = 0 ] || tasks=1
layout=("--ntasks-per-node=$tasks" "--gpus-per-node=$gpus")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cmd=(sbatch "--nodes=$nodes" "${layout[@]}" ${sbatch_args[@]+"${sbatch_args[@]}"}
     launch/slurm.sbatch "$@")
if [ "$dry_run" = 1 ]; then
  # Shell-quoted, plain words left bare.
  out=()
  for a in "$(pwd)" "CODI_SLURM_INIT=$init" "${cmd[@]}"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "cd ${out[0]} && mkdir -p outputs/slurm && ${out[*]:1}"
else
  command -v sbatch >/dev/null || fail "sbatch not found: run this on a SLURM login node"
  mkdir -p outputs/slurm
  CODI_SLURM_INIT=$init "${cmd[@]}"
fi
