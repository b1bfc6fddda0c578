package gpu

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/signal-p2p/signal/audit"
	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/native"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// TestAuditTolerances measures what audit.DefaultTolerances must allow:
// the same calls, from the same adapter, on the native engine (BF16 weights
// held as BF16, and widened to f32) and on the PyTorch worker in f32 and in
// bf16, each engine's answer audited
// by every other as the coordinator audits a node (CompareForward,
// CompareScores, CompareDrawn). Every honest pair must pass, and the
// largest margin (difference as a fraction of its tolerance) is logged:
// so are the adapters after one optim_step (CompareAdapters).
// that is the room an honest node keeps. Then the lies the coordinator's
// tests plant, applied to an honest answer, must fail.
func TestAuditTolerances(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two PyTorch workers")
	}
	window, off := 256, false
	families := []trainer.Config{
		// signal-tiny's shape (testnet.DefaultModelConfig).
		{HiddenSize: 128, IntermediateSize: 344, NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2},
		{ModelType: "mistral", Architectures: []string{"MistralForCausalLM"}, SlidingWindow: &window,
			HiddenSize: 64, IntermediateSize: 96, NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2},
		{ModelType: "qwen2", Architectures: []string{"Qwen2ForCausalLM"}, TieWordEmbeddings: true, UseSlidingWindow: &off,
			HiddenSize: 64, IntermediateSize: 96, NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2},
		{ModelType: "qwen3", Architectures: []string{"Qwen3ForCausalLM"}, HeadDim: 24, UseSlidingWindow: &off,
			HiddenSize: 64, IntermediateSize: 96, NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2},
	}
	models := t.TempDir()
	var names []string
	for i, f := range families {
		f.VocabSize, f.MaxPositionEmbeddings, f.RopeTheta, f.RMSNormEps = 32000, 512, 1e6, 1e-6
		name := fmt.Sprintf("audit-%d", i)
		if err := trainer.GenerateRandomModel(filepath.Join(models, name), f, int64(11+i), ""); err != nil {
			t.Fatal(err)
		}
		names = append(names, name)
	}
	f32 := mustEngine(t, func(c *Config) { c.ModelsDir = models; c.DType = "float32" })
	bf16 := mustEngine(t, func(c *Config) { c.ModelsDir = models; c.DType = "bfloat16" })
	// The native engine both ways: BF16 files held as BF16 (its default)
	// and widened to f32.
	nat, err := native.New(models, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer nat.Close()
	nat32, err := native.New(models, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer nat32.Close()
	nat32.Precision = trainer.PrecisionF32
	engines := []struct {
		name string
		e    node.Engine
	}{{"native-bf16", nat}, {"native-f32", nat32}, {"worker-f32", f32}, {"worker-bf16", bf16}}

	tol := audit.DefaultTolerances()
	worst := map[string]float64{}
	raw := map[string]float64{}
	sameTokens := map[string]float64{} // lowest fraction of sampled tokens two engines drew alike
	for _, name := range names {
		adapter := randomAdapter(t, filepath.Join(models, name))
		ctx := context.Background()
		sessions := make([]node.Session, len(engines))
		for i, e := range engines {
			s, err := e.e.Open(ctx, protocol.SessionSpec{RunID: name + "-" + e.name, BaseModel: name, LoRARank: 4, LoRAAlpha: 8,
				TargetModules: []string{"q_proj", "k_proj", "v_proj", "o_proj"}, Seed: 1})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if err := s.LoadState(ctx, adapter); err != nil {
				t.Fatal(err)
			}
			sessions[i] = s
		}
		rng := rand.New(rand.NewSource(5))
		fb := protocol.ForwardBackwardRequest{}
		for range 4 {
			ids := make([]int, 65)
			for j := range ids {
				ids[j] = 3 + rng.Intn(31990)
			}
			d := protocol.Datum{ModelInput: protocol.ModelInput{Tokens: ids[:64]}}
			d.LossFnInputs.TargetTokens = ids[1:]
			for j := range 64 {
				d.LossFnInputs.Weights = append(d.LossFnInputs.Weights, float64(min(j/8, 1)))
			}
			fb.Data = append(fb.Data, d)
		}
		prompts := [][]int{{1, 450, 4996, 17354, 1701, 432}, {1, 3118, 2501, 263, 931, 17354, 975, 278}}
		one, zero, seed := 1.0, 0.0, int64(7)
		two := 2
		sampleReq := func(temp *float64) protocol.SampleRequest {
			return protocol.SampleRequest{Prompts: []protocol.Prompt{{Tokens: prompts[0]}, {Tokens: prompts[1]}}, NumSamples: &two,
				SamplingParams: protocol.SamplingParams{MaxTokens: 16, Temperature: temp, Seed: &seed}}
		}
		// Every engine answers every call once.
		type answers struct {
			fb, fwd      protocol.ForwardBackwardResponse
			warm, greedy protocol.SampleResponse
		}
		ans := make([]answers, len(engines))
		for i, s := range sessions {
			do(t, s, protocol.CallForwardBackward, fb, &ans[i].fb)
			do(t, s, protocol.CallForward, fb, &ans[i].fwd)
			do(t, s, protocol.CallSample, sampleReq(&one), &ans[i].warm)
			do(t, s, protocol.CallSample, sampleReq(&zero), &ans[i].greedy)
		}
		// The raw differences, beside the margins: what the tolerances
		// are sized from.
		for i := range engines {
			for j := i + 1; j < len(engines); j++ {
				pair := engines[i].name + " vs " + engines[j].name
				a, b := ans[i].fb, ans[j].fb
				raw[pair+": loss_sum relative"] = max(raw[pair+": loss_sum relative"], relDiff(a.LossSum, b.LossSum))
				raw[pair+": grad_norm relative"] = max(raw[pair+": grad_norm relative"], relDiff(*a.GradNorm, *b.GradNorm))
				for k := range a.Logprobs {
					for l := range a.Logprobs[k] {
						raw[pair+": logprob absolute"] = max(raw[pair+": logprob absolute"], math.Abs(a.Logprobs[k][l]-b.Logprobs[k][l]))
					}
				}
			}
		}
		record := func(claimer, validator int, what string, c audit.Check) {
			t.Helper()
			key := fmt.Sprintf("%s audited by %s: %s", engines[claimer].name, engines[validator].name, what)
			if !c.Passed {
				t.Errorf("%s, %s: honest answer failed: %s (margin %.3f)", name, key, c.Reason, c.Margin)
			}
			worst[key] = max(worst[key], c.Margin)
			worst[what] = max(worst[what], c.Margin)
		}
		for i := range engines {
			for j := range engines {
				if i == j {
					continue
				}
				record(i, j, "forward_backward", audit.CompareForward(ans[i].fb, ans[j].fb, true, tol))
				record(i, j, "forward", audit.CompareForward(ans[i].fwd, ans[j].fwd, false, tol))
				for _, smp := range []struct {
					what        string
					claim, own  protocol.SampleResponse
					temperature *float64
				}{{"seeded sample", ans[i].warm, ans[j].warm, &one}, {"greedy sample", ans[i].greedy, ans[j].greedy, &zero}} {
					var scored protocol.ForwardBackwardResponse
					do(t, sessions[j], protocol.CallForward, audit.ScoreRequest(prompts, smp.claim), &scored)
					record(i, j, smp.what+" scores", audit.CompareScores(prompts, smp.claim, scored, tol))
					record(i, j, smp.what+" tokens", audit.CompareDrawn(prompts, sampleReq(smp.temperature).SamplingParams, smp.claim, smp.own, scored, tol))
					same, all := 0, 0
					for a, g := range smp.claim.Samples {
						for b, x := range g {
							for c := range x.Tokens {
								all++
								if c < len(smp.own.Samples[a][b].Tokens) && x.Tokens[c] == smp.own.Samples[a][b].Tokens[c] {
									same++
								}
							}
						}
					}
					key := smp.what + " tokens the same, " + engines[i].name + " vs " + engines[j].name
					if f, ok := sameTokens[key]; !ok || float64(same)/float64(all) < f {
						sameTokens[key] = float64(same) / float64(all)
					}
				}
			}
		}

		// The lies, on the native engine's honest answers, audited by the
		// bf16 worker (the loosest honest pair).
		lie := func(what string, c audit.Check) {
			t.Helper()
			if c.Passed {
				t.Errorf("%s: lie %q passed (margin %.3f)", name, what, c.Margin)
			}
			t.Logf("%s: lie %q fails: %s (margin %.1f)", name, what, c.Reason, c.Margin)
		}
		honest, replay := ans[0].fb, ans[2].fb
		loss := honest
		loss.LossSum *= 1.1
		lie("loss_sum +10%", audit.CompareForward(loss, replay, true, tol))
		g := 1.0
		skipped := honest
		skipped.GradNorm = &g
		lie(fmt.Sprintf("grad_norm made up (1.0; honest %.4f)", *honest.GradNorm), audit.CompareForward(skipped, replay, true, tol))
		made := ans[0].warm
		made.Samples = [][]protocol.Sample{make([]protocol.Sample, 2), make([]protocol.Sample, 2)}
		for i, g := range ans[0].warm.Samples {
			for j, s := range g {
				r := protocol.Sample{Tokens: make([]int, len(s.Tokens)), Logprobs: make([]float64, len(s.Tokens))}
				for k := range r.Tokens {
					r.Tokens[k], r.Logprobs[k] = 3+rng.Intn(31990), -1
				}
				made.Samples[i][j] = r
			}
		}
		var madeScored protocol.ForwardBackwardResponse
		do(t, sessions[2], protocol.CallForward, audit.ScoreRequest(prompts, made), &madeScored)
		lie("random sample tokens, made-up logprobs (-1)", audit.CompareScores(prompts, made, madeScored, tol))
		random := ans[0].warm
		random.Samples = [][]protocol.Sample{make([]protocol.Sample, 2), make([]protocol.Sample, 2)}
		for i, g := range ans[0].warm.Samples {
			for j, s := range g {
				r := protocol.Sample{Tokens: make([]int, len(s.Tokens)), Logprobs: s.Logprobs}
				for k := range r.Tokens {
					r.Tokens[k] = 3 + rng.Intn(31990)
				}
				random.Samples[i][j] = r
			}
		}
		var scored protocol.ForwardBackwardResponse
		do(t, sessions[2], protocol.CallForward, audit.ScoreRequest(prompts, random), &scored)
		lie("random sample tokens, honest-looking logprobs", audit.CompareScores(prompts, random, scored, tol))
		// The smart liar: random tokens with their true logprobs (one
		// forward, far cheaper than drawing) pass the scores; the redraw
		// of the seeded request catches them.
		truthful := protocol.SampleResponse{Samples: make([][]protocol.Sample, len(random.Samples))}
		for i, g := range random.Samples {
			for _, smp := range g {
				truthful.Samples[i] = append(truthful.Samples[i], protocol.Sample{Tokens: smp.Tokens, Logprobs: make([]float64, len(smp.Tokens))})
			}
		}
		var truth protocol.ForwardBackwardResponse
		do(t, sessions[0], protocol.CallForward, audit.ScoreRequest(prompts, truthful), &truth)
		k := 0
		for i, g := range truthful.Samples {
			for j := range g {
				copy(truthful.Samples[i][j].Logprobs, truth.Logprobs[k][len(prompts[i])-1:])
				k++
			}
		}
		var truthScored protocol.ForwardBackwardResponse
		do(t, sessions[2], protocol.CallForward, audit.ScoreRequest(prompts, truthful), &truthScored)
		if c := audit.CompareScores(prompts, truthful, truthScored, tol); !c.Passed {
			t.Errorf("%s: random tokens with their true logprobs failed the scores: %s", name, c.Reason)
		}
		lie("random sample tokens, their true logprobs (redrawn)", audit.CompareDrawn(prompts, sampleReq(&one).SamplingParams, truthful, ans[2].warm, truthScored, tol))

		// optim_step: every engine steps from the same adapter with the
		// gradient its forward_backward above accumulated, and the
		// adapters after are compared as an optim_step audit compares
		// them (the coordinator's trail replay, audittrail.go).
		lr := 1e-3
		pre := readAdapters(t, filepath.Join(adapter, trainer.AdapterWeightsFile))
		after := make([]audit.Adapters, len(engines))
		for i, s := range sessions {
			do(t, s, protocol.CallOptimStep, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}, nil)
			dir := t.TempDir()
			if err := s.SaveState(ctx, dir, trainer.SaveAdapter); err != nil {
				t.Fatal(err)
			}
			after[i] = readAdapters(t, filepath.Join(dir, trainer.AdapterWeightsFile))
		}
		for i := range engines {
			for j := range engines {
				if i != j {
					record(i, j, "optim_step adapter", audit.CompareAdapters(pre, after[i], after[j], tol))
				}
				if j > i {
					pair := engines[i].name + " vs " + engines[j].name
					raw[pair+": adapter, of the update"] = max(raw[pair+": adapter, of the update"], adapterDistance(after[i], after[j])/adapterDistance(after[j], pre))
				}
			}
		}
		wrong := audit.Adapters{}
		for k, v := range after[0] {
			w := make([]float32, len(v))
			for i := range v {
				w[i] = pre[k][i] + 5*(v[i]-pre[k][i])
			}
			wrong[k] = w
		}
		lie("optim_step skipped (the adapter as it was)", audit.CompareAdapters(pre, pre, after[3], tol))
		lie("optim_step at 5× the learning rate", audit.CompareAdapters(pre, wrong, after[3], tol))
	}
	for _, k := range slices.Sorted(maps.Keys(raw)) {
		t.Logf("largest difference %-50s %.3g", k, raw[k])
	}
	for _, k := range slices.Sorted(maps.Keys(sameTokens)) {
		t.Logf("fraction of %-60s %.3f", k, sameTokens[k])
	}
	for _, k := range slices.Sorted(maps.Keys(worst)) {
		t.Logf("largest margin %-70s %.4f", k, worst[k])
	}
	if os.Getenv("SIGNAL_AUDIT_MARGINS") != "" {
		b, _ := json.MarshalIndent(worst, "", "  ")
		_ = os.WriteFile(os.Getenv("SIGNAL_AUDIT_MARGINS"), b, 0o644)
	}
}

// readAdapters decodes an adapter_model.safetensors file.
func readAdapters(t *testing.T, path string) audit.Adapters {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	a, err := audit.DecodeAdapters(b)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// adapterDistance is ‖a − b‖ over every tensor.
func adapterDistance(a, b audit.Adapters) float64 {
	var d2 float64
	for k, v := range a {
		for i := range v {
			d := float64(v[i]) - float64(b[k][i])
			d2 += d * d
		}
	}
	return math.Sqrt(d2)
}

func relDiff(a, b float64) float64 {
	return math.Abs(a-b) / math.Max(math.Abs(a), math.Abs(b))
}

func do(t *testing.T, s node.Session, call protocol.Call, body, out any) {
	t.Helper()
	mustDo(t, s, call, body, out)
}
