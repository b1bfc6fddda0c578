#!/usr/bin/env bash
# Installs (once) and prints the directory of the GGUF consumers the export
# tests judge with (export/llamacpp_test.go, export/gguf_py_test.go): real
# llama.cpp, as the npm package node-llama-cpp at one pinned version with
# its prebuilt Linux x64 CPU binary (DIR/node_modules), and ggml's gguf
# Python package (DIR/python, run by the pinned Python test environment of
# scripts/pyenv.sh, which has its dependencies). Kept in the user's cache
# directory under both versions, so fresh clones and CI runs on one machine
# share it. The tests read the path from $SIGNAL_LLAMACPP (make test sets it).
#
# Only llama.cpp's CPU build is fetched: the package's optional dependencies
# would bring CUDA and Vulkan builds (about 700 MB) that the tests never
# load, and its postinstall step would try to build llama.cpp from source
# when no prebuilt binary fits, which needs a network the tests must not
# depend on.
# First install: about 90 MB, under a minute. Later runs: a stat.
set -euo pipefail
version="3.22.1"      # node-llama-cpp
gguf_version="0.19.0" # gguf on the package index
here="$(cd "$(dirname "$0")" && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/signal"
dir="$cache/llama-cpp-$version-gguf-$gguf_version"
if [ ! -f "$dir/.complete" ]; then
  command -v npm >/dev/null || { echo "llamacpp.sh: npm is missing (apt-get install nodejs npm)" >&2; exit 1; }
  mkdir -p "$cache"
  # One installer at a time; a second waits and then finds it complete.
  exec 9>"$cache/llama-cpp.lock"
  flock 9
  if [ ! -f "$dir/.complete" ]; then
    echo "installing node-llama-cpp $version (CPU build) and gguf $gguf_version in $dir (about 90 MB, once)" >&2
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp"
    echo '{"name": "signal-llamacpp", "private": true, "type": "module"}' >"$dir.tmp/package.json"
    (cd "$dir.tmp" && npm install --silent --no-audit --no-fund --ignore-scripts --omit=optional \
      "node-llama-cpp@$version" "@node-llama-cpp/linux-x64@$version" >&2)
    python="$("$here/pyenv.sh")"
    "$python" -m pip install --quiet --disable-pip-version-check --no-input --no-deps --no-compile \
      --target "$dir.tmp/python" "gguf==$gguf_version" >&2
    PYTHONPATH="$dir.tmp/python" "$python" -c "import gguf" >&2
    # Built aside and moved into place, so an interrupted install is never
    # taken for a complete one.
    (cd "$dir.tmp" && node -e "import('node-llama-cpp').then(m => m.getLlama({gpu: false, build: 'never', progressLogs: false})).then(() => process.exit(0))") >&2
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    touch "$dir/.complete"
    ls -d "$cache"/llama-cpp-* 2>/dev/null | grep -v "^$dir$" | sed 's/^/  stale (rm -rf to free): /' >&2 || true
  fi
fi
echo "$dir"
