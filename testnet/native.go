package testnet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/gpu"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// EngineFactory builds a node engine serving models (name → model dir).
type EngineFactory func(models map[string]string) (node.Engine, error)

var (
	enginesMu sync.Mutex
	engines   = map[string]EngineFactory{"native": newNativeEngine}
)

// RegisterEngine makes an engine available to testnets by name (Config.Engine,
// `signal testnet --engine`). Child processes see it when the binary
// registers it at init.
func RegisterEngine(name string, f EngineFactory) {
	enginesMu.Lock()
	defer enginesMu.Unlock()
	engines[name] = f
}

func engineFactory(name string) (EngineFactory, bool) {
	enginesMu.Lock()
	defer enginesMu.Unlock()
	f, ok := engines[name]
	return f, ok
}

func engineNames() []string {
	enginesMu.Lock()
	defer enginesMu.Unlock()
	var out []string
	for n := range engines {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// nativeEngine runs sessions on the Go trainer (trainer.Session over a
// shared trainer.Model per base model).
//
// It is the testnet's own adapter from the public API's JSON bodies to the
// trainer, written because the node package had no native engine yet when
// the testnet was built; node/native (the node helper's) should replace it
// through RegisterEngine("native", ...) once it exists.
type nativeEngine struct {
	models map[string]string

	mu     sync.Mutex
	loaded map[string]*trainer.Model
}

var (
	_ node.Engine  = (*nativeEngine)(nil)
	_ node.Session = (*nativeSession)(nil)
)

func newNativeEngine(models map[string]string) (node.Engine, error) {
	if len(models) == 0 {
		return nil, fmt.Errorf("native engine: %w", errNoModels)
	}
	return &nativeEngine{models: models, loaded: map[string]*trainer.Model{}}, nil
}

// Backend is "native".
func (e *nativeEngine) Backend() string { return "native" }

// Models lists the model names the engine serves, sorted.
func (e *nativeEngine) Models() []string {
	out := make([]string, 0, len(e.models))
	for n := range e.models {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// model loads a base model once; sessions share it.
func (e *nativeEngine) model(name string) (*trainer.Model, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if m, ok := e.loaded[name]; ok {
		return m, nil
	}
	dir, ok := e.models[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q (this node serves %v)", node.ErrUnknownModel, name, e.Models())
	}
	m, err := trainer.LoadModel(dir)
	if err != nil {
		return nil, fmt.Errorf("load model %s: %w", name, err)
	}
	e.loaded[name] = m
	return m, nil
}

// Open starts a session with a fresh adapter.
func (e *nativeEngine) Open(_ context.Context, spec protocol.SessionSpec) (node.Session, error) {
	m, err := e.model(spec.BaseModel)
	if err != nil {
		return nil, err
	}
	cfg := trainer.SessionConfig{Rank: spec.LoRARank, Alpha: float32(spec.LoRAAlpha), Seed: spec.Seed}
	for _, t := range spec.TargetModules {
		if t == "all-linear" {
			cfg.TargetModules = nil
			break
		}
		cfg.TargetModules = append(cfg.TargetModules, t)
	}
	if len(spec.LRSchedule) > 0 {
		var s protocol.LRSchedule
		if err := strictJSON(spec.LRSchedule, &s); err != nil {
			return nil, fmt.Errorf("lr_schedule: %w", err)
		}
		cfg.Schedule = &trainer.LRSchedule{Kind: s.Kind, PeakLR: s.PeakLR, WarmupSteps: s.WarmupSteps, TotalSteps: s.TotalSteps, FinalFraction: s.FinalFraction}
	}
	s, err := trainer.NewSession(m, cfg)
	if err != nil {
		return nil, engineErr(err)
	}
	return &nativeSession{s: s, m: m}, nil
}

type nativeSession struct {
	s *trainer.Session
	m *trainer.Model
}

// engineErr maps the trainer's input errors to the node's 400.
func engineErr(err error) error {
	if errors.Is(err, trainer.ErrInvalidInput) || errors.Is(err, trainer.ErrUnsupported) {
		return fmt.Errorf("%w: %w", node.ErrInvalidRequest, err)
	}
	return err
}

func strictJSON(b []byte, v any) error {
	if len(b) == 0 {
		b = []byte("{}")
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: body: %w", node.ErrInvalidRequest, err)
	}
	return nil
}

// Do runs one compute call with the API's JSON body.
func (s *nativeSession) Do(ctx context.Context, call protocol.Call, body []byte) ([]byte, protocol.Usage, error) {
	var usage protocol.Usage
	switch call {
	case protocol.CallForwardBackward, protocol.CallForward:
		var req protocol.ForwardBackwardRequest
		if err := strictJSON(body, &req); err != nil {
			return nil, usage, err
		}
		data := req.Data
		if len(req.Examples) > 0 {
			if len(data) > 0 {
				return nil, usage, fmt.Errorf("%w: give data or examples, not both", node.ErrInvalidRequest)
			}
			var err error
			// The same tokenization rules as the GPU engine: BOS as the
			// tokenizer says, weights 0 on the prompt, 1 on the completion.
			if data, err = gpu.ExamplesToData(s.m.Tokenizer(), req.Examples); err != nil {
				return nil, usage, fmt.Errorf("%w: %w", node.ErrInvalidRequest, err)
			}
		}
		if len(data) == 0 {
			return nil, usage, fmt.Errorf("%w: data or examples: required", node.ErrInvalidRequest)
		}
		td := make([]trainer.Datum, len(data))
		for i, d := range data {
			td[i] = trainer.Datum{
				Tokens: d.ModelInput.Tokens, TargetTokens: d.LossFnInputs.TargetTokens,
				Weights: f32(d.LossFnInputs.Weights), Logprobs: f32(d.LossFnInputs.Logprobs), Advantages: f32(d.LossFnInputs.Advantages),
			}
		}
		lossFn := req.LossFn
		if lossFn == "" {
			lossFn = trainer.LossCrossEntropy
		}
		run := s.s.Forward
		if call == protocol.CallForwardBackward {
			run = s.s.ForwardBackward
		}
		r, err := run(ctx, td, lossFn, req.LossFnConfig)
		if err != nil {
			return nil, usage, engineErr(err)
		}
		out := protocol.ForwardBackwardResponse{LossSum: r.LossSum, LossMean: r.LossMean, Tokens: int64(r.Tokens), Logprobs: make([][]float64, len(r.Logprobs))}
		for i, lp := range r.Logprobs {
			out.Logprobs[i] = f64(lp)
		}
		var inTokens int64
		for _, d := range td {
			inTokens += int64(len(d.Tokens))
		}
		if call == protocol.CallForwardBackward {
			g := r.GradNorm
			out.GradNorm = &g
			usage.TrainTokens = inTokens
		} else {
			usage.PrefillTokens = inTokens
		}
		b, err := json.Marshal(out)
		return b, usage, err
	case protocol.CallOptimStep:
		var req protocol.OptimStepRequest
		if err := strictJSON(body, &req); err != nil {
			return nil, usage, err
		}
		p := trainer.DefaultAdamParams()
		if a := req.AdamParams; a != nil {
			set := func(dst *float64, v *float64) {
				if v != nil {
					*dst = *v
				}
			}
			set(&p.LearningRate, a.LearningRate)
			set(&p.Beta1, a.Beta1)
			set(&p.Beta2, a.Beta2)
			set(&p.Eps, a.Eps)
			set(&p.WeightDecay, a.WeightDecay)
			set(&p.GradClipNorm, a.GradClipNorm)
		}
		r, err := s.s.OptimStep(ctx, p)
		if err != nil {
			return nil, usage, engineErr(err)
		}
		b, err := json.Marshal(protocol.OptimStepResponse{Step: r.Step, LearningRate: r.LearningRate, GradNorm: r.GradNorm})
		return b, usage, err
	case protocol.CallSample:
		var req protocol.SampleRequest
		if err := strictJSON(body, &req); err != nil {
			return nil, usage, err
		}
		tok := s.m.Tokenizer()
		prompts := make([][]int, len(req.Prompts))
		for i, p := range req.Prompts {
			switch {
			case len(p.Tokens) > 0 && p.Text != "":
				return nil, usage, fmt.Errorf("%w: prompts[%d]: give tokens or text, not both", node.ErrInvalidRequest, i)
			case len(p.Tokens) > 0:
				prompts[i] = p.Tokens
			case p.Text != "" && tok != nil:
				prompts[i] = tok.Encode(p.Text, true)
			case p.Text != "":
				return nil, usage, fmt.Errorf("%w: prompts[%d].text: the model has no tokenizer", node.ErrInvalidRequest, i)
			default:
				return nil, usage, fmt.Errorf("%w: prompts[%d]: empty", node.ErrInvalidRequest, i)
			}
			usage.PrefillTokens += int64(len(prompts[i]))
		}
		n := 1
		if req.NumSamples != nil {
			n = *req.NumSamples
		}
		sp := trainer.DefaultSamplingParams()
		q := req.SamplingParams
		sp.MaxTokens = q.MaxTokens
		if q.Temperature != nil {
			sp.Temperature = float32(*q.Temperature)
		}
		if q.TopK != nil {
			sp.TopK = *q.TopK
		}
		if q.TopP != nil {
			sp.TopP = float32(*q.TopP)
		}
		if q.Seed != nil {
			sp.Seed = *q.Seed
		}
		sp.Stop = q.Stop
		rows, err := s.s.Sample(ctx, prompts, n, sp)
		if err != nil {
			return nil, usage, engineErr(err)
		}
		usage.PrefillTokens *= int64(n)
		out := protocol.SampleResponse{Samples: make([][]protocol.Sample, len(rows))}
		for i, row := range rows {
			out.Samples[i] = make([]protocol.Sample, len(row))
			for j, smp := range row {
				toks := smp.Tokens
				if toks == nil {
					toks = []int{}
				}
				out.Samples[i][j] = protocol.Sample{Tokens: toks, Text: smp.Text, Logprobs: f64(smp.Logprobs), StopReason: smp.StopReason}
				usage.SampledTokens += int64(len(smp.Tokens))
			}
		}
		b, err := json.Marshal(out)
		return b, usage, err
	}
	return nil, usage, fmt.Errorf("%w: call %q is not a compute call", node.ErrInvalidRequest, call)
}

// SaveState writes PEFT files (and optimizer state in full mode) into dir.
func (s *nativeSession) SaveState(_ context.Context, dir, mode string) error {
	_, err := s.s.SaveState(dir, mode)
	return engineErr(err)
}

// LoadState restores what SaveState wrote.
func (s *nativeSession) LoadState(_ context.Context, dir string) error {
	return engineErr(s.s.LoadState(dir))
}

// Step is the number of optimizer steps taken.
func (s *nativeSession) Step() int { return s.s.Step() }

// Close frees the session (the shared base model stays loaded).
func (s *nativeSession) Close() error { return s.s.Close() }

func f32(x []float64) []float32 {
	if x == nil {
		return nil
	}
	out := make([]float32, len(x))
	for i, v := range x {
		out[i] = float32(v)
	}
	return out
}

func f64(x []float32) []float64 {
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = float64(v)
	}
	return out
}
