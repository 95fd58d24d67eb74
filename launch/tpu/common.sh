#!/usr/bin/env bash
# Shared settings and helpers of the TPU scripts; sourced by them, not run on its own.
#
# Settings (environment variables):
#   TPU_NAME          TPU VM / pod slice name (required)
#   ZONE              e.g. us-central2-b, us-east5-a (required)
#   PROJECT           gcloud project ('' = gcloud's configured default)
#   ACCELERATOR_TYPE  e.g. v4-8, v5p-32, v5litepod-16, v6e-8 (create.sh, supervise.sh)
#   RUNTIME_VERSION   TPU VM software version ('' = chosen from ACCELERATOR_TYPE)
#   SPOT=1            spot (preemptible) capacity
#   QUEUED=1          create / delete through a queued resource named QR_NAME
#   QR_NAME           queued resource name (default: ${TPU_NAME}-qr)
#   REMOTE_DIR        code directory on every worker, relative to the home dir (default psvae_jax)
#   REMOTE_VENV       Python virtual environment on every worker (default psvae_venv)
#   DRY_RUN=1         print the gcloud commands instead of running them (same as --dry-run)

DRY_RUN="${DRY_RUN:-0}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
PROJECT="${PROJECT:-}"
REMOTE_DIR="${REMOTE_DIR:-psvae_jax}"
REMOTE_VENV="${REMOTE_VENV:-psvae_venv}"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "${LAUNCH_DIR}/.." && pwd)"
export DRY_RUN

die() {
  echo "error: $*" >&2
  exit 2
}

# Splits the script's arguments: --dry-run sets DRY_RUN=1, everything else lands in ARGS.
parse_common_args() {
  ARGS=()
  local arg
  for arg in "$@"; do
    if [[ "${arg}" == "--dry-run" ]]; then
      DRY_RUN=1
    else
      ARGS+=("${arg}")
    fi
  done
  export DRY_RUN
}

is_dry_run() {
  [[ "${DRY_RUN}" == "1" ]]
}

# One argument in shell syntax: as is when it is plain, else in single quotes.
shell_quote() {
  local s="$1" q="'"
  if [[ "${s}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "${s}"
  else
    printf "'%s'" "${s//${q}/${q}\\${q}${q}}"
  fi
}

# Quotes arguments into one shell-safe command line (for printing and remote commands).
quote_args() {
  local out="" arg
  for arg in "$@"; do
    out+=" $(shell_quote "${arg}")"
  done
  printf '%s\n' "${out# }"
}

# Runs a command, or prints it (shell-quoted, prefixed with '+ ') under DRY_RUN=1.
run() {
  if is_dry_run; then
    printf '+ %s\n' "$(quote_args "$@")"
    return 0
  fi
  "$@"
}

require() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "${name} is not set (see the settings at the top of launch/tpu/common.sh)"
  done
}

# The common tail of every gcloud TPU command: zone and (optional) project.
location_flags() {
  LOCATION_FLAGS=(--zone="${ZONE}")
  if [[ -n "${PROJECT}" ]]; then
    LOCATION_FLAGS+=(--project="${PROJECT}")
  fi
}

# Default TPU VM software version per chip family (Cloud TPU docs, "TPU software versions").
default_runtime_version() {
  case "${ACCELERATOR_TYPE}" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "unknown ACCELERATOR_TYPE=${ACCELERATOR_TYPE}: expected v4-N, v5p-N, v5litepod-N or v6e-N" ;;
  esac
}

# Runs one shell command line on every worker of the slice (gcloud ... ssh --worker=all).
on_all_workers() {
  location_flags
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${LOCATION_FLAGS[@]}" --worker=all \
    --command="$1"
}
