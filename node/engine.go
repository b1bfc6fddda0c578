package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
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

// DirOpener is an Engine that opens a session on the model in any
// directory, not only one it serves: a capacity challenge's random model,
// which the node generates (protocol.RandomModel). The model is the
// session's alone and freed with it.
type DirOpener interface {
	OpenDir(ctx context.Context, dir string, spec protocol.SessionSpec) (Session, error)
}

// MemoryReporter is an Engine that knows the memory each of its models
// holds once loaded; the node advertises it (protocol.Node.ModelMemory).
type MemoryReporter interface {
	ModelMemory() map[string]int64
}

// Session is one run's adapter and optimizer state on an engine. The node
// calls it from one goroutine at a time, with typed values: it decodes the
// public API's request once and converts examples, prompts and stop strings
// itself (convert.go), so every engine trains on the same tokens.
type Session interface {
	// Tokenizer is the base model's tokenizer, nil when its directory has
	// none (then only token ids are accepted).
	Tokenizer() Tokenizer
	// ForwardBackward runs data through the model, adds the gradient of
	// the loss sum to the accumulated gradient and returns the figures.
	ForwardBackward(ctx context.Context, data []trainer.Datum, loss Loss) (trainer.ForwardResult, error)
	// Forward is ForwardBackward without gradients.
	Forward(ctx context.Context, data []trainer.Datum, loss Loss) (trainer.ForwardResult, error)
	// OptimStep applies one AdamW step with the accumulated gradient.
	OptimStep(ctx context.Context, p trainer.AdamParams) (trainer.OptimResult, error)
	// Sample continues each prompt num times. Samples carry their text
	// cut at the first of p.Stop (trainer.CutAtStop's rule).
	Sample(ctx context.Context, prompts [][]int, num int, p trainer.SamplingParams) ([][]trainer.Sample, error)
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

// Loss names a loss function (trainer.LossCrossEntropy, ...) and its
// settings (clip thresholds) as the API sent them. TopK > 0 (Forward only)
// asks each position's TopK most likely tokens too (ForwardResult.TopIDs).
type Loss struct {
	Fn     string
	Config map[string]float64
	TopK   int
}

// Tokenizer is what the node needs of a model's tokenizer to convert text
// (trainer/tokenizer's Tokenizer is one).
type Tokenizer interface {
	Encode(text string, addSpecial bool) []int
	Decode(ids []int, skipSpecial bool) string
	EOS() []int
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
	// ErrOutOfMemory means the session's model does not fit the memory the
	// node has: unavailable here, placed elsewhere. It wraps ErrUnavailable.
	ErrOutOfMemory = fmt.Errorf("%w: out of memory", ErrUnavailable)
	// ErrConflict means the call clashes with the session's state, e.g. an
	// init with another spec for a run already open (409).
	ErrConflict = errors.New("conflict")
	// ErrCheckpoint means a checkpoint could not be stored, found or verified.
	ErrCheckpoint = errors.New("checkpoint failed")
)
