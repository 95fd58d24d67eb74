#!/usr/bin/env bash
# Keeps a training run going through preemptions: (re)creates the slice when it is gone or
# preempted, sets it up, runs the config, and re-runs until main exits 0. Every re-run resumes
# from the workdir's latest checkpoint (main saves one on SIGTERM and exits 143).
#
#   TPU_NAME=psvae ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 SPOT=1 \
#     launch/tpu/supervise.sh CONFIG gs://BUCKET/runs/NAME [--config.a.b=v ...] [--dry-run]
#
# Settings: see launch/tpu/common.sh and run.sh. Extra:
#   MAX_RESTARTS   re-runs after preemptions before giving up (default 100)
#   MAX_FAILURES   consecutive failures that are not preemptions before giving up (default 3)
#   RETRY_SLEEP    seconds between attempts (default 60)
# DRY_RUN=1 prints the commands of each attempt; DRY_RUN_TPU_STATE (default READY) and
# DRY_RUN_EXIT_CODES (space-separated, one per attempt, default 0) stand in for the slice's state
# and main's exit status so the loop can be followed offline.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "${HERE}/common.sh"
parse_common_args "$@"
set -- "${ARGS[@]}"
[[ $# -ge 2 ]] || die "usage: launch/tpu/supervise.sh CONFIG WORKDIR [--config.a.b=v ...] [--dry-run]"
require TPU_NAME ZONE ACCELERATOR_TYPE
MAX_RESTARTS="${MAX_RESTARTS:-100}"
MAX_FAILURES="${MAX_FAILURES:-3}"
RETRY_SLEEP="${RETRY_SLEEP:-60}"
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
read -r -a dry_exit_codes <<< "${DRY_RUN_EXIT_CODES:-0}"
location_flags

# READY, or the slice's problem state (PREEMPTED, TERMINATED, SUSPENDED, NOT_FOUND, ...).
slice_state() {
  local cmd state
  if [[ "${QUEUED}" == "1" ]]; then
    cmd=(gcloud compute tpus queued-resources describe "${QR_NAME}" "${LOCATION_FLAGS[@]}"
      --format='value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${LOCATION_FLAGS[@]}"
      --format='value(state)')
  fi
  if is_dry_run; then
    run "${cmd[@]}" >&2
    echo "${DRY_RUN_TPU_STATE:-READY}"
    return
  fi
  state="$("${cmd[@]}" 2> /dev/null || echo NOT_FOUND)"
  # A granted queued resource is ACTIVE while its slice is READY.
  [[ "${state}" == "ACTIVE" ]] && state="READY"
  echo "${state:-NOT_FOUND}"
}

recreate() {
  local state="$1"
  if [[ "${state}" != "NOT_FOUND" ]]; then
    bash "${HERE}/delete.sh"
  fi
  bash "${HERE}/create.sh"
  bash "${HERE}/setup.sh"
}

restarts=0
failures=0
attempt=0
needs_setup=1
while true; do
  attempt=$((attempt + 1))
  state="$(slice_state)"
  if [[ "${state}" != "READY" ]]; then
    echo "supervise: attempt ${attempt}: slice ${TPU_NAME} is ${state}; (re)creating it"
    recreate "${state}"
    needs_setup=0
  elif [[ "${needs_setup}" == "1" ]]; then
    bash "${HERE}/setup.sh"
    needs_setup=0
  fi

  echo "supervise: attempt ${attempt}: running ${1} in ${2}"
  if is_dry_run; then
    bash "${HERE}/run.sh" "$@"
    rc="${dry_exit_codes[attempt - 1]:-0}"
  elif bash "${HERE}/run.sh" "$@"; then
    rc=0
  else
    rc=$?
  fi
  if [[ "${rc}" == "0" ]]; then
    echo "supervise: finished after ${attempt} attempt(s)"
    exit 0
  fi

  state="$(slice_state)"
  if [[ "${state}" != "READY" || "${rc}" == "143" ]]; then
    restarts=$((restarts + 1))
    failures=0
    echo "supervise: preempted (exit ${rc}, slice ${state}); resuming from the last checkpoint (restart ${restarts}/${MAX_RESTARTS})"
    [[ "${restarts}" -le "${MAX_RESTARTS}" ]] || die "gave up after ${MAX_RESTARTS} restarts"
  else
    failures=$((failures + 1))
    echo "supervise: run failed with exit ${rc} on a healthy slice (failure ${failures}/${MAX_FAILURES})"
    [[ "${failures}" -lt "${MAX_FAILURES}" ]] || die "gave up after ${MAX_FAILURES} consecutive failures (exit ${rc})"
  fi
  if ! is_dry_run; then
    sleep "${RETRY_SLEEP}"
  fi
done
