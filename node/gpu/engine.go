package gpu

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/protocol"
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
// base model is loaded once per worker and shared). The node restores
// spec.ResumeFrom itself through LoadState.
func (e *Engine) Open(ctx context.Context, spec protocol.SessionSpec) (node.Session, error) {
	if spec.RunID == "" {
		return nil, fmt.Errorf("%w: run_id: required", ErrInvalidInput)
	}
	dir, err := e.ModelDir(spec.BaseModel)
	if err != nil {
		return nil, err
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
		Step int `json:"step"`
	}
	if err := json.Unmarshal(resp.Body, &out); err != nil {
		return nil, fmt.Errorf("%s: %w: decode answer: %w", protocol.CallInit, ErrInternal, err)
	}
	e.open.Add(1)
	return &Session{e: e, spec: spec, tok: tok, gen: gen, step: out.Step}, nil
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

// Do runs forward_backward, forward, optim_step or sample with the public
// API's JSON request body and returns the API's JSON response body (without
// cost/balance) and what the call used.
func (s *Session) Do(ctx context.Context, call protocol.Call, body []byte) ([]byte, protocol.Usage, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return nil, protocol.Usage{}, err
	}
	if len(body) == 0 {
		body = []byte("{}")
	}
	switch call {
	case protocol.CallForwardBackward, protocol.CallForward:
		return s.forward(ctx, call, body)
	case protocol.CallOptimStep:
		return s.optimStep(ctx, body)
	case protocol.CallSample:
		return s.sample(ctx, body)
	}
	return nil, protocol.Usage{}, fmt.Errorf("%w: call %q is not one Do runs (forward_backward, forward, optim_step, sample)", ErrInvalidInput, call)
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

func decodeStrict(body []byte, v any) error {
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: body: %w", ErrInvalidInput, err)
	}
	return nil
}

// ---- forward_backward / forward ----

type workerFwd struct {
	Data         []protocol.Datum   `json:"data"`
	LossFn       string             `json:"loss_fn,omitempty"`
	LossFnConfig map[string]float64 `json:"loss_fn_config,omitempty"`
}

type workerFwdOut struct {
	LossSum  float64     `json:"loss_sum"`
	LossMean float64     `json:"loss_mean"`
	Tokens   int64       `json:"tokens"`
	GradNorm *float64    `json:"grad_norm"`
	Logprobs [][]float64 `json:"logprobs"`
}

func (s *Session) forward(ctx context.Context, call protocol.Call, body []byte) ([]byte, protocol.Usage, error) {
	var usage protocol.Usage
	var req protocol.ForwardBackwardRequest
	if err := decodeStrict(body, &req); err != nil {
		return nil, usage, fmt.Errorf("%s: %w", call, err)
	}
	data := req.Data
	if len(req.Examples) > 0 {
		if len(data) > 0 {
			return nil, usage, fmt.Errorf("%s: %w: give data or examples, not both", call, ErrInvalidInput)
		}
		var err error
		if data, err = ExamplesToData(s.tok, req.Examples); err != nil {
			return nil, usage, fmt.Errorf("%s: %w", call, err)
		}
	}
	resp, err := s.e.call(ctx, s.spec.RunID, call, workerFwd{Data: data, LossFn: req.LossFn, LossFnConfig: req.LossFnConfig})
	if err != nil {
		return nil, usage, err
	}
	var w workerFwdOut
	if err := json.Unmarshal(resp.Body, &w); err != nil {
		return nil, usage, fmt.Errorf("%s: %w: decode answer: %w", call, ErrInternal, err)
	}
	out := protocol.ForwardBackwardResponse{LossSum: w.LossSum, LossMean: w.LossMean, Tokens: w.Tokens, Logprobs: w.Logprobs}
	if call == protocol.CallForwardBackward {
		out.GradNorm = w.GradNorm
	}
	b, err := json.Marshal(out)
	return b, resp.Usage, err
}

// ExamplesToData tokenizes text examples as the native engine does: Text is
// trained on every token; Prompt + Completion has weight 0 on the prompt's
// targets and 1 on the completion's. Inputs are the tokens but the last,
// targets the tokens shifted left by one.
func ExamplesToData(tok *tokenizer.Tokenizer, ex []protocol.TextExample) ([]protocol.Datum, error) {
	if tok == nil {
		return nil, fmt.Errorf("%w: examples: the model has no tokenizer; send data as token ids", ErrInvalidInput)
	}
	out := make([]protocol.Datum, 0, len(ex))
	for i, x := range ex {
		var ids []int
		promptLen := 0
		switch {
		case x.Text != "" && (x.Prompt != "" || x.Completion != ""):
			return nil, fmt.Errorf("%w: examples[%d]: give text, or prompt and completion", ErrInvalidInput, i)
		case x.Text != "":
			ids = tok.Encode(x.Text, true)
		case x.Completion != "":
			p := tok.Encode(x.Prompt, true)
			promptLen = len(p)
			ids = append(p, tok.Encode(x.Completion, false)...)
		default:
			return nil, fmt.Errorf("%w: examples[%d]: empty (want text, or prompt and completion)", ErrInvalidInput, i)
		}
		if len(ids) < 2 {
			return nil, fmt.Errorf("%w: examples[%d]: %d token(s), want at least 2", ErrInvalidInput, i, len(ids))
		}
		n := len(ids) - 1
		d := protocol.Datum{ModelInput: protocol.ModelInput{Tokens: ids[:n]}}
		d.LossFnInputs.TargetTokens = ids[1:]
		d.LossFnInputs.Weights = make([]float64, n)
		for j := range n {
			if j+1 >= promptLen {
				d.LossFnInputs.Weights[j] = 1
			}
		}
		out = append(out, d)
	}
	return out, nil
}

// ---- optim_step ----

func (s *Session) optimStep(ctx context.Context, body []byte) ([]byte, protocol.Usage, error) {
	var usage protocol.Usage
	var req protocol.OptimStepRequest
	if err := decodeStrict(body, &req); err != nil {
		return nil, usage, fmt.Errorf("%s: %w", protocol.CallOptimStep, err)
	}
	resp, err := s.e.call(ctx, s.spec.RunID, protocol.CallOptimStep, req)
	if err != nil {
		return nil, usage, err
	}
	var out protocol.OptimStepResponse
	if err := json.Unmarshal(resp.Body, &out); err != nil {
		return nil, usage, fmt.Errorf("%s: %w: decode answer: %w", protocol.CallOptimStep, ErrInternal, err)
	}
	s.step = out.Step
	b, err := json.Marshal(out)
	return b, resp.Usage, err
}

// ---- sample ----

type workerPrompt struct {
	Tokens []int `json:"tokens"`
}

type workerSample struct {
	Prompts        []workerPrompt          `json:"prompts"`
	NumSamples     *int                    `json:"num_samples,omitempty"`
	SamplingParams protocol.SamplingParams `json:"sampling_params"`
	StopTokens     []int                   `json:"stop_tokens,omitempty"`
}

func (s *Session) sample(ctx context.Context, body []byte) ([]byte, protocol.Usage, error) {
	var usage protocol.Usage
	var req protocol.SampleRequest
	if err := decodeStrict(body, &req); err != nil {
		return nil, usage, fmt.Errorf("%s: %w", protocol.CallSample, err)
	}
	w := workerSample{NumSamples: req.NumSamples, SamplingParams: req.SamplingParams}
	// The worker stops on token ids (the model's and the tokenizer's EOS)
	// and ends rows early on stop strings it can see in token bytes
	// (worker/signal_worker/stopbytes.py); the cut itself is made here, on
	// exactly decoded text (applyStop).
	for i, p := range req.Prompts {
		switch {
		case len(p.Tokens) > 0 && p.Text != "":
			return nil, usage, fmt.Errorf("%s: %w: prompts[%d]: give tokens or text, not both", protocol.CallSample, ErrInvalidInput, i)
		case len(p.Tokens) > 0:
			w.Prompts = append(w.Prompts, workerPrompt{Tokens: p.Tokens})
		case p.Text != "":
			if s.tok == nil {
				return nil, usage, fmt.Errorf("%s: %w: prompts[%d].text: the model has no tokenizer", protocol.CallSample, ErrInvalidInput, i)
			}
			w.Prompts = append(w.Prompts, workerPrompt{Tokens: s.tok.Encode(p.Text, true)})
		default:
			return nil, usage, fmt.Errorf("%s: %w: prompts[%d]: empty", protocol.CallSample, ErrInvalidInput, i)
		}
	}
	for i, st := range req.SamplingParams.Stop {
		if st == "" {
			return nil, usage, fmt.Errorf("%s: %w: sampling_params.stop[%d]: empty string", protocol.CallSample, ErrInvalidInput, i)
		}
	}
	if s.tok != nil {
		w.StopTokens = s.tok.EOS()
	}
	resp, err := s.e.call(ctx, s.spec.RunID, protocol.CallSample, w)
	if err != nil {
		return nil, usage, err
	}
	var out protocol.SampleResponse
	if err := json.Unmarshal(resp.Body, &out); err != nil {
		return nil, usage, fmt.Errorf("%s: %w: decode answer: %w", protocol.CallSample, ErrInternal, err)
	}
	usage = resp.Usage
	if s.tok != nil {
		usage.SampledTokens = 0
		for _, row := range out.Samples {
			for j := range row {
				applyStop(s.tok, &row[j], req.SamplingParams.Stop)
				usage.SampledTokens += int64(len(row[j].Tokens))
			}
		}
	}
	b, err := json.Marshal(out)
	return b, usage, err
}

// applyStop decodes a sample's text and cuts it at the first stop string:
// tokens keep the one that completed the stop string, text ends before it.
// That token is found by binary search over prefix decodes (whether a
// prefix's text holds a stop string only changes once, from no to yes), so
// a long sample costs O(n log n), not a decode per token.
func applyStop(tok *tokenizer.Tokenizer, smp *protocol.Sample, stops []string) {
	first := func(text string) int {
		cut := -1
		for _, st := range stops {
			if i := strings.Index(text, st); i >= 0 && (cut < 0 || i < cut) {
				cut = i
			}
		}
		return cut
	}
	text := tok.Decode(smp.Tokens, true)
	if len(stops) == 0 || first(text) < 0 {
		smp.Text = text
		return
	}
	k := sort.Search(len(smp.Tokens), func(k int) bool { return first(tok.Decode(smp.Tokens[:k+1], true)) >= 0 }) + 1
	cut := -1
	if k <= len(smp.Tokens) {
		prefix := tok.Decode(smp.Tokens[:k], true)
		if cut = first(prefix); cut >= 0 {
			text = prefix
		}
	}
	if cut < 0 { // a decoder whose prefixes disagree: cut the full text
		k, cut = len(smp.Tokens), first(text)
	}
	smp.Tokens = smp.Tokens[:k]
	smp.Logprobs = smp.Logprobs[:k]
	smp.Text = text[:cut]
	smp.StopReason = "stop"
}
