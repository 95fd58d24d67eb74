#!/usr/bin/env bash
# Runs ON a TPU worker (setup.sh calls it on all of them): creates ~/$REMOTE_VENV and installs
# jax[tpu] at the version requirements.txt pins, plus requirements.txt without torch.
#
# torch is left out on purpose: training never imports it. It is only the reference for the
# parity tests and benchmarks, which run on any CPU machine (see docs/launch.md).
# DRY_RUN=1 prints the install commands and the requirements list instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REMOTE_VENV="${REMOTE_VENV:-psvae_venv}"
venv="${HOME}/${REMOTE_VENV}"

version_ok() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null
}
python="${PYTHON:-}"
if [[ -z "${python}" ]]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if version_ok "${candidate}"; then
      python="${candidate}"
      break
    fi
  done
fi
if [[ -z "${python}" ]] || ! version_ok "${python}"; then
  echo "error: no Python >= 3.11 on this worker (PYTHON='${PYTHON:-}'); the requirements need it." >&2
  echo "       Install one (e.g. sudo apt-get install -y python3.11 python3.11-venv) and set PYTHON." >&2
  exit 2
fi

jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
[[ -n "${jax_version}" ]] || { echo "error: requirements.txt pins no jax version" >&2; exit 2; }
requirements="$(mktemp)"
grep -v -E '^torch([=<>~ ]|$)' requirements.txt > "${requirements}"

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  echo "+ ${python} -m venv ${venv}"
  echo "+ ${venv}/bin/python -m pip install jax[tpu]==${jax_version} -r ${requirements}"
  sed 's/^/  requirement: /' "${requirements}"
  rm -f "${requirements}"
  exit 0
fi
"${python}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet --upgrade pip
# jax[tpu]==X brings the matching jaxlib and libtpu.
"${venv}/bin/python" -m pip install "jax[tpu]==${jax_version}" -r "${requirements}"
rm -f "${requirements}"
# Only imports: touching the TPU here would wait for the other hosts of a pod slice.
"${venv}/bin/python" -c 'import jax, libtpu; print("jax", jax.__version__, "with libtpu installed")'
