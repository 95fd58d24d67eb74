#!/usr/bin/env bash
# Training on all GPUs of one machine: a single process drives every local GPU (jax sees them
# all; config.mesh spreads the step over them). No coordinator is needed.
#
#   launch/gpu/single_node.sh CONFIG WORKDIR [--config.a.b=v ...] [--dry-run]
#   CUDA_VISIBLE_DEVICES=0,1,2,3 launch/gpu/single_node.sh configs/svae.py /runs/svae
#
# Settings: PYTHON (default python3), COMPILATION_CACHE (default WORKDIR/xla_cache; 'none' =
# off), DRY_RUN=1 (print the command instead of running it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DRY_RUN="${DRY_RUN:-0}"
args=()
for arg in "$@"; do
  if [[ "${arg}" == "--dry-run" ]]; then DRY_RUN=1; else args+=("${arg}"); fi
done
set -- "${args[@]}"
if [[ $# -lt 2 ]]; then
  echo "usage: launch/gpu/single_node.sh CONFIG WORKDIR [--config.a.b=v ...] [--dry-run]" >&2
  exit 2
fi
workdir="${2%/}"
cache="${COMPILATION_CACHE:-${workdir}/xla_cache}"
if [[ "${cache}" == "none" ]]; then cache=""; fi
# shellcheck source=SCRIPTDIR/../xla_flags.sh
source launch/xla_flags.sh gpu
cmd=("${PYTHON:-python3}" -m psvae_jax.main "--config=$1" "--workdir=${workdir}"
  "--compilation_cache_dir=${cache}" "${@:3}")
if [[ "${DRY_RUN}" == "1" ]]; then
  printf '+'
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
