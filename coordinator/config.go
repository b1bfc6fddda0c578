package coordinator

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"time"

	"github.com/signal-p2p/signal/ledger"
	"github.com/signal-p2p/signal/protocol"
)

// Tokenizer encodes text for POST /v1/tokenize.
type Tokenizer interface {
	Encode(text string, addSpecial bool) []int
}

// Config configures one coordinator.
type Config struct {
	// ID is this member's raft server ID; unique in the cluster.
	ID string
	// DataDir holds the raft log (raft.db) and snapshots.
	DataDir string
	// RaftAddr is the raft TCP bind address (HOST:PORT; port 0 picks one).
	RaftAddr string
	// HTTPAddr is the public API's bind address (port 0 picks one).
	HTTPAddr string
	// Bootstrap makes a fresh data dir start a one-member cluster.
	Bootstrap bool
	// Join is any member's HTTP base URL; a fresh member asks it to add it.
	Join string
	// AdminToken authorises /v1/admin/* and /v1/cluster/*; every member of
	// a cluster needs the same one.
	AdminToken string
	// ClusterSecret authenticates members to each other: the raft
	// transport is mutual TLS under a CA derived from it (clusterTLS), so a
	// process without it cannot reach raft at all. Every member needs the
	// same one. Empty derives it from AdminToken, which every member shares
	// already and which can mint credits anyway, so it grants nothing new;
	// set it apart where the admin token is handed to more people than the
	// coordinators' hosts.
	ClusterSecret string
	// Models is the model registry; every member needs the same one.
	Models []ModelSpec
	// Backend reaches the node network; nil means none (placement fails
	// with 503) unless NewMember gives the coordinator its p2p host.
	Backend Backend
	// UI, when set, serves the web pages: GET / and everything under
	// /dashboard (the dashboard package's Handler). Nil leaves them 404.
	UI http.Handler
	// LoadTokenizer loads a model's tokenizer for /v1/tokenize from the
	// model's local path; nil makes /v1/tokenize answer 503.
	LoadTokenizer func(dir string) (Tokenizer, error)
	// FeeBasisPoints is the network's share of each charge (1000 = 10%).
	FeeBasisPoints int
	// RatePerSecond and RateBurst configure each API key's token bucket.
	RatePerSecond float64
	RateBurst     int
	// CheckpointStores are the URI prefixes of the network's checkpoint
	// store (s3://bucket/prefix, file:///shared/dir): a node's checkpoint
	// is recorded only inside one. Empty (development) takes any plain
	// file or s3 URI.
	CheckpointStores []string
	// MaxRunsPerAccount is the most runs one account may hold open
	// (starting, ready or moving); MinRunBalance the micro-credits an
	// account needs available to open one.
	MaxRunsPerAccount int
	MinRunBalance     int64
	// IdleRunTTL is how long a run may go without a billed call before the
	// leader saves it (a full checkpoint, which load_state resumes) and
	// ends it, freeing its session slot.
	IdleRunTTL time.Duration
	// StorageBillInterval is how often the leader bills checkpoint storage
	// (each checkpoint's first hour is billed when it is written).
	// CheckpointRetention is how long an ended run's checkpoints are kept
	// (and billed) before they are collected; RunRetention how long its
	// record stays after that.
	StorageBillInterval time.Duration
	CheckpointRetention time.Duration
	RunRetention        time.Duration
	// DeleteCheckpointFiles, when set, deletes collected checkpoint files
	// (URIs no remaining checkpoint names) from the network's store.
	DeleteCheckpointFiles func(ctx context.Context, uris []string) error
	// PushCheckpoint, when set, commits a checkpoint's adapter to a
	// Hugging Face Hub repository (POST /v1/checkpoints/{id}/push),
	// reading it from the network's store; unset, pushes are refused.
	PushCheckpoint PushFunc
	// OpenCheckpointFile, when set, reads one stored checkpoint file,
	// verified against its CID: the Tinker door's download URLs stream
	// through it (node/storage.GetVerified over the network's store).
	OpenCheckpointFile func(ctx context.Context, f protocol.CheckpointFile) (io.ReadCloser, error)
	// AuditRate is the fraction of billed forward_backward, forward and
	// sample calls the leader audits: a validator of another operator
	// replays the call from the state the node committed (audit.go). With
	// audits on, an operator's share of each charge is held in its node's
	// escrow until audits release it; 0 turns both off (operators are
	// paid at once, as before audits existed).
	AuditRate float64
	// EscrowWindow is how long earnings a passed audit verified stay held
	// (a failure within it still refunds them); earnings no audit has
	// covered for this long make the node's next call audited.
	EscrowWindow time.Duration
	// EscrowReleaseInterval is how often the leader releases what is due.
	EscrowReleaseInterval time.Duration
	// AuditWorkers bounds the audits being validated at once.
	AuditWorkers int
	// CallTimeout bounds one billed call on a node. The call runs to its
	// end even when the client hangs up, so the work is billed.
	CallTimeout time.Duration
	// MaxBodyBytes limits the bodies of the compute calls (forward,
	// forward_backward, sample); every other route takes at most
	// smallBodyBytes. Bodies are read only after the caller authenticated.
	MaxBodyBytes int64
	// ReadTimeout bounds reading one request, body included; IdleTimeout
	// an idle keep-alive connection. Writes are bounded by CallTimeout.
	ReadTimeout time.Duration
	IdleTimeout time.Duration
	// MaxConnsPerIP caps the connections one client address holds open.
	MaxConnsPerIP int
	// MaxBatch is the most commands in one raft entry; MaxInflightBatches
	// is how many entries may be committing at once.
	MaxBatch           int
	MaxInflightBatches int
	// ApplyTimeout bounds one raft apply.
	ApplyTimeout time.Duration
	// NodeLostAfter is how long a run's node may be missing from the
	// backend's node list before the run moves. The list already has the
	// slack against false alarms (the p2p host keeps a node NodeTTL = 6 s,
	// three 2 s adverts, after its last one, and unlists it at once only
	// when every connection to it closed), so this is a short grace for a
	// connection that drops and comes back. Default 2 s: a node whose
	// process dies is replaced ~2 s after its sockets close; one that goes
	// silent (machine, network) at most 6 + 2 s after its last advert,
	// inside issue 6's 10 s with the move itself.
	NodeLostAfter time.Duration
	// RetryAfter is what 503s tell clients to wait.
	RetryAfter time.Duration
	// ChallengeInterval is how often the leader measures each node with a
	// capacity challenge (challenge.go; default 10 min; negative: never).
	ChallengeInterval time.Duration
	// TinkerPoll is how long the Tinker door's retrieve_future waits for
	// an answer before it says try_again (default 25 s: under the SDK's
	// 45 s request timeout).
	TinkerPoll time.Duration
	// TinkerQueueBytes bounds an account's queued Tinker calls (default
	// 64 MiB; 429 past it), TinkerBytes its futures with their answers
	// (default 256 MiB; the oldest finished ones are forgotten past it).
	TinkerQueueBytes int64
	TinkerBytes      int64
	// TinkerChunkLen is the most datums the tinker SDK puts in one
	// forward_backward request (its client config's fwdbwd_max_chunk_len;
	// 0: the SDK's default of 1024). A longer batch goes as chunks sent in
	// parallel, first chunk last, which the seq_id order reassembles.
	TinkerChunkLen int
	// Raft timing; zero values take hashicorp/raft's defaults.
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration
	// LogStore is where a fresh data dir keeps the raft log: LogStoreWAL
	// (the default; empty means it too) or LogStoreBolt. A data dir that
	// holds a log already keeps the store it has.
	LogStore string
	// SnapshotThreshold is how many log entries trigger a snapshot.
	SnapshotThreshold uint64
	SnapshotInterval  time.Duration
	// Logger receives audit events and infrastructure logs.
	Logger *slog.Logger
	// RaftLogLevel is the level from which hashicorp/raft's own lines go
	// into Logger (component=raft): "trace", "debug", "info", "warn" or
	// "error".
	RaftLogLevel string
}

// DefaultAuditRate is the fraction of billed calls audited by default: 3%
// puts about 3% on the network's compute (one replay per audited call)
// and catches a node that lies on every call within 100 calls with
// probability 1 − 0.97^100 ≈ 95%.
const DefaultAuditRate = 0.03

// DefaultConfig returns a configuration with every tunable set; callers
// fill ID, DataDir, addresses and the admin token.
func DefaultConfig() Config {
	return Config{
		RaftAddr:            "127.0.0.1:7000",
		HTTPAddr:            "127.0.0.1:8080",
		FeeBasisPoints:      1000,
		RatePerSecond:       50,
		RateBurst:           100,
		MaxBodyBytes:        32 << 20,
		ReadTimeout:         time.Minute,
		IdleTimeout:         2 * time.Minute,
		MaxConnsPerIP:       256,
		MaxBatch:            512,
		MaxInflightBatches:  2,
		LogStore:            LogStoreWAL,
		ApplyTimeout:        10 * time.Second,
		CallTimeout:         30 * time.Minute,
		StorageBillInterval: time.Hour,
		IdleRunTTL:          2 * time.Hour,
		CheckpointRetention: 7 * 24 * time.Hour,
		RunRetention:        30 * 24 * time.Hour,
		MaxRunsPerAccount:   16,
		MinRunBalance:       1,
		NodeLostAfter:       2 * time.Second,
		RetryAfter:          2 * time.Second,
		SnapshotThreshold:   8192,
		SnapshotInterval:    2 * time.Minute,
		Logger:              slog.New(slog.NewJSONHandler(io.Discard, nil)),
		RaftLogLevel:        "warn",

		// Audits and escrowed earnings (audit.go).
		AuditRate:             DefaultAuditRate,
		EscrowWindow:          24 * time.Hour,
		EscrowReleaseInterval: 10 * time.Minute,
		AuditWorkers:          2,
	}
}

// clusterSecret is the secret the raft transport's certificates derive from.
func (c Config) clusterSecret() string {
	if c.ClusterSecret != "" {
		return c.ClusterSecret
	}
	return "admin-token:" + c.AdminToken
}

// Validate checks the configuration, naming the first bad field.
func (c Config) Validate() error {
	switch {
	case c.ID == "":
		return fmt.Errorf("config ID: empty: %w", ErrInvalidRequest)
	case c.DataDir == "":
		return fmt.Errorf("config DataDir: empty: %w", ErrInvalidRequest)
	case c.RaftAddr == "":
		return fmt.Errorf("config RaftAddr: empty: %w", ErrInvalidRequest)
	case c.HTTPAddr == "":
		return fmt.Errorf("config HTTPAddr: empty: %w", ErrInvalidRequest)
	case len(c.AdminToken) < 8:
		return fmt.Errorf("config AdminToken: at least 8 characters required: %w", ErrInvalidRequest)
	case c.ClusterSecret != "" && len(c.ClusterSecret) < 16:
		return fmt.Errorf("config ClusterSecret: at least 16 characters required: %w", ErrInvalidRequest)
	case c.Bootstrap && c.Join != "":
		return fmt.Errorf("config Bootstrap and Join: choose one: %w", ErrInvalidRequest)
	case c.FeeBasisPoints < 0 || c.FeeBasisPoints > ledger.MaxBasisPoints:
		return fmt.Errorf("config FeeBasisPoints %d: allowed 0..%d: %w", c.FeeBasisPoints, ledger.MaxBasisPoints, ErrInvalidRequest)
	case c.RatePerSecond <= 0 || c.RateBurst < 1:
		return fmt.Errorf("config RatePerSecond %v / RateBurst %d: must be positive: %w", c.RatePerSecond, c.RateBurst, ErrInvalidRequest)
	case c.MaxBodyBytes < 1024:
		return fmt.Errorf("config MaxBodyBytes %d: at least 1024: %w", c.MaxBodyBytes, ErrInvalidRequest)
	case c.StorageBillInterval <= 0 || c.CheckpointRetention <= 0 || c.RunRetention <= 0 || c.IdleRunTTL <= 0:
		return fmt.Errorf("config StorageBillInterval/CheckpointRetention/RunRetention/IdleRunTTL: must be positive: %w", ErrInvalidRequest)
	case c.MaxRunsPerAccount < 1 || c.MinRunBalance < 0:
		return fmt.Errorf("config MaxRunsPerAccount %d / MinRunBalance %d: want ≥ 1 and ≥ 0: %w", c.MaxRunsPerAccount, c.MinRunBalance, ErrInvalidRequest)
	case c.ReadTimeout <= 0 || c.IdleTimeout <= 0 || c.MaxConnsPerIP < 1:
		return fmt.Errorf("config ReadTimeout/IdleTimeout/MaxConnsPerIP: must be positive: %w", ErrInvalidRequest)
	case c.MaxBatch < 1 || c.MaxInflightBatches < 1:
		return fmt.Errorf("config MaxBatch %d / MaxInflightBatches %d: must be positive: %w", c.MaxBatch, c.MaxInflightBatches, ErrInvalidRequest)
	case !(c.AuditRate >= 0 && c.AuditRate <= 1) || c.EscrowWindow < 0 || c.EscrowReleaseInterval <= 0 || c.AuditWorkers < 1:
		return fmt.Errorf("config AuditRate %v / EscrowWindow %v / EscrowReleaseInterval %v / AuditWorkers %d: want 0..1, ≥ 0, > 0, ≥ 1: %w", c.AuditRate, c.EscrowWindow, c.EscrowReleaseInterval, c.AuditWorkers, ErrInvalidRequest)
	case c.ApplyTimeout <= 0 || c.NodeLostAfter <= 0 || c.RetryAfter <= 0 || c.CallTimeout <= 0:
		return fmt.Errorf("config ApplyTimeout/NodeLostAfter/RetryAfter/CallTimeout: must be positive: %w", ErrInvalidRequest)
	case c.LogStore != "" && c.LogStore != LogStoreWAL && c.LogStore != LogStoreBolt:
		return fmt.Errorf("config LogStore %q: want %q or %q: %w", c.LogStore, LogStoreWAL, LogStoreBolt, ErrInvalidRequest)
	case c.Logger == nil:
		return fmt.Errorf("config Logger: nil: %w", ErrInvalidRequest)
	}
	if c.Join != "" {
		u, err := url.Parse(c.Join)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("config Join %q: want an http(s) URL: %w", c.Join, ErrInvalidRequest)
		}
	}
	seen := map[string]bool{}
	for i, m := range c.Models {
		if err := m.Validate(); err != nil {
			return fmt.Errorf("config Models[%d]: %w", i, err)
		}
		if seen[m.Name] {
			return fmt.Errorf("config Models[%d]: name %q twice: %w", i, m.Name, ErrInvalidRequest)
		}
		seen[m.Name] = true
	}
	return nil
}
