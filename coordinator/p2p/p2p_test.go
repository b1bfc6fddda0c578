package p2p_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/minio/minio-go/v7"

	"github.com/signal-p2p/signal/coordinator/p2p"
	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/fingerprint"
	"github.com/signal-p2p/signal/node/miniotest"
	"github.com/signal-p2p/signal/node/nodetest"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

var loopback = []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}

// fakeRegistry is a Registry from function fields; the default accepts the
// token "good-token" for operator "op-1".
type fakeRegistry struct {
	mu       sync.Mutex
	joined   map[string]string
	Register func(peerID, token string) (string, error)
}

var _ p2p.Registry = (*fakeRegistry)(nil)

func newRegistry() *fakeRegistry {
	return &fakeRegistry{joined: make(map[string]string), Register: func(_, token string) (string, error) {
		if token != "good-token" {
			return "", fmt.Errorf("%w: %q", p2p.ErrInvalidJoinToken, token)
		}
		return "op-1", nil
	}}
}

func (r *fakeRegistry) AdmitNode(_ context.Context, peerID, token string) (string, error) {
	op, err := r.Register(peerID, token)
	if err != nil {
		return "", err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.joined[peerID] = op
	return op, nil
}

func (r *fakeRegistry) IsJoined(peerID string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.joined[peerID]
	return ok
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func startCoordinator(t testing.TB, reg p2p.Registry) *p2p.Host {
	t.Helper()
	return startCoordinatorWith(t, reg, nil)
}

// startCoordinatorWith starts a coordinator host whose config mod adjusts.
func startCoordinatorWith(t testing.TB, reg p2p.Registry, mod func(*p2p.Config)) *p2p.Host {
	t.Helper()
	cfg := p2p.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.ListenAddrs = loopback
	cfg.NodeTTL = 2 * time.Second
	cfg.Logger = quietLogger()
	if mod != nil {
		mod(&cfg)
	}
	h, err := p2p.New(cfg, reg)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Stop() })
	return h
}

type nodeOpts struct {
	token      string
	storageURL string
	creds      storage.Credentials
	dht        bool
}

func startNode(t testing.TB, coord *p2p.Host, o nodeOpts) (*node.Node, *nodetest.Engine) {
	t.Helper()
	cfg := node.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.ListenAddrs = loopback
	cfg.Bootstrap = coord.Addrs()
	cfg.JoinToken = o.token
	cfg.StorageURL = o.storageURL
	cfg.Creds = o.creds
	cfg.DHT = o.dht
	cfg.MDNS = false
	cfg.AdvertInterval = 200 * time.Millisecond
	cfg.RedialInterval = 200 * time.Millisecond
	cfg.DrainTimeout = 5 * time.Second
	cfg.Logger = quietLogger()
	cfg.Fingerprinter = fingerprint.New(fingerprint.CPUSource{}, time.Second)
	eng := &nodetest.Engine{}
	n, err := node.New(cfg, eng)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Stop() })
	return n, eng
}

func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func listed(h *p2p.Host, peerID string) (protocol.Node, bool) {
	for _, n := range h.Nodes() {
		if n.PeerID == peerID {
			return n, true
		}
	}
	return protocol.Node{}, false
}

func TestJoinedNodeAdvertsAndUnjoinedIgnored(t *testing.T) {
	reg := newRegistry()
	coord := startCoordinator(t, reg)
	good, _ := startNode(t, coord, nodeOpts{token: "good-token"})
	bad, _ := startNode(t, coord, nodeOpts{token: "stolen-token"})

	took := waitFor(t, 10*time.Second, "joined node's advert", func() bool { _, ok := listed(coord, good.PeerID()); return ok })
	t.Logf("node start → advert listed: %v", took)
	n, _ := listed(coord, good.PeerID())
	if n.CPU.Cores <= 0 || n.CPU.MemoryTotal <= 0 || len(n.Backends) != 1 || n.Backends[0] != "fake" ||
		len(n.Models) != 1 || n.MaxSessions != 8 || n.Operator != "op-1" || len(n.Addrs) == 0 || n.LastSeen == "" {
		t.Fatalf("advert = %+v", n)
	}
	if got := good.Joined(); got[coord.PeerID()] != "op-1" {
		t.Fatalf("good node joined = %v", got)
	}
	// The bad node is connected and publishing, but never listed or served.
	time.Sleep(1 * time.Second)
	if _, ok := listed(coord, bad.PeerID()); ok {
		t.Fatal("node with a refused token is listed")
	}
	if len(bad.Joined()) != 0 {
		t.Fatalf("bad node joined = %v", bad.Joined())
	}
	_, err := coord.Do(context.Background(), bad.PeerID(), protocol.SessionRequest{RequestID: "r", RunID: "x", Call: protocol.CallClose})
	if !errors.Is(err, p2p.ErrNotJoined) {
		t.Fatalf("Do to un-joined node err = %v, want ErrNotJoined", err)
	}
}

// caller issues session calls with fresh request ids.
type caller struct {
	t     *testing.T
	coord *p2p.Host
	node  string
	run   string
	n     int
}

func (c *caller) do(call protocol.Call, body any) protocol.SessionResponse {
	c.t.Helper()
	c.n++
	return c.doID(fmt.Sprintf("req-%d", c.n), call, body)
}

func (c *caller) doID(id string, call protocol.Call, body any) protocol.SessionResponse {
	c.t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := c.coord.Do(ctx, c.node, protocol.SessionRequest{RequestID: id, RunID: c.run, Call: call, Body: b})
	if err != nil {
		c.t.Fatalf("%s: %v", call, err)
	}
	return resp
}

func (c *caller) ok(call protocol.Call, body, out any) protocol.SessionResponse {
	c.t.Helper()
	resp := c.do(call, body)
	if resp.Error != nil {
		c.t.Fatalf("%s: node error %+v", call, *resp.Error)
	}
	if out != nil {
		if err := json.Unmarshal(resp.Body, out); err != nil {
			c.t.Fatalf("%s body: %v", call, err)
		}
	}
	return resp
}

func datum(n int) protocol.Datum {
	toks := make([]int, n)
	w := make([]float64, n)
	for i := range toks {
		toks[i], w[i] = i+1, 1
	}
	return protocol.Datum{ModelInput: protocol.ModelInput{Tokens: toks}, LossFnInputs: protocol.LossFnInputs{TargetTokens: toks, Weights: w}}
}

func startJoined(t *testing.T, o nodeOpts) (*p2p.Host, *node.Node, *nodetest.Engine) {
	t.Helper()
	coord := startCoordinator(t, newRegistry())
	o.token = "good-token"
	n, eng := startNode(t, coord, o)
	waitFor(t, 10*time.Second, "node listed", func() bool { _, ok := listed(coord, n.PeerID()); return ok })
	return coord, n, eng
}

func TestSessionRoundTripAndFileCheckpoints(t *testing.T) {
	store := t.TempDir()
	coord, n, eng := startJoined(t, nodeOpts{storageURL: "file://" + store})
	c := &caller{t: t, coord: coord, node: n.PeerID(), run: "run-1"}

	var st protocol.SessionState
	c.ok(protocol.CallInit, protocol.SessionSpec{RunID: "run-1", BaseModel: "tiny", LoRARank: 8, CheckpointEvery: 2}, &st)
	if st.RunID != "run-1" || st.Step != 0 || st.Backend != "fake" {
		t.Fatalf("init state = %+v", st)
	}
	// A repeated request id runs once and gets the first answer.
	fb := protocol.ForwardBackwardRequest{Data: []protocol.Datum{datum(5), datum(7)}}
	r1 := c.doID("fb-1", protocol.CallForwardBackward, fb)
	r2 := c.doID("fb-1", protocol.CallForwardBackward, fb)
	if eng.Calls(protocol.CallForwardBackward) != 1 || !bytes.Equal(r1.Body, r2.Body) || r1.Usage.TrainTokens != 12 {
		t.Fatalf("repeat executed %d times; usage %+v", eng.Calls(protocol.CallForwardBackward), r1.Usage)
	}
	var os1 protocol.OptimStepResponse
	if resp := c.ok(protocol.CallOptimStep, protocol.OptimStepRequest{}, &os1); resp.Checkpoint != nil || os1.Step != 1 {
		t.Fatalf("step 1: %+v, checkpoint %v", os1, resp.Checkpoint)
	}
	c.ok(protocol.CallForwardBackward, fb, nil)
	auto := c.ok(protocol.CallOptimStep, protocol.OptimStepRequest{}, nil)
	if auto.Checkpoint == nil || auto.Checkpoint.Step != 2 || auto.Checkpoint.Mode != "full" || auto.Usage.StoredBytes == 0 {
		t.Fatalf("automatic checkpoint at step 2 = %+v (usage %+v)", auto.Checkpoint, auto.Usage)
	}
	var sample protocol.SampleResponse
	c.ok(protocol.CallSample, protocol.SampleRequest{Prompts: []protocol.Prompt{{Tokens: []int{1}}}, SamplingParams: protocol.SamplingParams{MaxTokens: 4}}, &sample)
	if len(sample.Samples) != 1 || len(sample.Samples[0][0].Tokens) != 4 || sample.Samples[0][0].Tokens[0] != 24 {
		t.Fatalf("sample = %+v", sample)
	}

	var saved protocol.SaveStateResponse
	resp := c.ok(protocol.CallSaveState, protocol.SaveStateRequest{Mode: "adapter"}, &saved)
	cp := saved.Checkpoint
	if resp.Checkpoint == nil || resp.Checkpoint.ID != cp.ID || cp.Step != 2 || cp.Mode != "adapter" || len(cp.Files) != 2 ||
		!strings.HasPrefix(cp.URI, "file://"+store) {
		t.Fatalf("save_state = %+v", cp)
	}
	// Every stored file's bytes hash to its CID.
	for _, f := range cp.Files {
		b, err := os.ReadFile(filepath.Join(store, f.CID))
		if err != nil || storage.NewCID(b).String() != f.CID || int64(len(b)) != f.Size {
			t.Fatalf("stored %s does not verify (err %v)", f.Name, err)
		}
	}

	// Train further, then restore the checkpoint by CID: the step goes back.
	c.ok(protocol.CallForwardBackward, fb, nil)
	c.ok(protocol.CallOptimStep, protocol.OptimStepRequest{}, nil)
	c.ok(protocol.CallLoadState, protocol.LoadStateRequest{Checkpoint: cp.ID}, &st)
	if st.Step != 2 {
		t.Fatalf("after load_state step = %d, want 2", st.Step)
	}
	c.ok(protocol.CallLoadState, protocol.LoadStateRequest{Checkpoint: cp.URI}, &st)

	// Tamper with the adapter file: load_state fails with a clear error.
	var adapter protocol.CheckpointFile
	for _, f := range cp.Files {
		if f.Name == "adapter_model.safetensors" {
			adapter = f
		}
	}
	if err := os.WriteFile(filepath.Join(store, adapter.CID), []byte(`{"step":99}`), 0o644); err != nil {
		t.Fatal(err)
	}
	bad := c.do(protocol.CallLoadState, protocol.LoadStateRequest{Checkpoint: cp.ID})
	if bad.Error == nil || bad.Error.Code != protocol.CodeInvalidRequest || !strings.Contains(bad.Error.Message, "does not match its cid") {
		t.Fatalf("tampered load_state = %+v", bad.Error)
	}

	// Errors map to API codes.
	if e := c.do(protocol.CallSaveState, protocol.SaveStateRequest{Mode: "everything"}).Error; e == nil || e.Code != protocol.CodeInvalidRequest {
		t.Fatalf("bad mode error = %+v", e)
	}
	other := &caller{t: t, coord: coord, node: n.PeerID(), run: "nope", n: 100}
	if e := other.do(protocol.CallForward, fb).Error; e == nil || e.Code != protocol.CodeNotFound {
		t.Fatalf("unknown run error = %+v", e)
	}
	if e := other.do(protocol.CallInit, protocol.SessionSpec{BaseModel: "huge"}).Error; e == nil || e.Code != protocol.CodeUnknownModel {
		t.Fatalf("unknown model error = %+v", e)
	}
	c.ok(protocol.CallClose, struct{}{}, &st)
	if !st.Closed || eng.OpenSessions() != 0 || n.Manager().Sessions() != 0 {
		t.Fatalf("after close: %+v, engine open %d", st, eng.OpenSessions())
	}
}

func TestCheckpointToMinIO(t *testing.T) {
	srv := miniotest.Start(t, "signal")
	creds := storage.Credentials{AccessKey: miniotest.AccessKey, SecretKey: miniotest.SecretKey}
	url := srv.StorageURL("signal", "ckpt")
	coord, n, _ := startJoined(t, nodeOpts{storageURL: url, creds: creds})
	c := &caller{t: t, coord: coord, node: n.PeerID(), run: "run-s3"}
	c.ok(protocol.CallInit, protocol.SessionSpec{BaseModel: "tiny", LoRARank: 4}, nil)
	c.ok(protocol.CallForwardBackward, protocol.ForwardBackwardRequest{Data: []protocol.Datum{datum(3)}}, nil)
	c.ok(protocol.CallOptimStep, protocol.OptimStepRequest{}, nil)
	var saved protocol.SaveStateResponse
	c.ok(protocol.CallSaveState, protocol.SaveStateRequest{Mode: "full"}, &saved)
	cp := saved.Checkpoint
	if !strings.HasPrefix(cp.URI, "s3://signal/ckpt/") || len(cp.Files) != 3 {
		t.Fatalf("checkpoint = %+v", cp)
	}
	// Read back independently of the node: every object verifies.
	st, err := storage.Open(url, creds)
	if err != nil {
		t.Fatal(err)
	}
	m, err := storage.Resolver{Default: st}.Fetch(context.Background(), cp.ID, t.TempDir())
	if err != nil || m.Step != 1 || len(m.Files) != 3 {
		t.Fatalf("fetch = %+v, %v", m, err)
	}
	// Tamper with an object in the bucket: load_state refuses it.
	f := cp.Files[0]
	if _, err := srv.Client.PutObject(context.Background(), "signal", "ckpt/"+f.CID, strings.NewReader("evil"), 4, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	resp := c.do(protocol.CallLoadState, protocol.LoadStateRequest{Checkpoint: cp.URI})
	if resp.Error == nil || resp.Error.Code != protocol.CodeInvalidRequest || !strings.Contains(resp.Error.Message, f.Name) {
		t.Fatalf("tampered load_state = %+v", resp.Error)
	}
}

// movingRun is a run trained on node a of two nodes that share checkpoint
// storage, ready to move to b: the failover and drain tests start from it.
type movingRun struct {
	coord *p2p.Host
	a, b  *node.Node
	c     *caller
	spec  protocol.SessionSpec
	auto  *protocol.Checkpoint // the last automatic checkpoint
}

// startMovingRun opens run on a with a checkpoint every `every` steps and
// trains it for `steps` steps.
func startMovingRun(t *testing.T, reg p2p.Registry, run string, every, steps int) *movingRun {
	t.Helper()
	store := t.TempDir()
	m := &movingRun{coord: startCoordinator(t, reg)}
	m.a, _ = startNode(t, m.coord, nodeOpts{token: "good-token", storageURL: "file://" + store})
	m.b, _ = startNode(t, m.coord, nodeOpts{token: "good-token", storageURL: "file://" + store})
	waitFor(t, 10*time.Second, "both nodes listed", func() bool { return len(m.coord.Nodes()) == 2 })
	m.c = &caller{t: t, coord: m.coord, node: m.a.PeerID(), run: run}
	m.spec = protocol.SessionSpec{RunID: run, BaseModel: "tiny", LoRARank: 8, CheckpointEvery: every}
	m.c.ok(protocol.CallInit, m.spec, nil)
	for i := 0; i < steps; i++ {
		m.c.ok(protocol.CallForwardBackward, protocol.ForwardBackwardRequest{Data: []protocol.Datum{datum(4)}}, nil)
		if r := m.c.ok(protocol.CallOptimStep, protocol.OptimStepRequest{}, nil); r.Checkpoint != nil {
			m.auto = r.Checkpoint
		}
	}
	return m
}

func TestNodeLostAndResumeElsewhere(t *testing.T) {
	m := startMovingRun(t, newRegistry(), "run-f", 2, 3)
	coord, a, b, c, spec, last := m.coord, m.a, m.b, m.c, m.spec, m.auto
	if last == nil || last.Step != 2 {
		t.Fatalf("last automatic checkpoint = %+v", last)
	}

	a.Kill()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := coord.Do(ctx, a.PeerID(), protocol.SessionRequest{RequestID: "after-kill", RunID: "run-f", Call: protocol.CallSample, Body: []byte(`{}`)})
	if !errors.Is(err, p2p.ErrNodeLost) {
		t.Fatalf("Do on a killed node err = %v, want ErrNodeLost", err)
	}
	took := waitFor(t, 10*time.Second, "killed node to expire", func() bool { _, ok := listed(coord, a.PeerID()); return !ok })
	t.Logf("node killed → unlisted after %v", took)

	// The run moves to b, restored from the last checkpoint.
	spec.ResumeFrom = last
	c.node = b.PeerID()
	var st protocol.SessionState
	c.ok(protocol.CallInit, spec, &st)
	if st.ResumedFromStep == nil || *st.ResumedFromStep != 2 || st.Step != 2 {
		t.Fatalf("resumed state = %+v", st)
	}
	var os protocol.OptimStepResponse
	c.ok(protocol.CallForwardBackward, protocol.ForwardBackwardRequest{Data: []protocol.Datum{datum(4)}}, nil)
	c.ok(protocol.CallOptimStep, protocol.OptimStepRequest{}, &os)
	if os.Step != 3 {
		t.Fatalf("step after resume = %d, want 3", os.Step)
	}
}

func TestGracefulStopCheckpointsOpenSessions(t *testing.T) {
	store := t.TempDir()
	coord, n, eng := startJoined(t, nodeOpts{storageURL: "file://" + store})
	c := &caller{t: t, coord: coord, node: n.PeerID(), run: "run-g"}
	c.ok(protocol.CallInit, protocol.SessionSpec{BaseModel: "tiny"}, nil)
	c.ok(protocol.CallForwardBackward, protocol.ForwardBackwardRequest{Data: []protocol.Datum{datum(2)}}, nil)
	c.ok(protocol.CallOptimStep, protocol.OptimStepRequest{}, nil)
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	if eng.OpenSessions() != 0 {
		t.Fatalf("%d sessions open after Stop", eng.OpenSessions())
	}
	entries, _ := os.ReadDir(store)
	if len(entries) != 4 { // adapter_config, adapter_model, optimizer, manifest
		t.Fatalf("storage holds %d objects after Stop, want a full checkpoint (4)", len(entries))
	}
}

// TestNodeServesOnlyItsCoordinators: a peer that is not one of the node's
// bootstrap coordinators gets its adverts but cannot run calls on it.
func TestNodeServesOnlyItsCoordinators(t *testing.T) {
	coord, n, eng := startJoined(t, nodeOpts{})
	rogueReg := newRegistry()
	rogueReg.Register = func(string, string) (string, error) { return "x", nil }
	rogue := startCoordinator(t, rogueReg)
	if _, err := rogueReg.AdmitNode(context.Background(), n.PeerID(), "any"); err != nil {
		t.Fatal(err)
	}
	ai, err := peer.AddrInfoFromString(rogue.Addrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Host().Connect(context.Background(), *ai); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "rogue sees adverts", func() bool { _, ok := listed(rogue, n.PeerID()); return ok })
	spec, _ := json.Marshal(protocol.SessionSpec{BaseModel: "tiny"})
	_, err = rogue.Do(context.Background(), n.PeerID(), protocol.SessionRequest{RequestID: "r", RunID: "x", Call: protocol.CallInit, Body: spec})
	if err == nil || n.Manager().Sessions() != 0 || eng.OpenSessions() != 0 {
		t.Fatalf("rogue call: err %v, sessions %d", err, n.Manager().Sessions())
	}
	// The real coordinator still gets through.
	if r, err := coord.Do(context.Background(), n.PeerID(), protocol.SessionRequest{RequestID: "r", RunID: "x", Call: protocol.CallInit, Body: spec}); err != nil || r.Error != nil {
		t.Fatalf("coordinator call: %v %+v", err, r.Error)
	}
}

// TestWithDHT runs the node with its Kademlia DHT on (bootstrapped from the
// coordinator): joining, adverts and calls work the same.
func TestWithDHT(t *testing.T) {
	coord := startCoordinator(t, newRegistry())
	n, _ := startNode(t, coord, nodeOpts{token: "good-token", dht: true})
	waitFor(t, 10*time.Second, "node listed", func() bool { _, ok := listed(coord, n.PeerID()); return ok })
	spec, _ := json.Marshal(protocol.SessionSpec{BaseModel: "tiny"})
	if r, err := coord.Do(context.Background(), n.PeerID(), protocol.SessionRequest{RequestID: "r", RunID: "x", Call: protocol.CallInit, Body: spec}); err != nil || r.Error != nil {
		t.Fatalf("init: %v %+v", err, r.Error)
	}
}

// TestKilledNodeUnlistedWithoutWaitingForTTL: a node whose process dies
// closes its connections; the coordinator unlists it at once instead of
// after NodeTTL (a minute here, so only the disconnect can explain it), and
// a call to it fails as lost without waiting for a dial to time out.
func TestKilledNodeUnlistedWithoutWaitingForTTL(t *testing.T) {
	reg := newRegistry()
	cfg := p2p.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.ListenAddrs = loopback
	cfg.NodeTTL = time.Minute
	cfg.Logger = quietLogger()
	coord, err := p2p.New(cfg, reg)
	if err != nil {
		t.Fatal(err)
	}
	if err := coord.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = coord.Stop() })
	a, _ := startNode(t, coord, nodeOpts{token: "good-token"})
	b, _ := startNode(t, coord, nodeOpts{token: "good-token"})
	waitFor(t, 10*time.Second, "both nodes listed", func() bool { return len(coord.Nodes()) == 2 })

	a.Kill()
	took := waitFor(t, 20*time.Second, "killed node unlisted", func() bool { _, ok := listed(coord, a.PeerID()); return !ok })
	t.Logf("node killed → unlisted after %v (NodeTTL %v)", took, cfg.NodeTTL)
	if _, ok := listed(coord, b.PeerID()); !ok {
		t.Fatal("the live node was unlisted too")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err = coord.Do(ctx, a.PeerID(), protocol.SessionRequest{RequestID: "after-kill", RunID: "run-k", Call: protocol.CallSample, Body: []byte(`{}`)})
	if !errors.Is(err, p2p.ErrNodeLost) || ctx.Err() != nil {
		t.Fatalf("Do on a killed node: err = %v (ctx %v), want ErrNodeLost before the deadline", err, ctx.Err())
	}
}

// TestOversizedAnswerIsNotALostNode: an answer over the coordinator's
// frame limit is its own error, and the node stays listed and callable,
// so a caller cannot move runs off a healthy node by asking for a large
// answer.
func TestOversizedAnswerIsNotALostNode(t *testing.T) {
	coord := startCoordinatorWith(t, newRegistry(), func(cfg *p2p.Config) { cfg.MaxFrameBytes = 16 << 10 })
	n, _ := startNode(t, coord, nodeOpts{token: "good-token"})
	waitFor(t, 10*time.Second, "node listed", func() bool { _, ok := listed(coord, n.PeerID()); return ok })
	c := &caller{t: t, coord: coord, node: n.PeerID(), run: "run-big"}
	c.ok(protocol.CallInit, protocol.SessionSpec{RunID: "run-big", BaseModel: "tiny", LoRARank: 8}, nil)

	b, _ := json.Marshal(protocol.ForwardBackwardRequest{Data: []protocol.Datum{datum(20000)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := coord.Do(ctx, n.PeerID(), protocol.SessionRequest{RequestID: "big", RunID: "run-big", Call: protocol.CallForward, Body: b})
	if !errors.Is(err, p2p.ErrResponseTooLarge) || errors.Is(err, p2p.ErrNodeLost) {
		t.Fatalf("oversized answer: err %v, want ErrResponseTooLarge and not lost", err)
	}
	if _, ok := listed(coord, n.PeerID()); !ok {
		t.Fatal("the node was unlisted after an oversized answer")
	}
	c.ok(protocol.CallForward, protocol.ForwardBackwardRequest{Data: []protocol.Datum{datum(3)}}, nil)
}
