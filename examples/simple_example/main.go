// Command simple_example is Signal's simple example in Go: fine-tune a LoRA
// adapter for 20 steps on a small built-in text dataset, sample every 5
// steps, save the adapter and print where it is.
//
//	SIGNAL_URL=http://127.0.0.1:8080 SIGNAL_API_KEY=sk-... go run ./examples/simple_example
//	go run ./examples/simple_example --testnet testnet-data/testnet.json
//
// The last line is "SUMMARY {json}" for scripts.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// dataset is short, regular text a small model can learn in 20 steps.
var dataset = []protocol.TextExample{
	{Text: "The cat sat on the mat."},
	{Text: "The dog sat on the log."},
	{Text: "The bird sat on the branch."},
	{Text: "The fox sat on the box."},
	{Prompt: "Question: What color is the sky?\nAnswer:", Completion: " The sky is blue."},
	{Prompt: "Question: What color is grass?\nAnswer:", Completion: " Grass is green."},
}

var prompts = []string{"The cat sat", "Question: What color is the sky?\nAnswer:"}

type config struct {
	url, apiKey, testnet, baseModel string
	loraRank, steps, sampleEvery    int
	learningRate                    float64
	maxTokens                       int
	tokens, keepRun                 bool
}

// summary is the example's machine-readable result.
type summary struct {
	RunID               string                 `json:"run_id"`
	Losses              []float64              `json:"losses"`
	CostMicroCredits    protocol.MicroCredits  `json:"cost_micro_credits"`
	BalanceMicroCredits *protocol.MicroCredits `json:"balance_micro_credits"`
	CheckpointURI       string                 `json:"checkpoint_uri"`
	CheckpointID        string                 `json:"checkpoint_id"`
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "simple_example:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err = run(ctx, cfg, os.Stdout)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "simple_example:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (config, error) {
	fs := flag.NewFlagSet("simple_example", flag.ContinueOnError)
	var c config
	defModel := os.Getenv("SIGNAL_BASE_MODEL")
	if defModel == "" {
		defModel = "signal-tiny"
	}
	fs.StringVar(&c.url, "url", os.Getenv("SIGNAL_URL"), "coordinator URL; several, comma-separated, are tried in turn (default $SIGNAL_URL)")
	fs.StringVar(&c.apiKey, "api-key", os.Getenv("SIGNAL_API_KEY"), "API key (default $SIGNAL_API_KEY)")
	fs.StringVar(&c.testnet, "testnet", os.Getenv("SIGNAL_TESTNET"), "read the coordinators and API key from this testnet.json or testnet directory (default $SIGNAL_TESTNET)")
	fs.StringVar(&c.baseModel, "base-model", defModel, "base model (default $SIGNAL_BASE_MODEL or signal-tiny)")
	fs.IntVar(&c.loraRank, "lora-rank", 8, "LoRA rank")
	fs.IntVar(&c.steps, "steps", 20, "training steps")
	fs.IntVar(&c.sampleEvery, "sample-every", 5, "sample every this many steps")
	fs.Float64Var(&c.learningRate, "learning-rate", 5e-3, "AdamW learning rate")
	fs.IntVar(&c.maxTokens, "max-tokens", 16, "tokens per sample")
	fs.BoolVar(&c.tokens, "tokens", false, "send token Datum built with the tokenize endpoint instead of text examples")
	fs.BoolVar(&c.keepRun, "keep-run", false, "do not end the run at the end")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if c.testnet != "" {
		tf, err := client.ReadTestnetFile(c.testnet)
		if err != nil {
			return c, err
		}
		// Explicit flags still win over the testnet file.
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		if !set["url"] {
			// Every coordinator: the client fails over between them.
			c.url = strings.Join(tf.Coordinators, ",")
		}
		if !set["api-key"] {
			c.apiKey = tf.APIKey
		}
	}
	switch {
	case c.url == "":
		return c, errors.New("no coordinator URL: set SIGNAL_URL or pass --url or --testnet")
	case c.apiKey == "":
		return c, errors.New("no API key: set SIGNAL_API_KEY or pass --api-key or --testnet")
	case c.steps < 1 || c.sampleEvery < 1 || c.maxTokens < 1:
		return c, fmt.Errorf("--steps %d, --sample-every %d, --max-tokens %d: each must be ≥ 1", c.steps, c.sampleEvery, c.maxTokens)
	}
	return c, nil
}

func credits(mc protocol.MicroCredits) string { return protocol.FormatCredits(mc) }

// costOf is what a billed answer cost, 0 when the server left it out.
func costOf(b protocol.Billed) protocol.MicroCredits {
	if b.Cost == nil {
		return 0
	}
	return b.Cost.MicroCredits
}

func run(ctx context.Context, cfg config, out io.Writer) (err error) {
	c, err := client.NewCluster(strings.Split(cfg.url, ","), cfg.apiKey)
	if err != nil {
		return err
	}
	t0 := time.Now()
	rank, seed := cfg.loraRank, int64(1)
	r, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: cfg.baseModel, LoRARank: &rank, Seed: &seed, Name: "simple-example"})
	if err != nil {
		return fmt.Errorf("create run: %w", err)
	}
	info := r.Info()
	fmt.Fprintf(out, "run %s on %s (rank %d), node %s\n", info.ID, info.BaseModel, rank, info.Node)
	// End the run even when a call fails midway, so its node session is
	// freed; a cancelled ctx gets a short fresh one for that.
	defer func() {
		if cfg.keepRun {
			return
		}
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if _, cerr := r.Close(cctx); cerr != nil {
			err = errors.Join(err, fmt.Errorf("close run: %w", cerr))
		}
	}()

	batch := protocol.ForwardBackwardRequest{Examples: dataset}
	if cfg.tokens {
		batch = protocol.ForwardBackwardRequest{}
		for _, ex := range dataset {
			prompt, completion := ex.Prompt, ex.Completion
			if ex.Text != "" {
				prompt, completion = "", ex.Text
			}
			d, err := r.DatumFromText(ctx, prompt, completion)
			if err != nil {
				return fmt.Errorf("build datum: %w", err)
			}
			batch.Data = append(batch.Data, d)
		}
	}

	var s summary
	s.RunID = info.ID
	sp := make([]protocol.Prompt, len(prompts))
	for i, p := range prompts {
		sp[i] = protocol.Prompt{Text: p}
	}
	lr := cfg.learningRate
	temp := 0.7
	for i := 0; i < cfg.steps; i++ {
		ts := time.Now()
		fb, err := r.ForwardBackward(ctx, batch)
		if err != nil {
			return fmt.Errorf("forward_backward step %d: %w", i, err)
		}
		st, err := r.OptimStep(ctx, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}})
		if err != nil {
			return fmt.Errorf("optim_step %d: %w", i, err)
		}
		cost := costOf(fb.Billed) + costOf(st.Billed)
		s.CostMicroCredits += cost
		s.BalanceMicroCredits = st.BalanceMicroCredits
		s.Losses = append(s.Losses, fb.LossMean)
		fmt.Fprintf(out, "step %2d  loss %.4f  tokens %d  grad_norm %.4f  lr %.2g  cost %s  (%.1fs)\n",
			st.Step, fb.LossMean, fb.Tokens, st.GradNorm, st.LearningRate, credits(cost), time.Since(ts).Seconds())
		if i%cfg.sampleEvery == 0 {
			sampleSeed := int64(i)
			sm, err := r.Sample(ctx, protocol.SampleRequest{Prompts: sp, SamplingParams: protocol.SamplingParams{
				MaxTokens: cfg.maxTokens, Temperature: &temp, Seed: &sampleSeed}})
			if err != nil {
				return fmt.Errorf("sample at step %d: %w", i, err)
			}
			s.CostMicroCredits += costOf(sm.Billed)
			if sm.BalanceMicroCredits != nil {
				s.BalanceMicroCredits = sm.BalanceMicroCredits
			}
			for j, p := range prompts {
				if j < len(sm.Samples) && len(sm.Samples[j]) > 0 {
					fmt.Fprintf(out, "  sample  %q -> %q\n", p, sm.Samples[j][0].Text)
				}
			}
		}
	}

	saved, err := r.SaveState(ctx, protocol.SaveStateRequest{Mode: "adapter", Name: "simple-example"})
	if err != nil {
		return fmt.Errorf("save_state: %w", err)
	}
	s.CostMicroCredits += costOf(saved.Billed)
	if saved.BalanceMicroCredits != nil {
		s.BalanceMicroCredits = saved.BalanceMicroCredits
	}
	ck := saved.Checkpoint
	s.CheckpointURI, s.CheckpointID = ck.URI, ck.ID
	fmt.Fprintf(out, "saved adapter at step %d: %s\n", ck.Step, ck.URI)
	for _, f := range ck.Files {
		fmt.Fprintf(out, "  %-28s %8d bytes  cid %s\n", f.Name, f.Size, f.CID)
	}
	first, last := s.Losses[0], s.Losses[len(s.Losses)-1]
	trend := "falling"
	if !(last < first) {
		trend = "NOT falling"
	}
	bal := "-"
	if s.BalanceMicroCredits != nil {
		bal = credits(*s.BalanceMicroCredits)
	}
	fmt.Fprintf(out, "loss %.4f -> %.4f over %d steps (%s); cost %s credits; balance %s credits; %.1fs\n",
		first, last, len(s.Losses), trend, credits(s.CostMicroCredits), bal, time.Since(t0).Seconds())
	js, err := json.Marshal(s)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(out, "SUMMARY %s\n", js)
	return err
}
