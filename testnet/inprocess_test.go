package testnet

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// trainRun runs the examples' flow through the Go SDK: create a run, steps
// of forward_backward + optim_step on text examples, and returns the run
// with the losses.
func trainRun(ctx context.Context, t *testing.T, c *client.Client, steps int) (*client.Run, []float64) {
	t.Helper()
	rank, seed, every := 8, int64(1), 5
	r, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: DefaultModelName, LoRARank: &rank, Seed: &seed, CheckpointEvery: &every})
	if err != nil {
		t.Fatal(err)
	}
	lr := 5e-3
	batch := protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{
		{Text: "The cat sat on the mat."},
		{Text: "The dog sat on the log."},
		{Prompt: "Question: What color is the sky?\nAnswer:", Completion: " The sky is blue."},
	}}
	var losses []float64
	for i := 0; i < steps; i++ {
		fb, err := r.ForwardBackward(ctx, batch)
		if err != nil {
			t.Fatalf("step %d forward_backward: %v", i, err)
		}
		if _, err := r.OptimStep(ctx, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}); err != nil {
			t.Fatalf("step %d optim_step: %v", i, err)
		}
		losses = append(losses, fb.LossMean)
	}
	return r, losses
}

func TestInProcessTestnet(t *testing.T) {
	tn := startTestnet(t, nil)
	info := tn.Info()
	if len(info.Coordinators) != 3 || len(info.Nodes) != 2 || info.APIKey == "" || info.AdminToken == "" {
		t.Fatalf("info = %+v", info)
	}
	// testnet.json says the same, and the Go SDK's reader accepts it.
	raw, err := os.ReadFile(filepath.Join(info.Dir, "testnet.json"))
	if err != nil {
		t.Fatal(err)
	}
	var onDisk Info
	if err := json.Unmarshal(raw, &onDisk); err != nil || onDisk.APIKey != info.APIKey || len(onDisk.Nodes) != 2 {
		t.Fatalf("testnet.json = %s (%v)", raw, err)
	}
	tf, err := client.ReadTestnetFile(filepath.Join(info.Dir, "testnet.json"))
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// Every coordinator answers: followers forward writes to the leader.
	for _, u := range info.Coordinators {
		c, err := client.New(u, tf.APIKey)
		if err != nil {
			t.Fatal(err)
		}
		ms, err := c.Models(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(ms) != 1 || ms[0].Name != DefaultModelName {
			t.Fatalf("models from %s = %+v", u, ms)
		}
	}
	c, err := client.New(info.Coordinators[1], tf.APIKey)
	if err != nil {
		t.Fatal(err)
	}
	r, losses := trainRun(ctx, t, c, 12)
	t.Logf("losses %.3f", losses)
	if !(losses[len(losses)-1] < losses[0]-0.5) {
		t.Fatalf("loss did not fall: %.3f", losses)
	}
	smp, err := r.Sample(ctx, protocol.SampleRequest{Prompts: []protocol.Prompt{{Text: "The cat sat"}}, SamplingParams: protocol.SamplingParams{MaxTokens: 8}})
	if err != nil {
		t.Fatal(err)
	}
	if len(smp.Samples) != 1 || len(smp.Samples[0]) != 1 || len(smp.Samples[0][0].Tokens) == 0 {
		t.Fatalf("samples = %+v", smp.Samples)
	}
	saved, err := r.SaveState(ctx, protocol.SaveStateRequest{Mode: "adapter"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("checkpoint %s", saved.Checkpoint.URI)
	if _, err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
}
