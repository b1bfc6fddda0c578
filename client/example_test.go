package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// The seed's flow: create a run, train on text, sample, save the adapter.
func Example() {
	ctx := context.Background()
	c, err := client.New("http://127.0.0.1:8080", "sk-...")
	if err != nil {
		log.Fatal(err)
	}
	rank := 8
	run, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: "signal-tiny", LoRARank: &rank})
	if errors.Is(err, client.ErrInsufficientBalance) {
		log.Fatal("top up first: ", err)
	} else if err != nil {
		log.Fatal(err)
	}
	defer run.Close(ctx) // ends the run and frees its node session
	lr := 5e-3
	batch := protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{
		{Text: "The cat sat on the mat."},
		{Prompt: "Q: What color is the sky?\nA:", Completion: " Blue."},
	}}
	for step := 0; step < 20; step++ {
		fb, err := run.ForwardBackward(ctx, batch)
		if err != nil {
			log.Fatal(err)
		}
		if _, err := run.OptimStep(ctx, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}); err != nil {
			log.Fatal(err)
		}
		fmt.Printf("step %d loss %.4f\n", step, fb.LossMean)
	}
	sm, err := run.Sample(ctx, protocol.SampleRequest{
		Prompts:        []protocol.Prompt{{Text: "The cat"}},
		SamplingParams: protocol.SamplingParams{MaxTokens: 16},
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(sm.Samples[0][0].Text)
	saved, err := run.SaveState(ctx, protocol.SaveStateRequest{Mode: "adapter"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(saved.Checkpoint.URI)
}
