// Package node is Signal's node daemon: a libp2p host that joins the
// network through the coordinators with a join token, publishes signed
// capacity adverts on GossipSub, and serves run sessions on
// /signal/session/1 with an Engine, storing checkpoints by CID.
package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/discovery/mdns"
	yamux "github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/signal-p2p/signal/node/fingerprint"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

// MDNSServiceName is the mDNS service Signal peers announce on a LAN.
const MDNSServiceName = "signal-p2p"

// Config configures a Node.
type Config struct {
	// DataDir keeps the identity key, and checkpoints when StorageURL is unset.
	DataDir string
	// ListenAddrs are multiaddrs to listen on (TCP and QUIC by default).
	ListenAddrs []string
	// Bootstrap are the coordinators' full multiaddrs (with /p2p/ID). Only
	// these peers may call sessions; with none, any peer may (development).
	Bootstrap []string
	// JoinToken is proven to each coordinator once per connection.
	JoinToken string
	// StorageURL is where checkpoints go: file:///dir or s3://bucket/prefix?endpoint=...
	StorageURL string
	// Creds for s3 storage (empty: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
	Creds storage.Credentials
	// MaxSessions bounds open sessions.
	MaxSessions int
	// AdvertInterval is how often a capacity advert is published.
	AdvertInterval time.Duration
	// FingerprintInterval is how often devices are re-read.
	FingerprintInterval time.Duration
	// RedialInterval is how often unconnected coordinators are redialled.
	RedialInterval time.Duration
	// DrainTimeout bounds graceful shutdown: running calls, then checkpoints.
	DrainTimeout time.Duration
	// MDNS turns on LAN discovery; DHT turns on a Kademlia DHT.
	MDNS, DHT bool
	// MaxFrameBytes bounds one session message.
	MaxFrameBytes int
	// Fingerprinter reads devices; nil detects NVML or falls back to the CPU.
	Fingerprinter *fingerprint.Fingerprinter
	Logger        *slog.Logger
}

// DefaultConfig returns the settings `signal node` starts from.
func DefaultConfig() Config {
	return Config{
		ListenAddrs:         []string{"/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"},
		MaxSessions:         8,
		AdvertInterval:      2 * time.Second,
		FingerprintInterval: fingerprint.DefaultInterval,
		RedialInterval:      time.Second,
		DrainTimeout:        30 * time.Second,
		MDNS:                true,
		MaxFrameBytes:       protocol.MaxFrameBytes,
	}
}

// Validate checks the configuration and names the first bad field.
func (c *Config) Validate() error {
	if c.DataDir == "" {
		return errors.New("data: directory required")
	}
	if len(c.ListenAddrs) == 0 {
		return errors.New("listen: at least one address required")
	}
	for _, a := range c.ListenAddrs {
		if _, err := ma.NewMultiaddr(a); err != nil {
			return fmt.Errorf("listen: %q: %w", a, err)
		}
	}
	for _, b := range c.Bootstrap {
		if _, err := peer.AddrInfoFromString(b); err != nil {
			return fmt.Errorf("bootstrap: %q (want a multiaddr ending in /p2p/PEER_ID): %w", b, err)
		}
	}
	if len(c.Bootstrap) > 0 && c.JoinToken == "" {
		return errors.New("join-token: required to join coordinators")
	}
	if c.MaxSessions < 1 {
		return fmt.Errorf("max-sessions: %d, must be ≥ 1", c.MaxSessions)
	}
	if c.AdvertInterval <= 0 || c.RedialInterval <= 0 {
		return fmt.Errorf("advert/redial interval must be positive (%v, %v)", c.AdvertInterval, c.RedialInterval)
	}
	if c.MaxFrameBytes <= 0 || c.MaxFrameBytes > protocol.MaxFrameBytes {
		return fmt.Errorf("max frame bytes: %d, must be in 1..%d", c.MaxFrameBytes, protocol.MaxFrameBytes)
	}
	return nil
}

// Node is a running node daemon.
type Node struct {
	cfg       Config
	log       *slog.Logger
	host      host.Host
	engine    Engine
	mgr       *Manager
	fp        *fingerprint.Fingerprinter
	bootstrap []peer.AddrInfo
	allowed   map[peer.ID]bool

	cancel  context.CancelFunc
	wg      sync.WaitGroup // goroutines started by Start
	streams sync.WaitGroup // session stream handlers
	ps      *pubsub.PubSub
	topic   *pubsub.Topic
	dht     *dht.IpfsDHT
	mdns    mdns.Service
	kick    chan struct{} // asks for an advert now

	mu       sync.Mutex
	devices  fingerprint.Result
	joined   map[peer.ID]string // coordinator → operator account
	rejected map[peer.ID]bool   // coordinators that refused the token
	stopping bool
	stopped  bool
}

// New creates the node's libp2p host (listening) and session manager.
// Start joins the network.
func New(cfg Config, engine Engine) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("node config: %w", err)
	}
	if engine == nil {
		return nil, errors.New("node config: engine required")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	key, err := LoadOrCreateIdentity(filepath.Join(cfg.DataDir, IdentityFile))
	if err != nil {
		return nil, err
	}
	if cfg.StorageURL == "" {
		cfg.StorageURL = "file://" + filepath.Join(mustAbs(cfg.DataDir), "checkpoints")
	}
	st, err := storage.Open(cfg.StorageURL, cfg.Creds)
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	n := &Node{
		cfg:      cfg,
		log:      log,
		engine:   engine,
		allowed:  make(map[peer.ID]bool),
		joined:   make(map[peer.ID]string),
		rejected: make(map[peer.ID]bool),
		kick:     make(chan struct{}, 1),
	}
	for _, b := range cfg.Bootstrap {
		ai, _ := peer.AddrInfoFromString(b) // checked by Validate
		n.bootstrap = append(n.bootstrap, *ai)
		n.allowed[ai.ID] = true
	}
	n.fp = cfg.Fingerprinter
	if n.fp == nil {
		var why error
		n.fp, why = fingerprint.Detect(cfg.FingerprintInterval)
		if why != nil {
			log.Info("no NVML GPUs; advertising CPU capacity", "reason", why)
		}
	}
	n.mgr = NewManager(ManagerConfig{
		MaxSessions: cfg.MaxSessions,
		Storage:     st,
		TempDir:     "",
		Logger:      log,
	}, engine)
	n.host, err = libp2p.New(
		libp2p.Identity(key),
		libp2p.ListenAddrStrings(cfg.ListenAddrs...),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Transport(quic.NewTransport),
		libp2p.Security(noise.ID, noise.New),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
	)
	if err != nil {
		return nil, fmt.Errorf("libp2p host: %w", err)
	}
	return n, nil
}

func mustAbs(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// PeerID is the node's libp2p peer ID.
func (n *Node) PeerID() string { return n.host.ID().String() }

// Addrs are the node's full multiaddrs (with /p2p/ID).
func (n *Node) Addrs() []string {
	var out []string
	for _, a := range n.host.Addrs() {
		out = append(out, a.String()+"/p2p/"+n.host.ID().String())
	}
	return out
}

// Manager is the node's session manager.
func (n *Node) Manager() *Manager { return n.mgr }

// Host is the node's libp2p host.
func (n *Node) Host() host.Host { return n.host }

// Start serves sessions and starts discovery, joining and adverts; they
// run until Stop.
func (n *Node) Start(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	n.cancel = cancel
	ps, err := pubsub.NewGossipSub(ctx, n.host)
	if err != nil {
		cancel()
		return fmt.Errorf("gossipsub: %w", err)
	}
	n.ps = ps
	if n.topic, err = ps.Join(protocol.CapacityTopic); err != nil {
		cancel()
		return fmt.Errorf("join capacity topic: %w", err)
	}
	if n.cfg.DHT {
		n.dht, err = dht.New(n.host, dht.Mode(dht.ModeAuto), dht.ProtocolPrefix("/signal"),
			dht.BootstrapPeers(n.bootstrap...))
		if err != nil {
			cancel()
			return fmt.Errorf("dht: %w", err)
		}
		if err := n.dht.Bootstrap(ctx); err != nil {
			n.log.Warn("dht bootstrap", "err", err)
		}
	}
	if n.cfg.MDNS {
		n.mdns = mdns.NewMdnsService(n.host, MDNSServiceName, &mdnsNotifee{n: n, ctx: ctx})
		if err := n.mdns.Start(); err != nil {
			n.log.Warn("mdns", "err", err)
		}
	}
	n.host.SetStreamHandler(libp2pproto.ID(protocol.SessionProtocolID), n.handleSession)

	fpCh := n.fp.Fingerprint(ctx)
	n.wg.Add(3)
	go n.consumeFingerprints(ctx, fpCh)
	go n.maintainCoordinators(ctx)
	go n.advertLoop(ctx)
	n.log.Info("node started", "peer", n.PeerID(), "addrs", n.Addrs(), "backend", n.engine.Backend(), "devices", n.fp.Source())
	return nil
}

// Stop shuts down gracefully: it stops taking sessions, lets running calls
// finish, checkpoints open sessions (bounded by DrainTimeout), then leaves
// the network.
func (n *Node) Stop() error {
	n.mu.Lock()
	if n.stopped {
		n.mu.Unlock()
		return nil
	}
	n.stopped, n.stopping = true, true
	n.mu.Unlock()

	n.host.RemoveStreamHandler(libp2pproto.ID(protocol.SessionProtocolID))
	ctx, cancel := context.WithTimeout(context.Background(), n.cfg.DrainTimeout)
	cps := n.mgr.Drain(ctx)
	cancel()
	for run, cp := range cps {
		n.log.Info("checkpointed at shutdown", "run", run, "step", cp.Step, "uri", cp.URI)
	}
	n.reportDrained(cps)
	var errs []error
	if n.topic != nil {
		// Close the topic while pubsub still runs: afterwards it can only
		// report that its context ended.
		if err := n.topic.Close(); err != nil && !errors.Is(err, context.Canceled) {
			errs = append(errs, err)
		}
	}
	if n.cancel != nil {
		n.cancel()
	}
	n.wg.Wait()
	if n.mdns != nil {
		errs = append(errs, n.mdns.Close())
	}
	if n.dht != nil {
		errs = append(errs, n.dht.Close())
	}
	errs = append(errs, n.host.Close())
	n.streams.Wait()
	return errors.Join(errs...)
}

// drainReportTimeout bounds telling the coordinators the drain
// checkpoints: a coordinator that does not answer by then costs its runs
// the steps since their last automatic checkpoint, not the shutdown.
const drainReportTimeout = 10 * time.Second

// reportDrained tells every coordinator this node joined the checkpoints
// it saved while draining, over a direct stream (a GossipSub message
// published while the host closes may never leave), so that its runs
// resume from them on another node. Each coordinator records them through
// raft, so one acknowledgement would do; asking all of them rides out a
// coordinator that is down. Failures are logged: they lose steps, not data.
func (n *Node) reportDrained(cps map[string]protocol.Checkpoint) {
	if len(cps) == 0 {
		return
	}
	rep := protocol.DrainReport{PeerID: n.PeerID(), Checkpoints: make([]protocol.Checkpoint, 0, len(cps))}
	for run, cp := range cps {
		cp.RunID = run
		rep.Checkpoints = append(rep.Checkpoints, cp)
	}
	n.mu.Lock()
	coords := make([]peer.ID, 0, len(n.joined))
	for id := range n.joined {
		coords = append(coords, id)
	}
	n.mu.Unlock()
	if len(coords) == 0 {
		n.log.Warn("drain checkpoints not reported: joined no coordinator", "checkpoints", len(cps))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), drainReportTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, id := range coords {
		wg.Add(1)
		go func(id peer.ID) {
			defer wg.Done()
			recorded, err := n.sendDrainReport(ctx, id, rep)
			if err != nil {
				n.log.Warn("drain checkpoints not reported", "coordinator", id, "err", err)
				return
			}
			n.log.Info("drain checkpoints reported", "coordinator", id, "checkpoints", len(rep.Checkpoints), "recorded", recorded)
		}(id)
	}
	wg.Wait()
}

// sendDrainReport sends rep on a /signal/drained/1 stream and reads the ack.
func (n *Node) sendDrainReport(ctx context.Context, id peer.ID, rep protocol.DrainReport) (int, error) {
	s, err := n.host.NewStream(ctx, id, libp2pproto.ID(protocol.DrainedProtocolID))
	if err != nil {
		return 0, fmt.Errorf("open drained stream: %w", err)
	}
	defer s.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	if err := protocol.WriteFrame(s, protocol.MsgDrainReport, rep); err != nil {
		_ = s.Reset()
		return 0, err
	}
	var ack protocol.DrainAck
	if err := protocol.ReadMessage(s, protocol.MsgDrainAck, 1<<20, &ack); err != nil {
		_ = s.Reset()
		return 0, fmt.Errorf("read drain ack: %w", err)
	}
	if ack.Error != nil {
		return 0, fmt.Errorf("coordinator refused the drain report: %s: %s", ack.Error.Code, ack.Error.Message)
	}
	return ack.Recorded, nil
}

// Kill closes the host without draining: for tests that simulate a crash.
func (n *Node) Kill() {
	n.mu.Lock()
	n.stopped, n.stopping = true, true
	n.mu.Unlock()
	if n.cancel != nil {
		n.cancel()
	}
	_ = n.host.Close()
	n.wg.Wait()
}

// handleSession serves one session stream: a sequence of requests, each
// answered before the next is read. Calls run under the node's lifetime,
// not the stream's, so a call whose caller went away still completes and
// its retry is answered from the request-id cache.
func (n *Node) handleSession(s network.Stream) {
	remote := s.Conn().RemotePeer()
	if len(n.allowed) > 0 && !n.allowed[remote] {
		n.log.Warn("session stream from a peer that is not a coordinator", "peer", remote)
		_ = s.Reset()
		return
	}
	n.mu.Lock()
	if n.stopping {
		n.mu.Unlock()
		_ = s.Reset()
		return
	}
	n.streams.Add(1)
	n.mu.Unlock()
	defer n.streams.Done()
	for {
		t, payload, err := protocol.ReadFrame(s, n.cfg.MaxFrameBytes)
		if errors.Is(err, io.EOF) {
			_ = s.Close()
			return
		}
		if err != nil || t != protocol.MsgSessionRequest {
			if err == nil {
				err = fmt.Errorf("%w: %s", protocol.ErrUnexpectedMsgType, t)
			}
			n.log.Debug("session stream", "peer", remote, "err", err)
			_ = s.Reset()
			return
		}
		var resp protocol.SessionResponse
		req, err := protocol.DecodeSessionRequest(payload)
		switch {
		case err != nil && req.RequestID == "":
			// Nothing to address an answer to: the peer is broken.
			_ = s.Reset()
			return
		case err != nil:
			resp = errorResponse(req.RequestID, fmt.Errorf("%w: %w", ErrInvalidRequest, err))
		default:
			resp = n.mgr.Handle(context.Background(), req)
			if resp.Checkpoint != nil || req.Call == protocol.CallInit || req.Call == protocol.CallClose {
				n.advertSoon()
			}
		}
		if err := protocol.WriteFrame(s, protocol.MsgSessionResponse, resp); err != nil {
			n.log.Debug("session stream write", "peer", remote, "err", err)
			_ = s.Reset()
			return
		}
	}
}

func (n *Node) advertSoon() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

func (n *Node) consumeFingerprints(ctx context.Context, ch <-chan fingerprint.Result) {
	defer n.wg.Done()
	for {
		select {
		case r, ok := <-ch:
			if !ok {
				return
			}
			if r.Err != nil {
				n.log.Warn("fingerprint", "source", r.Source, "err", r.Err)
			}
			n.mu.Lock()
			n.devices = r
			n.mu.Unlock()
			n.advertSoon()
		case <-ctx.Done():
			return
		}
	}
}

// Advert is the capacity advert the node publishes now.
func (n *Node) Advert() protocol.Node {
	n.mu.Lock()
	d := n.devices.Devices
	n.mu.Unlock()
	var backends []string
	// An engine whose worker is down names no backend: advertise none
	// rather than an empty name the coordinator could match.
	if b := n.engine.Backend(); b != "" {
		backends = []string{b}
	}
	var mem map[string]int64
	if r, ok := n.engine.(MemoryReporter); ok {
		mem = r.ModelMemory()
	}
	return protocol.Node{
		ModelMemory: mem,
		PeerID:      n.PeerID(),
		Addrs:       n.Addrs(),
		GPUs:        d.GPUs,
		CPU:         d.CPU,
		Backends:    backends,
		Models:      n.engine.Models(),
		Sessions:    n.mgr.Sessions(),
		MaxSessions: n.cfg.MaxSessions,
		LastSeen:    time.Now().UTC().Format(time.RFC3339Nano),
	}
}

func (n *Node) advertLoop(ctx context.Context) {
	defer n.wg.Done()
	// After a change (joined, session opened) a few adverts go out at a
	// short interval: GossipSub drops a message published before the
	// coordinator's subscription has reached this node, and a newly joined
	// node should be schedulable at once, not one interval later.
	const burstInterval = 150 * time.Millisecond
	burst := 0
	t := time.NewTimer(n.cfg.AdvertInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-n.kick:
			burst = 4
		}
		next := n.cfg.AdvertInterval
		if burst > 0 {
			burst--
			next = min(next, burstInterval)
		}
		t.Reset(next)
		b, err := protocol.EncodeFrame(protocol.MsgAdvert, n.Advert())
		if err != nil {
			n.log.Error("encode advert", "err", err)
			continue
		}
		if err := n.topic.Publish(ctx, b); err != nil && ctx.Err() == nil {
			n.log.Warn("publish advert", "err", err)
		}
	}
}

// maintainCoordinators keeps a connection to every bootstrap coordinator
// and proves the join token on each new connection.
func (n *Node) maintainCoordinators(ctx context.Context) {
	defer n.wg.Done()
	t := time.NewTicker(n.cfg.RedialInterval)
	defer t.Stop()
	for {
		for _, ai := range n.bootstrap {
			n.maintainOne(ctx, ai)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (n *Node) maintainOne(ctx context.Context, ai peer.AddrInfo) {
	n.mu.Lock()
	rejected := n.rejected[ai.ID]
	_, joined := n.joined[ai.ID]
	n.mu.Unlock()
	if rejected {
		return
	}
	if n.host.Network().Connectedness(ai.ID) != network.Connected {
		n.mu.Lock()
		delete(n.joined, ai.ID) // a new connection proves the token again
		n.mu.Unlock()
		joined = false
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := n.host.Connect(cctx, ai)
		cancel()
		if err != nil {
			n.log.Debug("dial coordinator", "peer", ai.ID, "err", err)
			return
		}
	}
	if joined {
		return
	}
	op, err := n.join(ctx, ai.ID)
	var rej *joinRejectedError
	switch {
	case errors.As(err, &rej):
		n.log.Error("coordinator refused the join token", "peer", ai.ID, "err", err)
		n.mu.Lock()
		n.rejected[ai.ID] = true
		n.mu.Unlock()
	case err != nil:
		n.log.Warn("join coordinator", "peer", ai.ID, "err", err)
	default:
		n.log.Info("joined coordinator", "peer", ai.ID, "operator", op)
		n.mu.Lock()
		n.joined[ai.ID] = op
		n.mu.Unlock()
		n.advertSoon()
	}
}

// joinRejectedError is a coordinator's refusal of the token: retrying with
// the same token cannot succeed.
type joinRejectedError struct{ body protocol.ErrorBody }

func (e *joinRejectedError) Error() string { return e.body.Code + ": " + e.body.Message }

func (n *Node) join(ctx context.Context, coord peer.ID) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s, err := n.host.NewStream(ctx, coord, libp2pproto.ID(protocol.JoinProtocolID))
	if err != nil {
		return "", fmt.Errorf("open join stream: %w", err)
	}
	defer s.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	if err := protocol.WriteFrame(s, protocol.MsgJoinRequest, protocol.JoinRequest{JoinToken: n.cfg.JoinToken}); err != nil {
		_ = s.Reset()
		return "", err
	}
	var resp protocol.JoinResponse
	if err := protocol.ReadMessage(s, protocol.MsgJoinResponse, 1<<16, &resp); err != nil {
		_ = s.Reset()
		return "", fmt.Errorf("join response: %w", err)
	}
	if resp.Error != nil {
		if resp.Error.Code == protocol.CodeUnauthorized || resp.Error.Code == protocol.CodeForbidden {
			return "", &joinRejectedError{*resp.Error}
		}
		return "", fmt.Errorf("join: %s: %s", resp.Error.Code, resp.Error.Message)
	}
	return resp.Operator, nil
}

// Joined reports the coordinators this node has proven its token to.
func (n *Node) Joined() map[string]string {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]string, len(n.joined))
	for p, op := range n.joined {
		out[p.String()] = op
	}
	return out
}

type mdnsNotifee struct {
	n   *Node
	ctx context.Context
}

// HandlePeerFound connects to LAN peers so that GossipSub can reach them.
func (m *mdnsNotifee) HandlePeerFound(ai peer.AddrInfo) {
	if ai.ID == m.n.host.ID() {
		return
	}
	ctx, cancel := context.WithTimeout(m.ctx, 5*time.Second)
	defer cancel()
	if err := m.n.host.Connect(ctx, ai); err != nil {
		m.n.log.Debug("mdns connect", "peer", ai.ID, "err", err)
	}
}
