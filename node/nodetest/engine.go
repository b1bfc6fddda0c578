// Package nodetest has a fake Engine for tests of the node, the
// coordinator's p2p side and the testnet: it keeps a tiny deterministic
// state (a step counter and a running sum of the tokens trained on) that
// survives SaveState/LoadState, so tests can check that calls, checkpoints
// and failover carry state, without a real model.
package nodetest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// Engine is a fake node.Engine.
type Engine struct {
	// ModelNames are the models it serves (default "tiny").
	ModelNames []string
	// Calls counts every session call executed, by call name.
	mu    sync.Mutex
	calls map[protocol.Call]int
	open  atomic.Int64
}

var (
	_ node.Engine  = (*Engine)(nil)
	_ node.Session = (*Session)(nil)
)

// Backend is "fake".
func (e *Engine) Backend() string { return "fake" }

// Models lists ModelNames.
func (e *Engine) Models() []string {
	if len(e.ModelNames) == 0 {
		return []string{"tiny"}
	}
	return append([]string(nil), e.ModelNames...)
}

// Calls returns how many times call was executed.
func (e *Engine) Calls(call protocol.Call) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.calls[call]
}

// Open returns a fresh session; unknown models fail with node.ErrUnknownModel.
func (e *Engine) Open(_ context.Context, spec protocol.SessionSpec) (node.Session, error) {
	ms := e.Models()
	sort.Strings(ms)
	if i := sort.SearchStrings(ms, spec.BaseModel); i == len(ms) || ms[i] != spec.BaseModel {
		return nil, fmt.Errorf("%w: %q (have %v)", node.ErrUnknownModel, spec.BaseModel, ms)
	}
	e.open.Add(1)
	return &Session{e: e}, nil
}

// Open is the number of sessions open.
func (e *Engine) OpenSessions() int { return int(e.open.Load()) }

func (e *Engine) count(c protocol.Call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.calls == nil {
		e.calls = make(map[protocol.Call]int)
	}
	e.calls[c]++
}

// State is the fake session's trainable state.
type State struct {
	Step      int     `json:"step"`
	TokenSum  int64   `json:"token_sum"`
	Pending   int64   `json:"pending"` // tokens accumulated since the last optim_step
	LastLR    float64 `json:"last_lr"`
	Optimizer bool    `json:"optimizer,omitempty"`
}

// Session is a fake node.Session.
type Session struct {
	e     *Engine
	state State
	done  bool
}

// State returns the session's state.
func (s *Session) State() State { return s.state }

// Tokenizer is nil: the fake takes token ids only.
func (s *Session) Tokenizer() node.Tokenizer { return nil }

// ForwardBackward counts data's tokens as the loss and adds them to the
// tokens pending for the next optim_step.
func (s *Session) ForwardBackward(_ context.Context, data []trainer.Datum, _ node.Loss) (trainer.ForwardResult, error) {
	s.e.count(protocol.CallForwardBackward)
	res := forward(data)
	res.GradNorm = 1.0 / float64(s.state.Step+1)
	s.state.Pending += int64(res.Tokens)
	return res, nil
}

// Forward is ForwardBackward without the pending tokens.
func (s *Session) Forward(_ context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	s.e.count(protocol.CallForward)
	res := forward(data)
	// Asked for top-k: ids 0..k-1 at logprobs -1, -2, …, at every position.
	if k := loss.TopK; k > 0 {
		for _, d := range data {
			ids, lps := make([]int32, len(d.Tokens)*k), make([]float32, len(d.Tokens)*k)
			for i := range ids {
				ids[i], lps[i] = int32(i%k), -float32(1+i%k)
			}
			res.TopIDs, res.TopLogprobs = append(res.TopIDs, ids), append(res.TopLogprobs, lps)
		}
	}
	return res, nil
}

// forward gives every position logprob -1 and loss 1.
func forward(data []trainer.Datum) trainer.ForwardResult {
	var res trainer.ForwardResult
	for _, d := range data {
		res.Tokens += len(d.Tokens)
		lp := make([]float32, len(d.Tokens))
		for i := range lp {
			lp[i] = -1
		}
		res.Logprobs = append(res.Logprobs, lp)
	}
	res.LossSum, res.WeightSum = float64(res.Tokens), float64(res.Tokens)
	return res
}

// OptimStep moves the pending tokens into the state.
func (s *Session) OptimStep(_ context.Context, p trainer.AdamParams) (trainer.OptimResult, error) {
	s.e.count(protocol.CallOptimStep)
	s.state.Step++
	s.state.TokenSum += s.state.Pending
	s.state.Pending = 0
	s.state.LastLR = p.LearningRate
	s.state.Optimizer = true
	return trainer.OptimResult{Step: s.state.Step, LearningRate: p.LearningRate, GradNorm: 1}, nil
}

// Sample answers max_tokens tokens derived from the state's token sum, so
// a sample shows what the run has trained on.
func (s *Session) Sample(_ context.Context, prompts [][]int, _ int, p trainer.SamplingParams) ([][]trainer.Sample, error) {
	s.e.count(protocol.CallSample)
	out := make([][]trainer.Sample, len(prompts))
	for pi := range prompts {
		toks := make([]int, p.MaxTokens)
		for i := range toks {
			toks[i] = int(s.state.TokenSum+int64(i)) % 1000
		}
		out[pi] = []trainer.Sample{{Tokens: toks, Text: fmt.Sprint(toks), Logprobs: make([]float32, len(toks)), StopReason: trainer.StopLength}}
	}
	return out, nil
}

// SaveState writes adapter_config.json and adapter_model.safetensors (fake
// content), plus optimizer.json in full mode.
func (s *Session) SaveState(_ context.Context, dir, mode string) error {
	b, err := json.Marshal(s.state)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "adapter_config.json"), []byte(`{"peft_type":"LORA","r":8}`), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "adapter_model.safetensors"), b, 0o644); err != nil {
		return err
	}
	if mode == node.ModeFull {
		return os.WriteFile(filepath.Join(dir, "optimizer.json"), []byte(`{"adam":true}`), 0o644)
	}
	return nil
}

// LoadState reads what SaveState wrote.
func (s *Session) LoadState(_ context.Context, dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "adapter_model.safetensors"))
	if err != nil {
		return fmt.Errorf("%w: %w", node.ErrInvalidRequest, err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return fmt.Errorf("%w: adapter: %w", node.ErrInvalidRequest, err)
	}
	s.state = st
	return nil
}

// Step is the optimizer step count.
func (s *Session) Step() int { return s.state.Step }

// Close ends the session.
func (s *Session) Close() error {
	if !s.done {
		s.done = true
		s.e.open.Add(-1)
	}
	return nil
}
