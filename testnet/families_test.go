package testnet

import (
	"context"
	"math"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// mixedStarts counts the nodes the "mixed-engines" factory has built, so
// that one testnet gets one node of each engine.
var mixedStarts atomic.Int32

func init() {
	// The first node a testnet builds runs the Go engine, the next the
	// PyTorch worker on the CPU, and so on alternately.
	RegisterEngine("mixed-engines", func(dataDir string, models map[string]string) (node.Engine, error) {
		if mixedStarts.Add(1)%2 == 1 {
			return newNativeEngine(dataDir, models)
		}
		return newTorchCPUEngine(dataDir, models)
	})
}

// TestFamiliesTrainAlikeOnBothEngines: one testnet with a native node and a
// PyTorch-worker node serves a random model of every family both engines
// compute (Llama — signal-tiny —, Mistral, Qwen2 with q/k/v biases and a
// tied head, Qwen3 with q/k norms and its own head_dim). For each, two runs
// with the same seed land one on each node — the seed gives the same
// initial adapter on both engines (trainer.NewLoRAFromConfig draws it; the
// worker is handed it) —, train three steps on the same token data and
// sample greedily: the losses agree within the engines'
// float32 agreement tolerance (node/gpu's agreement test: 1e-4 relative;
// measured here ≤ 4e-7 after three AdamW steps) and the greedy tokens are
// the same.
func TestFamiliesTrainAlikeOnBothEngines(t *testing.T) {
	// The native engine in f32 (not the BF16 file's half engine): this test
	// holds both engines to float32 agreement.
	t.Setenv("SIGNAL_ENGINE_PRECISION", "f32")
	if testing.Short() {
		t.Skip("starts a testnet with a PyTorch worker")
	}
	torchPython(t)
	models := map[string]string{}
	window, off := 256, false
	for _, f := range []trainer.Config{
		{ModelType: "mistral", Architectures: []string{"MistralForCausalLM"}, SlidingWindow: &window},
		{ModelType: "qwen2", Architectures: []string{"Qwen2ForCausalLM"}, TieWordEmbeddings: true, UseSlidingWindow: &off},
		{ModelType: "qwen3", Architectures: []string{"Qwen3ForCausalLM"}, HeadDim: 24, UseSlidingWindow: &off},
	} {
		f.HiddenSize, f.IntermediateSize, f.NumHiddenLayers, f.NumAttentionHeads, f.NumKeyValueHeads = 64, 96, 2, 4, 2
		f.VocabSize, f.MaxPositionEmbeddings, f.RopeTheta, f.RMSNormEps = 512, 256, 1e6, 1e-6
		dir := filepath.Join(t.TempDir(), "random-"+f.ModelType)
		if err := trainer.GenerateRandomModel(dir, f, 3, ""); err != nil {
			t.Fatal(err)
		}
		models["random-"+f.ModelType] = dir
	}
	mixedStarts.Store(0)
	tn := startTestnet(t, func(c *Config) {
		c.Coordinators, c.Nodes, c.Engine, c.Models = 1, 2, "mixed-engines", models
		// Placement by measured throughput would put both runs on the
		// faster engine; this test wants one on each, by load.
		c.ChallengeInterval = -1
	})
	info := tn.Info()
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	c, err := client.New(info.Coordinators[0], info.APIKey)
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := c.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	backend := map[string]string{}
	for _, n := range nodes {
		if len(n.Backends) == 1 {
			backend[n.PeerID] = n.Backends[0]
		}
	}
	if len(backend) != 2 {
		t.Fatalf("nodes %+v: want one native and one cpu-torch node", nodes)
	}

	// Token data inside every model's vocabulary, one prompt masked.
	data := []protocol.Datum{{ModelInput: protocol.ModelInput{Tokens: []int{1, 45, 99, 173, 260, 311, 402}},
		LossFnInputs: protocol.LossFnInputs{TargetTokens: []int{45, 99, 173, 260, 311, 402, 7}, Weights: []float64{0, 0, 1, 1, 1, 1, 1}}},
		{ModelInput: protocol.ModelInput{Tokens: []int{1, 88, 21}},
			LossFnInputs: protocol.LossFnInputs{TargetTokens: []int{88, 21, 9}, Weights: []float64{1, 1, 0.5}}}}
	names := []string{DefaultModelName, "random-mistral", "random-qwen2", "random-qwen3"}
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			rank, seed := 4, int64(7)
			var runs [2]*client.Run
			engines := map[string]bool{}
			for i := range runs {
				r, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: name, LoRARank: &rank, Seed: &seed})
				if err != nil {
					t.Fatal(err)
				}
				defer func() { _, _ = r.Close(ctx) }()
				runs[i] = r
				engines[backend[r.Info().Node]] = true
			}
			if !engines["native"] || !engines["cpu-torch"] {
				t.Fatalf("the two runs landed on %v: want one on each engine", engines)
			}
			lr := 1e-2
			for step := 0; step < 3; step++ {
				var loss [2]float64
				for i, r := range runs {
					fb, err := r.ForwardBackward(ctx, protocol.ForwardBackwardRequest{Data: data})
					if err != nil {
						t.Fatalf("step %d forward_backward: %v", step, err)
					}
					loss[i] = fb.LossSum
					if _, err := r.OptimStep(ctx, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}); err != nil {
						t.Fatalf("step %d optim_step: %v", step, err)
					}
				}
				t.Logf("step %d loss_sum %.6f / %.6f", step, loss[0], loss[1])
				if math.Abs(loss[0]-loss[1]) > 1e-4*math.Max(math.Abs(loss[0]), math.Abs(loss[1])) {
					t.Fatalf("step %d: loss_sum %v on one engine, %v on the other", step, loss[0], loss[1])
				}
			}
			var toks [2][]int
			zero := 0.0
			for i, r := range runs {
				smp, err := r.Sample(ctx, protocol.SampleRequest{Prompts: []protocol.Prompt{{Tokens: []int{1, 45, 99}}},
					SamplingParams: protocol.SamplingParams{MaxTokens: 8, Temperature: &zero}})
				if err != nil {
					t.Fatal(err)
				}
				toks[i] = smp.Samples[0][0].Tokens
			}
			if !slices.Equal(toks[0], toks[1]) {
				t.Fatalf("greedy samples differ: %v and %v", toks[0], toks[1])
			}
		})
	}
}
