package trainer

import (
	"context"
	"math"
	"math/rand"
	"path/filepath"
	"testing"
)

// refDatum is the reference's JSON form of a Datum.
type refDatum struct {
	Tokens       []int     `json:"tokens"`
	TargetTokens []int     `json:"target_tokens"`
	Weights      []float32 `json:"weights,omitempty"`
	Logprobs     []float32 `json:"logprobs,omitempty"`
	Advantages   []float32 `json:"advantages,omitempty"`
}

func toRef(data []Datum) []refDatum {
	out := make([]refDatum, len(data))
	for i, d := range data {
		out[i] = refDatum{d.Tokens, d.TargetTokens, d.Weights, d.Logprobs, d.Advantages}
	}
	return out
}

// randomData makes sequences of the given lengths: next-token targets,
// weights 0 on the first quarter (a "prompt"), 1 after.
func randomData(r *rand.Rand, vocab int, lens ...int) []Datum {
	var data []Datum
	for _, n := range lens {
		seq := make([]int, n+1)
		for i := range seq {
			seq[i] = r.Intn(vocab)
		}
		d := Datum{Tokens: seq[:n], TargetTokens: seq[1:], Weights: make([]float32, n)}
		for i := range d.Weights {
			if i >= n/4 {
				d.Weights[i] = 1
			}
		}
		data = append(data, d)
	}
	return data
}

// randomizeB fills every B (zero after PEFT init) so that every gradient is
// non-zero.
func randomizeB(l *LoRA, r *rand.Rand) {
	for _, p := range l.Pairs() {
		for i := range p.B {
			p.B[i] = (r.Float32()*2 - 1) * 0.3
		}
	}
}

type refGrad struct {
	LossSum  float64              `json:"loss_sum"`
	Logprobs [][]float64          `json:"logprobs"`
	GradNorm float64              `json:"grad_norm"`
	Grads    map[string][]float64 `json:"grads"`
}

// TestForwardBackwardMatchesPyTorch compares loss, logprobs and every LoRA
// gradient with transformers + PEFT under autograd in float64 on the same
// weights. The
// engine runs in float32 on weights that are exact BF16 values, so the
// differences are float32 rounding over a few hundred-term sums: logprobs
// agree to ~1e-5 absolute, gradients to ~1e-4 of each tensor's largest
// entry. The tolerances below are 10x that; a wrong formula is off by O(1).
func TestForwardBackwardMatchesPyTorch(t *testing.T) {
	qwen2, qwen3 := generatedQwen2(t, t.TempDir()), generatedQwen3(t, t.TempDir())
	for _, tc := range []struct {
		model   string
		adapter string // "" = all seven modules, random A and B
		loss    string
		cfg     map[string]float64
	}{
		{"tiny-sp", "adapter", LossCrossEntropy, nil},
		{"tiny-bl", "adapter", LossCrossEntropy, nil},
		{"tiny-sp", "", LossCrossEntropy, nil},
		{"tiny-bl", "", LossImportanceSampling, nil},
		{"tiny-sp", "", LossPPO, map[string]float64{"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}},
		{qwen2, "", LossCrossEntropy, nil},
		{qwen3, "", LossCrossEntropy, nil},
		{qwen3, "", LossPPO, map[string]float64{"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}},
		{"tiny-sp", "", LossCISPO, map[string]float64{"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}},
		{"tiny-bl", "", LossDRO, map[string]float64{"beta": 0.3}},
	} {
		name := filepath.Base(tc.model) + "/" + tc.adapter + "/" + tc.loss
		t.Run(name, func(t *testing.T) {
			refs := references(t)
			m := mustLoad(t, tc.model)
			r := rand.New(rand.NewSource(7))
			var lora *LoRA
			dir := filepath.Join("testdata", tc.model, "adapter")
			if tc.adapter == "" {
				var err error
				lora, err = NewLoRA(m, 3, 6, nil, 11)
				if err != nil {
					t.Fatal(err)
				}
				randomizeB(lora, r)
				dir = t.TempDir()
				if err := lora.Save(dir); err != nil {
					t.Fatal(err)
				}
			} else {
				lora = mustAdapter(t, m, tc.model)
			}
			data := randomData(r, m.Config().VocabSize, 9, 4, 17)
			if tc.loss != LossCrossEntropy {
				for i := range data {
					n := len(data[i].Tokens)
					data[i].Logprobs, data[i].Advantages = make([]float32, n), make([]float32, n)
					for j := 0; j < n; j++ {
						// Sampler logprobs near the model's (about -10.4 for a
						// random model over 32k tokens) so ratios straddle the clip band.
						data[i].Logprobs[j] = float32(-math.Log(float64(m.Config().VocabSize)) + r.NormFloat64()*0.2)
						data[i].Advantages[j] = float32(r.NormFloat64())
					}
				}
			}
			for _, oracle := range refs {
				var ref refGrad
				runRef(t, oracle, []string{"grad"}, map[string]any{
					"model": modelDir(tc.model), "adapter": dir, "data": toRef(data),
					"loss_fn": tc.loss, "loss_fn_config": tc.cfg, "dtype": "float64",
				}, &ref)
				t.Run(oracle.name, func(t *testing.T) { compareGrads(t, tc.model, tc.loss, tc.cfg, lora, data, ref) })
			}
		})
	}
}

// compareGrads checks the engine's loss, logprobs, gradient norm and every
// LoRA gradient against ref, both ways of holding the projections.
func compareGrads(t *testing.T, model, loss string, cfg map[string]float64, lora *LoRA, data []Datum, ref refGrad) {
	forEachWeightPath(t, func(t *testing.T, packedOn bool) {
		m := mustLoad(t, model)
		if (m.lmHead().p != nil) != packedOn {
			t.Fatalf("packed weights: %v, want %v", m.lmHead().p != nil, packedOn)
		}
		grads := zerosLike(lora)
		res, err := runPass(context.Background(), m, lora, data, loss, cfg, grads, 0)
		if err != nil {
			t.Fatal(err)
		}
		e := gradErrors(t, res, grads, data, ref)
		if e.loss > 1e-4 {
			t.Errorf("loss_sum %v, reference %v", res.LossSum, ref.LossSum)
		}
		if d := math.Abs(res.GradNorm - ref.GradNorm); d > 1e-3*ref.GradNorm {
			t.Errorf("grad_norm %v, reference %v", res.GradNorm, ref.GradNorm)
		}
		if e.logprob > 1e-4 {
			t.Errorf("logprobs differ from the reference by up to %g", e.logprob)
		}
		if e.grad > 1e-3 {
			t.Errorf("%s: gradient off by %g of its largest entry", e.worst, e.grad)
		}
		t.Logf("loss %.6f (reference %.6f), worst logprob diff %.2g, worst relative grad diff %.2g (%s)",
			res.LossSum, ref.LossSum, e.logprob, e.grad, e.worst)
	})
}

// TestTrainingMatchesPyTorchAdamW trains the same fresh PEFT adapter for 30
// steps on a small fixed text in the engine and in transformers + PEFT
// (float32 both, torch.optim.AdamW with the same settings) and compares the
// loss curves.
// Both run float32 with different summation orders; AdamW normalises steps,
// so tiny gradient differences move parameters alike and the curves stay
// within a fraction of a percent. The loss must also fall well below its
// start, as PyTorch's does.
func TestTrainingMatchesPyTorchAdamW(t *testing.T) {
	refs := references(t)
	m := mustLoad(t, "tiny-sp")
	// "The quick brown fox jumps over the lazy dog. The quick brown fox jumps
	// again, and the lazy dog sleeps." with BOS, as trainer/tokenizer encodes it
	// with tiny-sp's tokenizer.json (not copied here: 1.8 MB).
	ids := []int{1, 415, 2936, 9060, 285, 1142, 461, 10575, 754, 272, 17898, 3914, 28723, 415, 2936, 9060,
		285, 1142, 461, 10575, 1076, 28725, 304, 272, 17898, 3914, 7767, 2671, 28723}
	data := []Datum{{Tokens: ids[:len(ids)-1], TargetTokens: ids[1:], Weights: make([]float32, len(ids)-1)}}
	for i := range data[0].Weights {
		data[0].Weights[i] = 1
	}
	s := mustSession(t, m, SessionConfig{Rank: 4, Alpha: 8, Seed: 21})
	dir := t.TempDir()
	if _, err := s.SaveState(dir, SaveAdapter); err != nil {
		t.Fatal(err)
	}
	p := DefaultAdamParams()
	p.LearningRate, p.WeightDecay, p.GradClipNorm = 1e-2, 0.01, 10
	const steps = 30
	var losses []float64
	for i := 0; i < steps; i++ {
		r := mustFB(t, s, data)
		losses = append(losses, r.LossSum)
		mustStep(t, s, p)
	}
	for _, oracle := range refs {
		t.Run(oracle.name, func(t *testing.T) {
			var ref struct {
				Losses []float64 `json:"losses"`
			}
			runRef(t, oracle, []string{"train"}, map[string]any{
				"model": filepath.Join("testdata", "tiny-sp"), "adapter": dir, "data": toRef(data), "steps": steps,
				"dtype": "float32",
				"adam": map[string]float64{"learning_rate": p.LearningRate, "beta1": p.Beta1, "beta2": p.Beta2,
					"eps": p.Eps, "weight_decay": p.WeightDecay, "grad_clip_norm": p.GradClipNorm},
			}, &ref)
			if len(ref.Losses) != steps {
				t.Fatalf("%s returned %d losses", oracle.name, len(ref.Losses))
			}
			worst := 0.0
			for i := range losses {
				rel := math.Abs(losses[i]-ref.Losses[i]) / math.Abs(ref.Losses[i])
				worst = math.Max(worst, rel)
				if rel > 5e-3 {
					t.Errorf("step %d: loss %v, %s %v", i, losses[i], oracle.name, ref.Losses[i])
				}
			}
			if !(losses[steps-1] < 0.5*losses[0]) || !(ref.Losses[steps-1] < 0.5*ref.Losses[0]) {
				t.Errorf("loss did not fall by half: engine %v -> %v, reference %v -> %v", losses[0], losses[steps-1], ref.Losses[0], ref.Losses[steps-1])
			}
			t.Logf("loss %.4f -> %.4f (%s %.4f -> %.4f), worst relative step difference %.2g",
				losses[0], losses[steps-1], oracle.name, ref.Losses[0], ref.Losses[steps-1], worst)
		})
	}
}
