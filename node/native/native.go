// Package native adapts the Go training engine (package trainer) to the
// node's Engine interface: it loads base models from a models directory
// (Hugging Face layout, directory name = model name) once and shares each
// among all sessions on it. The node converts the public API's requests
// into the trainer's types (node/convert.go); this package only opens
// models and sessions.
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
	"strconv"
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

	// Available, when set, is the memory the engine may load models into
	// (tests); by default the machine's MemAvailable.
	Available func() int64

	// Precision is how models are held (trainer.LoadOptions); the zero
	// value keeps each file's dtype unless SIGNAL_ENGINE_PRECISION says f32.
	// Set it before the first Open.
	Precision trainer.Precision

	mu       sync.Mutex
	models   map[string]*modelSlot
	estimate map[string]int64 // ModelMemory's figures for models not loaded
	fetchMu  sync.Mutex
}

// modelSlot loads a model once; concurrent opens of the same model wait
// for the first load.
type modelSlot struct {
	once  sync.Once
	model *trainer.Model
	err   error
}

var (
	_ node.Engine    = (*Engine)(nil)
	_ node.DirOpener = (*Engine)(nil)
	_ node.Session   = (*Session)(nil)
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

// ModelMemory is the memory each model in the directory holds once loaded
// (node.MemoryReporter): a loaded model's own figure, else an estimate from
// its headers (computed once per model).
func (e *Engine) ModelMemory() map[string]int64 {
	out := map[string]int64{}
	for _, name := range e.Models() {
		e.mu.Lock()
		if s, ok := e.models[name]; ok && s.model != nil {
			out[name] = s.model.MemoryBytes()
			e.mu.Unlock()
			continue
		}
		est, ok := e.estimate[name]
		e.mu.Unlock()
		if !ok {
			var err error
			if est, err = trainer.EstimateMemory(filepath.Join(e.dir, name), trainer.LoadOptions{Precision: e.Precision}); err != nil {
				continue // not loadable: Open will say why
			}
			e.mu.Lock()
			if e.estimate == nil {
				e.estimate = map[string]int64{}
			}
			e.estimate[name] = est
			e.mu.Unlock()
		}
		out[name] = est
	}
	return out
}

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
	s.once.Do(func() {
		if err := e.fits(dir); err != nil {
			e.mu.Lock()
			s.err = err
			e.mu.Unlock()
			return
		}
		m, err := trainer.LoadModelWith(dir, trainer.LoadOptions{Precision: e.Precision})
		// Under the engine's lock: Loaded and ModelMemory read the slot
		// under it while a load is in flight (callers past once.Do see it
		// through the Once).
		e.mu.Lock()
		s.model, s.err = m, err
		e.mu.Unlock()
	})
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
	return e.open(m, spec, false)
}

// OpenDir starts a session on the model in dir, loaded for the session
// alone and closed with it (node.DirOpener).
func (e *Engine) OpenDir(_ context.Context, dir string, spec protocol.SessionSpec) (node.Session, error) {
	if err := e.fits(dir); err != nil {
		return nil, err
	}
	m, err := trainer.LoadModelWith(dir, trainer.LoadOptions{Precision: e.Precision})
	if err != nil {
		return nil, fmt.Errorf("load model %s: %w", dir, mapErr(err))
	}
	s, err := e.open(m, spec, true)
	if err != nil {
		_ = m.Close()
	}
	return s, err
}

// open starts a session on m; owned says the session closes m.
func (e *Engine) open(m *trainer.Model, spec protocol.SessionSpec, owned bool) (node.Session, error) {
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
	return &Session{s: s, m: m, owned: owned}, nil
}

// fits refuses a model that needs more memory than the machine has
// available (node.ErrOutOfMemory), before loading it: on Linux an
// allocation past it does not fail, the kernel kills the process later.
// The coordinator places the run elsewhere and notes what this node could
// not hold.
func (e *Engine) fits(dir string) error {
	need, err := trainer.EstimateMemory(dir, trainer.LoadOptions{Precision: e.Precision})
	if err != nil {
		return nil // not estimable: the load says why
	}
	avail, ok := e.available()
	if ok && need > avail {
		return fmt.Errorf("%w: model %s needs %d MiB, the machine has %d MiB available", node.ErrOutOfMemory, filepath.Base(dir), need>>20, avail>>20)
	}
	return nil
}

// available is the memory the machine has available (MemAvailable), or
// the engine's Available when set.
func (e *Engine) available() (int64, bool) {
	if e.Available != nil {
		return e.Available(), true
	}
	raw, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err == nil
		}
	}
	return 0, false
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
	s     *trainer.Session
	m     *trainer.Model
	owned bool // m is the session's alone (OpenDir): closed with it
}

// Tokenizer is the model's tokenizer (nil when its directory has none).
func (s *Session) Tokenizer() node.Tokenizer {
	if t := s.m.Tokenizer(); t != nil {
		return t
	}
	return nil
}

// ForwardBackward accumulates the gradient of data's loss.
func (s *Session) ForwardBackward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	res, err := s.s.ForwardBackward(ctx, data, loss.Fn, loss.Config)
	return deref(res, err)
}

// Forward computes data's loss and logprobs without gradients.
func (s *Session) Forward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	if loss.TopK > 0 {
		return deref(s.s.ForwardTopK(ctx, data, loss.Fn, loss.Config, loss.TopK))
	}
	res, err := s.s.Forward(ctx, data, loss.Fn, loss.Config)
	return deref(res, err)
}

// OptimStep applies one AdamW step.
func (s *Session) OptimStep(ctx context.Context, p trainer.AdamParams) (trainer.OptimResult, error) {
	res, err := s.s.OptimStep(ctx, p)
	return deref(res, err)
}

// Sample continues the prompts on the session's adapter.
func (s *Session) Sample(ctx context.Context, prompts [][]int, num int, p trainer.SamplingParams) ([][]trainer.Sample, error) {
	res, err := s.s.Sample(ctx, prompts, num, p)
	return res, mapErr(err)
}

func deref[T any](v *T, err error) (T, error) {
	if err != nil {
		var zero T
		return zero, mapErr(err)
	}
	return *v, nil
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

// Close frees the session; the shared model stays loaded for the next run
// (a model of its own is freed too).
func (s *Session) Close() error {
	err := s.s.Close()
	if s.owned {
		err = errors.Join(err, s.m.Close())
	}
	return err
}
