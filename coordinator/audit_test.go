package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/signal-p2p/signal/ledger"
	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/gpu"
	"github.com/signal-p2p/signal/node/native"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// The audit tests run real nodes: node.Managers over the native engine on
// a tiny random model, one per peer, sharing a file checkpoint store, as
// the p2p host would reach them (the Backend calls Manager.Handle). A
// lying node is a real node whose engine's sessions lie.

// realNet is a Backend over real node.Managers.
type realNet struct {
	mu    sync.Mutex
	nodes map[string]*realNode
	store storage.Store
}

type realNode struct {
	info protocol.Node
	m    *node.Manager
}

// tinyModelsDir generates the tiny random model every node serves, as
// "tiny" (testConfig's model).
func tinyModelsDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cfg := trainer.Config{HiddenSize: 32, IntermediateSize: 64, NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2,
		VocabSize: 512, MaxPositionEmbeddings: 256, RopeTheta: 1e4, RMSNormEps: 1e-6}
	if err := trainer.GenerateRandomModel(filepath.Join(dir, "tiny"), cfg, 3, ""); err != nil {
		t.Fatal(err)
	}
	return dir
}

// newRealNet starts one node per peer; wrap, when it returns a non-nil
// function for a peer, turns that node's sessions into liars.
func newRealNet(t *testing.T, peers []string, wrap func(peer string) func(node.Session) node.Session) *realNet {
	return newEngineNet(t, peers, wrap, nil)
}

// newEngineNet is newRealNet whose peers in workers run the PyTorch worker
// on the CPU (torchPython's interpreter) instead of the native engine.
func newEngineNet(t *testing.T, peers []string, wrap func(peer string) func(node.Session) node.Session, workers map[string]bool) *realNet {
	t.Helper()
	models := tinyModelsDir(t)
	store, err := storage.Open("file://"+t.TempDir(), storage.Credentials{})
	if err != nil {
		t.Fatal(err)
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	n := &realNet{nodes: map[string]*realNode{}, store: store}
	for _, p := range peers {
		var e node.Engine
		backend := "native"
		if workers[p] {
			c := gpu.DefaultConfig()
			c.Device, c.ModelsDir, c.RunDir, c.Logger, c.Python = "cpu", models, t.TempDir(), quiet, torchPython(t)
			pool, err := gpu.NewPool([]gpu.Config{c})
			if err != nil {
				t.Fatal(err)
			}
			if err := pool.Start(context.Background()); err != nil {
				t.Fatalf("start the PyTorch worker: %v", err)
			}
			t.Cleanup(func() { _ = pool.Stop() })
			e, backend = pool, gpu.BackendCPUTorch
		} else {
			eng, err := native.New(models, quiet)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = eng.Close() })
			e = eng
		}
		if wrap != nil {
			if w := wrap(p); w != nil {
				e = &lyingEngine{Engine: e, wrap: w}
			}
		}
		m := node.NewManager(node.ManagerConfig{MaxSessions: 8, Storage: store, TempDir: t.TempDir(), Logger: quiet}, e)
		n.nodes[p] = &realNode{m: m, info: protocol.Node{PeerID: p, CPU: protocol.CPU{Cores: 2, MemoryTotal: 8 << 30}, MaxSessions: 8,
			Backends: []string{backend}, Models: []string{"tiny"}}}
	}
	return n
}

// torchPython is $SIGNAL_PYTHON (else /usr/bin/python3) when it imports
// torch; without it the test skips, or fails in CI.
func torchPython(t *testing.T) string {
	t.Helper()
	py := os.Getenv("SIGNAL_PYTHON")
	if py == "" {
		py = "/usr/bin/python3"
	}
	if err := exec.Command(py, "-c", "import torch").Run(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s has no torch: %v", py, err)
		}
		t.Skipf("%s has no torch (set $SIGNAL_PYTHON): %v", py, err)
	}
	return py
}

func (n *realNet) backend() *fakeBackend {
	return &fakeBackend{
		NodesFn: func() []protocol.Node {
			n.mu.Lock()
			defer n.mu.Unlock()
			out := make([]protocol.Node, 0, len(n.nodes))
			for _, nd := range n.nodes {
				info := nd.info
				info.Sessions = nd.m.Sessions()
				out = append(out, info)
			}
			sort.Slice(out, func(i, j int) bool { return out[i].PeerID < out[j].PeerID })
			return out
		},
		DoFn: func(ctx context.Context, peer string, req protocol.SessionRequest) (protocol.SessionResponse, error) {
			n.mu.Lock()
			nd := n.nodes[peer]
			n.mu.Unlock()
			if nd == nil {
				return protocol.SessionResponse{}, fmt.Errorf("dial %s: %w", peer, ErrNodeLost)
			}
			return nd.m.Handle(ctx, req), nil
		},
	}
}

// lyingEngine is a real engine whose sessions lie.
type lyingEngine struct {
	node.Engine
	wrap func(node.Session) node.Session
}

func (e *lyingEngine) Open(ctx context.Context, spec protocol.SessionSpec) (node.Session, error) {
	s, err := e.Engine.Open(ctx, spec)
	if err != nil {
		return nil, err
	}
	return e.wrap(s), nil
}

// OpenDir lies on a challenge's generated model too.
func (e *lyingEngine) OpenDir(ctx context.Context, dir string, spec protocol.SessionSpec) (node.Session, error) {
	s, err := e.Engine.(node.DirOpener).OpenDir(ctx, dir, spec)
	if err != nil {
		return nil, err
	}
	return e.wrap(s), nil
}

// fabricatedGradNorm is what the backward-skipping liar reports.
const fabricatedGradNorm = 1.0

// skipBackward runs the forward only: no gradient accumulates, and the
// grad norm is made up.
type skipBackward struct{ node.Session }

func (s skipBackward) ForwardBackward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	res, err := s.Session.Forward(ctx, data, loss)
	res.GradNorm = fabricatedGradNorm
	return res, err
}

// fabricatedLoss trains honestly but reports a loss 20% lower (a node
// making its runs look better, or answering without computing).
type fabricatedLoss struct{ node.Session }

func (s fabricatedLoss) ForwardBackward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	res, err := s.Session.ForwardBackward(ctx, data, loss)
	res.LossSum *= 0.8
	return res, err
}

func (s fabricatedLoss) Forward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	res, err := s.Session.Forward(ctx, data, loss)
	res.LossSum *= 0.8
	return res, err
}

// randomSamples generates nothing: random tokens, made-up logprobs.
type randomSamples struct {
	node.Session
	rng *rand.Rand
}

func (s randomSamples) Sample(_ context.Context, prompts [][]int, num int, p trainer.SamplingParams) ([][]trainer.Sample, error) {
	out := make([][]trainer.Sample, len(prompts))
	for i := range prompts {
		for range num {
			smp := trainer.Sample{StopReason: trainer.StopLength}
			for range p.MaxTokens {
				smp.Tokens = append(smp.Tokens, 3+s.rng.Intn(500))
				smp.Logprobs = append(smp.Logprobs, -0.1-3*s.rng.Float32())
			}
			out[i] = append(out[i], smp)
		}
	}
	return out, nil
}

// truthfulRandomSamples makes tokens up and reports their true logprobs
// (one forward over prompt and tokens, far cheaper than drawing): the
// scores match, so only a redraw of the seeded request catches it.
type truthfulRandomSamples struct {
	node.Session
	rng *rand.Rand
}

func (s truthfulRandomSamples) Sample(ctx context.Context, prompts [][]int, num int, p trainer.SamplingParams) ([][]trainer.Sample, error) {
	out := make([][]trainer.Sample, len(prompts))
	for i, pr := range prompts {
		for range num {
			seq := append([]int(nil), pr...)
			for range p.MaxTokens {
				seq = append(seq, 3+s.rng.Intn(500))
			}
			d := trainer.Datum{Tokens: seq[:len(seq)-1], TargetTokens: seq[1:], Weights: make([]float32, len(seq)-1)}
			res, err := s.Session.Forward(ctx, []trainer.Datum{d}, node.Loss{Fn: trainer.LossCrossEntropy})
			if err != nil {
				return nil, err
			}
			out[i] = append(out[i], trainer.Sample{Tokens: seq[len(pr):], Logprobs: res.Logprobs[0][len(pr)-1:], StopReason: trainer.StopLength})
		}
	}
	return out, nil
}

// liar is the peer id liarRun's lying node has: placement breaks ties by
// peer id, so a run lands on it.
const liar = "node-0-liar"

// liarRun starts a network of the liar (its sessions wrapped by wrap) and
// two honest nodes of two other operators, audited at rate, and a run
// with checkpoint_every on the liar. It returns the coordinator, a user's
// key and account, and the run.
func liarRun(t *testing.T, wrap func(node.Session) node.Session, rate float64, checkpointEvery int) (*Coordinator, string, string, protocol.Run) {
	t.Helper()
	net := newRealNet(t, []string{liar, "node-1", "node-2"}, func(p string) func(node.Session) node.Session {
		if p == liar {
			return wrap
		}
		return nil
	})
	c := auditCluster(t, net, rate, time.Hour, map[string]string{liar: "op-liar", "node-1": "op-a", "node-2": "op-b"})
	key, acct := createKey(t, c.URL(), 10_000_000)
	run := createRun(t, c.URL(), key, map[string]any{"base_model": "tiny", "lora_rank": 4, "checkpoint_every": checkpointEvery})
	if run.Node != liar {
		t.Fatalf("run placed on %s, want the liar", run.Node)
	}
	return c, key, acct, run
}

// waitMovedOffLiar waits for run to be ready on a node other than liar.
func waitMovedOffLiar(t *testing.T, c *Coordinator, runID string) {
	t.Helper()
	waitFor(t, 30*time.Second, "the run moved", func() bool {
		var r *RunRecord
		c.State(func(s *State) { r, _ = s.Run(runID) })
		return r.Run.Node != liar && r.Run.Status == protocol.RunReady
	})
}

// auditCluster starts one member auditing at rate over n, with each peer
// joined under its operator; verified earnings are released after window.
// A window of 0 also makes every call of a node holding unaudited
// earnings audited (they are older than the window): tests of the rate
// use a long one.
func auditCluster(t *testing.T, n *realNet, rate float64, window time.Duration, operators map[string]string, mods ...func(*Config)) *Coordinator {
	t.Helper()
	cfg := testConfig(t, "solo")
	cfg.Bootstrap = true
	cfg.Backend = n.backend()
	cfg.AuditRate = rate
	cfg.EscrowWindow = window
	cfg.OpenCheckpointFile = storage.FileOpener(n.store)
	cfg.EscrowReleaseInterval = 50 * time.Millisecond
	// These tests make hundreds of calls as fast as the nodes answer (faster
	// than 50/s without -race); the rate limit is not what they test.
	cfg.RatePerSecond, cfg.RateBurst = 1e6, 1e6
	for _, m := range mods {
		m(&cfg)
	}
	c := mustStart(t, cfg)
	waitFor(t, 10*time.Second, "leader", c.IsLeader)
	byOp := map[string][]string{}
	for peer, op := range operators {
		byOp[op] = append(byOp[op], peer)
	}
	for op, peers := range byOp {
		joinNodes(t, c, op, peers...)
	}
	return c
}

// tokenData is a forward_backward body of k sequences of 24 random tokens.
func tokenData(rng *rand.Rand, k int) protocol.ForwardBackwardRequest {
	var req protocol.ForwardBackwardRequest
	for range k {
		ids := make([]int, 25)
		for j := range ids {
			ids[j] = 3 + rng.Intn(500)
		}
		d := protocol.Datum{ModelInput: protocol.ModelInput{Tokens: ids[:24]}}
		d.LossFnInputs.TargetTokens = ids[1:]
		for j := range 24 {
			d.LossFnInputs.Weights = append(d.LossFnInputs.Weights, float64(min(j/4, 1)))
		}
		req.Data = append(req.Data, d)
	}
	return req
}

func sampleBody(rng *rand.Rand, temperature float64) protocol.SampleRequest {
	two := 2
	prompt := []int{1}
	for range 6 {
		prompt = append(prompt, 3+rng.Intn(500))
	}
	return protocol.SampleRequest{Prompts: []protocol.Prompt{{Tokens: prompt}}, NumSamples: &two,
		SamplingParams: protocol.SamplingParams{MaxTokens: 8, Temperature: &temperature}}
}

// missBound is the number of calls within which an audit at rate misses
// a node that lies on every call with probability at most p:
// (1 − rate)^n ≤ p.
func missBound(rate, p float64) int { return int(math.Ceil(math.Log(p) / math.Log(1-rate))) }

func nodeAudits(c *Coordinator, peer string) NodeAuditRecord {
	var rec NodeAuditRecord
	c.State(func(s *State) { rec = s.nodeAudits[peer] })
	return rec
}

// TestAuditsCatchLyingEngines: a node whose engine skips the backward,
// fabricates losses or returns random samples serves a run among honest
// nodes of two other operators. At audit rate 0.5 it is audited within
// missBound(0.5, 1e-6) = 20 calls but with probability 1e-6; the audit
// fails, its held earnings go back to the user, it is quarantined, and
// the run moves to an honest node, where calls go on.
func TestAuditsCatchLyingEngines(t *testing.T) {
	const rate = 0.5
	bound := missBound(rate, 1e-6)
	for _, tc := range []struct {
		name   string
		wrap   func(node.Session) node.Session
		call   protocol.Call
		reason string
	}{
		{"skips the backward", func(s node.Session) node.Session { return skipBackward{s} }, protocol.CallForwardBackward, "grad_norm"},
		{"fabricates losses", func(s node.Session) node.Session { return fabricatedLoss{s} }, protocol.CallForward, "loss_sum"},
		{"returns random samples", func(s node.Session) node.Session { return randomSamples{s, rand.New(rand.NewSource(1))} }, protocol.CallSample, "logprobs"},
		{"returns random samples with their true logprobs", func(s node.Session) node.Session {
			return truthfulRandomSamples{s, rand.New(rand.NewSource(1))}
		}, protocol.CallSample, "drawn samples"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, key, acct, run := liarRun(t, tc.wrap, rate, 1)
			// A full checkpoint to move from (save_state is not audited).
			mustStatus(t, do(t, "POST", c.URL()+"/v1/runs/"+run.ID+"/save_state", key, map[string]any{"mode": "full"}), 200)

			rng := rand.New(rand.NewSource(2))
			calls := 0
			for c.auditor.chosen.Load() == 0 {
				if calls == bound {
					t.Fatalf("no call audited in %d calls at rate %v (probability %.1g)", bound, rate, math.Pow(1-rate, float64(bound)))
				}
				var body any = tokenData(rng, 2)
				if tc.call == protocol.CallSample {
					body = sampleBody(rng, 1)
				}
				mustStatus(t, do(t, "POST", c.URL()+"/v1/runs/"+run.ID+"/"+string(tc.call), key, body), 200)
				calls++
			}
			t.Logf("audited after %d calls (bound %d at rate %v)", calls, bound, rate)
			waitFor(t, 30*time.Second, "the liar quarantined", func() bool { return nodeAudits(c, liar).Quarantined })
			rec := nodeAudits(c, liar)
			if rec.Failed != 1 || !strings.Contains(rec.QuarantineReason, tc.reason) {
				t.Fatalf("liar's record %+v, want a failure on %s", rec, tc.reason)
			}
			t.Logf("verdict: %s", rec.QuarantineReason)

			// Every operator share it held went back: of each call it
			// served, the user paid the network's fee (10%, rounded down)
			// and nothing to the liar.
			c.State(func(s *State) {
				if err := s.Ledger().Check(); err != nil {
					t.Fatal(err)
				}
				if held := s.Balance(ledger.EscrowAccount(liar)); held != 0 || s.Balance("op-liar") != 0 {
					t.Fatalf("liar holds %d, its operator %d", held, s.Balance("op-liar"))
				}
				a := s.AccountView(acct)
				var spent, shares int64
				for _, ch := range a.Charges {
					spent += ch.MicroCredits
					shares += ch.MicroCredits - ch.MicroCredits/10
				}
				if rec.Refunded != shares || shares == 0 || a.BalanceMicroCredits != 10_000_000-spent+rec.Refunded {
					t.Fatalf("refunded %d, operator shares %d; balance %d after spending %d", rec.Refunded, shares, a.BalanceMicroCredits, spent)
				}
			})

			// The run moves off the quarantined node, and calls go on.
			waitMovedOffLiar(t, c, run.ID)
			mustStatus(t, do(t, "POST", c.URL()+"/v1/runs/"+run.ID+"/forward", key, tokenData(rng, 1)), 200)

			// What the API shows: the node's audits, the operator's refunds.
			var nl protocol.NodeList
			do(t, "GET", c.URL()+"/v1/nodes", key, nil).decode(t, &nl)
			for _, n := range nl.Nodes {
				if n.PeerID == liar && (n.Audits == nil || !n.Audits.Quarantined || n.Audits.Failed != 1 || n.Audits.RefundedMicroCredits != rec.Refunded) {
					t.Fatalf("/v1/nodes shows the liar as %+v", n.Audits)
				}
			}
		})
	}
}

// skippedUpdate answers optim_step as an honest node would (the step
// counted, the learning rate asked reported) but leaves the adapter as it
// was: the cheapest way to look like training.
type skippedUpdate struct{ node.Session }

func (s skippedUpdate) OptimStep(ctx context.Context, p trainer.AdamParams) (trainer.OptimResult, error) {
	asked := p.LearningRate
	p.LearningRate = 1e-30
	res, err := s.Session.OptimStep(ctx, p)
	res.LearningRate = asked
	return res, err
}

// wrongUpdate steps with five times the learning rate asked (a broken or
// careless optimizer) and reports the rate asked.
type wrongUpdate struct{ node.Session }

func (s wrongUpdate) OptimStep(ctx context.Context, p trainer.AdamParams) (trainer.OptimResult, error) {
	asked := p.LearningRate
	p.LearningRate *= 5
	res, err := s.Session.OptimStep(ctx, p)
	res.LearningRate = asked
	return res, err
}

// optimMissBound is the number of optim_steps within which a node whose
// every step is wrong escapes audits at rate with probability at most p:
// the first step anchors the run's trail; then the step with s steps on
// the trail is audited with probability rate/(s+1), s cycling through
// 0..anchorEvery−1 while no audit comes.
func optimMissBound(rate, p float64) int {
	miss := 1.0
	n := 0
	for miss > p {
		miss *= 1 - rate/float64(n%anchorEvery+1)
		n++
	}
	return 1 + n
}

// TestOptimAuditsCatchBadUpdates: a node whose forward_backward is honest
// but whose optim_step skips the update, or applies a wrong one, passes
// every forward_backward audit (the figures come from the adapter it has)
// and is caught by an optim_step audit: the validator replays the trail
// from the last anchor, and its adapter differs from the one the node
// committed (or, where the trail holds a forward_backward after a bad
// step, that call's figures do). The run uses no automatic checkpoints, so its anchors are
// the audits' own commits.
func TestOptimAuditsCatchBadUpdates(t *testing.T) {
	const rate = 0.5
	bound := optimMissBound(rate, 1e-6)
	for _, tc := range []struct {
		name string
		wrap func(node.Session) node.Session
	}{
		{"skips the update", func(s node.Session) node.Session { return skippedUpdate{s} }},
		{"applies a wrong update", func(s node.Session) node.Session { return wrongUpdate{s} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, key, _, run := liarRun(t, tc.wrap, rate, 0)
			rng := rand.New(rand.NewSource(3))
			steps := 0
			for !nodeAudits(c, liar).Quarantined {
				if steps == bound {
					t.Fatalf("liar not caught in %d steps at rate %v", bound, rate)
				}
				mustStatus(t, do(t, "POST", c.URL()+"/v1/runs/"+run.ID+"/forward_backward", key, tokenData(rng, 2)), 200)
				mustStatus(t, do(t, "POST", c.URL()+"/v1/runs/"+run.ID+"/optim_step", key, map[string]any{"adam_params": map[string]any{"learning_rate": 1e-2}}), 200)
				steps++
				// The verdict comes in the background: wait for each
				// step's audits so the count of steps is exact.
				waitFor(t, 30*time.Second, "audits decided", func() bool {
					return c.auditor.passed.Load()+c.auditor.failed.Load()+c.auditor.inconclusive.Load() == c.auditor.chosen.Load()
				})
			}
			rec := nodeAudits(c, liar)
			// The adapter differs, or a forward_backward of the trail
			// replayed after the validator's honest step does.
			if rec.Failed != 1 || !strings.Contains(rec.QuarantineReason, "adapter after optim_step") && !strings.Contains(rec.QuarantineReason, "of the trail") {
				t.Fatalf("liar's record %+v, want a failure on the adapter or the trail", rec)
			}
			// Its forward_backward audits (if any came first) passed: only
			// the optim_step audit sees the lie.
			for _, a := range rec.Recent {
				if a.Passed == (a.Call == string(protocol.CallOptimStep)) {
					t.Fatalf("liar's audits %+v: want forward_backward passes and an optim_step failure", rec.Recent)
				}
			}
			t.Logf("caught after %d steps (bound %d at rate %v), %d audits passed before: %s", steps, bound, rate, rec.Passed, rec.QuarantineReason)
			waitMovedOffLiar(t, c, run.ID)
		})
	}
}

// TestHonestNodesPassAudits: honest native nodes of three operators pass
// every audit of a mix of forward_backward, forward, warm and greedy
// samples, audited at rate 1; their earnings are verified and released to
// their operators, and the largest margin is logged.
func TestHonestNodesPassAudits(t *testing.T) {
	peers := []string{"node-a", "node-b", "node-c"}
	net := newRealNet(t, peers, nil)
	var deletedMu sync.Mutex
	deleted := 0 // files of states audits committed, deleted once no audit or trail needs them
	c := auditCluster(t, net, 1, 0, map[string]string{"node-a": "op-a", "node-b": "op-b", "node-c": "op-c"},
		func(cfg *Config) {
			cfg.DeleteCheckpointFiles = func(_ context.Context, uris []string) error {
				deletedMu.Lock()
				deleted += len(uris)
				deletedMu.Unlock()
				return nil
			}
		})
	key, _ := createKey(t, c.URL(), 100_000_000)
	var runs []protocol.Run
	for range 3 { // one run per node: placement spreads them
		runs = append(runs, createRun(t, c.URL(), key, map[string]any{"base_model": "tiny", "lora_rank": 4}))
	}
	rng := rand.New(rand.NewSource(4))
	// 230 rounds of 3 runs × 3 audited calls: 2,070 audits, no false positive.
	rounds := 230
	if testing.Short() {
		rounds = 20
	}
	calls, worst := honestRounds(t, c, key, runs, peers, rng, rounds, true)
	// The states optim_step audits committed are let go once their audits
	// passed: what stays owned is at most each run's current anchor.
	waitFor(t, 30*time.Second, "audit states released", func() bool {
		c.auditor.mu.Lock()
		defer c.auditor.mu.Unlock()
		return len(c.auditor.owned) <= len(runs)
	})
	deletedMu.Lock()
	if deleted == 0 {
		t.Error("no committed audit state was deleted")
	}
	deletedMu.Unlock()
	t.Logf("%d calls, %d audits passed, 0 failed; largest margin among the last %d per node: %.4f of the tolerance (native replays native exactly)", calls, c.auditor.passed.Load(), maxAuditsPerNode, worst)
	ratio := float64(c.auditor.replayCredits.Load()) / float64(c.auditor.auditedCredits.Load())
	t.Logf("a replay costs %.3f of its audited call at the model's prices (forward_backward and forward 1, a sample scored and redrawn > 1, an optim_step its trail): %.2f%% of the compute at the default rate %v", ratio, 100*ratio*DefaultAuditRate, DefaultAuditRate)
	// Earnings verified by the passes are released (window 0) to the operators.
	waitFor(t, 10*time.Second, "earnings released", func() bool {
		paid := true
		c.State(func(s *State) {
			for _, op := range []string{"op-a", "op-b", "op-c"} {
				paid = paid && s.Balance(op) > 0
			}
		})
		return paid
	})
	var op *protocol.OperatorEarnings
	c.State(func(s *State) {
		op = s.OperatorView("op-a")
		if err := s.Ledger().Check(); err != nil {
			t.Fatal(err)
		}
	})
	if op == nil || op.EarnedMicroCredits == 0 || op.Nodes[0].Audits.Passed == 0 {
		t.Fatalf("operator view %+v", op)
	}
}

// TestOneOperatorCannotVouchForItself: two nodes of one operator, one of
// them lying, are never each other's validators: with no other operator
// live nothing is audited and their earnings stay held; once a node of
// another operator joins, the liar is audited and caught.
func TestOneOperatorCannotVouchForItself(t *testing.T) {
	liar := "node-0-liar"
	net := newRealNet(t, []string{liar, "node-1-accomplice", "node-2-other"}, func(p string) func(node.Session) node.Session {
		if p == liar {
			return func(s node.Session) node.Session { return fabricatedLoss{s} }
		}
		return nil
	})
	other := net.nodes["node-2-other"]
	delete(net.nodes, "node-2-other") // not live yet
	c := auditCluster(t, net, 1, 0, map[string]string{liar: "op-x", "node-1-accomplice": "op-x", "node-2-other": "op-y"})
	key, _ := createKey(t, c.URL(), 10_000_000)
	run := createRun(t, c.URL(), key, map[string]any{"base_model": "tiny", "lora_rank": 4})
	rng := rand.New(rand.NewSource(6))
	for range 5 {
		mustStatus(t, do(t, "POST", c.URL()+"/v1/runs/"+run.ID+"/forward", key, tokenData(rng, 1)), 200)
	}
	if n := c.auditor.chosen.Load(); n != 0 {
		t.Fatalf("%d audits with only one operator's nodes live", n)
	}
	c.State(func(s *State) {
		if s.Balance("op-x") != 0 || s.Balance(ledger.EscrowAccount(liar)) == 0 {
			t.Fatalf("op-x paid %d, held %d: unaudited earnings must stay held", s.Balance("op-x"), s.Balance(ledger.EscrowAccount(liar)))
		}
	})
	net.mu.Lock()
	net.nodes["node-2-other"] = other
	net.mu.Unlock()
	mustStatus(t, do(t, "POST", c.URL()+"/v1/runs/"+run.ID+"/forward", key, tokenData(rng, 1)), 200)
	waitFor(t, 30*time.Second, "the liar quarantined", func() bool { return nodeAudits(c, liar).Quarantined })
	if v := nodeAudits(c, "node-2-other").Validated; v != 1 {
		t.Fatalf("the other operator's node validated %d audits, want 1", v)
	}
	if v := nodeAudits(c, "node-1-accomplice").Validated; v != 0 {
		t.Fatalf("the accomplice validated %d audits of its own operator's node", v)
	}
}

// TestPendingAuditOutlivesItsLeader: an audit whose state the node
// committed is a raft record; a leader that dies before its replay (here:
// one that recorded it and never queued it) leaves it to the next leader,
// whose auditor finishes it. The record goes once the verdict is in, and
// rides a snapshot while it waits.
func TestPendingAuditOutlivesItsLeader(t *testing.T) {
	peers := []string{"node-a", "node-b"}
	net := newRealNet(t, peers, nil)
	// A rate that chooses no call itself: only the resumed audit runs.
	c := auditCluster(t, net, 1e-12, time.Hour, map[string]string{"node-a": "op-a", "node-b": "op-b"})
	key, acct := createKey(t, c.URL(), 100_000_000)
	run := createRun(t, c.URL(), key, map[string]any{"base_model": "tiny", "lora_rank": 4})
	body := tokenData(rand.New(rand.NewSource(5)), 2)
	r := do(t, "POST", c.URL()+"/v1/runs/"+run.ID+"/forward", key, body)
	mustStatus(t, r, 200)
	var rec *RunRecord
	c.State(func(s *State) { rec, _ = s.Run(run.ID) })
	model, err := c.models.get("tiny")
	if err != nil {
		t.Fatal(err)
	}
	// What a leader does before it dies: the node commits its state and
	// the audit is recorded as pending, and nothing queues it here.
	raw, _ := json.Marshal(body)
	job, ok := c.auditor.commitState(context.Background(), rec, model, protocol.CallForward, raw, r.body, 100)
	if !ok {
		t.Fatal("the node did not commit its state")
	}
	var pending []PendingAudit
	c.State(func(s *State) { pending = s.PendingAudits() })
	if len(pending) != 1 || pending[0].ID != job.id || pending[0].Pre.ID == "" {
		t.Fatalf("pending audits %+v", pending)
	}
	var buf bytes.Buffer
	c.State(func(s *State) {
		if err := writeSnapshot(&buf, s); err != nil {
			t.Fatal(err)
		}
	})
	restored, err := readSnapshot(&buf)
	if err != nil || len(restored.PendingAudits()) != 1 {
		t.Fatalf("pending audits through a snapshot: %v %v", restored.PendingAudits(), err)
	}
	// The leader's escrow loop resumes it: a validator replays, the
	// verdict is recorded, the record goes.
	waitFor(t, 30*time.Second, "the resumed audit's verdict", func() bool { return nodeAudits(c, run.Node).Passed == 1 })
	c.State(func(s *State) { pending = s.PendingAudits() })
	if len(pending) != 0 {
		t.Errorf("pending after the verdict: %+v", pending)
	}
	if rec := nodeAudits(c, run.Node); rec.Recent[0].ID != job.id || rec.Failed != 0 {
		t.Errorf("the node's audits %+v (account %s)", rec, acct)
	}
}

// TestNativeAndWorkerNodesAuditEachOther: honest nodes of three operators,
// one of them running the PyTorch worker, replay each other's calls (the
// worker validates native nodes' calls and they its) and every audit
// passes: the tolerances hold across engines, not only within one.
func TestNativeAndWorkerNodesAuditEachOther(t *testing.T) {
	peers := []string{"node-a", "node-b", "node-w"}
	net := newEngineNet(t, peers, nil, map[string]bool{"node-w": true})
	c := auditCluster(t, net, 1, time.Hour, map[string]string{"node-a": "op-a", "node-b": "op-b", "node-w": "op-w"})
	key, _ := createKey(t, c.URL(), 100_000_000)
	var runs []protocol.Run
	for range 3 { // one run per node
		runs = append(runs, createRun(t, c.URL(), key, map[string]any{"base_model": "tiny", "lora_rank": 4}))
	}
	_, worst := honestRounds(t, c, key, runs, peers, rand.New(rand.NewSource(6)), 20, false) // 120 audits, most across engines
	crossed := map[string]int{}
	margins := map[string]float64{}
	for _, p := range peers {
		for _, a := range nodeAudits(c, p).Recent {
			if (p == "node-w") != (a.Validator == "node-w") {
				crossed[a.Call]++ // one engine checked the other
				margins[a.Call] = max(margins[a.Call], a.Margin)
			}
		}
	}
	if crossed[string(protocol.CallForwardBackward)] == 0 || crossed[string(protocol.CallOptimStep)] == 0 {
		t.Fatalf("audits across engines by call %v: the test shows nothing", crossed)
	}
	t.Logf("%d audits passed; among the last %d per node, across engines by call: %v, largest margins %v (of the tolerance; overall %.4f)", c.auditor.passed.Load(), maxAuditsPerNode, crossed, margins, worst)
}

// slowSession is an honest engine's session that takes 300 ms more per
// training step (the tiny model's step takes a few ms): a node whose
// advert claims more than it does.
type slowSession struct{ node.Session }

func (s slowSession) ForwardBackward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	time.Sleep(300 * time.Millisecond)
	return s.Session.ForwardBackward(ctx, data, loss)
}

// TestCapacityChallenges: every node is measured by a challenge when it is
// seen; the measure, not the advert, places runs (a slow node advertising
// an H200 gets none while faster ones are free), and a node whose
// challenge outputs another operator's node does not reproduce is
// quarantined before any user's call reaches it.
func TestCapacityChallenges(t *testing.T) {
	peers := []string{"node-a", "node-b", "node-gpu-liar", "node-fabricator"}
	net := newRealNet(t, peers, func(p string) func(node.Session) node.Session {
		switch p {
		case "node-gpu-liar":
			return func(s node.Session) node.Session { return slowSession{s} }
		case "node-fabricator":
			return func(s node.Session) node.Session { return fabricatedLoss{s} }
		}
		return nil
	})
	net.nodes["node-gpu-liar"].info.GPUs = []protocol.GPU{{Name: "NVIDIA H200", UUID: "GPU-fake", MemoryTotal: 141 << 30, MemoryFree: 140 << 30}}
	c := auditCluster(t, net, 1e-12, time.Hour, map[string]string{"node-a": "op-a", "node-b": "op-b", "node-gpu-liar": "op-c", "node-fabricator": "op-d"},
		func(cfg *Config) { cfg.ChallengeInterval = time.Minute })
	waitFor(t, 60*time.Second, "every node measured or caught", func() bool {
		done := true
		for _, p := range peers {
			rec := nodeAudits(c, p)
			done = done && (rec.TokensPerSec > 0 || rec.Quarantined)
		}
		return done
	})
	fab := nodeAudits(c, "node-fabricator")
	if !fab.Quarantined || !strings.Contains(fab.QuarantineReason, "capacity challenge") {
		t.Fatalf("the fabricating node after its challenge: %+v", fab)
	}
	a, b, liar := nodeAudits(c, "node-a"), nodeAudits(c, "node-b"), nodeAudits(c, "node-gpu-liar")
	t.Logf("measured tokens/s: node-a %.0f, node-b %.0f, node-gpu-liar (advertises an H200) %.0f", a.TokensPerSec, b.TokensPerSec, liar.TokensPerSec)
	if !a.MeasureVerified || !b.MeasureVerified {
		t.Errorf("honest measures not verified by another operator: %+v %+v", a, b)
	}
	if liar.TokensPerSec*2 > min(a.TokensPerSec, b.TokensPerSec) {
		t.Errorf("the slow node measured %.0f tokens/s, honest ones %.0f and %.0f", liar.TokensPerSec, a.TokensPerSec, b.TokensPerSec)
	}
	key, _ := createKey(t, c.URL(), 100_000_000)
	for range 2 {
		run := createRun(t, c.URL(), key, map[string]any{"base_model": "tiny", "lora_rank": 4})
		if run.Node != "node-a" && run.Node != "node-b" {
			t.Errorf("a run placed on %s while the measured-faster nodes had room", run.Node)
		}
	}
	var v []protocol.Node
	r := do(t, "GET", c.URL()+"/v1/nodes", key, nil)
	var list protocol.NodeList
	r.decode(t, &list)
	v = list.Nodes
	for _, n := range v {
		if n.PeerID == "node-gpu-liar" && (n.Audits == nil || n.Audits.MeasuredTokensPerSec <= 0) {
			t.Errorf("/v1/nodes does not show the liar's measured throughput beside its advert: %+v", n.Audits)
		}
	}
}

// honestRounds makes rounds of audited calls on each run (forward_backward,
// forward when withForward, a sample; then an optim_step, audited from the
// second round on) at audit rate 1,
// waits for every verdict and fails on any failed or inconclusive audit
// or any of peers failed or quarantined. It returns the number of audited
// calls and the largest margin among the peers' recent audits.
func honestRounds(t *testing.T, c *Coordinator, key string, runs []protocol.Run, peers []string, rng *rand.Rand, rounds int, withForward bool) (int, float64) {
	t.Helper()
	calls := 0
	for i := range rounds {
		for _, run := range runs {
			base := c.URL() + "/v1/runs/" + run.ID + "/"
			mustStatus(t, do(t, "POST", base+"forward_backward", key, tokenData(rng, 2)), 200)
			if withForward {
				mustStatus(t, do(t, "POST", base+"forward", key, tokenData(rng, 2)), 200)
				calls++
			}
			mustStatus(t, do(t, "POST", base+"sample", key, sampleBody(rng, float64(i%2))), 200)
			mustStatus(t, do(t, "POST", base+"optim_step", key, map[string]any{}), 200)
			calls += 2
			if i > 0 {
				// At rate 1 the first optim_step anchors the run's trail
				// and each later one is audited (audittrail.go).
				calls++
			}
		}
	}
	waitFor(t, 300*time.Second, "every audit decided", func() bool {
		return c.auditor.passed.Load()+c.auditor.failed.Load()+c.auditor.inconclusive.Load() == int64(calls)
	})
	if f, inc := c.auditor.failed.Load(), c.auditor.inconclusive.Load(); f != 0 || inc != 0 {
		t.Fatalf("%d honest audits failed, %d inconclusive", f, inc)
	}
	worst := 0.0
	for _, p := range peers {
		rec := nodeAudits(c, p)
		if rec.Failed != 0 || rec.Quarantined {
			t.Fatalf("honest node %s: %+v", p, rec)
		}
		for _, a := range rec.Recent {
			worst = max(worst, a.Margin)
		}
	}
	return calls, worst
}

// oomEngine is a node whose advert claims room it does not have: every
// session open answers out of memory, as the native engine's memory check
// or a GPU worker's allocator would.
type oomEngine struct {
	node.Engine
	opens *atomic.Int64
}

func (e oomEngine) Open(context.Context, protocol.SessionSpec) (node.Session, error) {
	e.opens.Add(1)
	return nil, fmt.Errorf("load model tiny: %w", node.ErrOutOfMemory)
}

// TestMemoryIsMeasured: a node that advertises a terabyte but cannot hold
// the model is tried once; its answer becomes its measured memory ceiling,
// and placement gives it no run of that model again while the ceiling
// holds, whatever its advert says. The node that held the model has that
// much proven. Both show in /v1/nodes.
func TestMemoryIsMeasured(t *testing.T) {
	peers := []string{"node-a-claims", "node-b"}
	net := newRealNet(t, peers, nil)
	var opens atomic.Int64
	liar := net.nodes["node-a-claims"]
	liar.m = node.NewManager(node.ManagerConfig{MaxSessions: 8, TempDir: t.TempDir()}, oomEngine{opens: &opens})
	liar.info.CPU.MemoryTotal = 1 << 40
	for _, p := range peers {
		net.nodes[p].info.ModelMemory = map[string]int64{"tiny": 3 << 20}
	}
	c := auditCluster(t, net, 0, time.Hour, map[string]string{"node-a-claims": "op-a", "node-b": "op-b"})
	key, _ := createKey(t, c.URL(), 10_000_000)
	for range 3 {
		if run := createRun(t, c.URL(), key, map[string]any{"base_model": "tiny", "lora_rank": 4}); run.Node != "node-b" {
			t.Fatalf("run on %s, want node-b", run.Node)
		}
	}
	if n := opens.Load(); n != 1 {
		t.Fatalf("the node that could not hold the model was tried %d times, want once", n)
	}
	a, b := nodeAudits(c, "node-a-claims"), nodeAudits(c, "node-b")
	if a.MemoryCeiling != 3<<20 || b.MemoryProven != 3<<20 || b.MemoryCeiling != 0 {
		t.Fatalf("measured memory: %s ceiling %d; node-b proven %d, ceiling %d", "node-a-claims", a.MemoryCeiling, b.MemoryProven, b.MemoryCeiling)
	}
	var list protocol.NodeList
	do(t, "GET", c.URL()+"/v1/nodes", key, nil).decode(t, &list)
	for _, n := range list.Nodes {
		if n.PeerID == "node-a-claims" && (n.Audits == nil || n.Audits.MemoryCeilingBytes != 3<<20) {
			t.Fatalf("/v1/nodes shows %+v for the node that could not hold the model", n.Audits)
		}
	}
}
