package testnet

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

// The Go SDK's futures, pipelined steps, samplers and checkpoint downloads
// against a real testnet.
func TestSDKFuturesSamplersDownloads(t *testing.T) {
	tn := startTestnet(t, func(c *Config) { c.Coordinators, c.Nodes = 1, 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, err := client.NewCluster(tn.Info().Coordinators, tn.Info().APIKey)
	if err != nil {
		t.Fatal(err)
	}
	rank := 4
	run, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: DefaultModelName, LoRARank: &rank})
	if err != nil {
		t.Fatal(err)
	}
	toks := []int{1, 415, 5255, 3290, 356, 272, 2130, 28723, 415, 5255, 3290, 356, 272, 2130, 28723}
	d, err := client.DatumFromTokens(toks[:1], toks[1:])
	if err != nil {
		t.Fatal(err)
	}
	batch := protocol.ForwardBackwardRequest{Data: []protocol.Datum{d}}
	lr := 1e-2
	opt := protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}
	// Five steps submitted at once: they run in order, one round trip each.
	var futs []*client.Future[client.StepResult]
	for range 5 {
		futs = append(futs, run.TrainStepAsync(ctx, batch, opt))
	}
	var losses []float64
	for i, f := range futs {
		res, err := f.Wait(ctx)
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if res.OptimStep.Step != i+1 {
			t.Errorf("future %d answered optimizer step %d", i, res.OptimStep.Step)
		}
		losses = append(losses, res.ForwardBackward.LossSum)
	}
	if losses[4] >= losses[0] {
		t.Errorf("losses over 5 pipelined steps: %v", losses)
	}
	// A forward_backward and an optim_step in flight together, in order.
	fb := run.ForwardBackwardAsync(ctx, batch)
	op := run.OptimStepAsync(ctx, opt)
	if o, err := op.Wait(ctx); err != nil || o.Step != 6 {
		t.Fatalf("the async optim_step: %+v %v", o, err)
	}
	if f, err := fb.Wait(ctx); err != nil || f.LossSum >= losses[0] {
		t.Fatalf("the async forward_backward: %+v %v", f, err)
	}
	saved, err := run.SaveState(ctx, protocol.SaveStateRequest{Mode: "adapter"})
	if err != nil {
		t.Fatal(err)
	}
	cps, err := c.ListCheckpoints(ctx, run.ID())
	if err != nil || !slices.ContainsFunc(cps, func(cp protocol.Checkpoint) bool { return cp.ID == saved.Checkpoint.ID }) {
		t.Fatalf("ListCheckpoints %v: %v", cps, err)
	}
	dir := t.TempDir()
	files, err := c.DownloadCheckpoint(ctx, saved.Checkpoint.ID, dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != len(saved.Checkpoint.Files) {
		t.Fatalf("downloaded %d files, the checkpoint has %d", len(files), len(saved.Checkpoint.Files))
	}
	for _, f := range saved.Checkpoint.Files {
		b, err := os.ReadFile(filepath.Join(dir, f.Name))
		if err != nil || storage.NewCID(b).String() != f.CID {
			t.Errorf("downloaded %s: %v, CID %s, want %s", f.Name, err, storage.NewCID(b), f.CID)
		}
	}
	// A sampler of the checkpoint samples the run's weights; one of the
	// base model samples something else.
	zero := 0.0
	sreq := protocol.SampleRequest{Prompts: []protocol.Prompt{{Tokens: toks[:4]}}, SamplingParams: protocol.SamplingParams{MaxTokens: 6, Temperature: &zero}}
	want, err := run.Sample(ctx, sreq)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.NewSampler(ctx, client.SamplerOptions{Checkpoint: saved.Checkpoint.ID})
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Sample(ctx, sreq)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.Samples[0][0].Tokens, want.Samples[0][0].Tokens) {
		t.Errorf("greedy samples: the checkpoint's sampler %v, the run %v", got.Samples[0][0].Tokens, want.Samples[0][0].Tokens)
	}
	_, _ = s.Close(ctx)
	b, err := c.NewSampler(ctx, client.SamplerOptions{BaseModel: DefaultModelName})
	if err != nil {
		t.Fatal(err)
	}
	base, err := b.Sample(ctx, sreq)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Equal(base.Samples[0][0].Tokens, want.Samples[0][0].Tokens) {
		t.Errorf("the base model's greedy sample equals the trained adapter's: %v", base.Samples[0][0].Tokens)
	}
}
