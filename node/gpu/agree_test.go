package gpu

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// agreementData is two sequences of different lengths with a masked prompt.
func agreementData() []protocol.Datum {
	a := []int{1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203}
	b := []int{1, 3118, 2501, 263, 931}
	mk := func(ids []int, masked int) protocol.Datum {
		d := protocol.Datum{ModelInput: protocol.ModelInput{Tokens: ids[:len(ids)-1]}}
		d.LossFnInputs.TargetTokens = ids[1:]
		for j := range len(ids) - 1 {
			w := 1.0
			if j < masked {
				w = 0
			}
			d.LossFnInputs.Weights = append(d.LossFnInputs.Weights, w)
		}
		return d
	}
	return []protocol.Datum{mk(a, 2), mk(b, 0)}
}

func toNative(data []protocol.Datum) []trainer.Datum {
	out := make([]trainer.Datum, len(data))
	for i, d := range data {
		w := make([]float32, len(d.LossFnInputs.Weights))
		for j, x := range d.LossFnInputs.Weights {
			w[j] = float32(x)
		}
		out[i] = trainer.Datum{Tokens: d.ModelInput.Tokens, TargetTokens: d.LossFnInputs.TargetTokens, Weights: w}
	}
	return out
}

func near(a, b, rel, abs float64) bool {
	return math.Abs(a-b) <= abs+rel*math.Max(math.Abs(a), math.Abs(b))
}

// TestAgreementWithNativeEngine runs the same model, adapter and data
// through the native Go engine and the PyTorch worker (f32 on the CPU) and
// checks loss, logprobs, gradient norm, an AdamW step and greedy samples,
// then moves full checkpoints between the two.
//
// Tolerances: both compute in float32 from the same BF16→f32 weights and
// f32 adapter, so they differ only by summation order (BLAS blocking vs
// torch's kernels): ~1e-6 relative per product, a few 1e-5 after two layers
// and a 32000-way log-softmax. Loss and grad norm: 1e-4 relative; logprobs:
// 1e-3 absolute; parameters after a step: loss within 1e-4 relative.
func TestAgreementWithNativeEngine(t *testing.T) {
	// The native engine in f32 (not the BF16 file's half engine): this test
	// holds both engines to float32 agreement.
	t.Setenv("SIGNAL_ENGINE_PRECISION", "f32")
	for _, name := range []string{"tiny-sp", "tiny-bl"} {
		t.Run(name, func(t *testing.T) {
			modelDir, err := filepath.Abs(filepath.Join("..", "..", "trainer", "testdata", name))
			if err != nil {
				t.Fatal(err)
			}
			testAgreement(t, name, modelDir, filepath.Join(modelDir, "adapter"))
		})
	}
	// Every family both engines serve, on random models of each: Mistral,
	// Qwen2 (q/k/v biases, tied head), Qwen3 (q/k norms, its own head_dim).
	window, off := 256, false
	for _, f := range []trainer.Config{
		{ModelType: "mistral", Architectures: []string{"MistralForCausalLM"}, SlidingWindow: &window},
		{ModelType: "qwen2", Architectures: []string{"Qwen2ForCausalLM"}, TieWordEmbeddings: true, UseSlidingWindow: &off},
		{ModelType: "qwen3", Architectures: []string{"Qwen3ForCausalLM"}, HeadDim: 24, UseSlidingWindow: &off},
	} {
		t.Run(f.ModelType, func(t *testing.T) {
			// The agreement data's token ids need a 32000-token vocabulary.
			f.HiddenSize, f.IntermediateSize, f.NumHiddenLayers, f.NumAttentionHeads, f.NumKeyValueHeads = 64, 96, 2, 4, 2
			f.VocabSize, f.MaxPositionEmbeddings, f.RopeTheta, f.RMSNormEps = 32000, 512, 1e6, 1e-6
			dir := filepath.Join(t.TempDir(), "gen-"+f.ModelType)
			if err := trainer.GenerateRandomModel(dir, f, 3, ""); err != nil {
				t.Fatal(err)
			}
			testAgreement(t, "gen-"+f.ModelType, dir, randomAdapter(t, dir))
		})
	}
}

// randomAdapter saves a rank-4 adapter on q, k, v, o with random A and B
// for the model in dir, so every module's path is live in both engines.
func randomAdapter(t *testing.T, dir string) string {
	t.Helper()
	m, err := trainer.LoadModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	l, err := trainer.NewLoRA(m, 4, 8, []string{"q_proj", "k_proj", "v_proj", "o_proj"}, 5)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range l.Pairs() {
		for j := range p.B {
			p.B[j] = float32(math.Sin(float64(i*7919+j))) * 0.05
		}
	}
	out := filepath.Join(t.TempDir(), "adapter")
	if err := l.Save(out); err != nil {
		t.Fatal(err)
	}
	return out
}

func testAgreement(t *testing.T, name, modelDir, adapterDir string) {
	models := t.TempDir()
	if err := os.Symlink(modelDir, filepath.Join(models, name)); err != nil {
		t.Fatal(err)
	}
	e := mustEngine(t, func(c *Config) { c.ModelsDir = models })
	ctx := context.Background()

	m, err := trainer.LoadModel(modelDir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	targets := []string{"q_proj", "k_proj", "v_proj", "o_proj"}
	nat, err := trainer.NewSession(m, trainer.SessionConfig{Rank: 4, Alpha: 8, TargetModules: targets, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer nat.Close()
	if err := nat.LoadState(adapterDir); err != nil {
		t.Fatal(err)
	}
	gs, err := e.Open(ctx, protocol.SessionSpec{RunID: "agree", BaseModel: name, LoRARank: 4, LoRAAlpha: 8, TargetModules: targets, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer gs.Close()
	if err := gs.LoadState(ctx, adapterDir); err != nil {
		t.Fatal(err)
	}

	data := agreementData()
	compareForward := func(stage string, grad bool) {
		t.Helper()
		call := protocol.CallForward
		var nr *trainer.ForwardResult
		var err error
		if grad {
			call = protocol.CallForwardBackward
			nr, err = nat.ForwardBackward(ctx, toNative(data), "", nil)
		} else {
			nr, err = nat.Forward(ctx, toNative(data), "", nil)
		}
		if err != nil {
			t.Fatal(err)
		}
		var gr protocol.ForwardBackwardResponse
		mustDo(t, gs, call, protocol.ForwardBackwardRequest{Data: data}, &gr)
		t.Logf("%s %s: loss_sum native %.6f worker %.6f", name, stage, nr.LossSum, gr.LossSum)
		if !near(nr.LossSum, gr.LossSum, 1e-4, 0) || !near(nr.LossMean, gr.LossMean, 1e-4, 0) || int64(nr.Tokens) != gr.Tokens {
			t.Fatalf("%s: native loss %v/%v/%d, worker %v/%v/%d", stage, nr.LossSum, nr.LossMean, nr.Tokens, gr.LossSum, gr.LossMean, gr.Tokens)
		}
		for i := range nr.Logprobs {
			for j := range nr.Logprobs[i] {
				if !near(float64(nr.Logprobs[i][j]), gr.Logprobs[i][j], 0, 1e-3) {
					t.Fatalf("%s: logprob[%d][%d] native %v worker %v", stage, i, j, nr.Logprobs[i][j], gr.Logprobs[i][j])
				}
			}
		}
		if grad {
			t.Logf("%s %s: grad_norm native %.6f worker %.6f", name, stage, nr.GradNorm, *gr.GradNorm)
			if !near(nr.GradNorm, *gr.GradNorm, 1e-4, 0) {
				t.Fatalf("%s: grad norm native %v worker %v", stage, nr.GradNorm, *gr.GradNorm)
			}
		}
	}
	compareForward("adapter", true)

	lr := 1e-2
	ns, err := nat.OptimStep(ctx, trainer.AdamParams{LearningRate: lr, Beta1: 0.9, Beta2: 0.95, Eps: 1e-12})
	if err != nil {
		t.Fatal(err)
	}
	var gst protocol.OptimStepResponse
	mustDo(t, gs, protocol.CallOptimStep, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}, &gst)
	if ns.Step != gst.Step || !near(ns.GradNorm, gst.GradNorm, 1e-4, 0) {
		t.Fatalf("optim_step native %+v worker %+v", ns, gst)
	}
	compareForward("after one AdamW step", false)

	// Greedy samples: the same tokens, logprobs within the logprob tolerance.
	prompts := [][]int{{1, 450, 4996}, {1, 3118, 2501, 263, 931, 17354}}
	nsm, err := nat.Sample(ctx, prompts, 1, trainer.SamplingParams{MaxTokens: 8, Temperature: 0, TopP: 1})
	if err != nil {
		t.Fatal(err)
	}
	zero := 0.0
	var gsm protocol.SampleResponse
	mustDo(t, gs, protocol.CallSample, protocol.SampleRequest{
		Prompts:        []protocol.Prompt{{Tokens: prompts[0]}, {Tokens: prompts[1]}},
		SamplingParams: protocol.SamplingParams{MaxTokens: 8, Temperature: &zero}}, &gsm)
	for i := range prompts {
		a, b := nsm[i][0], gsm.Samples[i][0]
		if fmt.Sprint(a.Tokens) != fmt.Sprint(b.Tokens) || a.StopReason != b.StopReason {
			t.Fatalf("greedy sample %d: native %v (%s), worker %v (%s)", i, a.Tokens, a.StopReason, b.Tokens, b.StopReason)
		}
		for j := range a.Logprobs {
			if !near(float64(a.Logprobs[j]), b.Logprobs[j], 0, 1e-3) {
				t.Fatalf("sample %d logprob %d: native %v worker %v", i, j, a.Logprobs[j], b.Logprobs[j])
			}
		}
	}

	// Checkpoints cross over: native full → worker, worker full → native,
	// with a pending gradient in each.
	if _, err := nat.ForwardBackward(ctx, toNative(data[:1]), "", nil); err != nil {
		t.Fatal(err)
	}
	natDir := t.TempDir()
	if _, err := nat.SaveState(natDir, trainer.SaveFull); err != nil {
		t.Fatal(err)
	}
	if err := gs.LoadState(ctx, natDir); err != nil {
		t.Fatal(err)
	}
	if gs.Step() != 1 {
		t.Fatalf("worker loaded native checkpoint at step %d, want 1", gs.Step())
	}
	// Both now hold the native's adapter, moments and pending gradient: a
	// second step must agree.
	if _, err := nat.OptimStep(ctx, trainer.AdamParams{LearningRate: lr, Beta1: 0.9, Beta2: 0.95, Eps: 1e-12}); err != nil {
		t.Fatal(err)
	}
	mustDo(t, gs, protocol.CallOptimStep, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}, &gst)
	if gst.Step != 2 {
		t.Fatalf("worker step %d after the native checkpoint's step, want 2", gst.Step)
	}
	compareForward("after a step from the native checkpoint", false)

	gsDir := t.TempDir()
	if err := gs.SaveState(ctx, gsDir, "full"); err != nil {
		t.Fatal(err)
	}
	nat2, err := trainer.NewSession(m, trainer.SessionConfig{Rank: 8, Alpha: 16, Seed: 9})
	if err != nil {
		t.Fatal(err)
	}
	defer nat2.Close()
	if err := nat2.LoadState(gsDir); err != nil {
		t.Fatalf("native engine loading the worker's checkpoint: %v", err)
	}
	if nat2.Step() != 2 {
		t.Fatalf("native step %d from the worker's checkpoint, want 2", nat2.Step())
	}
	a, err := nat.Forward(ctx, toNative(data), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := nat2.Forward(ctx, toNative(data), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if !near(a.LossSum, b.LossSum, 1e-4, 0) {
		t.Fatalf("native loss %v, native from the worker's checkpoint %v", a.LossSum, b.LossSum)
	}
}
