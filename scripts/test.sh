#!/usr/bin/env bash
# The whole test suite: creates (or reuses) the pinned test environment in .venv, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k parity`).
# With CI set (.ci/run sets it), nothing the suite needs may be missing: a system tool that cannot be installed, a
# failed pip install, a native kernel build that fails or a skip outside tests/expected_skips.py fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ci="${CI:-}"

# System tools, each with the Debian package that provides it: the kernel build tests use clang (with OpenMP), an
# ARM64 cross-compiler and qemu-user, the chat page's tests chromium (driven by Playwright), and the video oracle
# torchcodec FFmpeg's shared libraries.
tools=(clang aarch64-linux-gnu-gcc qemu-aarch64 chromium ffmpeg /usr/aarch64-linux-gnu/include/stdio.h
       /usr/lib/llvm-*/lib/libomp.so)
packages=(clang gcc-aarch64-linux-gnu qemu-user chromium ffmpeg libc6-dev-arm64-cross libomp-dev)
have() { if [[ $1 == /* ]]; then compgen -G "$1" >/dev/null; else command -v "$1" >/dev/null; fi; }
missing=()
for i in "${!tools[@]}"; do have "${tools[$i]}" || missing+=("$i"); done
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  want=$(for i in "${missing[@]}"; do echo "${packages[$i]}"; done | xargs)
  echo "scripts/test.sh: installing $want" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $want; } >/tmp/qwen2vl-apt.log 2>&1 \
    || { tail -20 /tmp/qwen2vl-apt.log >&2; [ -z "$ci" ] || { echo "scripts/test.sh: apt-get install $want failed" >&2; exit 1; }; }
fi
for i in "${!tools[@]}"; do
  if ! have "${tools[$i]}"; then
    if [ -n "$ci" ]; then
      echo "scripts/test.sh: ${tools[$i]} is missing (Debian package ${packages[$i]}); CI needs it" >&2
      exit 1
    fi
    echo "scripts/test.sh: ${tools[$i]} is missing (package ${packages[$i]}); its tests will skip" >&2
  fi
done

venv="${QWEN2VL_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! out=$("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt -e . 2>&1)
then
  echo "$out" >&2
  echo "scripts/test.sh: pip install -r requirements-test.txt failed" >&2
  exit 1
fi
grep -v "^WARNING: Location 'file:" <<<"$out" >&2 || true
"$venv/bin/python" -m ruff check qwen2vl tests scripts  # the code style: a lint failure fails the run
exec "$venv/bin/python" -m pytest -q -rs "$@"
