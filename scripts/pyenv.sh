#!/usr/bin/env bash
# Builds (once) and prints the path of the Python test environment's
# interpreter: a venv holding exactly scripts/pyenv.lock (torch 2.x, tinker,
# transformers, peft, safetensors, numpy and their dependencies), kept in
# the user's cache directory under the lock's hash, so fresh clones and CI
# runs on one machine share it and a changed lock builds a new one.
#
# First install: about 5.6 GB on disk (torch's wheel brings the CUDA
# libraries), a few minutes on a fast link. Later runs: a hash and a stat.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lock="$here/pyenv.lock"
base="${PYTHON_FOR_VENV:-/usr/bin/python3}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/signal"
hash="$(sha256sum "$lock" | cut -c1-16)"
venv="$cache/pyenv-$hash"
if [ ! -f "$venv/.complete" ]; then
  mkdir -p "$cache"
  # One builder at a time; a second waits and then finds it complete.
  exec 9>"$cache/pyenv.lock"
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    echo "building the Python test environment in $venv (about 5.6 GB, once per lock)" >&2
    rm -rf "$venv.tmp"
    "$base" -m venv "$venv.tmp"
    "$venv.tmp/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
      --no-deps --no-compile -r "$lock" >&2
    "$venv.tmp/bin/python" -c "import torch, transformers, peft, safetensors, numpy, tinker, tinker_cookbook" >&2
    # Built aside and moved into place, so an interrupted build is never
    # taken for a complete one. The entry scripts' shebangs keep the .tmp
    # path; only bin/python is used, which finds its prefix from its own path.
    rm -rf "$venv"
    mv "$venv.tmp" "$venv"
    touch "$venv/.complete"
    # Older environments of this project are left for the user to remove:
    ls -d "$cache"/pyenv-* 2>/dev/null | grep -v "$venv" | sed 's/^/  stale (rm -rf to free): /' >&2 || true
  fi
fi
echo "$venv/bin/python"
