#!/usr/bin/env bash
# One SLURM task (srun starts one per process): joins the job's processes through
# psvae_jax.main's --coordinator_address / --num_processes / --process_id and trains.
# Started by launch/gpu/slurm.sbatch, which exports PSVAE_COORDINATOR and PSVAE_PROCS.
# With PSVAE_PROCS=gpu each task sees only its own GPU (CUDA_VISIBLE_DEVICES=SLURM_LOCALID).
# DRY_RUN=1 prints the python command instead of running it.
set -euo pipefail
args=()
for arg in "$@"; do
  if [[ "${arg}" == "--dry-run" ]]; then DRY_RUN=1; else args+=("${arg}"); fi
done
set -- "${args[@]}"
for name in PSVAE_COORDINATOR SLURM_NTASKS SLURM_PROCID; do
  if [[ -z "${!name:-}" ]]; then
    echo "error: ${name} is not set: this runs under srun from launch/gpu/slurm.sbatch" >&2
    exit 2
  fi
done
if [[ "${PSVAE_PROCS:-gpu}" == "gpu" ]]; then
  export CUDA_VISIBLE_DEVICES="${SLURM_LOCALID:?SLURM_LOCALID is not set}"
fi
cmd=("${PYTHON:-python3}" -m psvae_jax.main "--coordinator_address=${PSVAE_COORDINATOR}"
  "--num_processes=${SLURM_NTASKS}" "--process_id=${SLURM_PROCID}" "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '+'
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    printf ' CUDA_VISIBLE_DEVICES=%s' "${CUDA_VISIBLE_DEVICES}"
  fi
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
