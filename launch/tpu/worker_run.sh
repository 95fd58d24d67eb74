#!/usr/bin/env bash
# Runs ON each TPU worker (run.sh starts it on all of them at once): the platform's XLA flags,
# then `python -m psvae_jax.main ARGS...` from ~/$REMOTE_VENV. Exits with main's status.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=SCRIPTDIR/../xla_flags.sh
source launch/xla_flags.sh tpu
exec "${HOME}/${REMOTE_VENV:-psvae_venv}/bin/python" -m psvae_jax.main "$@"
