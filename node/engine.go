package node

import (
	"context"
	"errors"

	"github.com/signal-p2p/signal/protocol"
)

// Engine runs training sessions on base models. The native Go engine
// (node/native) and the CUDA worker (node/gpu) implement it; tests use fakes.
type Engine interface {
	// Backend names the engine in capacity adverts ("native", "cuda", ...).
	Backend() string
	// Models lists the base models the engine can open without a download.
	Models() []string
	// Open starts a session with a fresh adapter for spec. The node restores
	// spec.ResumeFrom itself (through Session.LoadState) after Open.
	// Sessions on the same base model should share one loaded copy of it.
	Open(ctx context.Context, spec protocol.SessionSpec) (Session, error)
}

// Session is one run's adapter and optimizer state on an engine. The node
// calls it from one goroutine at a time.
type Session interface {
	// Do runs forward_backward, forward, optim_step or sample: body is the
	// public API's request JSON, the result the API's response JSON (without
	// cost and balance, which the coordinator adds).
	Do(ctx context.Context, call protocol.Call, body []byte) (resp []byte, usage protocol.Usage, err error)
	// SaveState writes the session's files into dir (an empty directory):
	// PEFT adapter files, plus optimizer state when mode is "full".
	SaveState(ctx context.Context, dir, mode string) error
	// LoadState restores what SaveState wrote into dir.
	LoadState(ctx context.Context, dir string) error
	// Step is the number of optimizer steps taken.
	Step() int
	// Close frees the session.
	Close() error
}

// Errors engines and the node return; the node maps them to the public API's
// error codes in one place (errorBody). Engines wrap them with %w.
var (
	// ErrInvalidRequest means the call's body or arguments are wrong (400).
	ErrInvalidRequest = errors.New("invalid request")
	// ErrUnknownModel means the engine does not have the base model (400).
	ErrUnknownModel = errors.New("unknown model")
	// ErrUnknownRun means no session is open for the run on this node (404).
	ErrUnknownRun = errors.New("unknown run")
	// ErrUnavailable means the node cannot take the call now: full, or
	// shutting down (503).
	ErrUnavailable = errors.New("node unavailable")
	// ErrConflict means the call clashes with the session's state, e.g. an
	// init with another spec for a run already open (409).
	ErrConflict = errors.New("conflict")
	// ErrCheckpoint means a checkpoint could not be stored, found or verified.
	ErrCheckpoint = errors.New("checkpoint failed")
)
