package trainer

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/signal-p2p/signal/trainer/packed"
)

// generatedQwen2 writes a random Qwen2 (Qwen2ForCausalLM: q/k/v biases,
// scaled up so a dropped one shows; a tied head; a listed but unused
// sliding window) into dir/gen-qwen2.
func generatedQwen2(t *testing.T, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "gen-qwen2")
	window, off := 16, false
	cfg := Config{ModelType: "qwen2", Architectures: []string{"Qwen2ForCausalLM"}, HiddenSize: 64,
		IntermediateSize: 96, NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2, VocabSize: 300,
		MaxPositionEmbeddings: 512, SlidingWindow: &window, UseSlidingWindow: &off, RopeTheta: 1e6,
		RMSNormEps: 1e-6, TieWordEmbeddings: true}
	if err := GenerateRandomModel(out, cfg, 8, ""); err != nil {
		t.Fatal(err)
	}
	return out
}

// generatedQwen3 writes a random Qwen3 dense model (Qwen3ForCausalLM:
// per-head q/k norms with weights away from 1, head_dim 24 while hidden /
// heads is 16, an untied head, BF16) into dir/gen-qwen3.
func generatedQwen3(t *testing.T, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "gen-qwen3")
	off := false
	cfg := Config{ModelType: "qwen3", Architectures: []string{"Qwen3ForCausalLM"}, HiddenSize: 64,
		IntermediateSize: 96, NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2, HeadDim: 24,
		VocabSize: 300, MaxPositionEmbeddings: 512, UseSlidingWindow: &off, RopeTheta: 1e6, RMSNormEps: 1e-6}
	if err := GenerateRandomModel(out, cfg, 9, ""); err != nil {
		t.Fatal(err)
	}
	return out
}

func readF32(t *testing.T, path string) []float32 {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]float32, len(raw)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return out
}

// modelDir maps a test model name (or an absolute directory) to its path.
func modelDir(name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	return filepath.Join("testdata", name)
}

// testTokens returns n deterministic ids spread over the vocabulary.
func testTokens(n, vocab, salt int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = (i*7919 + salt*104729 + 13) % vocab
	}
	return out
}

// Tolerance: the weights are BF16 values converted to f32 exactly on both
// sides, and both compute in f32, so the only differences are summation
// order in the GEMMs and softmax (and exp/cos rounding): a few f32 ulps per
// operation, about 1e-6 relative per layer. 1e-4 of the largest logit leaves
// two orders of margin while still catching any wrong sign, missing scale,
// misplaced head or off-by-one position (those change logits by O(1)).
const logitRelTol = 1e-4

type refGreedy struct {
	Samples []struct {
		Tokens   []int
		Logprobs []float64
	}
}

// TestMatchesPyTorch checks logits and greedy continuations (tokens and
// logprobs, through the model's own KV cache) on both tiny models, with and
// without their adapters, and on a generated F32 llama3-rope model, against
// Hugging Face transformers + PEFT (reference/hf_ref.py), in one
// interpreter run. Both compute in float32 on the same BF16-exact weights.
func TestMatchesPyTorch(t *testing.T) {
	var checks []refCheck
	var reqs []map[string]any
	tmp := t.TempDir()
	// A generated model covers what the tiny ones do not: llama3 RoPE
	// scaling (with an original context short enough that all three
	// frequency bands occur), F32 weights used in place from the mapping.
	gen := filepath.Join(tmp, "gen-llama3")
	gcfg := Config{HiddenSize: 48, IntermediateSize: 64, NumHiddenLayers: 2, NumAttentionHeads: 3,
		NumKeyValueHeads: 1, HeadDim: 16, VocabSize: 500, MaxPositionEmbeddings: 256, RopeTheta: 500000,
		TorchDtype: "float32", RopeScaling: &RopeScaling{RopeType: "llama3", Factor: 8, LowFreqFactor: 1,
			HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 32}}
	if err := GenerateRandomModel(gen, gcfg, 5, ""); err != nil {
		t.Fatal(err)
	}
	// Mistral: MistralForCausalLM in transformers, a BF16 file, GQA, an
	// untied head, and a sliding window shorter than max_position_embeddings
	// (served up to the window, inside which it is plain causal attention).
	mistral := filepath.Join(tmp, "gen-mistral")
	window := 64
	mcfg := Config{ModelType: "mistral", Architectures: []string{"MistralForCausalLM"}, HiddenSize: 64,
		IntermediateSize: 96, NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2, VocabSize: 300,
		MaxPositionEmbeddings: 512, SlidingWindow: &window, RopeTheta: 1e6}
	if err := GenerateRandomModel(mistral, mcfg, 6, ""); err != nil {
		t.Fatal(err)
	}
	if got := mustLoad(t, mistral).Config().MaxPositionEmbeddings; got != window {
		t.Fatalf("mistral context %d, want the sliding window %d", got, window)
	}
	qwen2, qwen3 := generatedQwen2(t, tmp), generatedQwen3(t, tmp)
	for _, name := range append(slices.Clone(tinyModels), gen, mistral, qwen2, qwen3) {
		m := mustLoad(t, name)
		V := m.Config().VocabSize
		adapters := []string{"", filepath.Join("testdata", name, "adapter")}
		if name == mistral || name == qwen2 || name == qwen3 {
			adapters = adapters[:1]
		}
		if name == gen {
			if !m.mapped {
				t.Error("F32 weights were copied, not used in place")
			}
			adapters = adapters[:1]
		}
		for _, adapter := range adapters {
			c := refCheck{model: name, adapter: adapter, tokens: testTokens(19, V, 1),
				prompts:    [][]int{testTokens(3, V, 2), testTokens(11, V, 3)},
				logitsPath: filepath.Join(tmp, fmt.Sprintf("%d.f32", len(checks)))}
			checks = append(checks, c)
			base := map[string]any{"model": modelDir(name)}
			if adapter != "" {
				base["adapter"] = adapter
			}
			lr := map[string]any{"cmd": "logits", "tokens": c.tokens, "out": c.logitsPath}
			gr := map[string]any{"cmd": "greedy", "prompts": c.prompts, "max_tokens": 10}
			for k, v := range base {
				lr[k], gr[k] = v, v
			}
			reqs = append(reqs, lr, gr)
		}
	}
	for _, ref := range references(t) {
		// Each oracle writes its own logits files.
		reqs := slices.Clone(reqs)
		for k := range reqs {
			if out, ok := reqs[k]["out"].(string); ok {
				r := maps.Clone(reqs[k])
				r["out"] = out + "." + ref.name
				reqs[k] = r
			}
		}
		var ans struct{ Answers []json.RawMessage }
		runRef(t, ref, nil, map[string]any{"cmd": "batch", "requests": reqs}, &ans)
		compareWithReference(t, ref, checks, ans.Answers)
	}
}

// refCheck is one model (and adapter) TestMatchesPyTorch compares.
type refCheck struct {
	model, adapter string
	tokens         []int
	prompts        [][]int
	logitsPath     string
}

func compareWithReference(t *testing.T, ref reference, checks []refCheck, answers []json.RawMessage) {
	for i, c := range checks {
		label := filepath.Base(c.model)
		if c.adapter != "" {
			label += "+adapter"
		}
		t.Run(label+"/"+ref.name, func(t *testing.T) {
			forEachWeightPath(t, func(t *testing.T, packedOn bool) {
				m := mustLoad(t, c.model)
				if (m.lmHead().p != nil) != packedOn {
					t.Fatalf("packed weights: %v, want %v", m.lmHead().p != nil, packedOn)
				}
				var lora *LoRA
				if c.adapter != "" {
					lora = mustAdapter(t, m, c.model)
				}
				got, err := m.Logits(context.Background(), c.tokens, lora)
				if err != nil {
					t.Fatal(err)
				}
				compareLogits(t, got, readF32(t, c.logitsPath+"."+ref.name))
				var la struct {
					Class string `json:"class"`
				}
				if err := json.Unmarshal(answers[2*i], &la); err != nil {
					t.Fatal(err)
				}
				if want := m.Config().Architectures; len(want) > 0 && la.Class != want[0] {
					t.Fatalf("transformers ran %s, the directory says %v", la.Class, want)
				}

				var want refGreedy
				if err := json.Unmarshal(answers[2*i+1], &want); err != nil {
					t.Fatal(err)
				}
				p := DefaultSamplingParams()
				p.Temperature, p.MaxTokens = 0, 10
				samples, err := m.Sample(context.Background(), c.prompts, 1, p, lora)
				if err != nil {
					t.Fatal(err)
				}
				for pi := range c.prompts {
					g, w := samples[pi][0], want.Samples[pi]
					// The reference never stops early; compare the prefix the engine produced.
					n := len(g.Tokens)
					if g.StopReason == StopLength && n != 10 {
						t.Errorf("prompt %d: %d tokens with stop_reason length", pi, n)
					}
					for j := 0; j < n; j++ {
						if g.Tokens[j] != w.Tokens[j] {
							t.Fatalf("prompt %d token %d: got %v, %s %v", pi, j, g.Tokens, ref.name, w.Tokens[:n])
						}
						// logprob = logit − logsumexp: its error is the logits' error, ~1e-5 absolute.
						if d := math.Abs(float64(g.Logprobs[j]) - w.Logprobs[j]); d > 1e-4*math.Max(1, math.Abs(w.Logprobs[j])) {
							t.Errorf("prompt %d logprob %d: got %v, %s %v", pi, j, g.Logprobs[j], ref.name, w.Logprobs[j])
						}
					}
				}
			})
		})
	}
}

// forEachWeightPath runs f once per way the engine can hold the
// projections: row-major for OpenBLAS (SIGNAL_ENGINE_PACKED=0) and, where
// the CPU runs the kernel, packed (package packed). A machine with AVX-512
// would otherwise never check the OpenBLAS forward, and one without it
// never the packed one.
func forEachWeightPath(t *testing.T, f func(t *testing.T, packedOn bool)) {
	t.Run("sgemm", func(t *testing.T) {
		t.Setenv("SIGNAL_ENGINE_PACKED", "0")
		f(t, false)
	})
	if packed.Available() {
		t.Run("packed", func(t *testing.T) {
			t.Setenv("SIGNAL_ENGINE_PACKED", "1") // even when the caller's environment turns it off
			f(t, true)
		})
	}
}

func compareLogits(t *testing.T, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d logits, want %d", len(got), len(want))
	}
	var maxAbs, maxDiff float64
	for i := range want {
		maxAbs = math.Max(maxAbs, math.Abs(float64(want[i])))
		maxDiff = math.Max(maxDiff, math.Abs(float64(got[i]-want[i])))
	}
	t.Logf("max |logit| %.4g, max diff %.3g (relative %.3g)", maxAbs, maxDiff, maxDiff/maxAbs)
	if maxDiff > logitRelTol*maxAbs {
		t.Errorf("logits differ from PyTorch by %.3g, more than %.0e of the largest logit %.4g", maxDiff, logitRelTol, maxAbs)
	}
}

// prefillPass runs a prefill pass over seqs (without a cache when kv is
// nil) and returns it.
func prefillPass(t *testing.T, m *Model, lora *LoRA, seqs [][]int, kv *kvCache, last bool) *pass {
	t.Helper()
	ar := m.arenas.get()
	t.Cleanup(func() { m.arenas.put(ar) })
	lens, rows, maxLen := make([]int, len(seqs)), 0, 0
	for i, s := range seqs {
		lens[i], rows, maxLen = len(s), rows+len(s), max(maxLen, len(s))
	}
	p := newPass(m, lora, ar, lens, rows, maxLen, false)
	p.kv, p.lastRows = kv, last
	for i, s := range seqs {
		copy(p.tokens[p.seqOff[i]:], s)
		p.slots = append(p.slots, i)
	}
	defer singleThreadBLAS()()
	if err := p.forward(context.Background()); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestForwardLastRows: with lastRows the last block runs on each
// sequence's last row alone, and out holds those rows: they agree with a
// full forward's (the last row's attention is the same sums, made by a
// one-row GEMM, so to f32 rounding), with an adapter on every module and
// sequences of one row and of more than one 128-row query block; the keys
// and values cached are the same bits.
func TestForwardLastRows(t *testing.T) {
	forEachWeightPath(t, func(t *testing.T, _ bool) {
		m := mustLoad(t, "tiny-sp")
		lora := mustAdapter(t, m, "tiny-sp")
		c := m.Config()
		seqs := [][]int{testTokens(9, c.VocabSize, 1), testTokens(1, c.VocabSize, 2), testTokens(140, c.VocabSize, 3)}
		hid, n := c.HiddenSize, len(seqs)
		run := func(last bool) (*pass, *kvCache) {
			ar := m.arenas.get()
			t.Cleanup(func() { m.arenas.put(ar) })
			cache := newKVCache(ar, n, c.NumHiddenLayers, c.NumAttentionHeads, c.NumKeyValueHeads, 140, c.HeadDim)
			return prefillPass(t, m, lora, seqs, cache, last), cache
		}
		full, fullKV := run(false)
		last, lastKV := run(true)
		if last.outRows != n {
			t.Fatalf("lastRows gives %d rows, want one per sequence (%d)", last.outRows, n)
		}
		for s := 0; s < n; s++ {
			r := full.seqOff[s+1] - 1
			var maxAbs, maxDiff float64
			for j := 0; j < hid; j++ {
				w, g := float64(full.out[r*hid+j]), float64(last.out[s*hid+j])
				maxAbs, maxDiff = max(maxAbs, math.Abs(w)), max(maxDiff, math.Abs(g-w))
			}
			if maxDiff > 1e-5*maxAbs {
				t.Errorf("sequence %d: last row differs from the full forward's by %.3g (largest %.3g)", s, maxDiff, maxAbs)
			}
		}
		for i := range fullKV.k {
			if fullKV.k[i] != lastKV.k[i] || fullKV.v[i] != lastKV.v[i] {
				t.Fatalf("cached key or value %d differs", i)
			}
		}
	})
}

// TestTrainingForwardKeepsWhatBackwardNeeds: a training pass is the one
// forward with its activations kept. Keeping them must not change the
// result: its final hidden states are an inference pass's bit for bit. And
// what it keeps must be what the backward needs: the LoRA gradients built
// from them match central finite differences of the loss through the
// whole model, for the largest entries of every module's A and B, on a
// Llama and on a Qwen3 (whose q/k norms keep their own activations).
func TestTrainingForwardKeepsWhatBackwardNeeds(t *testing.T) {
	for _, name := range []string{"tiny-sp", generatedQwen3(t, t.TempDir())} {
		t.Run(filepath.Base(name), func(t *testing.T) {
			m := mustLoad(t, name)
			r := rand.New(rand.NewSource(7))
			lora, err := NewLoRA(m, 3, 6, nil, 11)
			if err != nil {
				t.Fatal(err)
			}
			randomizeB(lora, r)
			data := randomData(r, m.Config().VocabSize, 6, 3)

			ar := m.arenas.get()
			defer m.arenas.put(ar)
			tp := newTrainPass(m, lora, data, ar)
			release := singleThreadBLAS()
			err = tp.forward(context.Background())
			release()
			if err != nil {
				t.Fatal(err)
			}
			plain := prefillPass(t, m, lora, [][]int{data[0].Tokens, data[1].Tokens}, nil, false)
			for i := range plain.out[:plain.outRows*m.Config().HiddenSize] {
				if plain.out[i] != tp.out[i] {
					t.Fatalf("out[%d] = %v kept, %v not", i, tp.out[i], plain.out[i])
				}
			}

			grads := zerosLike(lora)
			if _, err := runPass(context.Background(), m, lora, data, LossCrossEntropy, nil, grads, 0); err != nil {
				t.Fatal(err)
			}
			loss := func() float64 {
				res, err := runPass(context.Background(), m, lora, data, LossCrossEntropy, nil, nil, 0)
				if err != nil {
					t.Fatal(err)
				}
				return res.LossSum
			}
			const h = 1e-2
			for li := range lora.Layers {
				for mod, p := range lora.Layers[li] {
					if p == nil {
						continue
					}
					g := grads.Layers[li][mod]
					for _, pair := range [][2][]float32{{p.A, g.A}, {p.B, g.B}} {
						par, grad := pair[0], pair[1]
						k := 0
						for i := range grad {
							if math.Abs(float64(grad[i])) > math.Abs(float64(grad[k])) {
								k = i
							}
						}
						old := par[k]
						par[k] = old + h
						fp := loss()
						par[k] = old - h
						fm := loss()
						par[k] = old
						num := (fp - fm) / (2 * h)
						if d := math.Abs(num - float64(grad[k])); d > 2e-3+2e-2*math.Abs(num) {
							t.Errorf("layer %d %s: gradient %v, finite difference %v", li, Module(mod), grad[k], num)
						}
					}
				}
			}
		})
	}
}
