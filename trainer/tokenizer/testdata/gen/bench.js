// Times transformers.js (the reference) encoding testdata/bench.txt, for
// scripts/bench-tokenizer.sh to print next to the Go figures.
// Usage: node bench.js  → one line per tokenizer: "<name> <MB/s>"
"use strict";
const fs = require("fs");
const path = require("path");
const { TokenizerLoader } = require("@lenml/tokenizers");

const text = fs.readFileSync(path.join(__dirname, "../bench.txt"), "utf8");
const bytes = Buffer.byteLength(text, "utf8");
for (const name of ["byte-level-bpe", "sentencepiece-bpe"]) {
  const dir = path.join(__dirname, "..", name);
  const tok = TokenizerLoader.fromPreTrained({
    tokenizerJSON: JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8")),
    tokenizerConfig: JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8")),
  });
  for (let i = 0; i < 20; i++) tok.encode(text, { add_special_tokens: false }); // warm up (JIT, cache)
  let n = 0;
  const t0 = process.hrtime.bigint();
  let elapsed = 0;
  while (elapsed < 2e9) {
    tok.encode(text, { add_special_tokens: false });
    n++;
    elapsed = Number(process.hrtime.bigint() - t0);
  }
  console.log(`${name} ${((bytes * n) / (elapsed / 1e9) / 1e6).toFixed(2)}`);
}
