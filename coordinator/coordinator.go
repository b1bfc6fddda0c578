// Package coordinator is Signal's control plane: a hashicorp/raft cluster
// whose FSM holds API keys, the ledger, runs and node assignments, behind
// the public HTTP API. DESIGN.md beside this file says why it is shaped so.
package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"

	"github.com/signal-p2p/signal/internal/retry"
	"github.com/signal-p2p/signal/protocol"
)

// joinsPerSecond and joinBurst bound new node registrations per join token.
const (
	joinsPerSecond = 5
	joinBurst      = 20
)

// logCacheEntries is how many recent raft entries stay in memory for
// replication (each entry is a batch of up to MaxBatch commands).
const logCacheEntries = 512

// Coordinator is one member of the coordinator cluster: raft, FSM, HTTP API.
type Coordinator struct {
	cfg     Config
	log     *slog.Logger
	fsm     *fsm
	models  *registry
	metrics *metrics
	limits  *rateLimits
	// joinLimits bounds new node registrations per join token.
	joinLimits *rateLimits
	// backend reaches the node network; set before Start, never after.
	backend Backend

	raft      *raft.Raft
	logs      raft.LogStore // raft's log (through its cache): benchmarks read entry sizes
	transport *raft.NetworkTransport
	stream    *tcpStream
	store     *raftboltdb.BoltStore
	wal       io.Closer // the raft-wal log; nil when the log is in store
	logKind   string
	batch     *batcher
	ln        net.Listener
	srv       *http.Server
	client    *http.Client

	// leaderReady is true on the leader once its FSM has applied every
	// entry of earlier terms (a barrier), so its reads are current.
	leaderReady atomic.Bool

	// gates queue each run's billed calls (one at a time to its node).
	gates *runGates
	// auditor validates the audited calls in the background (audit.go).
	auditor *auditor
	// tokenizers are the models' tokenizers this member has loaded.
	tokenizers *tokenizers
	// tokenizeSlots bounds concurrent /v1/tokenize work on this member.
	tokenizeSlots chan struct{}
	// pushSlots bounds concurrent checkpoint pushes on this member.
	pushSlots chan struct{}

	// tinkerSig wakes the Tinker door's long polls when its book changes;
	// tinkerKick wakes the leader's queue runner (tinkerexec.go).
	// life ends when Stop begins: long polls answer at once then, so the
	// HTTP server's graceful shutdown does not wait out their 25 s.
	life       context.Context
	tinkerSig  *tinkerSignal
	tinkerKick chan struct{}
	// tinkerPaused holds why a queued call waits (future id → pausedState),
	// for retrieve_future's try_again; the leader's runner keeps it.
	tinkerPaused sync.Map
	inflightMu   sync.Mutex
	inflight     map[string]chan struct{} // idempotency scopes being executed
	movingMu     sync.Mutex
	moving       map[string]bool     // runs being moved by this leader
	missing      map[string]lostMark // runs whose node seems gone
	// badCheckpoints are the checkpoints a node refused to restore, per
	// run (id → why), and lastBad the latest; moves fall back past them.
	badCheckpoints map[string]map[string]string
	lastBad        map[string]string
	// lostFrom is the node each run in a move was lost from.
	lostFrom map[string]string

	cancel  context.CancelFunc
	wg      sync.WaitGroup
	started bool
	stopped atomic.Bool
	stopMu  sync.Mutex
}

// New checks cfg and builds a coordinator; Start runs it.
func New(cfg Config) (*Coordinator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := &Coordinator{
		cfg:    cfg,
		log:    cfg.Logger.With("coordinator", cfg.ID),
		fsm:    newFSM(),
		models: newRegistry(cfg.Models),
		limits: newRateLimits(cfg.RatePerSecond, cfg.RateBurst),

		joinLimits: newRateLimits(joinsPerSecond, joinBurst),
		inflight:   map[string]chan struct{}{},
		tinkerSig:  newTinkerSignal(),
		tinkerKick: make(chan struct{}, 1),
		moving:     map[string]bool{},

		badCheckpoints: map[string]map[string]string{},
		lastBad:        map[string]string{},
		lostFrom:       map[string]string{},
		missing:        map[string]lostMark{},
		client:         &http.Client{Timeout: 30 * time.Minute},

		tokenizers:    newTokenizers(cfg.LoadTokenizer),
		tokenizeSlots: make(chan struct{}, 2),
		pushSlots:     make(chan struct{}, maxPushes),
		gates:         newRunGates(),
	}
	c.fsm.log = c.log
	c.auditor = newAuditor(c)
	c.metrics = newMetrics(c)
	c.fsm.observe = c.metrics.observeApply
	c.fsm.changed = func() {
		c.tinkerSig.notify()
		c.tinkerWake()
	}
	c.backend = cfg.Backend
	if c.backend == nil {
		c.backend = noBackend{} // NewMember sets its host before Start
	}
	return c, nil
}

func (c *Coordinator) nodesBackend() Backend { return c.backend }

// Start opens the raft stores, starts raft and the HTTP server, and
// bootstraps or joins as configured. It returns once the HTTP server
// listens; becoming leader or joining happens in the background.
func (c *Coordinator) Start(ctx context.Context) error {
	if c.started {
		return errors.New("coordinator already started")
	}
	c.started = true
	if err := os.MkdirAll(c.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	// One log: raft's lines are records of the coordinator's own logger.
	hl := newRaftLogger(c.log, hclog.LevelFromString(c.cfg.RaftLogLevel))
	snaps, err := c.openStores(hl)
	if err != nil {
		return err
	}
	if err := c.openTransport(hl); err != nil {
		_ = c.closeStores()
		return err
	}
	hasState, err := c.startRaft(hl, snaps)
	if err != nil {
		return err
	}
	if err := c.listenHTTP(); err != nil {
		_ = c.shutdownRaft()
		return err
	}
	c.runLoops(ctx, hasState)
	c.log.Info("coordinator started", "category", "infrastructure", "raft_addr", c.RaftAddr(), "http_addr", c.HTTPAddr(), "existing_state", hasState, "log_store", c.logKind)
	return nil
}

// openStores opens the bolt store (raft's stable store, and the log of
// data dirs that keep it there) and the snapshot store.
func (c *Coordinator) openStores(hl hclog.Logger) (raft.SnapshotStore, error) {
	store, err := raftboltdb.New(raftboltdb.Options{
		Path: filepath.Join(c.cfg.DataDir, "raft.db"),
		BoltOptions: &bbolt.Options{
			// Another process holding the file: fail, do not hang.
			Timeout: 5 * time.Second,
			// The freelist is rebuilt when the file opens instead of being
			// written with every commit: each StoreLogs writes fewer pages.
			// Durability is unchanged (etcd runs bbolt so).
			NoFreelistSync: true,
			FreelistType:   bbolt.FreelistMapType,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("open raft store: %w", err)
	}
	c.store = store
	snaps, err := raft.NewFileSnapshotStoreWithLogger(c.cfg.DataDir, 2, hl)
	if err != nil {
		_ = c.closeStores()
		return nil, fmt.Errorf("open snapshot store: %w", err)
	}
	return snaps, nil
}

// openTransport binds the raft port under the cluster's mutual TLS.
func (c *Coordinator) openTransport(hl hclog.Logger) error {
	serverTLS, clientTLS, err := clusterTLS(c.cfg.clusterSecret(), c.cfg.ID)
	if err != nil {
		return fmt.Errorf("raft transport certificates: %w", err)
	}
	stream, err := newTCPStream(c.cfg.RaftAddr, serverTLS, clientTLS)
	if err != nil {
		return fmt.Errorf("raft transport on %s: %w", c.cfg.RaftAddr, err)
	}
	c.stream = stream
	c.transport = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{Stream: stream, MaxPool: 3, Timeout: 10 * time.Second, Logger: hl})
	return nil
}

// raftConfig is hashicorp/raft's configuration with this member's timings.
func (c *Coordinator) raftConfig(hl hclog.Logger) *raft.Config {
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(c.cfg.ID)
	rc.Logger = hl
	if c.cfg.HeartbeatTimeout > 0 {
		rc.HeartbeatTimeout = c.cfg.HeartbeatTimeout
	}
	if c.cfg.ElectionTimeout > 0 {
		rc.ElectionTimeout = c.cfg.ElectionTimeout
	}
	if c.cfg.LeaderLeaseTimeout > 0 {
		rc.LeaderLeaseTimeout = c.cfg.LeaderLeaseTimeout
	}
	if c.cfg.CommitTimeout > 0 {
		rc.CommitTimeout = c.cfg.CommitTimeout
	}
	if c.cfg.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = c.cfg.SnapshotThreshold
	}
	if c.cfg.SnapshotInterval > 0 {
		rc.SnapshotInterval = c.cfg.SnapshotInterval
	}
	// Batches already group commands; let raft ship many entries per RPC too,
	// and take Apply calls without waiting for the leader loop (which is
	// busy writing the previous entries to disk).
	rc.MaxAppendEntries = 256
	rc.BatchApplyCh = true
	return rc
}

// startRaft opens the log, starts raft over the open stores and
// transport, and bootstraps a fresh cluster when asked. It reports whether
// the data dir held state already. On failure it has released the stores
// and the raft port, so a retry in this process can bind it.
func (c *Coordinator) startRaft(hl hclog.Logger, snaps raft.SnapshotStore) (hasState bool, err error) {
	abort := func() {
		_ = c.transport.Close() // closes the stream layer's listener
		c.transport, c.stream = nil, nil
		_ = c.closeStores()
	}
	rc := c.raftConfig(hl)
	logStore, w, kind, err := openLogStore(c.cfg.DataDir, c.cfg.LogStore, c.store)
	if err != nil {
		abort()
		return false, err
	}
	c.wal, c.logKind = w, kind
	// Replication reads back the entries it sends; recent ones come from
	// memory instead of a disk read each.
	logs, err := raft.NewLogCache(logCacheEntries, logStore)
	if err != nil {
		abort()
		return false, fmt.Errorf("raft log cache: %w", err)
	}
	hasState, err = raft.HasExistingState(logs, c.store, snaps)
	if err != nil {
		abort()
		return false, fmt.Errorf("inspect raft state: %w", err)
	}
	r, err := raft.NewRaft(rc, c.fsm, logs, c.store, snaps, c.transport)
	if err != nil {
		abort()
		return false, fmt.Errorf("start raft: %w", err)
	}
	c.raft, c.logs = r, logs
	if c.cfg.Bootstrap && !hasState {
		boot := raft.Configuration{Servers: []raft.Server{{ID: rc.LocalID, Address: c.transport.LocalAddr()}}}
		if err := r.BootstrapCluster(boot).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			_ = c.shutdownRaft()
			return false, fmt.Errorf("bootstrap: %w", err)
		}
	}
	return hasState, nil
}

// listenHTTP binds the API's address and builds its server.
func (c *Coordinator) listenHTTP() error {
	ln, err := net.Listen("tcp", c.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("http listen on %s: %w", c.cfg.HTTPAddr, err)
	}
	c.ln = ln
	c.srv = &http.Server{
		Handler:           c.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       c.cfg.ReadTimeout,
		// A billed call may run CallTimeout on its node before the answer.
		WriteTimeout:   c.cfg.CallTimeout + time.Minute,
		IdleTimeout:    c.cfg.IdleTimeout,
		MaxHeaderBytes: 64 << 10,
	}
	return nil
}

// runLoops starts the member's goroutines, each owned by c.wg and ended
// by Stop: the batcher, the HTTP server, the leadership watch and, on a
// fresh member told to join, the join loop.
func (c *Coordinator) runLoops(ctx context.Context, hasState bool) {
	ctx, cancel := context.WithCancel(ctx)
	c.cancel = cancel
	c.life = ctx
	c.batch = newBatcher(c.raft, c.cfg.MaxBatch, c.cfg.MaxInflightBatches, c.cfg.ApplyTimeout, c.metrics.observeBatch)
	c.batch.Start(ctx)
	c.auditor.Start(ctx, c.cfg.AuditWorkers)
	c.goLoop(func() {
		if err := c.srv.Serve(newPerIPListener(c.ln, c.cfg.MaxConnsPerIP)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			c.log.Error("http server stopped", "category", "infrastructure", "err", err)
		}
	})
	c.goLoop(func() { c.watchLeadership(ctx) })
	if c.cfg.Join != "" && !hasState {
		c.goLoop(func() { c.joinLoop(ctx) })
	}
}

// goLoop runs fn in a goroutine that Stop waits for.
func (c *Coordinator) goLoop(fn func()) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		fn()
	}()
}

// Stop shuts the coordinator down: background loops, HTTP server, raft,
// stores. It is safe to call more than once.
func (c *Coordinator) Stop() error {
	c.stopMu.Lock()
	defer c.stopMu.Unlock()
	if !c.started || c.stopped.Load() {
		return nil
	}
	c.stopped.Store(true)
	if c.cancel == nil { // Start failed: it released what it had opened
		return nil
	}
	c.cancel()
	var errs []error
	if c.srv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := c.srv.Shutdown(sctx); err != nil {
			errs = append(errs, fmt.Errorf("http shutdown: %w", err))
		}
		cancel()
	}
	c.wg.Wait()
	c.auditor.Stop()
	c.batch.Wait()
	if err := c.shutdownRaft(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (c *Coordinator) shutdownRaft() error {
	var errs []error
	if c.raft != nil {
		if err := c.raft.Shutdown().Error(); err != nil {
			errs = append(errs, fmt.Errorf("raft shutdown: %w", err))
		}
	}
	if c.transport != nil {
		_ = c.transport.Close()
	}
	if err := c.closeStores(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (c *Coordinator) closeStores() error {
	var errs []error
	if c.wal != nil {
		if err := c.wal.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close raft wal: %w", err))
		}
		c.wal = nil
	}
	if c.store != nil {
		if err := c.store.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close raft store: %w", err))
		}
		c.store = nil
	}
	return errors.Join(errs...)
}

// LogStore says where this member's raft log lives: LogStoreWAL or
// LogStoreBolt (fixed by the data dir once it holds a log). Empty before Start.
func (c *Coordinator) LogStore() string { return c.logKind }

// HTTPAddr is the address the API listens on (HOST:PORT).
func (c *Coordinator) HTTPAddr() string {
	if c.ln == nil {
		return c.cfg.HTTPAddr
	}
	return c.ln.Addr().String()
}

// URL is the API's base URL.
func (c *Coordinator) URL() string { return "http://" + c.HTTPAddr() }

// RaftAddr is the raft transport's address.
func (c *Coordinator) RaftAddr() string {
	if c.transport == nil {
		return c.cfg.RaftAddr
	}
	return string(c.transport.LocalAddr())
}

// ID is this member's raft server ID.
func (c *Coordinator) ID() string { return c.cfg.ID }

// IsLeader reports whether this member is the raft leader and ready to serve.
func (c *Coordinator) IsLeader() bool {
	return c.raft != nil && !c.stopped.Load() && c.raft.State() == raft.Leader && c.leaderReady.Load()
}

// WaitLeader waits until some member is leader and known to this one.
func (c *Coordinator) WaitLeader(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if c.IsLeader() {
			return nil
		}
		if _, id := c.raft.LeaderWithID(); id != "" {
			if _, ok := c.memberHTTP(string(id)); ok {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for leader: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// AppliedIndex is the index of the last entry this member's FSM applied.
func (c *Coordinator) AppliedIndex() uint64 { return c.raft.AppliedIndex() }

// State runs fn with read access to this member's replicated state.
func (c *Coordinator) State(fn func(*State)) { c.fsm.read(fn) }

// Snapshot asks raft to take a snapshot now.
func (c *Coordinator) Snapshot() error { return c.raft.Snapshot().Error() }

func (c *Coordinator) memberHTTP(id string) (string, bool) {
	var m MemberRecord
	var ok bool
	c.fsm.read(func(s *State) { m, ok = s.Member(id) })
	return m.HTTPAddr, ok && m.HTTPAddr != ""
}

// leaderURL is the current leader's HTTP base URL.
func (c *Coordinator) leaderURL() (string, error) {
	_, id := c.raft.LeaderWithID()
	if id == "" {
		return "", retryAfter(protocol.UserErrorf(ErrUnavailable, "the coordinators have no raft leader yet; retry in a moment"), c.cfg.RetryAfter)
	}
	addr, ok := c.memberHTTP(string(id))
	if !ok {
		return "", retryAfter(protocol.UserErrorf(ErrUnavailable, "the raft leader %s has no known HTTP address yet; retry in a moment", id), c.cfg.RetryAfter)
	}
	return "http://" + addr, nil
}

// propose replicates one command and returns its result.
func (c *Coordinator) propose(ctx context.Context, t cmdType, v any) (any, error) {
	if c.raft.State() != raft.Leader {
		return nil, retryAfter(ErrNotLeader, c.cfg.RetryAfter)
	}
	cmd, err := newCommand(t, v)
	if err != nil {
		return nil, err
	}
	return c.batch.propose(ctx, cmd)
}

// watchLeadership keeps leaderReady current and runs the leader's duties
// (member record, failover monitor) while this member leads.
func (c *Coordinator) watchLeadership(ctx context.Context) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var leaderCancel context.CancelFunc
	var leaderWG sync.WaitGroup
	stopLeading := func() {
		c.leaderReady.Store(false)
		if leaderCancel != nil {
			leaderCancel()
			leaderWG.Wait()
			leaderCancel = nil
		}
	}
	defer stopLeading()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		isLeader := c.raft.State() == raft.Leader
		switch {
		case isLeader && leaderCancel == nil:
			// Apply everything from earlier terms before serving reads.
			if err := c.raft.Barrier(c.cfg.ApplyTimeout).Error(); err != nil {
				c.log.Warn("leader barrier failed", "category", "infrastructure", "err", err)
				continue
			}
			lctx, cancel := context.WithCancel(ctx)
			leaderCancel = cancel
			if _, err := c.propose(lctx, cmdPutMember, MemberRecord{ID: c.cfg.ID, RaftAddr: c.RaftAddr(), HTTPAddr: c.HTTPAddr()}); err != nil {
				c.log.Warn("record own member address", "category", "infrastructure", "err", err)
				stopLeading()
				continue
			}
			c.leaderReady.Store(true)
			c.metrics.leader.Set(1)
			c.log.Info("became leader", "category", "infrastructure")
			// The leader's periodic work, each until leadership ends.
			for _, loop := range []func(context.Context){c.failoverLoop, c.storageLoop, c.idleLoop, c.escrowLoop, c.tinkerLoop, c.challengeLoop} {
				leaderWG.Add(1)
				go func() {
					defer leaderWG.Done()
					loop(lctx)
				}()
			}
		case !isLeader && leaderCancel != nil:
			c.log.Info("lost leadership", "category", "infrastructure")
			c.metrics.leader.Set(0)
			stopLeading()
		}
	}
}

// every calls f every period until ctx ends: the shape of the leader's
// periodic loops (storage bills, idle runs, escrow releases).
func every(ctx context.Context, period time.Duration, f func()) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}

// joinRequest is the body of POST /v1/cluster/join.
type joinRequest struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	HTTPAddr string `json:"http_addr"`
}

// joinLoop asks the configured member to add this one until it succeeds
// or ctx ends.
func (c *Coordinator) joinLoop(ctx context.Context) {
	body, _ := json.Marshal(joinRequest{ID: c.cfg.ID, RaftAddr: c.RaftAddr(), HTTPAddr: c.HTTPAddr()})
	url := strings.TrimRight(c.cfg.Join, "/") + "/v1/cluster/join"
	failures := 0
	err := retry.Do(ctx, func() error { return c.postAdmin(ctx, url, body, nil) }, func(err error, wait time.Duration) {
		// The first failure, then one in ten: a member waits for its
		// cluster's leader quietly.
		if failures%10 == 0 {
			c.log.Warn("join failed; retrying", "category", "infrastructure", "via", c.cfg.Join, "in", wait, "err", err)
		}
		failures++
	})
	if err == nil {
		c.log.Info("joined cluster", "category", "infrastructure", "via", c.cfg.Join)
	}
}

// postAdmin POSTs body with the admin token and decodes a 200 answer into out.
func (c *Coordinator) postAdmin(ctx context.Context, url string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.cfg.AdminToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		return fmt.Errorf("post %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e protocol.ErrorResponse
		_ = json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&e)
		return fmt.Errorf("post %s: status %d %s: %w", url, resp.StatusCode, e.Error.Message, remoteError(resp.StatusCode, e.Error.Code))
	}
	if out != nil {
		return json.NewDecoder(resp.Body).Decode(out)
	}
	return nil
}

// addMember adds a voter (leader only) and records its HTTP address.
func (c *Coordinator) addMember(ctx context.Context, j joinRequest) error {
	if j.ID == "" || j.RaftAddr == "" || j.HTTPAddr == "" {
		return fmt.Errorf("join: id, raft_addr and http_addr are required: %w", ErrInvalidRequest)
	}
	cf := c.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return raftError(err)
	}
	present := false
	for _, s := range cf.Configuration().Servers {
		if s.ID == raft.ServerID(j.ID) && s.Address == raft.ServerAddress(j.RaftAddr) {
			present = true
		} else if s.ID == raft.ServerID(j.ID) || s.Address == raft.ServerAddress(j.RaftAddr) {
			// Same ID at a new address (or the reverse): replace it.
			if err := c.raft.RemoveServer(s.ID, 0, c.cfg.ApplyTimeout).Error(); err != nil {
				return raftError(err)
			}
		}
	}
	if !present {
		if err := c.raft.AddVoter(raft.ServerID(j.ID), raft.ServerAddress(j.RaftAddr), 0, c.cfg.ApplyTimeout).Error(); err != nil {
			return raftError(err)
		}
	}
	_, err := c.propose(ctx, cmdPutMember, MemberRecord(j))
	return err
}

func now() string { return time.Now().UTC().Format(time.RFC3339Nano) }
