package testnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/signal-p2p/signal/coordinator"
	"github.com/signal-p2p/signal/coordinator/dashboard"
	"github.com/signal-p2p/signal/coordinator/p2p"
	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/hub"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/trainer/tokenizer"
)

// CoordinatorSpec is one coordinator member: what the parent tells a child
// process (as JSON) or StartInProcess passes directly.
type CoordinatorSpec struct {
	ID         string                  `json:"id"`
	DataDir    string                  `json:"data_dir"`
	Bootstrap  bool                    `json:"bootstrap"`
	Join       string                  `json:"join,omitempty"`
	AdminToken string                  `json:"admin_token"`
	Models     []coordinator.ModelSpec `json:"models"`
	// NodeLostAfter and NodeTTL are the failover timings (see Config).
	NodeLostAfter time.Duration `json:"node_lost_after"`
	NodeTTL       time.Duration `json:"node_ttl"`
	// RatePerSecond and RateBurst are each API key's token bucket (0: the
	// testnet's defaults).
	RatePerSecond float64 `json:"rate_per_second,omitempty"`
	// TinkerChunkLen is the most datums the tinker SDK sends in one
	// forward_backward request (0: the coordinator's default).
	TinkerChunkLen int `json:"tinker_chunk_len,omitempty"`
	RateBurst      int `json:"rate_burst,omitempty"`
	// ChallengeInterval is Config.ChallengeInterval.
	ChallengeInterval time.Duration `json:"challenge_interval,omitempty"`
	// StorageURL is the network's checkpoint store, shared with the nodes:
	// node checkpoints are recorded only inside it, and collected ones are
	// deleted from it.
	StorageURL string              `json:"storage_url,omitempty"`
	Creds      storage.Credentials `json:"creds"`
}

// Coordinator is a running coordinator member: raft, the API and the
// dashboard on one address (as `signal coordinator` serves them), and its
// libp2p host (the nodes' bootstrap peer).
type Coordinator struct {
	m *coordinator.Member

	stopOnce sync.Once
	stopErr  error
}

// StartCoordinator starts one coordinator member on loopback with free ports.
func StartCoordinator(ctx context.Context, spec CoordinatorSpec, log *slog.Logger) (*Coordinator, error) {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	cfg := coordinator.DefaultConfig()
	cfg.ID = spec.ID
	cfg.DataDir = spec.DataDir
	cfg.RaftAddr = "127.0.0.1:0"
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.Bootstrap = spec.Bootstrap
	cfg.Join = spec.Join
	cfg.AdminToken = spec.AdminToken
	cfg.Models = spec.Models
	cfg.Logger = log
	if spec.StorageURL != "" {
		ns, err := storage.OpenNetwork(spec.StorageURL, spec.Creds)
		if err != nil {
			return nil, fmt.Errorf("coordinator %s storage: %w", spec.ID, err)
		}
		cfg.CheckpointStores, cfg.DeleteCheckpointFiles = []string{ns.Prefix}, ns.Delete
		// Pushes to $HF_ENDPOINT (a test's local Hub) or huggingface.co,
		// as signal coordinator wires them.
		cfg.PushCheckpoint = hub.Pusher(&hub.Client{}, ns.Store)
		cfg.OpenCheckpointFile = storage.FileOpener(ns.Store)
	}
	// The testnet's key is used by examples and tests in tight loops.
	cfg.RatePerSecond, cfg.RateBurst = DefaultConfig().RatePerSecond, DefaultConfig().RateBurst
	if spec.RatePerSecond > 0 && spec.RateBurst > 0 {
		cfg.RatePerSecond, cfg.RateBurst = spec.RatePerSecond, spec.RateBurst
	}
	if spec.NodeLostAfter > 0 {
		cfg.NodeLostAfter = spec.NodeLostAfter
	}
	cfg.TinkerChunkLen = spec.TinkerChunkLen
	cfg.ChallengeInterval = spec.ChallengeInterval
	// Loopback raft: elections in well under a second.
	cfg.HeartbeatTimeout = 500 * time.Millisecond
	cfg.ElectionTimeout = 500 * time.Millisecond
	cfg.LeaderLeaseTimeout = 250 * time.Millisecond
	cfg.LoadTokenizer = func(dir string) (coordinator.Tokenizer, error) { return tokenizer.Load(dir) }
	pcfg := p2p.DefaultConfig()
	pcfg.ListenAddrs = []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}
	if spec.NodeTTL > 0 {
		pcfg.NodeTTL = spec.NodeTTL
	}
	// The dashboard at / and /dashboard, reading through the member's own
	// API once it listens.
	var m *coordinator.Member
	cfg.UI = dashboard.New(dashboard.NewSelfSource(func() string { return m.URL() }), dashboard.Options{Title: "Signal testnet · " + spec.ID, Logger: log})
	m, err := coordinator.NewMember(cfg, &pcfg)
	if err != nil {
		return nil, fmt.Errorf("coordinator %s: %w", spec.ID, err)
	}
	if err := m.Start(ctx); err != nil {
		return nil, fmt.Errorf("coordinator %s: %w", spec.ID, err)
	}
	return &Coordinator{m: m}, nil
}

// URL is the member's public base URL (API and dashboard).
func (c *Coordinator) URL() string { return c.m.URL() }

// P2PAddrs are the multiaddrs nodes bootstrap to.
func (c *Coordinator) P2PAddrs() []string { return c.m.P2PAddrs() }

// Core is the coordinator itself (raft state, leadership).
func (c *Coordinator) Core() *coordinator.Coordinator { return c.m.Coordinator() }

// Stop stops the coordinator and its libp2p host.
func (c *Coordinator) Stop() error {
	c.stopOnce.Do(func() { c.stopErr = c.m.Stop() })
	return c.stopErr
}

// NodeSpec is one node member.
type NodeSpec struct {
	DataDir     string              `json:"data_dir"`
	Bootstrap   []string            `json:"bootstrap"`
	JoinToken   string              `json:"join_token"`
	StorageURL  string              `json:"storage_url"`
	Creds       storage.Credentials `json:"creds"`
	Models      map[string]string   `json:"models"`
	MaxSessions int                 `json:"max_sessions"`
	Engine      string              `json:"engine"`
	// AdvertInterval is how often the node advertises (0: node default).
	AdvertInterval time.Duration `json:"advert_interval,omitempty"`
}

// Node is a running node member.
type Node struct {
	*node.Node
	// stopEngine ends the engine's own processes (a PyTorch worker); nil
	// for an engine that has none.
	stopEngine func() error
}

// Stop stops the node gracefully (Node.Stop), then its engine.
func (n *Node) Stop() error {
	err := n.Node.Stop()
	if n.stopEngine != nil {
		err = errors.Join(err, n.stopEngine())
	}
	return err
}

// Kill crashes the node (Node.Kill) and ends its engine's processes, as a
// machine that dies takes them along.
func (n *Node) Kill() {
	n.Node.Kill()
	if n.stopEngine != nil {
		_ = n.stopEngine()
	}
}

// StartNode starts one node daemon on loopback.
func StartNode(ctx context.Context, spec NodeSpec, log *slog.Logger) (*Node, error) {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	f, ok := engineFactory(spec.Engine)
	if !ok {
		return nil, fmt.Errorf("%w: engine %q: known engines are %v", ErrInvalidConfig, spec.Engine, engineNames())
	}
	eng, err := f(spec.DataDir, spec.Models)
	if err != nil {
		return nil, err
	}
	cfg := node.DefaultConfig()
	cfg.DataDir = spec.DataDir
	cfg.ListenAddrs = []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}
	cfg.Bootstrap = spec.Bootstrap
	cfg.JoinToken = spec.JoinToken
	cfg.StorageURL = spec.StorageURL
	cfg.Creds = spec.Creds
	cfg.MaxSessions = spec.MaxSessions
	// Bootstrap peers are explicit; mDNS would make every testnet on the
	// machine (other tests, other developers) find each other.
	cfg.MDNS = false
	if spec.AdvertInterval > 0 {
		cfg.AdvertInterval = spec.AdvertInterval
	}
	cfg.DrainTimeout = 10 * time.Second
	cfg.Logger = log
	var stopEngine func() error
	if s, ok := eng.(interface{ Stop() error }); ok {
		stopEngine = s.Stop
	}
	n, err := node.New(cfg, eng)
	if err != nil {
		if stopEngine != nil {
			_ = stopEngine()
		}
		return nil, err
	}
	nd := &Node{Node: n, stopEngine: stopEngine}
	if err := n.Start(ctx); err != nil {
		_ = nd.Stop()
		return nil, err
	}
	return nd, nil
}
