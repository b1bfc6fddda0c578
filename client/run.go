package client

import (
	"context"
	"fmt"
	"net/http"
	"sync"

	"github.com/signal-p2p/signal/protocol"
)

// Run is a handle on one training run. It keeps the run's last known state
// (Info), updated by the calls that change it. It is safe for concurrent
// use, though a run's node executes its calls one at a time.
type Run struct {
	c *Client

	mu   sync.Mutex
	info protocol.Run
	// runQueue orders the run's async calls (async.go).
	runQueue
}

// NewRunHandle returns a handle on an existing run without fetching it.
func (c *Client) NewRunHandle(id string) *Run { return &Run{c: c, info: protocol.Run{ID: id}} }

// ID is the run's id.
func (r *Run) ID() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.info.ID
}

// Info is a copy of the run's last known state.
func (r *Run) Info() protocol.Run {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.info
}

func (r *Run) setInfo(info protocol.Run) {
	r.mu.Lock()
	r.info = info
	r.mu.Unlock()
}

// path is the run's URL path below /v1 plus suffix.
func (r *Run) path(suffix string) (string, error) { return runPath(r.ID(), suffix) }

// post sends a mutating call on the run.
func (r *Run) post(ctx context.Context, suffix string, in, out any) error {
	p, err := r.path(suffix)
	if err != nil {
		return err
	}
	return r.c.do(ctx, call{method: http.MethodPost, path: p, in: in, out: out})
}

// addSpent keeps Info().SpentMicroCredits current from billed answers,
// and fills BalanceMicroCredits from an older server's "balance".
func (r *Run) addSpent(b *protocol.Billed) {
	if b.BalanceMicroCredits == nil && b.Balance != nil {
		bal := *b.Balance
		b.BalanceMicroCredits = &bal
	}
	if b.Cost == nil {
		return
	}
	r.mu.Lock()
	r.info.SpentMicroCredits += b.Cost.MicroCredits
	r.mu.Unlock()
}

// ForwardBackward computes the loss on req's batch (token Data or text
// Examples) and accumulates gradients for the next OptimStep.
func (r *Run) ForwardBackward(ctx context.Context, req protocol.ForwardBackwardRequest) (*protocol.ForwardBackwardResponse, error) {
	if err := checkBatch(req); err != nil {
		return nil, err
	}
	var out protocol.ForwardBackwardResponse
	if err := r.post(ctx, "/forward_backward", req, &out); err != nil {
		return nil, err
	}
	r.addSpent(&out.Billed)
	return &out, nil
}

// Forward computes the loss and logprobs on req's batch without gradients.
func (r *Run) Forward(ctx context.Context, req protocol.ForwardBackwardRequest) (*protocol.ForwardBackwardResponse, error) {
	if err := checkBatch(req); err != nil {
		return nil, err
	}
	var out protocol.ForwardBackwardResponse
	if err := r.post(ctx, "/forward", req, &out); err != nil {
		return nil, err
	}
	r.addSpent(&out.Billed)
	return &out, nil
}

// checkBatch catches an empty or ambiguous batch before it costs a request.
func checkBatch(req protocol.ForwardBackwardRequest) error {
	switch {
	case len(req.Data) == 0 && len(req.Examples) == 0:
		return fmt.Errorf("%w: batch is empty: set data or examples", ErrInvalidArgument)
	case len(req.Data) > 0 && len(req.Examples) > 0:
		return fmt.Errorf("%w: batch has both data and examples: set one", ErrInvalidArgument)
	}
	return nil
}

// OptimStep applies the accumulated gradients with AdamW (req.AdamParams nil
// takes the run's schedule and the defaults).
func (r *Run) OptimStep(ctx context.Context, req protocol.OptimStepRequest) (*protocol.OptimStepResponse, error) {
	var out protocol.OptimStepResponse
	if err := r.post(ctx, "/optim_step", req, &out); err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.info.Step = out.Step
	r.mu.Unlock()
	r.addSpent(&out.Billed)
	return &out, nil
}

// Sample generates continuations of req's prompts with the run's adapter.
func (r *Run) Sample(ctx context.Context, req protocol.SampleRequest) (*protocol.SampleResponse, error) {
	if len(req.Prompts) == 0 {
		return nil, fmt.Errorf("%w: prompts is empty", ErrInvalidArgument)
	}
	var out protocol.SampleResponse
	if err := r.post(ctx, "/sample", req, &out); err != nil {
		return nil, err
	}
	r.addSpent(&out.Billed)
	return &out, nil
}

// SaveState stores the run's adapter (mode "adapter", the default) or
// adapter and optimizer ("full") and returns the checkpoint.
func (r *Run) SaveState(ctx context.Context, req protocol.SaveStateRequest) (*protocol.SaveStateResponse, error) {
	var out protocol.SaveStateResponse
	if err := r.post(ctx, "/save_state", req, &out); err != nil {
		return nil, err
	}
	r.addSpent(&out.Billed)
	return &out, nil
}

// LoadState restores the run from a checkpoint named by id, URI or CID.
func (r *Run) LoadState(ctx context.Context, checkpoint string) (*protocol.Run, error) {
	if checkpoint == "" {
		return nil, fmt.Errorf("%w: checkpoint is empty", ErrInvalidArgument)
	}
	var out protocol.Run
	if err := r.post(ctx, "/load_state", protocol.LoadStateRequest{Checkpoint: checkpoint}, &out); err != nil {
		return nil, err
	}
	r.setInfo(out)
	return &out, nil
}

// Close ends the run and frees its node's session.
func (r *Run) Close(ctx context.Context) (*protocol.Run, error) {
	out, err := r.c.DeleteRun(ctx, r.ID())
	if err != nil {
		return nil, err
	}
	r.setInfo(*out)
	return out, nil
}

// Refresh fetches the run's current state into Info.
func (r *Run) Refresh(ctx context.Context) error {
	p, err := r.path("")
	if err != nil {
		return err
	}
	var out protocol.Run
	if err := r.c.do(ctx, call{method: http.MethodGet, path: p, out: &out}); err != nil {
		return err
	}
	r.setInfo(out)
	return nil
}

// Metrics returns the run's per-step metrics.
func (r *Run) Metrics(ctx context.Context) ([]protocol.Metrics, error) {
	return r.c.RunMetrics(ctx, r.ID())
}

// Tokenize turns text into token ids with the run's base model tokenizer.
func (r *Run) Tokenize(ctx context.Context, text string, addSpecialTokens bool) ([]int, error) {
	return r.c.Tokenize(ctx, protocol.TokenizeRequest{
		BaseModel: r.Info().BaseModel, Text: text, AddSpecialTokens: addSpecialTokens,
	})
}

// DatumFromText tokenizes prompt (with the tokenizer's special tokens, e.g.
// BOS) and completion (without) on the server and builds a Datum that trains
// on the completion only; see DatumFromTokens.
func (r *Run) DatumFromText(ctx context.Context, prompt, completion string) (protocol.Datum, error) {
	var p []int
	if prompt != "" {
		var err error
		if p, err = r.Tokenize(ctx, prompt, true); err != nil {
			return protocol.Datum{}, fmt.Errorf("tokenize prompt: %w", err)
		}
	}
	c, err := r.Tokenize(ctx, completion, prompt == "")
	if err != nil {
		return protocol.Datum{}, fmt.Errorf("tokenize completion: %w", err)
	}
	return DatumFromTokens(p, c)
}

// DatumFromTokens builds a next-token Datum from a prompt and a completion:
// the model reads all tokens but the last, predicts each following token, and
// the loss weighs only the completion's tokens (weight 1; the prompt's 0).
func DatumFromTokens(prompt, completion []int) (protocol.Datum, error) {
	n := len(prompt) + len(completion)
	if len(completion) == 0 || n < 2 {
		return protocol.Datum{}, fmt.Errorf("%w: datum needs ≥ 2 tokens with ≥ 1 in the completion, got prompt %d, completion %d",
			ErrInvalidArgument, len(prompt), len(completion))
	}
	all := make([]int, 0, n)
	all = append(all, prompt...)
	all = append(all, completion...)
	weights := make([]float64, n-1)
	for i := range weights {
		// weights[i] is for predicting all[i+1].
		if i+1 >= len(prompt) {
			weights[i] = 1
		}
	}
	return protocol.Datum{
		ModelInput: protocol.ModelInput{Tokens: all[:n-1]},
		LossFnInputs: protocol.LossFnInputs{
			TargetTokens: append([]int(nil), all[1:]...),
			Weights:      weights,
		},
	}, nil
}
