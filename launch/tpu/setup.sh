#!/usr/bin/env bash
# Puts the code on every worker of the slice and installs jax[tpu] + the requirements there.
#
#   TPU_NAME=psvae ZONE=us-east5-a launch/tpu/setup.sh [--dry-run]
#
# Settings: see launch/tpu/common.sh. Extra:
#   CODE_SOURCE=copy  (default) pack this checkout (without .git) and copy it to all workers
#   CODE_SOURCE=git   clone GIT_URL at GIT_REF (default main) on every worker
#   PYTHON            interpreter on the workers used to create REMOTE_VENV ('' = the newest
#                     python3.1x found; Python >= 3.11 is required)
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"
[[ ${#ARGS[@]} -eq 0 ]] || die "setup.sh takes no positional arguments (got: ${ARGS[*]})"
require TPU_NAME ZONE
CODE_SOURCE="${CODE_SOURCE:-copy}"
location_flags

case "${CODE_SOURCE}" in
  copy)
    archive="${TMPDIR:-/tmp}/${TPU_NAME}-psvae_jax.tar.gz"
    run tar -C "${REPO_ROOT}" --exclude=.git --exclude=__pycache__ --exclude=.pytest_cache \
      -czf "${archive}" .
    run gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:psvae_jax.tar.gz" \
      "${LOCATION_FLAGS[@]}" --worker=all
    on_all_workers "$(quote_args rm -rf "${REMOTE_DIR}") && $(quote_args mkdir -p "${REMOTE_DIR}") && $(quote_args tar -xzf psvae_jax.tar.gz -C "${REMOTE_DIR}")"
    ;;
  git)
    require GIT_URL
    ref="${GIT_REF:-main}"
    on_all_workers "( test -d $(quote_args "${REMOTE_DIR}/.git") || $(quote_args git clone --quiet "${GIT_URL}" "${REMOTE_DIR}") ) && cd $(quote_args "${REMOTE_DIR}") && $(quote_args git fetch --quiet origin "${ref}") && git checkout --quiet --detach FETCH_HEAD"
    ;;
  *) die "CODE_SOURCE=${CODE_SOURCE}: expected copy or git" ;;
esac

env_prefix="REMOTE_VENV=$(shell_quote "${REMOTE_VENV}")"
if [[ -n "${PYTHON:-}" ]]; then
  env_prefix+=" PYTHON=$(shell_quote "${PYTHON}")"
fi
on_all_workers "cd $(shell_quote "${REMOTE_DIR}") && ${env_prefix} bash launch/tpu/install_worker.sh"
