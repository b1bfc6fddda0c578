// Package native adapts the Go training engine (package trainer) to the
// node's Engine interface: it loads base models from a models directory
// (Hugging Face layout, directory name = model name) once and shares each
// among all sessions on it, and converts between the public API's JSON and
// the trainer's types, tokenizing text examples and prompts with the
// model's tokenizer.
package native

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// BackendName is the name adverts give this engine.
const BackendName = "native"

// Engine serves sessions from the models in one directory.
type Engine struct {
	dir     string
	catalog *node.ModelCatalog

	// Fetch, when set, is asked for a model missing from the directory: it
	// fills dir (a temporary directory, renamed into place on success),
	// e.g. from the Hugging Face Hub, or fails with node.ErrUnknownModel.
	Fetch func(ctx context.Context, name, dir string) error

	mu      sync.Mutex
	models  map[string]*modelSlot
	fetchMu sync.Mutex
}

// modelSlot loads a model once; concurrent opens of the same model wait
// for the first load.
type modelSlot struct {
	once  sync.Once
	model *trainer.Model
	err   error
}

var (
	_ node.Engine  = (*Engine)(nil)
	_ node.Session = (*Session)(nil)
)

// New returns an engine over the models in dir.
func New(dir string, log *slog.Logger) (*Engine, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("models dir: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("models dir %s: not a directory", dir)
	}
	return &Engine{dir: dir, models: make(map[string]*modelSlot), catalog: node.NewModelCatalog(dir, log)}, nil
}

// Backend is BackendName.
func (e *Engine) Backend() string { return BackendName }

// Models lists the model directories that pass the model check
// (node.ModelCatalog).
func (e *Engine) Models() []string { return e.catalog.Models() }

// Loaded lists the models held in memory.
func (e *Engine) Loaded() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for name, s := range e.models {
		if s.model != nil {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// Close frees every loaded model; open sessions must be closed first.
func (e *Engine) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	var errs []error
	for name, s := range e.models {
		if s.model != nil {
			errs = append(errs, s.model.Close())
		}
		delete(e.models, name)
	}
	return errors.Join(errs...)
}

func (e *Engine) model(ctx context.Context, name string) (*trainer.Model, error) {
	if name == "" || name != filepath.Base(name) || strings.HasPrefix(name, ".") {
		return nil, fmt.Errorf("%w: base_model %q", node.ErrUnknownModel, name)
	}
	dir := filepath.Join(e.dir, name)
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
		if e.Fetch == nil {
			return nil, fmt.Errorf("%w: %q (have %v)", node.ErrUnknownModel, name, e.Models())
		}
		if err := e.fetch(ctx, name, dir); err != nil {
			return nil, err
		}
	}
	e.mu.Lock()
	s, ok := e.models[name]
	if !ok {
		s = &modelSlot{}
		e.models[name] = s
	}
	e.mu.Unlock()
	s.once.Do(func() { s.model, s.err = trainer.LoadModel(dir) })
	if s.err != nil {
		e.mu.Lock()
		if e.models[name] == s {
			delete(e.models, name) // let a later open retry
		}
		e.mu.Unlock()
		return nil, fmt.Errorf("load model %s: %w", name, mapErr(s.err))
	}
	return s.model, nil
}

// fetch downloads a model into a temporary directory beside its final
// place and renames it there, so that a failed download leaves no model
// directory that looks complete. Concurrent fetches of one model are
// serialised by the engine's fetch lock.
func (e *Engine) fetch(ctx context.Context, name, dir string) error {
	e.fetchMu.Lock()
	defer e.fetchMu.Unlock()
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err == nil {
		return nil // fetched by the caller before us
	}
	tmp := filepath.Join(e.dir, ".fetch-"+name)
	if err := e.Fetch(ctx, name, tmp); err != nil {
		return fmt.Errorf("fetch model %s: %w", name, err)
	}
	if _, err := os.Stat(filepath.Join(tmp, "config.json")); err != nil {
		return fmt.Errorf("fetch model %s: %w: no config.json", name, node.ErrUnknownModel)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("fetch model %s: %w", name, err)
	}
	return nil
}

// Open starts a session with a fresh LoRA adapter on the shared model.
func (e *Engine) Open(ctx context.Context, spec protocol.SessionSpec) (node.Session, error) {
	m, err := e.model(ctx, spec.BaseModel)
	if err != nil {
		return nil, err
	}
	cfg := trainer.SessionConfig{
		Rank:          spec.LoRARank,
		Alpha:         float32(spec.LoRAAlpha),
		TargetModules: spec.TargetModules,
		Seed:          spec.Seed,
	}
	if len(spec.LRSchedule) > 0 && string(spec.LRSchedule) != "null" {
		var s protocol.LRSchedule
		if err := strictDecode(spec.LRSchedule, &s); err != nil {
			return nil, fmt.Errorf("lr_schedule: %w", err)
		}
		cfg.Schedule = &trainer.LRSchedule{Kind: s.Kind, PeakLR: s.PeakLR, WarmupSteps: s.WarmupSteps,
			TotalSteps: s.TotalSteps, FinalFraction: s.FinalFraction}
	}
	s, err := trainer.NewSession(m, cfg)
	if err != nil {
		return nil, mapErr(err)
	}
	return &Session{s: s, m: m}, nil
}

// mapErr turns the trainer's input errors into the node's.
func mapErr(err error) error {
	if errors.Is(err, trainer.ErrInvalidInput) || errors.Is(err, trainer.ErrUnsupported) {
		return fmt.Errorf("%w: %w", node.ErrInvalidRequest, err)
	}
	return err
}

func strictDecode(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %w", node.ErrInvalidRequest, err)
	}
	return nil
}

// Session is one run on the native engine.
type Session struct {
	s *trainer.Session
	m *trainer.Model
}

// Do runs one compute call.
func (s *Session) Do(ctx context.Context, call protocol.Call, body []byte) ([]byte, protocol.Usage, error) {
	var (
		out   any
		usage protocol.Usage
		err   error
	)
	switch call {
	case protocol.CallForwardBackward, protocol.CallForward:
		out, usage, err = s.forward(ctx, body, call == protocol.CallForwardBackward)
	case protocol.CallOptimStep:
		out, err = s.optimStep(ctx, body)
	case protocol.CallSample:
		out, usage, err = s.sample(ctx, body)
	default:
		return nil, protocol.Usage{}, fmt.Errorf("%w: call %q is not a compute call", node.ErrInvalidRequest, call)
	}
	if err != nil {
		return nil, protocol.Usage{}, mapErr(err)
	}
	b, err := json.Marshal(out)
	if err != nil {
		return nil, protocol.Usage{}, fmt.Errorf("encode %s response: %w", call, err)
	}
	return b, usage, nil
}

func (s *Session) forward(ctx context.Context, body []byte, grad bool) (any, protocol.Usage, error) {
	var req protocol.ForwardBackwardRequest
	if err := strictDecode(body, &req); err != nil {
		return nil, protocol.Usage{}, err
	}
	data, err := s.toData(req)
	if err != nil {
		return nil, protocol.Usage{}, err
	}
	var res *trainer.ForwardResult
	if grad {
		res, err = s.s.ForwardBackward(ctx, data, req.LossFn, req.LossFnConfig)
	} else {
		res, err = s.s.Forward(ctx, data, req.LossFn, req.LossFnConfig)
	}
	if err != nil {
		return nil, protocol.Usage{}, err
	}
	resp := protocol.ForwardBackwardResponse{
		LossSum:  res.LossSum,
		LossMean: res.LossMean,
		Tokens:   int64(res.Tokens),
		Logprobs: make([][]float64, len(res.Logprobs)),
	}
	for i, lp := range res.Logprobs {
		resp.Logprobs[i] = f64(lp)
	}
	usage := protocol.Usage{PrefillTokens: int64(res.Tokens)}
	if grad {
		g := res.GradNorm
		resp.GradNorm = &g
		usage = protocol.Usage{TrainTokens: int64(res.Tokens)}
	}
	return resp, usage, nil
}

// toData converts API data, or tokenizes text examples: a Text example
// trains on every next token; a Prompt+Completion example has weight 0 on
// the prompt's tokens and 1 on the completion's, ending with the model's
// end-of-sequence token.
func (s *Session) toData(req protocol.ForwardBackwardRequest) ([]trainer.Datum, error) {
	if len(req.Data) > 0 && len(req.Examples) > 0 {
		return nil, fmt.Errorf("%w: give data or examples, not both", node.ErrInvalidRequest)
	}
	if len(req.Data) == 0 && len(req.Examples) == 0 {
		return nil, fmt.Errorf("%w: data: empty", node.ErrInvalidRequest)
	}
	out := make([]trainer.Datum, 0, len(req.Data)+len(req.Examples))
	for _, d := range req.Data {
		out = append(out, trainer.Datum{
			Tokens:       d.ModelInput.Tokens,
			TargetTokens: d.LossFnInputs.TargetTokens,
			Weights:      f32(d.LossFnInputs.Weights),
			Logprobs:     f32(d.LossFnInputs.Logprobs),
			Advantages:   f32(d.LossFnInputs.Advantages),
		})
	}
	if len(req.Examples) == 0 {
		return out, nil
	}
	tok := s.m.Tokenizer()
	if tok == nil {
		return nil, fmt.Errorf("%w: examples: the model has no tokenizer; send tokens", node.ErrInvalidRequest)
	}
	for i, ex := range req.Examples {
		var ids []int
		var weights []float32
		switch {
		case ex.Text != "" && ex.Prompt == "" && ex.Completion == "":
			ids = tok.Encode(ex.Text, true)
			weights = make([]float32, len(ids))
			for j := range weights {
				weights[j] = 1
			}
		case ex.Text == "" && ex.Completion != "":
			p := tok.Encode(ex.Prompt, true)
			c := append(tok.Encode(ex.Completion, false), tok.EOS()[:min(1, len(tok.EOS()))]...)
			ids = append(p, c...)
			weights = make([]float32, len(ids))
			for j := len(p); j < len(ids); j++ {
				weights[j] = 1
			}
		default:
			return nil, fmt.Errorf("%w: examples[%d]: want text, or prompt and completion", node.ErrInvalidRequest, i)
		}
		if len(ids) < 2 {
			return nil, fmt.Errorf("%w: examples[%d]: %d tokens, need at least 2", node.ErrInvalidRequest, i, len(ids))
		}
		// Position j predicts token j+1, weighted as token j+1.
		out = append(out, trainer.Datum{Tokens: ids[:len(ids)-1], TargetTokens: ids[1:], Weights: weights[1:]})
	}
	return out, nil
}

func (s *Session) optimStep(ctx context.Context, body []byte) (any, error) {
	var req protocol.OptimStepRequest
	if len(body) > 0 {
		if err := strictDecode(body, &req); err != nil {
			return nil, err
		}
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
	res, err := s.s.OptimStep(ctx, p)
	if err != nil {
		return nil, err
	}
	return protocol.OptimStepResponse{Step: res.Step, LearningRate: res.LearningRate, GradNorm: res.GradNorm}, nil
}

func (s *Session) sample(ctx context.Context, body []byte) (any, protocol.Usage, error) {
	var req protocol.SampleRequest
	if err := strictDecode(body, &req); err != nil {
		return nil, protocol.Usage{}, err
	}
	if len(req.Prompts) == 0 {
		return nil, protocol.Usage{}, fmt.Errorf("%w: prompts: empty", node.ErrInvalidRequest)
	}
	num := 1
	if req.NumSamples != nil {
		num = *req.NumSamples
	}
	prompts := make([][]int, len(req.Prompts))
	var prefill int64
	for i, p := range req.Prompts {
		switch {
		case len(p.Tokens) > 0 && p.Text == "":
			prompts[i] = p.Tokens
		case len(p.Tokens) == 0 && p.Text != "":
			tok := s.m.Tokenizer()
			if tok == nil {
				return nil, protocol.Usage{}, fmt.Errorf("%w: prompts[%d]: the model has no tokenizer; send tokens", node.ErrInvalidRequest, i)
			}
			prompts[i] = tok.Encode(p.Text, true)
		default:
			return nil, protocol.Usage{}, fmt.Errorf("%w: prompts[%d]: want tokens or text", node.ErrInvalidRequest, i)
		}
		prefill += int64(len(prompts[i]))
	}
	sp := req.SamplingParams
	params := trainer.SamplingParams{MaxTokens: sp.MaxTokens, Temperature: 1, TopP: 1, Stop: sp.Stop}
	if sp.Temperature != nil {
		params.Temperature = float32(*sp.Temperature)
	}
	if sp.TopK != nil {
		params.TopK = *sp.TopK // ≤ 0 is off, as the API's -1
	}
	if sp.TopP != nil {
		params.TopP = float32(*sp.TopP)
	}
	if sp.Seed != nil {
		params.Seed = *sp.Seed
	}
	res, err := s.s.Sample(ctx, prompts, num, params)
	if err != nil {
		return nil, protocol.Usage{}, err
	}
	resp := protocol.SampleResponse{Samples: make([][]protocol.Sample, len(res))}
	var sampled int64
	for i, group := range res {
		for _, smp := range group {
			resp.Samples[i] = append(resp.Samples[i], protocol.Sample{
				Tokens: smp.Tokens, Text: smp.Text, Logprobs: f64(smp.Logprobs), StopReason: smp.StopReason,
			})
			sampled += int64(len(smp.Tokens))
		}
	}
	return resp, protocol.Usage{PrefillTokens: prefill, SampledTokens: sampled}, nil
}

// SaveState writes PEFT files (and optimizer state in full mode) into dir.
func (s *Session) SaveState(_ context.Context, dir, mode string) error {
	_, err := s.s.SaveState(dir, mode)
	return mapErr(err)
}

// LoadState restores an adapter or full checkpoint from dir.
func (s *Session) LoadState(_ context.Context, dir string) error {
	return mapErr(s.s.LoadState(dir))
}

// Step is the session's optimizer step count.
func (s *Session) Step() int { return s.s.Step() }

// Close frees the session; the shared model stays loaded for the next run.
func (s *Session) Close() error { return s.s.Close() }

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
