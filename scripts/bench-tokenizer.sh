#!/usr/bin/env bash
# Tokenizer throughput (trainer/tokenizer): Go encode/decode MB/s and load time
# on the committed Llama 3 and Llama 2 tokenizers, and, when node and the
# reference's node_modules are installed, transformers.js encode MB/s on the
# same text with the Go/reference ratio. Figures only, no pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."
pkg=./trainer/tokenizer
out=$(go test -run '^$' -bench 'Encode|Decode|Load' -benchtime 2s -cpu 1 "$pkg" | grep '^Benchmark')
echo "$out"

gen=trainer/tokenizer/testdata/gen
if command -v node >/dev/null && [ -d "$gen/node_modules/@lenml/tokenizers" ]; then
  ref=$(cd "$gen" && node bench.js)
  echo "transformers.js (@lenml/tokenizers) encode MB/s:"
  echo "$ref" | sed 's/^/  /'
  go_bl=$(echo "$out" | awk '/Encode\/byte-level\/cached/ {print $(NF-1)}')
  go_sp=$(echo "$out" | awk '/Encode\/sentencepiece/ {print $(NF-1)}')
  ref_bl=$(echo "$ref" | awk '$1=="byte-level-bpe" {print $2}')
  ref_sp=$(echo "$ref" | awk '$1=="sentencepiece-bpe" {print $2}')
  awk -v a="$go_bl" -v b="$ref_bl" 'BEGIN {printf "ratio Go/transformers.js, byte-level encode:    %.1fx\n", a/b}'
  awk -v a="$go_sp" -v b="$ref_sp" 'BEGIN {printf "ratio Go/transformers.js, sentencepiece encode: %.1fx\n", a/b}'
else
  echo "(no reference ratio: run 'npm install' in $gen to compare with transformers.js)"
fi
