// Runs GGUF files through real llama.cpp (the npm package node-llama-cpp,
// installed by scripts/llamacpp.sh into $SIGNAL_LLAMACPP) for the export
// tests: greedy continuations of token-id prompts, with or without a LoRA
// adapter GGUF, and llama.cpp's own tokenization of some texts. One process
// runs every job, since starting llama.cpp costs more than these tiny models.
//
// stdin:  {"jobs": [{"model": FILE, "lora": FILE|null, "prompts": [[id, ...]],
//          "max_tokens": N, "texts": ["...", ...]}, ...]}
// stdout: {"answers": [{"samples": [[id, ...]], "tokens": [[id, ...]],
//          "bos": id|null, "eos": id|null, "add_bos": bool}, ...]}
// A sample stops after max_tokens or at an end-of-generation token, which
// it keeps, as Signal's sampler does. The KV cache is F32 (llama.cpp's
// default is F16), so F32 files are compared at F32 throughout.
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const dir = process.env.SIGNAL_LLAMACPP;
const entry = createRequire(dir + "/package.json").resolve("node-llama-cpp");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(entry).href);

let input = "";
for await (const chunk of process.stdin) input += chunk;
const req = JSON.parse(input);

const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, progressLogs: false });
const models = new Map();
const answers = [];
for (const job of req.jobs) {
  if (!models.has(job.model)) models.set(job.model, await llama.loadModel({ modelPath: job.model, gpuLayers: 0 }));
  const model = models.get(job.model);
  const context = await model.createContext({
    contextSize: 512,
    batchSize: 512,
    threads: 2,
    flashAttention: false,
    experimentalKvCacheKeyType: "F32",
    experimentalKvCacheValueType: "F32",
    lora: job.lora ? { adapters: [{ filePath: job.lora, scale: 1 }] } : undefined,
  });
  const sequence = context.getSequence();
  const samples = [];
  for (const prompt of job.prompts ?? []) {
    await sequence.clearHistory();
    const out = [];
    for await (const token of sequence.evaluate(prompt, { temperature: 0, yieldEogToken: true })) {
      out.push(token);
      if (out.length >= job.max_tokens || model.isEogToken(token)) break;
    }
    samples.push(out);
  }
  answers.push({
    samples,
    tokens: (job.texts ?? []).map((t) => Array.from(model.tokenize(t, false))),
    bos: model.tokens.bos,
    eos: model.tokens.eos,
    add_bos: model.tokens.shouldPrependBosToken,
  });
  await context.dispose();
}
process.stdout.write(JSON.stringify({ answers }));
for (const model of models.values()) await model.dispose();
await llama.dispose();
