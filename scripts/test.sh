#!/usr/bin/env bash
# The whole test suite: creates (or reuses) the pinned test environment in .venv, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${QWEN2VL_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt -e . 2>&1 \
  | grep -v "^WARNING: Location 'file:" || true
# The qwen-vl-utils oracle reads videos with decord here (torchvision 0.29 cannot, torchcodec does not load).
export FORCE_QWENVL_VIDEO_READER=decord
exec "$venv/bin/python" -m pytest -q "$@"
