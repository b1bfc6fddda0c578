// Package testnet starts local Signal networks for development and tests:
// N coordinators (a raft cluster) and M nodes on loopback with free ports,
// an admin token, a funded API key, and the embedded default model.
//
// Two variants share one start-up sequence (flow.go): StartInProcess runs
// every member inside the calling process (the project's integration tests),
// StartProcesses runs each member as a child process of the signal binary
// (`signal testnet`), so that killing a node is killing a process.
package testnet

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/signal-p2p/signal/coordinator"
	"github.com/signal-p2p/signal/coordinator/p2p"
	"github.com/signal-p2p/signal/node/storage"
)

// Errors of this package.
var (
	// ErrInvalidConfig names a Config field that is out of range.
	ErrInvalidConfig = errors.New("invalid testnet config")
	// ErrNotReady means the network did not come up in time: no leader,
	// a member that did not join, or nodes that never advertised.
	ErrNotReady = errors.New("testnet not ready")
	// ErrMemberExited means a child process ended while the testnet ran.
	ErrMemberExited = errors.New("testnet member exited")
)

// Config describes a testnet.
type Config struct {
	// Coordinators and Nodes are how many of each to start.
	Coordinators int
	Nodes        int
	// Dir holds everything: coordinator and node data, logs, the generated
	// default model (kept across starts), checkpoints, testnet.json.
	Dir string
	// StorageURL is where nodes store checkpoints; empty means a local
	// directory, file://Dir/checkpoints.
	StorageURL string
	// Creds are the S3 credentials for an s3:// StorageURL (empty: the
	// nodes read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
	Creds storage.Credentials
	// Models are extra base models, name → Hugging Face model directory,
	// served besides the embedded default (DefaultModelName).
	Models map[string]string
	// NoDefaultModel leaves signal-tiny out (then Models must name one).
	NoDefaultModel bool
	// MicroCredits fund the API key the testnet mints.
	MicroCredits int64
	// MaxSessions bounds each node's open sessions.
	MaxSessions int
	// NodeLostAfter is how long a run's node may be missing before the run
	// moves (the coordinator's setting).
	NodeLostAfter time.Duration
	// NodeTTL is how long a node stays listed after its last advert (the
	// coordinators' p2p setting).
	NodeTTL time.Duration
	// RatePerSecond and RateBurst are each API key's token bucket on the
	// coordinators. The defaults are generous (examples call in tight
	// loops); lower them to see how a client meets 429s.
	RatePerSecond float64
	RateBurst     int
	// TinkerChunkLen is the most datums the tinker SDK puts in one
	// forward_backward request before it splits the batch into chunks sent
	// in parallel (0: the coordinator's default, the SDK's 1024).
	TinkerChunkLen int
	// ChallengeInterval is how often the leader measures each node with a
	// capacity challenge (0: the coordinator's default; < 0: never — a
	// test that needs placement to spread runs by load alone).
	ChallengeInterval time.Duration
	// AdvertInterval is how often nodes advertise (0: the node's default).
	AdvertInterval time.Duration
	// ReadyTimeout bounds start-up: leader election, joins, node adverts.
	ReadyTimeout time.Duration
	// Engine names the node engine: "native" (the Go trainer, the default)
	// or another name registered with RegisterEngine.
	Engine string
	// Logger receives the testnet's own progress lines (and, in process,
	// the members' logs).
	Logger *slog.Logger
}

// DefaultConfig is `make run`'s network: 3 coordinators, 2 nodes, 1000
// credits on its key, and the failover timings a production network runs with (a
// dead node's runs serve again within seconds).
func DefaultConfig() Config {
	return Config{
		Coordinators:  3,
		Nodes:         2,
		Dir:           filepath.Join(".cache", "testnet"),
		MicroCredits:  1000 * 1_000_000,
		MaxSessions:   8,
		NodeLostAfter: coordinator.DefaultConfig().NodeLostAfter,
		NodeTTL:       p2p.DefaultConfig().NodeTTL,
		RatePerSecond: 1000,
		RateBurst:     2000,
		ReadyTimeout:  2 * time.Minute,
		Engine:        "native",
	}
}

// Validate names the first field out of range.
func (c *Config) Validate() error {
	switch {
	case c.Coordinators < 1 || c.Coordinators > 9:
		return fmt.Errorf("%w: coordinators %d: allowed 1..9", ErrInvalidConfig, c.Coordinators)
	case c.Nodes < 0 || c.Nodes > 16:
		return fmt.Errorf("%w: nodes %d: allowed 0..16", ErrInvalidConfig, c.Nodes)
	case c.Dir == "":
		return fmt.Errorf("%w: dir: required", ErrInvalidConfig)
	case c.MicroCredits < 0:
		return fmt.Errorf("%w: credits %d micro-credits: must not be negative", ErrInvalidConfig, c.MicroCredits)
	case c.MaxSessions < 1:
		return fmt.Errorf("%w: max sessions %d: must be at least 1", ErrInvalidConfig, c.MaxSessions)
	case c.NodeLostAfter <= 0 || c.NodeTTL <= 0 || c.ReadyTimeout <= 0 || c.AdvertInterval < 0:
		return fmt.Errorf("%w: node lost after %v, node ttl %v, ready timeout %v, advert interval %v: must be positive", ErrInvalidConfig, c.NodeLostAfter, c.NodeTTL, c.ReadyTimeout, c.AdvertInterval)
	case c.RatePerSecond <= 0 || c.RateBurst < 1:
		return fmt.Errorf("%w: rate %v/s, burst %d: must be positive", ErrInvalidConfig, c.RatePerSecond, c.RateBurst)
	case c.NoDefaultModel && len(c.Models) == 0:
		return fmt.Errorf("%w: models: %w: give --model NAME=DIR or keep the default", ErrInvalidConfig, errNoModels)
	}
	if _, ok := engineFactory(c.Engine); !ok {
		return fmt.Errorf("%w: engine %q: known engines are %s", ErrInvalidConfig, c.Engine, strings.Join(engineNames(), ", "))
	}
	if c.StorageURL != "" {
		if _, err := storage.Open(c.StorageURL, c.Creds); err != nil {
			return fmt.Errorf("%w: storage %q: %w", ErrInvalidConfig, c.StorageURL, err)
		}
	}
	for name, dir := range c.Models {
		if name == "" || strings.ContainsAny(name, " /\t\n") {
			return fmt.Errorf("%w: model name %q: must be non-empty without spaces or slashes", ErrInvalidConfig, name)
		}
		if name == DefaultModelName && !c.NoDefaultModel {
			return fmt.Errorf("%w: model %s: the name is the embedded default's", ErrInvalidConfig, name)
		}
		if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
			return fmt.Errorf("%w: model %s=%s: not a Hugging Face model directory: %w", ErrInvalidConfig, name, dir, err)
		}
	}
	return nil
}

// ParseModelFlag parses one --model NAME=DIR.
func ParseModelFlag(s string) (name, dir string, err error) {
	name, dir, ok := strings.Cut(s, "=")
	if !ok || name == "" || dir == "" {
		return "", "", fmt.Errorf("%w: --model %q: want NAME=DIR", ErrInvalidConfig, s)
	}
	return name, dir, nil
}

// Info is testnet.json: what a client or a test needs to use the network.
type Info struct {
	Coordinators []string `json:"coordinators"`
	AdminToken   string   `json:"admin_token"`
	APIKey       string   `json:"api_key"`
	Account      string   `json:"account"`
	Models       []string `json:"models"`
	Nodes        []string `json:"nodes"`
	// Dashboard is the first coordinator's web page.
	Dashboard string `json:"dashboard"`
	// StorageURL is where checkpoints go.
	StorageURL string `json:"storage"`
	// Dir is the testnet's directory; Logs its members' logs.
	Dir  string `json:"dir"`
	Logs string `json:"logs"`
	// PIDs are the member processes (StartProcesses only), coordinators
	// first, so that a script can stop a kept testnet.
	PIDs []int `json:"pids,omitempty"`
}
