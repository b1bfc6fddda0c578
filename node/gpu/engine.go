package gpu

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
	"github.com/signal-p2p/signal/trainer/tokenizer"
)

// Engine exposes the worker's sessions to the node: one Engine per GPU.
// It implements node.Engine.
type Engine struct {
	cfg  Config
	sup  *Supervisor
	seq  atomic.Int64
	open atomic.Int64 // sessions opened and not closed

	catalog *node.ModelCatalog // ModelsDir under the shared model check

	mu   sync.Mutex
	toks map[string]*tokenizer.Tokenizer // by model dir; nil entry: the dir has none
}

// NewEngine prepares an engine and its worker; Start launches the worker.
func NewEngine(cfg Config) (*Engine, error) {
	sup, err := NewSupervisor(cfg)
	if err != nil {
		return nil, err
	}
	return &Engine{cfg: cfg, sup: sup, toks: map[string]*tokenizer.Tokenizer{}, catalog: node.NewModelCatalog(cfg.ModelsDir, cfg.Logger)}, nil
}

// Start launches the worker and waits until it is ready (see Supervisor.Start).
func (e *Engine) Start(ctx context.Context) error { return e.sup.Start(ctx) }

// Stop shuts the worker down; open sessions end with it.
func (e *Engine) Stop() error { return e.sup.Stop() }

// Supervisor returns the engine's worker supervisor (health, restarts).
func (e *Engine) Supervisor() *Supervisor { return e.sup }

// Backend is the name to advertise: "cuda" when the worker runs on a GPU
// that NVML also found, "cpu-torch" when it runs on the CPU, "" while no
// worker is up (advertise nothing then).
func (e *Engine) Backend() string {
	h, ok := e.sup.LastHealth()
	switch {
	case !ok:
		return ""
	case h.Backend == BackendCUDA && e.cfg.NVMLGPUs > 0:
		return BackendCUDA
	case h.Backend == BackendCPUTorch:
		return BackendCPUTorch
	}
	return ""
}

// Models lists the base models in ModelsDir that pass the model check both
// engines share (node.ModelCatalog): what Open can load without a download.
// The worker runs the Llama architecture only; a directory of another
// family (a Qwen2 with q/k/v biases, a Qwen3 with q/k norms) is never
// advertised, rather than computed wrongly.
func (e *Engine) Models() []string { return e.catalog.Models() }

// LoadedModels lists the base models the worker holds in device memory
// (loaded once, shared by every session on them).
func (e *Engine) LoadedModels() []string {
	h, _ := e.sup.LastHealth()
	return h.Models
}

// ModelDir is the directory of a base model: ModelsDir/name.
func (e *Engine) ModelDir(name string) (string, error) {
	if name == "" || name != filepath.Base(name) || strings.HasPrefix(name, ".") {
		return "", fmt.Errorf("%w: base_model %q: want a model directory name", ErrUnknownModel, name)
	}
	if e.cfg.ModelsDir == "" {
		return "", fmt.Errorf("%w: base_model %q: the node has no models directory", ErrUnknownModel, name)
	}
	dir := filepath.Join(e.cfg.ModelsDir, name)
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
		return "", fmt.Errorf("%w: base_model %q: not in %s: %w", ErrUnknownModel, name, e.cfg.ModelsDir, err)
	}
	if err := e.catalog.Check(name); err != nil {
		return "", fmt.Errorf("%w: base_model %q: %w", ErrInvalidInput, name, err)
	}
	return dir, nil
}

func (e *Engine) tokenizer(dir string) (*tokenizer.Tokenizer, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if t, ok := e.toks[dir]; ok {
		return t, nil
	}
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); os.IsNotExist(err) {
		e.toks[dir] = nil
		return nil, nil
	}
	t, err := tokenizer.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer of %s: %w", dir, err)
	}
	e.toks[dir] = t
	return t, nil
}

// call sends one request and maps a worker error answer to a Go error.
func (e *Engine) call(ctx context.Context, runID string, call protocol.Call, body any) (protocol.SessionResponse, error) {
	raw, err := json.Marshal(body)
	if err != nil {
		return protocol.SessionResponse{}, fmt.Errorf("%s: encode: %w", call, err)
	}
	req := protocol.SessionRequest{
		RequestID: "gpu-" + strconv.FormatInt(e.seq.Add(1), 10),
		RunID:     runID, Call: call, Body: raw,
	}
	resp, err := e.sup.Call(ctx, req)
	if err != nil {
		return resp, fmt.Errorf("%s: %w", call, err)
	}
	if resp.Error != nil {
		return resp, errWorker(call, resp.Error)
	}
	return resp, nil
}

// initBody is the worker's init call: the session spec plus where the base
// model lives on this machine.
type initBody struct {
	protocol.SessionSpec
	ModelDir string `json:"model_dir"`
}

// Open creates the run's session on the worker with a fresh adapter (its
// base model is loaded once per worker and shared): the one a seed gives on
// every engine (trainer.NewLoRAFromConfig), drawn here and handed to the
// worker, whose own generator would draw other A matrices. The node
// restores spec.ResumeFrom itself through LoadState.
func (e *Engine) Open(ctx context.Context, spec protocol.SessionSpec) (node.Session, error) {
	if spec.RunID == "" {
		return nil, fmt.Errorf("%w: run_id: required", ErrInvalidInput)
	}
	dir, err := e.ModelDir(spec.BaseModel)
	if err != nil {
		return nil, err
	}
	return e.OpenDir(ctx, dir, spec)
}

// OpenDir is Open on the model in dir (node.DirOpener): the worker loads
// it by its directory and frees it when its last session closes.
func (e *Engine) OpenDir(ctx context.Context, dir string, spec protocol.SessionSpec) (node.Session, error) {
	if spec.RunID == "" {
		return nil, fmt.Errorf("%w: run_id: required", ErrInvalidInput)
	}
	tok, err := e.tokenizer(dir)
	if err != nil {
		return nil, err
	}
	gen := e.sup.Generation()
	resp, err := e.call(ctx, spec.RunID, protocol.CallInit, initBody{SessionSpec: spec, ModelDir: dir})
	if err != nil {
		return nil, err
	}
	var out struct {
		Step    int      `json:"step"`
		Rank    int      `json:"lora_rank"`
		Alpha   float32  `json:"lora_alpha"`
		Targets []string `json:"target_modules"`
	}
	if err := json.Unmarshal(resp.Body, &out); err != nil {
		return nil, fmt.Errorf("%s: %w: decode answer: %w", protocol.CallInit, ErrInternal, err)
	}
	e.open.Add(1)
	s := &Session{e: e, spec: spec, tok: tok, gen: gen, step: out.Step}
	if spec.ResumeFrom == nil {
		if err := s.seed(ctx, dir, out.Rank, out.Alpha, out.Targets); err != nil {
			_ = s.Close()
			return nil, err
		}
	}
	return s, nil
}

// seed loads the seed's adapter, as the native engine draws it, into a
// session the worker has just opened with the rank, alpha and targets it
// answered.
func (s *Session) seed(ctx context.Context, modelDir string, rank int, alpha float32, targets []string) error {
	cfg, err := trainer.ReadConfig(modelDir)
	if err != nil {
		return fmt.Errorf("%s: seed adapter: %w", protocol.CallInit, err)
	}
	l, err := trainer.NewLoRAFromConfig(cfg, rank, alpha, targets, s.spec.Seed)
	if err != nil {
		return fmt.Errorf("%s: seed adapter: %w: %w", protocol.CallInit, ErrInvalidInput, err)
	}
	dir, err := os.MkdirTemp(s.e.cfg.RunDir, "seed-")
	if err != nil {
		return fmt.Errorf("%s: seed adapter: %w", protocol.CallInit, err)
	}
	defer os.RemoveAll(dir)
	if err := l.Save(dir); err != nil {
		return fmt.Errorf("%s: seed adapter: %w", protocol.CallInit, err)
	}
	return s.LoadState(ctx, dir)
}

// OpenSessions is the number of sessions opened on this engine and not closed.
func (e *Engine) OpenSessions() int { return int(e.open.Load()) }

var (
	_ node.Engine  = (*Engine)(nil)
	_ node.Session = (*Session)(nil)
)

// Session is one run's session on the worker; it implements node.Session.
type Session struct {
	e    *Engine
	spec protocol.SessionSpec
	tok  *tokenizer.Tokenizer
	gen  int64

	mu     sync.Mutex
	step   int
	closed bool
}

// Tokenizer is the base model's tokenizer (nil when its directory has none).
func (s *Session) Tokenizer() node.Tokenizer {
	if s.tok == nil {
		return nil
	}
	return s.tok
}

// locked runs fn with the session's lock held, once the session is usable.
func (s *Session) locked(fn func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	return fn()
}

// usable reports why the session cannot take a call; s.mu is held.
func (s *Session) usable() error {
	if s.closed {
		return fmt.Errorf("run %s: %w", s.spec.RunID, ErrClosed)
	}
	if s.e.sup.Generation() != s.gen && s.e.sup.Ready() {
		return fmt.Errorf("run %s: %w", s.spec.RunID, ErrSessionLost)
	}
	return nil
}

// Step is the number of optimizer steps taken.
func (s *Session) Step() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.step
}

// SaveState has the worker write the session's files into dir: PEFT
// adapter files, plus optimizer state (the native engine's format) when
// mode is "full". The worker shares this machine's filesystem.
func (s *Session) SaveState(ctx context.Context, dir, mode string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	if mode == "" {
		mode = "adapter"
	}
	if mode != "adapter" && mode != "full" {
		return fmt.Errorf("%s: %w: mode %q: want adapter or full", protocol.CallSaveState, ErrInvalidInput, mode)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("%s: %w", protocol.CallSaveState, err)
	}
	_, err = s.e.call(ctx, s.spec.RunID, protocol.CallSaveState, map[string]string{"dir": abs, "mode": mode})
	return err
}

// LoadState restores what SaveState (of this backend or the native engine)
// wrote into dir; the session is unchanged if anything fails.
func (s *Session) LoadState(ctx context.Context, dir string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("%s: %w", protocol.CallLoadState, err)
	}
	resp, err := s.e.call(ctx, s.spec.RunID, protocol.CallLoadState, map[string]string{"dir": abs})
	if err != nil {
		return err
	}
	var out struct {
		Step int `json:"step"`
	}
	if err := json.Unmarshal(resp.Body, &out); err != nil {
		return fmt.Errorf("%s: %w: decode answer: %w", protocol.CallLoadState, ErrInternal, err)
	}
	s.step = out.Step
	return nil
}

// Close ends the session on the worker; closing twice is a no-op.
func (s *Session) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.e.open.Add(-1)
	if s.e.sup.Generation() != s.gen {
		return nil // the worker restarted: the session is already gone
	}
	_, err := s.e.call(context.Background(), s.spec.RunID, protocol.CallClose, struct{}{})
	return err
}

// ---- forward_backward / forward ----

type workerFwd struct {
	Data         []protocol.Datum   `json:"data"`
	LossFn       string             `json:"loss_fn,omitempty"`
	LossFnConfig map[string]float64 `json:"loss_fn_config,omitempty"`
	TopK         int                `json:"top_k,omitempty"`
}

type workerFwdOut struct {
	LossSum   float64     `json:"loss_sum"`
	WeightSum float64     `json:"weight_sum"`
	Tokens    int         `json:"tokens"`
	GradNorm  *float64    `json:"grad_norm"`
	Logprobs  [][]float32 `json:"logprobs"`
	// TopIDs and TopLogprobs answer top_k: per datum, K per position.
	TopIDs      [][]int32   `json:"top_ids"`
	TopLogprobs [][]float32 `json:"top_logprobs"`
}

// ForwardBackward accumulates the gradient of data's loss on the worker.
func (s *Session) ForwardBackward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	return s.forward(ctx, protocol.CallForwardBackward, data, loss)
}

// Forward computes data's loss and logprobs on the worker, no gradients.
func (s *Session) Forward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	return s.forward(ctx, protocol.CallForward, data, loss)
}

func (s *Session) forward(ctx context.Context, call protocol.Call, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	var res trainer.ForwardResult
	err := s.locked(func() error {
		w := workerFwd{Data: make([]protocol.Datum, len(data)), LossFn: loss.Fn, LossFnConfig: loss.Config, TopK: loss.TopK}
		for i, d := range data {
			w.Data[i].ModelInput.Tokens = d.Tokens
			w.Data[i].LossFnInputs = protocol.LossFnInputs{TargetTokens: d.TargetTokens,
				Weights: f64(d.Weights), Logprobs: f64(d.Logprobs), Advantages: f64(d.Advantages)}
		}
		resp, err := s.e.call(ctx, s.spec.RunID, call, w)
		if err != nil {
			return err
		}
		var out workerFwdOut
		if err := json.Unmarshal(resp.Body, &out); err != nil {
			return fmt.Errorf("%s: %w: decode answer: %w", call, ErrInternal, err)
		}
		res = trainer.ForwardResult{LossSum: out.LossSum, WeightSum: out.WeightSum, Tokens: out.Tokens, Logprobs: out.Logprobs,
			TopIDs: out.TopIDs, TopLogprobs: out.TopLogprobs}
		if out.GradNorm != nil {
			res.GradNorm = *out.GradNorm
		}
		return nil
	})
	return res, err
}

// ---- optim_step ----

// OptimStep applies one AdamW step on the worker (PyTorch's AdamW with the
// native engine's parameters).
func (s *Session) OptimStep(ctx context.Context, p trainer.AdamParams) (trainer.OptimResult, error) {
	var res trainer.OptimResult
	err := s.locked(func() error {
		req := protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &p.LearningRate, Beta1: &p.Beta1,
			Beta2: &p.Beta2, Eps: &p.Eps, WeightDecay: &p.WeightDecay, GradClipNorm: &p.GradClipNorm}}
		resp, err := s.e.call(ctx, s.spec.RunID, protocol.CallOptimStep, req)
		if err != nil {
			return err
		}
		var out protocol.OptimStepResponse
		if err := json.Unmarshal(resp.Body, &out); err != nil {
			return fmt.Errorf("%s: %w: decode answer: %w", protocol.CallOptimStep, ErrInternal, err)
		}
		s.step = out.Step
		res = trainer.OptimResult{Step: out.Step, LearningRate: out.LearningRate, GradNorm: out.GradNorm}
		return nil
	})
	return res, err
}

// ---- sample ----

type workerPrompt struct {
	Tokens []int `json:"tokens"`
}

type workerSample struct {
	Prompts        []workerPrompt          `json:"prompts"`
	NumSamples     int                     `json:"num_samples"`
	SamplingParams protocol.SamplingParams `json:"sampling_params"`
	StopTokens     []int                   `json:"stop_tokens,omitempty"`
}

type workerSampleOut struct {
	Samples [][]struct {
		Tokens     []int     `json:"tokens"`
		Logprobs   []float32 `json:"logprobs"`
		StopReason string    `json:"stop_reason"`
	} `json:"samples"`
}

// Sample continues the prompts on the worker. The worker stops on token ids
// (the model's and the tokenizer's EOS) and ends rows early on stop strings
// it can see in token bytes (worker/signal_worker/stopbytes.py); the text
// and its cut are made here, on exactly decoded text, by the rule the
// native engine follows (trainer.CutAtStop).
func (s *Session) Sample(ctx context.Context, prompts [][]int, num int, p trainer.SamplingParams) ([][]trainer.Sample, error) {
	var res [][]trainer.Sample
	err := s.locked(func() error {
		temp, topP, topK, seed := float64(p.Temperature), float64(p.TopP), p.TopK, p.Seed
		w := workerSample{NumSamples: num, SamplingParams: protocol.SamplingParams{MaxTokens: p.MaxTokens,
			Temperature: &temp, TopK: &topK, TopP: &topP, Stop: p.Stop, Seed: &seed}}
		for _, pr := range prompts {
			w.Prompts = append(w.Prompts, workerPrompt{Tokens: pr})
		}
		if s.tok != nil {
			w.StopTokens = s.tok.EOS()
		}
		w.StopTokens = append(w.StopTokens, p.StopTokens...)
		resp, err := s.e.call(ctx, s.spec.RunID, protocol.CallSample, w)
		if err != nil {
			return err
		}
		var out workerSampleOut
		if err := json.Unmarshal(resp.Body, &out); err != nil {
			return fmt.Errorf("%s: %w: decode answer: %w", protocol.CallSample, ErrInternal, err)
		}
		res = make([][]trainer.Sample, len(out.Samples))
		for i, row := range out.Samples {
			res[i] = make([]trainer.Sample, len(row))
			for j, smp := range row {
				res[i][j] = trainer.Sample{Tokens: smp.Tokens, Logprobs: smp.Logprobs, StopReason: smp.StopReason}
				if s.tok != nil {
					trainer.CutAtStop(s.tok, &res[i][j], p.Stop)
				}
			}
		}
		return nil
	})
	return res, err
}

func f64(x []float32) []float64 {
	if x == nil {
		return nil
	}
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = float64(v)
	}
	return out
}
