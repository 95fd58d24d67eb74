#!/usr/bin/env bash
# Creates a TPU VM or pod slice, directly or through a queued resource, on demand or spot.
#
#   TPU_NAME=psvae ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 launch/tpu/create.sh [--dry-run]
#   QUEUED=1 SPOT=1 TPU_NAME=psvae ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 launch/tpu/create.sh
#
# Settings: see launch/tpu/common.sh. Extra for queued resources:
#   VALID_UNTIL   how long the request may wait for capacity, e.g. 6h ('' = no limit)
#   WAIT=0        return right after the request instead of waiting until the slice is ACTIVE
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"
[[ ${#ARGS[@]} -eq 0 ]] || die "create.sh takes no positional arguments (got: ${ARGS[*]})"
require TPU_NAME ZONE ACCELERATOR_TYPE
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version)}"
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
location_flags

capacity=()
if [[ "${SPOT}" == "1" ]]; then
  capacity=(--spot)
fi

if [[ "${QUEUED}" != "1" ]]; then
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${LOCATION_FLAGS[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" "${capacity[@]}"
  exit 0
fi

valid=()
if [[ -n "${VALID_UNTIL:-}" ]]; then
  valid=(--valid-until-duration="${VALID_UNTIL}")
fi
run gcloud compute tpus queued-resources create "${QR_NAME}" "${LOCATION_FLAGS[@]}" \
  --node-id="${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
  --runtime-version="${RUNTIME_VERSION}" "${capacity[@]}" "${valid[@]}"

if [[ "${WAIT:-1}" != "1" ]] || is_dry_run; then
  exit 0
fi
# A queued resource is granted asynchronously: wait until its slice is ACTIVE.
while true; do
  state="$(gcloud compute tpus queued-resources describe "${QR_NAME}" "${LOCATION_FLAGS[@]}" \
    --format='value(state.state)')"
  case "${state}" in
    ACTIVE) echo "queued resource ${QR_NAME}: ACTIVE"; exit 0 ;;
    FAILED | SUSPENDED) die "queued resource ${QR_NAME} is ${state}" ;;
    *) echo "queued resource ${QR_NAME}: ${state}; waiting"; sleep 60 ;;
  esac
done
