// Package gpu is the node's CUDA engine backend: it supervises one PyTorch
// worker process per GPU (node/gpu/worker, embedded in the binary) and
// exposes the worker's run sessions through the same call contract as the
// native engine (protocol.Call with the public API's JSON bodies).
//
// The worker speaks protocol's binary frame over a unix socket. It is
// started, health-checked and restarted with exponential backoff by the
// Supervisor; the Engine turns API bodies into the worker's token-level
// calls (tokenizing text examples and prompts, decoding samples, applying
// stop strings) and moves state files to and from checkpoint storage.
package gpu

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/signal-p2p/signal/node"
)

// Errors callers tell apart with errors.Is. Each wraps the node's sentinel
// for the same outcome, so the node maps them to API codes unchanged.
var (
	// ErrInvalidInput means the call's input is wrong (HTTP 400); the session is unchanged.
	ErrInvalidInput = fmt.Errorf("gpu: %w", node.ErrInvalidRequest)
	// ErrUnknownModel means the models directory has no such base model.
	ErrUnknownModel = fmt.Errorf("gpu: %w", node.ErrUnknownModel)
	// ErrNotFound means the worker has no session for the run.
	ErrNotFound = fmt.Errorf("gpu: %w", node.ErrUnknownRun)
	// ErrUnavailable means the worker is not running (starting, restarting,
	// stopped) or out of device memory: retry later or elsewhere (HTTP 503).
	ErrUnavailable = fmt.Errorf("gpu worker: %w", node.ErrUnavailable)
	// ErrOutOfMemory means the device ran out of memory for the call.
	ErrOutOfMemory = fmt.Errorf("gpu worker: %w", node.ErrOutOfMemory)
	// ErrSessionLost means the worker restarted since the session was opened,
	// so its adapter and optimizer state are gone; the run must be reopened
	// from its last checkpoint. It wraps ErrUnavailable.
	ErrSessionLost = fmt.Errorf("%w: session lost in a worker restart", ErrUnavailable)
	// ErrInternal means the worker failed on a valid call (a bug).
	ErrInternal = errors.New("gpu worker internal error")
	// ErrClosed means the session was closed.
	ErrClosed = errors.New("gpu session closed")
)

// Backend names advertised in capacity adverts.
const (
	// BackendCUDA is advertised when NVML finds GPUs and the worker runs on one.
	BackendCUDA = "cuda"
	// BackendCPUTorch is the same worker on the CPU (tests, CI).
	BackendCPUTorch = "cpu-torch"
)

// Config configures one worker (one device) and its engine.
type Config struct {
	// Python is the interpreter with torch; default $SIGNAL_PYTHON, else /usr/bin/python3.
	Python string
	// Device is the torch device: "cuda:0", "cuda:1", ... or "cpu".
	Device string
	// DType overrides the compute dtype ("float32", "bfloat16", "float16");
	// empty means bf16 on CUDA and f32 on the CPU.
	DType string
	// Threads bounds torch's CPU threads (0 = torch's default).
	Threads int
	// RunDir holds the socket and the extracted worker sources; empty means
	// a fresh temporary directory removed on Stop.
	RunDir string
	// ModelsDir holds base models in Hugging Face layout, one directory per
	// model name (the node's --models).
	ModelsDir string
	// NVMLGPUs is how many GPUs NVML found on this machine: "cuda" is
	// advertised only when it is positive and the worker runs on CUDA.
	NVMLGPUs int
	// StartTimeout bounds one worker start (import torch, CUDA init).
	StartTimeout time.Duration
	// HealthInterval is the time between health checks of a running worker.
	HealthInterval time.Duration
	// HealthTimeout bounds one health check; HealthFailures consecutive
	// failures get the worker killed and restarted.
	HealthTimeout  time.Duration
	HealthFailures int
	// InitialBackoff and MaxBackoff shape the exponential restart delay.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
	// StopTimeout bounds a graceful shutdown before the worker is killed.
	StopTimeout time.Duration
	// Logger receives supervisor events and the worker's stderr.
	Logger *slog.Logger
}

// DefaultConfig returns a CPU configuration with the supervisor's defaults.
func DefaultConfig() Config {
	py := os.Getenv("SIGNAL_PYTHON")
	if py == "" {
		py = "/usr/bin/python3"
	}
	return Config{
		Python:         py,
		Device:         "cpu",
		StartTimeout:   2 * time.Minute,
		HealthInterval: 5 * time.Second,
		HealthTimeout:  10 * time.Second,
		HealthFailures: 3,
		InitialBackoff: 500 * time.Millisecond,
		MaxBackoff:     30 * time.Second,
		StopTimeout:    10 * time.Second,
	}
}

// Validate reports the first field that is out of range.
func (c *Config) Validate() error {
	switch {
	case c.Python == "":
		return fmt.Errorf("%w: gpu config: Python is empty", ErrInvalidInput)
	case c.Device != "cpu" && !(len(c.Device) > 5 && c.Device[:5] == "cuda:"):
		return fmt.Errorf("%w: gpu config: Device %q: want cpu or cuda:N", ErrInvalidInput, c.Device)
	case c.DType != "" && c.DType != "float32" && c.DType != "bfloat16" && c.DType != "float16":
		return fmt.Errorf("%w: gpu config: DType %q: want float32, bfloat16 or float16", ErrInvalidInput, c.DType)
	case c.Threads < 0:
		return fmt.Errorf("%w: gpu config: Threads %d: want >= 0", ErrInvalidInput, c.Threads)
	case c.StartTimeout <= 0 || c.HealthInterval <= 0 || c.HealthTimeout <= 0 || c.StopTimeout <= 0:
		return fmt.Errorf("%w: gpu config: StartTimeout, HealthInterval, HealthTimeout and StopTimeout must be positive", ErrInvalidInput)
	case c.HealthFailures < 1:
		return fmt.Errorf("%w: gpu config: HealthFailures %d: want >= 1", ErrInvalidInput, c.HealthFailures)
	case c.InitialBackoff <= 0 || c.MaxBackoff < c.InitialBackoff:
		return fmt.Errorf("%w: gpu config: want 0 < InitialBackoff <= MaxBackoff", ErrInvalidInput)
	}
	return nil
}
