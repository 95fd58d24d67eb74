#!/usr/bin/env bash
# Runs one config on every worker of the slice at once (one process per host; jax finds the
# other hosts of a pod slice by itself), with the workdir on GCS.
#
#   TPU_NAME=psvae ZONE=us-east5-a launch/tpu/run.sh CONFIG WORKDIR [--config.a.b=v ...] [--dry-run]
#   e.g. launch/tpu/run.sh configs/svae.py gs://my-bucket/runs/svae --config.init=gs://my-bucket/ckpt/dinov2
#
# Settings: see launch/tpu/common.sh. Extra:
#   COMPILATION_CACHE    persistent XLA cache directory (default WORKDIR/xla_cache; 'none' = off)
#   ALLOW_LOCAL_WORKDIR=1  accept a non-gs:// workdir (single-host VMs only: pod workers do not
#                        share a disk, and every host must see the same checkpoints)
# Exit status: main's (0 done, 143 = stopped by SIGTERM after saving a checkpoint).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"
set -- "${ARGS[@]}"
[[ $# -ge 2 ]] || die "usage: launch/tpu/run.sh CONFIG WORKDIR [--config.a.b=v ...] [--dry-run]"
require TPU_NAME ZONE
config="$1"
workdir="${2%/}"
shift 2
if [[ "${workdir}" != gs://* && "${ALLOW_LOCAL_WORKDIR:-0}" != "1" ]]; then
  die "WORKDIR=${workdir} is not on GCS (gs://...): all hosts must read and write the same checkpoints (ALLOW_LOCAL_WORKDIR=1 for a single-host VM)"
fi
cache="${COMPILATION_CACHE:-${workdir}/xla_cache}"
if [[ "${cache}" == "none" ]]; then
  cache=""
fi

main_args=("--config=${config}" "--workdir=${workdir}" "--compilation_cache_dir=${cache}" "$@")
on_all_workers "REMOTE_VENV=$(shell_quote "${REMOTE_VENV}") bash $(shell_quote "${REMOTE_DIR}/launch/tpu/worker_run.sh") $(quote_args "${main_args[@]}")"
