// llama.cpp as the CPU inference peer of scripts/bench-engine-infer.sh: the
// prefill and decode throughput of a GGUF file through node-llama-cpp's
// prebuilt CPU build (scripts/llamacpp.sh installs it; $SIGNAL_LLAMACPP
// names its directory), measured as `signal model bench-infer` measures the
// native engine:
//   prefill: one sequence of prefill_tokens random ids, up to the first
//            sampled token (its last row's logits and a greedy pick);
//   decode:  decode_batch sequences, each after an 8-token prompt (the
//            first 7 evaluated before the clock starts), decode_tokens
//            greedy steps each, the sequences' steps batched together by
//            node-llama-cpp (one llama_decode per step); tokens/s counts
//            decode_batch × decode_tokens.
// Each figure is the median of `repeats` runs after two warm-up runs, for each
// thread count of threads_list. llama.cpp runs with its defaults otherwise
// (flash attention "auto", F16 KV cache), as its users run it.
//
// stdin:  {"model": FILE, "threads_list": [1, 2], "prefill_tokens": N,
//          "decode_tokens": N, "decode_batch": N, "repeats": N}
// stdout: {"configs": [{"threads": t, "prefill_tokens_per_s": x,
//          "decode_tokens_per_s": y}, ...]}
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const dir = process.env.SIGNAL_LLAMACPP;
const entry = createRequire(dir + "/package.json").resolve("node-llama-cpp");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(entry).href);

let input = "";
for await (const chunk of process.stdin) input += chunk;
const req = JSON.parse(input);

// maxThreads 0: a context's thread count is what it asks for, not a hint.
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, progressLogs: false, maxThreads: 0 });
// Read into memory at load (no mmap), as the native engine loads: the first
// runs must not pay the page faults.
const model = await llama.loadModel({ modelPath: req.model, gpuLayers: 0, useMmap: false });

// Deterministic ids below the tokenizer's real vocabulary.
let seed = 12345;
const rnd = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
const vocab = Math.min(model.tokens.tokenizerCharacterCount ?? 32000, 32000);
const ids = (n) => Array.from({ length: n }, () => 3 + Math.floor(rnd() * (vocab - 3)));
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

async function prefill(threads) {
  const context = await model.createContext({ contextSize: 1024, batchSize: 512, threads });
  const seq = context.getSequence();
  const times = [];
  for (let r = -1; r <= req.repeats; r++) {
    await seq.clearHistory();
    const prompt = ids(req.prefill_tokens);
    const t0 = performance.now();
    for await (const _ of seq.evaluate(prompt, { temperature: 0, yieldEogToken: true })) break;
    if (r > 0) times.push(performance.now() - t0);
  }
  await context.dispose();
  return req.prefill_tokens / (median(times) / 1000);
}

async function decode(threads) {
  const B = req.decode_batch;
  const context = await model.createContext({ contextSize: 256, batchSize: 512, threads, sequences: B });
  const seqs = Array.from({ length: B }, () => context.getSequence());
  const times = [];
  for (let r = -1; r <= req.repeats; r++) {
    const prompts = seqs.map(() => ids(8));
    await Promise.all(seqs.map(async (s, i) => {
      await s.clearHistory();
      await s.evaluateWithoutGeneratingNewTokens(prompts[i].slice(0, 7));
    }));
    let made = 0;
    const t0 = performance.now();
    await Promise.all(seqs.map(async (s, i) => {
      let n = 0;
      for await (const _ of s.evaluate(prompts[i].slice(7), { temperature: 0, yieldEogToken: true })) {
        made++;
        if (++n >= req.decode_tokens) break;
      }
    }));
    const dt = performance.now() - t0;
    if (made !== B * req.decode_tokens) throw new Error(`decoded ${made} tokens, want ${B * req.decode_tokens}`);
    if (r > 0) times.push(dt);
  }
  await context.dispose();
  return (B * req.decode_tokens) / (median(times) / 1000);
}

const configs = [];
for (const threads of req.threads_list ?? [2]) {
  configs.push({ threads, prefill_tokens_per_s: await prefill(threads), decode_tokens_per_s: await decode(threads) });
}
process.stdout.write(JSON.stringify({ configs }) + "\n");
await model.dispose();
await llama.dispose();
