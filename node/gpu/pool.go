package gpu

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/protocol"
)

// Pool is one node.Engine over several Engines, one per GPU (one worker
// process each): a multi-GPU node serves all its devices through it.
type Pool struct {
	engines []*Engine
}

var _ node.Engine = (*Pool)(nil)

// NewPool prepares one engine per config (e.g. Device cuda:0, cuda:1, ...).
func NewPool(cfgs []Config) (*Pool, error) {
	if len(cfgs) == 0 {
		return nil, fmt.Errorf("%w: gpu pool: no devices", ErrInvalidInput)
	}
	p := &Pool{}
	for _, c := range cfgs {
		e, err := NewEngine(c)
		if err != nil {
			_ = p.Stop()
			return nil, fmt.Errorf("gpu pool %s: %w", c.Device, err)
		}
		p.engines = append(p.engines, e)
	}
	return p, nil
}

// Engines returns the per-device engines.
func (p *Pool) Engines() []*Engine { return p.engines }

// Start starts every worker. It fails only when none comes up: a node with
// one broken GPU still serves on the others (that worker keeps retrying).
func (p *Pool) Start(ctx context.Context) error {
	var errs []error
	for _, e := range p.engines {
		if err := e.Start(ctx); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", e.cfg.Device, err))
		}
	}
	if len(errs) == len(p.engines) {
		return errors.Join(errs...)
	}
	return nil
}

// Stop stops every worker.
func (p *Pool) Stop() error {
	var errs []error
	for _, e := range p.engines {
		errs = append(errs, e.Stop())
	}
	return errors.Join(errs...)
}

// Backend is "cuda" when any device serves CUDA, else the first backend up.
func (p *Pool) Backend() string {
	first := ""
	for _, e := range p.engines {
		b := e.Backend()
		if b == BackendCUDA {
			return b
		}
		if first == "" {
			first = b
		}
	}
	return first
}

// Models lists the base models any device can open.
func (p *Pool) Models() []string {
	var out []string
	for _, e := range p.engines {
		for _, m := range e.Models() {
			if !slices.Contains(out, m) {
				out = append(out, m)
			}
		}
	}
	return out
}

// Open places the session on the running device with the fewest open
// sessions; among equals, one that already holds the base model loaded
// (sessions share it), then the lowest index.
func (p *Pool) Open(ctx context.Context, spec protocol.SessionSpec) (node.Session, error) {
	e, err := p.pick(spec)
	if err != nil {
		return nil, err
	}
	return e.Open(ctx, spec)
}

// OpenDir is Open on the model in dir (node.DirOpener).
func (p *Pool) OpenDir(ctx context.Context, dir string, spec protocol.SessionSpec) (node.Session, error) {
	e, err := p.pick(spec)
	if err != nil {
		return nil, err
	}
	return e.OpenDir(ctx, dir, spec)
}

// pick is the engine a new session goes to.
func (p *Pool) pick(spec protocol.SessionSpec) (*Engine, error) {
	best := -1
	bestLoaded := false
	for i, e := range p.engines {
		if !e.sup.Ready() {
			continue
		}
		loaded := slices.Contains(e.LoadedModels(), spec.BaseModel)
		if best < 0 || e.OpenSessions() < p.engines[best].OpenSessions() ||
			(e.OpenSessions() == p.engines[best].OpenSessions() && loaded && !bestLoaded) {
			best, bestLoaded = i, loaded
		}
	}
	if best < 0 {
		return nil, fmt.Errorf("%w: no gpu worker is running", ErrUnavailable)
	}
	return p.engines[best], nil
}
