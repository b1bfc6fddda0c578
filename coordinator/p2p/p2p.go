// Package p2p is the coordinator's side of the node network: a libp2p host
// that nodes bootstrap to. It verifies join tokens (through a Registry the
// coordinator implements over raft), keeps a soft-state table of live nodes
// from their signed GossipSub capacity adverts, and carries session calls
// to nodes over /signal/session/1 streams. *Host implements the
// coordinator's Backend interface (Nodes, Do).
package p2p

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	yamux "github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/signal-p2p/signal/protocol"
)

// Registry records which peers have joined; the coordinator implements it
// through raft so that every coordinator agrees.
type Registry interface {
	// AdmitNode verifies joinToken and records peerID as a joined node,
	// returning the operator account its earnings go to. Registering a
	// peer again with a valid token succeeds (nodes prove their token on
	// every connection, to every coordinator). A bad token must return an
	// error wrapping ErrInvalidJoinToken; other errors are taken as
	// transient (no leader yet) and the node retries.
	AdmitNode(ctx context.Context, peerID, joinToken string) (operator string, err error)
	// IsJoined reports whether peerID has joined.
	IsJoined(peerID string) bool
}

// DrainRecorder records the checkpoints a node saved while stopping
// gracefully, so that its runs resume from them on another node. The
// coordinator implements it through raft, next to Registry; a Registry
// that also implements DrainRecorder gets drain reports, otherwise they
// are refused (the node logs it and its runs resume from their last
// automatic checkpoint).
type DrainRecorder interface {
	// RecordDrained records each checkpoint for its run when the run is
	// still assigned to peerID and the checkpoint is not older than the
	// run's recorded step; it returns how many it recorded. Checkpoints it
	// declines are not an error; an error means none could be considered
	// (no leader, say).
	RecordDrained(ctx context.Context, peerID string, cps []protocol.Checkpoint) (recorded int, err error)
}

// Errors of this package.
var (
	// ErrNodeLost means the node is unreachable or its stream broke. The
	// coordinator matches it with errors.Is (coordinator.ErrNodeLost is
	// this same value).
	ErrNodeLost = errors.New("node lost")
	// ErrNotJoined means the peer has not proven a join token: it is not served.
	ErrNotJoined = errors.New("node has not joined")
	// ErrInvalidJoinToken is what a Registry wraps for a token it refuses.
	ErrInvalidJoinToken = errors.New("invalid join token")
	// ErrBadResponse means a node answered with something that is not a
	// response to the request sent.
	ErrBadResponse = errors.New("bad response from node")
	// ErrResponseTooLarge means a node's answer is over MaxFrameBytes.
	ErrResponseTooLarge = errors.New("node's answer over the frame limit")
)

// IdentityFile is the name of the coordinator's libp2p key in its data dir.
const IdentityFile = "p2p-identity.key"

// Config configures a Host.
type Config struct {
	// DataDir keeps the identity key, so the coordinator's multiaddr (which
	// nodes are configured with) survives restarts.
	DataDir string
	// ListenAddrs default to TCP and QUIC on all interfaces, random ports.
	ListenAddrs []string
	// NodeTTL is how long a node stays listed after its last advert. A
	// node whose every connection to this host closed is unlisted at once
	// (until it reconnects or adverts again): a dead process's sockets
	// close, so only a silent death (machine, network) waits for the TTL.
	NodeTTL time.Duration
	// MaxIdleStreams bounds the pooled session streams per node.
	MaxIdleStreams int
	// MaxFrameBytes bounds a session response.
	MaxFrameBytes int
	// DHT runs a Kademlia DHT server for nodes that use one.
	DHT    bool
	Logger *slog.Logger
}

// DefaultConfig returns the defaults: nodes advertise every 2 s, so 6 s
// without an advert (three missed) makes a node lost.
func DefaultConfig() Config {
	return Config{
		ListenAddrs:    []string{"/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"},
		NodeTTL:        6 * time.Second,
		MaxIdleStreams: 16,
		MaxFrameBytes:  protocol.MaxFrameBytes,
	}
}

// Validate names the first bad field.
func (c *Config) Validate() error {
	if c.DataDir == "" {
		return errors.New("p2p data dir: required")
	}
	if len(c.ListenAddrs) == 0 {
		return errors.New("p2p listen: at least one address required")
	}
	for _, a := range c.ListenAddrs {
		if _, err := ma.NewMultiaddr(a); err != nil {
			return fmt.Errorf("p2p listen: %q: %w", a, err)
		}
	}
	if c.NodeTTL <= 0 {
		return fmt.Errorf("p2p node ttl: %v, must be positive", c.NodeTTL)
	}
	if c.MaxIdleStreams < 0 {
		return fmt.Errorf("p2p max idle streams: %d", c.MaxIdleStreams)
	}
	if c.MaxFrameBytes <= 0 || c.MaxFrameBytes > protocol.MaxFrameBytes {
		return fmt.Errorf("p2p max frame bytes: %d, must be in 1..%d", c.MaxFrameBytes, protocol.MaxFrameBytes)
	}
	return nil
}

// Host is the coordinator's libp2p host.
type Host struct {
	cfg  Config
	reg  Registry
	log  *slog.Logger
	host host.Host

	cancel context.CancelFunc
	wg     sync.WaitGroup
	ps     *pubsub.PubSub
	topic  *pubsub.Topic
	sub    *pubsub.Subscription
	dht    *dht.IpfsDHT

	mu        sync.Mutex
	nodes     map[peer.ID]*nodeEntry
	operators map[peer.ID]string
	idle      map[peer.ID][]network.Stream
	now       func() time.Time
	notify    *network.NotifyBundle
}

type nodeEntry struct {
	advert protocol.Node
	seen   time.Time
	// disconnected: every connection to the node closed since its last
	// advert; it is not listed nor called until it reconnects or adverts.
	disconnected bool
}

// New creates the host and starts listening; Start subscribes to adverts.
func New(cfg Config, reg Registry) (*Host, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if reg == nil {
		return nil, errors.New("p2p: registry required")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	key, err := loadOrCreateIdentity(filepath.Join(cfg.DataDir, IdentityFile))
	if err != nil {
		return nil, err
	}
	h, err := libp2p.New(
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
	return &Host{
		cfg:       cfg,
		reg:       reg,
		log:       log,
		host:      h,
		nodes:     make(map[peer.ID]*nodeEntry),
		operators: make(map[peer.ID]string),
		idle:      make(map[peer.ID][]network.Stream),
		now:       time.Now,
	}, nil
}

// PeerID is the coordinator's peer ID.
func (h *Host) PeerID() string { return h.host.ID().String() }

// Addrs are the full multiaddrs (with /p2p/ID) nodes bootstrap to.
func (h *Host) Addrs() []string {
	var out []string
	for _, a := range h.host.Addrs() {
		out = append(out, a.String()+"/p2p/"+h.host.ID().String())
	}
	return out
}

// Start serves joins and follows the capacity topic until Stop.
func (h *Host) Start(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	h.cancel = cancel
	ps, err := pubsub.NewGossipSub(ctx, h.host)
	if err != nil {
		cancel()
		return fmt.Errorf("gossipsub: %w", err)
	}
	h.ps = ps
	if err := ps.RegisterTopicValidator(protocol.CapacityTopic, h.validateAdvert); err != nil {
		cancel()
		return fmt.Errorf("advert validator: %w", err)
	}
	if h.topic, err = ps.Join(protocol.CapacityTopic); err != nil {
		cancel()
		return fmt.Errorf("join capacity topic: %w", err)
	}
	if h.sub, err = h.topic.Subscribe(); err != nil {
		cancel()
		return fmt.Errorf("subscribe capacity topic: %w", err)
	}
	if h.cfg.DHT {
		if h.dht, err = dht.New(h.host, dht.Mode(dht.ModeServer), dht.ProtocolPrefix("/signal")); err != nil {
			cancel()
			return fmt.Errorf("dht: %w", err)
		}
	}
	h.host.SetStreamHandler(libp2pproto.ID(protocol.JoinProtocolID), h.handleJoin)
	h.host.SetStreamHandler(libp2pproto.ID(protocol.DrainedProtocolID), h.handleDrained)
	h.notify = &network.NotifyBundle{ConnectedF: h.connected, DisconnectedF: h.disconnected}
	h.host.Network().Notify(h.notify)
	h.wg.Add(2)
	go h.readAdverts(ctx)
	go h.sweep(ctx)
	h.log.Info("coordinator p2p host started", "peer", h.PeerID(), "addrs", h.Addrs())
	return nil
}

// Stop closes the host and waits for its goroutines.
func (h *Host) Stop() error {
	h.host.RemoveStreamHandler(libp2pproto.ID(protocol.JoinProtocolID))
	h.host.RemoveStreamHandler(libp2pproto.ID(protocol.DrainedProtocolID))
	if h.notify != nil {
		h.host.Network().StopNotify(h.notify)
	}
	var errs []error
	if h.sub != nil {
		h.sub.Cancel()
	}
	if h.topic != nil {
		// Close the topic while pubsub still runs: afterwards it can only
		// report that its context ended.
		if err := h.topic.Close(); err != nil && !errors.Is(err, context.Canceled) {
			errs = append(errs, err)
		}
	}
	if h.cancel != nil {
		h.cancel()
	}
	h.wg.Wait()
	h.mu.Lock()
	for p, ss := range h.idle {
		for _, s := range ss {
			_ = s.Reset()
		}
		delete(h.idle, p)
	}
	h.mu.Unlock()
	if h.dht != nil {
		errs = append(errs, h.dht.Close())
	}
	errs = append(errs, h.host.Close())
	return errors.Join(errs...)
}

// validateAdvert lets through only well-formed adverts that their author
// signed about itself and whose author has joined; GossipSub's strict
// signing has already checked the signature. Other joined coordinators
// forward only what passes, so an un-joined peer cannot flood the topic.
func (h *Host) validateAdvert(_ context.Context, _ peer.ID, msg *pubsub.Message) pubsub.ValidationResult {
	t, payload, err := protocol.DecodeFrame(msg.Data, 1<<20)
	if err != nil || t != protocol.MsgAdvert {
		return pubsub.ValidationReject
	}
	adv, err := protocol.DecodeAdvert(payload)
	if err != nil {
		return pubsub.ValidationReject
	}
	author := msg.GetFrom()
	if adv.PeerID != author.String() {
		return pubsub.ValidationReject
	}
	if !h.reg.IsJoined(author.String()) {
		return pubsub.ValidationIgnore
	}
	msg.ValidatorData = adv
	return pubsub.ValidationAccept
}

func (h *Host) readAdverts(ctx context.Context) {
	defer h.wg.Done()
	for {
		msg, err := h.sub.Next(ctx)
		if err != nil {
			return // ctx ended or subscription cancelled
		}
		adv, ok := msg.ValidatorData.(protocol.Node)
		if !ok {
			continue
		}
		id := msg.GetFrom()
		for _, a := range adv.Addrs {
			if ai, err := peer.AddrInfoFromString(a); err == nil && ai.ID == id {
				h.host.Peerstore().AddAddrs(id, ai.Addrs, peerstore.RecentlyConnectedAddrTTL)
			}
		}
		h.mu.Lock()
		h.nodes[id] = &nodeEntry{advert: adv, seen: h.now()}
		h.mu.Unlock()
	}
}

// connected clears a node's disconnected mark: it is reachable again.
func (h *Host) connected(_ network.Network, c network.Conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e, ok := h.nodes[c.RemotePeer()]; ok {
		e.disconnected = false
	}
}

// disconnected unlists a node once its last connection to this host
// closed, so that a node whose process died is lost in moments rather than
// after NodeTTL. Its pooled streams died with the connection.
func (h *Host) disconnected(n network.Network, c network.Conn) {
	id := c.RemotePeer()
	if n.Connectedness(id) == network.Connected {
		return // another connection remains
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	e, ok := h.nodes[id]
	if !ok {
		return
	}
	if !e.disconnected {
		h.log.Info("node disconnected; unlisted until it reconnects or adverts", "peer", id)
	}
	e.disconnected = true
	for _, s := range h.idle[id] {
		_ = s.Reset()
	}
	delete(h.idle, id)
}

// sweep forgets nodes long expired, so the table stays bounded.
func (h *Host) sweep(ctx context.Context) {
	defer h.wg.Done()
	t := time.NewTicker(h.cfg.NodeTTL)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		h.mu.Lock()
		for id, e := range h.nodes {
			if h.now().Sub(e.seen) > 10*h.cfg.NodeTTL {
				delete(h.nodes, id)
			}
		}
		h.mu.Unlock()
	}
}

// Nodes lists the live, joined nodes (advert seen within NodeTTL), by peer ID.
func (h *Host) Nodes() []protocol.Node {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	out := make([]protocol.Node, 0, len(h.nodes))
	for id, e := range h.nodes {
		if e.disconnected || now.Sub(e.seen) > h.cfg.NodeTTL || !h.reg.IsJoined(id.String()) {
			continue
		}
		n := e.advert
		n.LastSeen = e.seen.UTC().Format(time.RFC3339Nano)
		if op, ok := h.operators[id]; ok {
			n.Operator = op
		}
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PeerID < out[j].PeerID })
	return out
}

// live reports whether the node adverted within NodeTTL. A node marked
// disconnected still counts: Do redials it (briefly) rather than fail a
// call on a connection that may just have dropped.
func (h *Host) live(id peer.ID) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	e, ok := h.nodes[id]
	return ok && h.now().Sub(e.seen) <= h.cfg.NodeTTL
}

// redialTimeout bounds the dial of a call to a node this host has no
// connection to. A live node keeps connections to its coordinators (it
// redials them every second), so this is mostly a node whose connections
// just closed: alive, it answers a dial in milliseconds; dead, a dial can
// wait out QUIC's handshake timeout while the call's client waits for the
// run to move.
const redialTimeout = 2 * time.Second

func (h *Host) handleJoin(s network.Stream) {
	defer s.Close()
	remote := s.Conn().RemotePeer()
	_ = s.SetDeadline(time.Now().Add(30 * time.Second))
	var req protocol.JoinRequest
	if err := protocol.ReadMessage(s, protocol.MsgJoinRequest, 4096, &req); err != nil {
		h.log.Warn("join: bad request", "peer", remote, "err", err)
		_ = s.Reset()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var resp protocol.JoinResponse
	op, err := h.reg.AdmitNode(ctx, remote.String(), req.JoinToken)
	switch {
	case errors.Is(err, ErrInvalidJoinToken):
		h.log.Warn("join refused", "peer", remote, "err", err)
		resp.Error = &protocol.ErrorBody{Code: protocol.CodeUnauthorized, Message: err.Error()}
	case err != nil:
		h.log.Warn("join failed", "peer", remote, "err", err)
		resp.Error = &protocol.ErrorBody{Code: protocol.CodeUnavailable, Message: err.Error()}
	default:
		h.log.Info("node joined", "peer", remote, "operator", op)
		resp.Operator = op
		h.mu.Lock()
		h.operators[remote] = op
		h.mu.Unlock()
	}
	if err := protocol.WriteFrame(s, protocol.MsgJoinResponse, resp); err != nil {
		_ = s.Reset()
	}
}

// maxDrainReportBytes bounds a drain report: up to 1024 checkpoints of a
// few files each.
const maxDrainReportBytes = 4 << 20

// handleDrained takes a stopping node's drain report: only from a joined
// peer, about itself, and only when the registry records them.
func (h *Host) handleDrained(s network.Stream) {
	defer s.Close()
	remote := s.Conn().RemotePeer()
	_ = s.SetDeadline(time.Now().Add(30 * time.Second))
	var req protocol.DrainReport
	if err := protocol.ReadMessage(s, protocol.MsgDrainReport, maxDrainReportBytes, &req); err != nil {
		h.log.Warn("drain report: bad request", "peer", remote, "err", err)
		_ = s.Reset()
		return
	}
	var ack protocol.DrainAck
	rec, canRecord := h.reg.(DrainRecorder)
	switch {
	case !h.reg.IsJoined(remote.String()):
		h.log.Warn("drain report from a peer that has not joined", "peer", remote)
		ack.Error = &protocol.ErrorBody{Code: protocol.CodeUnauthorized, Message: ErrNotJoined.Error()}
	case req.PeerID != remote.String():
		h.log.Warn("drain report about another peer", "peer", remote, "about", req.PeerID)
		ack.Error = &protocol.ErrorBody{Code: protocol.CodeInvalidRequest, Message: fmt.Sprintf("peer_id: %q is not the sender %s", req.PeerID, remote)}
	case !canRecord:
		ack.Error = &protocol.ErrorBody{Code: protocol.CodeUnavailable, Message: "this coordinator does not record drain reports"}
	default:
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		n, err := rec.RecordDrained(ctx, remote.String(), req.Checkpoints)
		cancel()
		if err != nil {
			h.log.Warn("drain report not recorded", "peer", remote, "err", err)
			ack.Error = &protocol.ErrorBody{Code: protocol.CodeUnavailable, Message: err.Error()}
		} else {
			h.log.Info("drain report recorded", "peer", remote, "checkpoints", len(req.Checkpoints), "recorded", n)
			ack.Recorded = n
		}
	}
	if err := protocol.WriteFrame(s, protocol.MsgDrainAck, ack); err != nil {
		_ = s.Reset()
	}
}

// lost wraps ErrNodeLost around a cause.
func (h *Host) lost(id peer.ID, cause error) error {
	return fmt.Errorf("%w: node %s: %w", ErrNodeLost, id, cause)
}

// Do sends one session call to a node and returns its response. Errors
// wrapping ErrNodeLost mean the node is gone (not advertising, or the
// stream broke); a cancelled ctx returns ctx's error. A node's own error
// answer is a successful Do with resp.Error set.
func (h *Host) Do(ctx context.Context, nodePeerID string, req protocol.SessionRequest) (protocol.SessionResponse, error) {
	id, err := peer.Decode(nodePeerID)
	if err != nil {
		return protocol.SessionResponse{}, fmt.Errorf("node peer id %q: %w", nodePeerID, err)
	}
	if err := req.Validate(); err != nil {
		return protocol.SessionResponse{}, fmt.Errorf("session request: %w", err)
	}
	if !h.reg.IsJoined(nodePeerID) {
		return protocol.SessionResponse{}, fmt.Errorf("%w: %s", ErrNotJoined, nodePeerID)
	}
	if !h.live(id) {
		return protocol.SessionResponse{}, h.lost(id, fmt.Errorf("no advert within %v", h.cfg.NodeTTL))
	}
	dialCtx := ctx
	if h.host.Network().Connectedness(id) != network.Connected {
		var cancel context.CancelFunc
		dialCtx, cancel = context.WithTimeout(ctx, redialTimeout)
		defer cancel()
	}
	s, err := h.stream(dialCtx, id)
	if err != nil {
		if ctx.Err() != nil {
			return protocol.SessionResponse{}, ctx.Err()
		}
		return protocol.SessionResponse{}, h.lost(id, err)
	}
	// A cancelled ctx resets the stream, unblocking the read below.
	stop := context.AfterFunc(ctx, func() { _ = s.Reset() })
	resp, err := roundTrip(s, req, h.cfg.MaxFrameBytes)
	if !stop() || err != nil {
		_ = s.Reset()
		if ctx.Err() != nil {
			return protocol.SessionResponse{}, ctx.Err()
		}
		if errors.Is(err, ErrBadResponse) || errors.Is(err, ErrResponseTooLarge) {
			return protocol.SessionResponse{}, err
		}
		return protocol.SessionResponse{}, h.lost(id, err)
	}
	h.release(id, s)
	return resp, nil
}

func roundTrip(s network.Stream, req protocol.SessionRequest, maxBytes int) (protocol.SessionResponse, error) {
	if err := protocol.WriteFrame(s, protocol.MsgSessionRequest, req); err != nil {
		return protocol.SessionResponse{}, err
	}
	t, payload, err := protocol.ReadFrame(s, maxBytes)
	if errors.Is(err, protocol.ErrFrameTooLarge) {
		// The node is alive and answered; its answer is too big to take.
		// Treating that as a lost node would let any caller move its run
		// (and everyone's on that node) at will.
		return protocol.SessionResponse{}, fmt.Errorf("%w: %w", ErrResponseTooLarge, err)
	}
	if err != nil {
		return protocol.SessionResponse{}, fmt.Errorf("read response: %w", err)
	}
	if t != protocol.MsgSessionResponse {
		return protocol.SessionResponse{}, fmt.Errorf("%w: %s frame", ErrBadResponse, t)
	}
	resp, err := protocol.DecodeSessionResponse(payload)
	if err != nil {
		return protocol.SessionResponse{}, fmt.Errorf("%w: %w", ErrBadResponse, err)
	}
	if resp.RequestID != req.RequestID {
		return protocol.SessionResponse{}, fmt.Errorf("%w: answers request %q, sent %q", ErrBadResponse, resp.RequestID, req.RequestID)
	}
	return resp, nil
}

// stream takes an idle session stream to the node or opens one. Pooling
// saves the protocol negotiation round trip on every call.
func (h *Host) stream(ctx context.Context, id peer.ID) (network.Stream, error) {
	h.mu.Lock()
	for ss := h.idle[id]; len(ss) > 0; ss = h.idle[id] {
		s := ss[len(ss)-1]
		h.idle[id] = ss[:len(ss)-1]
		if s.Conn().IsClosed() {
			_ = s.Reset()
			continue
		}
		h.mu.Unlock()
		return s, nil
	}
	h.mu.Unlock()
	return h.host.NewStream(ctx, id, libp2pproto.ID(protocol.SessionProtocolID))
}

func (h *Host) release(id peer.ID, s network.Stream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.idle[id]) >= h.cfg.MaxIdleStreams {
		_ = s.Close()
		return
	}
	h.idle[id] = append(h.idle[id], s)
}

func loadOrCreateIdentity(path string) (crypto.PrivKey, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		k, err := crypto.UnmarshalPrivateKey(b)
		if err != nil {
			return nil, fmt.Errorf("p2p identity key %s: %w", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("p2p identity key: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate p2p identity key: %w", err)
	}
	if b, err = crypto.MarshalPrivateKey(k); err != nil {
		return nil, fmt.Errorf("encode p2p identity key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("p2p identity key dir: %w", err)
	}
	if err := os.WriteFile(path+".tmp", b, 0o600); err != nil {
		return nil, fmt.Errorf("write p2p identity key: %w", err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return nil, fmt.Errorf("write p2p identity key: %w", err)
	}
	return k, nil
}
