#!/usr/bin/env bash
# The whole test suite: creates (or reuses) the pinned test environment in .venv, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
# The kernel build tests use clang, an ARM64 cross-compiler and qemu-user, the chat page's tests Debian's chromium
# (driven by Playwright), and the video oracle torchcodec FFmpeg's shared libraries; installed here where apt-get can
# (root).
tools=(clang aarch64-linux-gnu-gcc qemu-aarch64 chromium ffmpeg)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v "${tools[@]}" >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libomp-dev \
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user chromium ffmpeg; } >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install clang / gcc-aarch64-linux-gnu / qemu-user / chromium / ffmpeg; their tests will skip" >&2
fi
venv="${QWEN2VL_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt -e . 2>&1 \
  | grep -v "^WARNING: Location 'file:" || true
exec "$venv/bin/python" -m pytest -q "$@"
