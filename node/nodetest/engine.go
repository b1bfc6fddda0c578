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

// Do implements forward_backward, forward, optim_step and sample over the
// public API's JSON types.
func (s *Session) Do(_ context.Context, call protocol.Call, body []byte) ([]byte, protocol.Usage, error) {
	s.e.count(call)
	switch call {
	case protocol.CallForwardBackward, protocol.CallForward:
		var req protocol.ForwardBackwardRequest
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, protocol.Usage{}, fmt.Errorf("%w: %w", node.ErrInvalidRequest, err)
		}
		if len(req.Data) == 0 {
			return nil, protocol.Usage{}, fmt.Errorf("%w: data: empty", node.ErrInvalidRequest)
		}
		var tokens int64
		resp := protocol.ForwardBackwardResponse{}
		for _, d := range req.Data {
			tokens += int64(len(d.ModelInput.Tokens))
			lp := make([]float64, len(d.ModelInput.Tokens))
			for i := range lp {
				lp[i] = -1
			}
			resp.Logprobs = append(resp.Logprobs, lp)
		}
		resp.Tokens = tokens
		resp.LossSum = float64(tokens)
		resp.LossMean = 1
		usage := protocol.Usage{PrefillTokens: tokens}
		if call == protocol.CallForwardBackward {
			g := 1.0 / float64(s.state.Step+1)
			resp.GradNorm = &g
			s.state.Pending += tokens
			usage = protocol.Usage{TrainTokens: tokens}
		}
		b, err := json.Marshal(resp)
		return b, usage, err
	case protocol.CallOptimStep:
		var req protocol.OptimStepRequest
		if len(body) > 0 {
			if err := json.Unmarshal(body, &req); err != nil {
				return nil, protocol.Usage{}, fmt.Errorf("%w: %w", node.ErrInvalidRequest, err)
			}
		}
		lr := 1e-4
		if req.AdamParams != nil && req.AdamParams.LearningRate != nil {
			lr = *req.AdamParams.LearningRate
		}
		s.state.Step++
		s.state.TokenSum += s.state.Pending
		s.state.Pending = 0
		s.state.LastLR = lr
		s.state.Optimizer = true
		b, err := json.Marshal(protocol.OptimStepResponse{Step: s.state.Step, LearningRate: lr, GradNorm: 1})
		return b, protocol.Usage{}, err
	case protocol.CallSample:
		var req protocol.SampleRequest
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, protocol.Usage{}, fmt.Errorf("%w: %w", node.ErrInvalidRequest, err)
		}
		var resp protocol.SampleResponse
		var sampled int64
		for range req.Prompts {
			toks := make([]int, req.SamplingParams.MaxTokens)
			for i := range toks {
				toks[i] = int(s.state.TokenSum+int64(i)) % 1000
			}
			sampled += int64(len(toks))
			resp.Samples = append(resp.Samples, []protocol.Sample{{Tokens: toks, Text: fmt.Sprint(toks), Logprobs: make([]float64, len(toks)), StopReason: "length"}})
		}
		b, err := json.Marshal(resp)
		return b, protocol.Usage{SampledTokens: sampled}, err
	}
	return nil, protocol.Usage{}, fmt.Errorf("%w: call %s", node.ErrInvalidRequest, call)
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
