#!/usr/bin/env bash
# Deletes the TPU VM / slice (with QUEUED=1: its queued resource and the slice with it).
#
#   TPU_NAME=psvae ZONE=us-east5-a launch/tpu/delete.sh [--dry-run]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"
[[ ${#ARGS[@]} -eq 0 ]] || die "delete.sh takes no positional arguments (got: ${ARGS[*]})"
require TPU_NAME ZONE
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
location_flags

if [[ "${QUEUED}" == "1" ]]; then
  run gcloud compute tpus queued-resources delete "${QR_NAME}" "${LOCATION_FLAGS[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${LOCATION_FLAGS[@]}" --quiet
fi
