package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/signal-p2p/signal/protocol"
)

const testAdmin = "test-admin-token"

// fakeBackend is a Backend built from function fields (STYLE.md 7).
type fakeBackend struct {
	NodesFn func() []protocol.Node
	DoFn    func(ctx context.Context, peer string, req protocol.SessionRequest) (protocol.SessionResponse, error)
}

var _ Backend = (*fakeBackend)(nil)

func (f *fakeBackend) Nodes() []protocol.Node { return f.NodesFn() }
func (f *fakeBackend) Do(ctx context.Context, peer string, req protocol.SessionRequest) (protocol.SessionResponse, error) {
	return f.DoFn(ctx, peer, req)
}

// fakeNet simulates nodes that answer session calls with fixed-shape
// answers: each forward_backward reports its token count as usage, each
// optim_step advances the step, save_state writes a checkpoint. Nodes can
// be taken down; a repeated RequestID is answered from the first result as
// real nodes do.
type fakeNet struct {
	mu       sync.Mutex
	nodes    map[string]*fakeNode
	calls    map[string]int // per call name
	executed map[string]protocol.SessionResponse
	// refuse, when set, answers a compute call with this error as a node
	// that refuses the request's content does.
	refuse *protocol.ErrorBody
}

type fakeNode struct {
	info     protocol.Node
	down     bool
	sessions map[string]*fakeSession
}

type fakeSession struct {
	spec protocol.SessionSpec
	step int
}

func newFakeNet(peers ...string) *fakeNet {
	n := &fakeNet{nodes: map[string]*fakeNode{}, calls: map[string]int{}, executed: map[string]protocol.SessionResponse{}}
	for _, p := range peers {
		n.nodes[p] = &fakeNode{info: protocol.Node{PeerID: p, CPU: protocol.CPU{Cores: 2, MemoryTotal: 8 << 30}, MaxSessions: 8, Backends: []string{"native"}}, sessions: map[string]*fakeSession{}}
	}
	return n
}

func (n *fakeNet) setDown(peer string, down bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.nodes[peer].down = down
}

// serve sets the models every node lists.
func (n *fakeNet) serve(models ...string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, nd := range n.nodes {
		nd.info.Models = models
	}
}

func (n *fakeNet) count(call protocol.Call) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.calls[string(call)]
}

func (n *fakeNet) backend() *fakeBackend {
	return &fakeBackend{
		NodesFn: func() []protocol.Node {
			n.mu.Lock()
			defer n.mu.Unlock()
			var out []protocol.Node
			for _, nd := range n.nodes {
				if !nd.down {
					info := nd.info
					info.Sessions = len(nd.sessions)
					out = append(out, info)
				}
			}
			return out
		},
		DoFn: n.do,
	}
}

func (n *fakeNet) do(_ context.Context, peer string, req protocol.SessionRequest) (protocol.SessionResponse, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	nd := n.nodes[peer]
	if nd == nil || nd.down {
		return protocol.SessionResponse{}, fmt.Errorf("dial %s: %w", peer, ErrNodeLost)
	}
	if prev, ok := n.executed[peer+"/"+req.RequestID]; ok {
		return prev, nil
	}
	n.calls[string(req.Call)]++
	resp := protocol.SessionResponse{RequestID: req.RequestID}
	fail := func(code, msg string) (protocol.SessionResponse, error) {
		resp.Error = &protocol.ErrorBody{Code: code, Message: msg}
		return resp, nil
	}
	s := nd.sessions[req.RunID]
	if req.Call != protocol.CallInit && s == nil {
		return fail(protocol.CodeNotFound, "no session "+req.RunID)
	}
	if n.refuse != nil && req.Call != protocol.CallInit && req.Call != protocol.CallClose {
		return fail(n.refuse.Code, n.refuse.Message)
	}
	switch req.Call {
	case protocol.CallInit:
		var spec protocol.SessionSpec
		if err := json.Unmarshal(req.Body, &spec); err != nil {
			return fail(protocol.CodeInvalidRequest, err.Error())
		}
		// A node that lists its models refuses others, as a real one does.
		if ms := nd.info.Models; len(ms) > 0 && !slices.Contains(ms, spec.BaseModel) {
			return fail(protocol.CodeUnknownModel, fmt.Sprintf("this node does not serve base_model %q (it serves %s)", spec.BaseModel, strings.Join(ms, ", ")))
		}
		s = &fakeSession{spec: spec}
		if spec.ResumeFrom != nil {
			s.step = spec.ResumeFrom.Step
		}
		nd.sessions[req.RunID] = s
		resp.Body = json.RawMessage(`{}`)
	case protocol.CallForwardBackward, protocol.CallForward:
		var fb protocol.ForwardBackwardRequest
		if err := json.Unmarshal(req.Body, &fb); err != nil {
			return fail(protocol.CodeInvalidRequest, err.Error())
		}
		// Every token with weight w costs loss 2w (weight 1 without
		// weights), so loss_mean is 2 over the weighted tokens, as a real
		// node's loss_sum / Σweights.
		var tokens int64
		var weight float64
		var lp [][]float64
		for _, d := range fb.Data {
			tokens += int64(len(d.ModelInput.Tokens))
			lp = append(lp, make([]float64, len(d.ModelInput.Tokens)))
			if d.LossFnInputs.Weights == nil {
				weight += float64(len(d.ModelInput.Tokens))
			}
			for _, w := range d.LossFnInputs.Weights {
				weight += w
			}
		}
		out := protocol.ForwardBackwardResponse{LossSum: 2 * weight, Tokens: tokens, Logprobs: lp}
		if k := fb.TopKLogprobs; k > 0 {
			// Ids 0..k-1 at logprobs -1, -2, … at every position.
			for _, d := range fb.Data {
				tl := protocol.TopLogprobs{}
				for range d.ModelInput.Tokens {
					ids, lps := make([]int, k), make([]float64, k)
					for j := range k {
						ids[j], lps[j] = j, -float64(j+1)
					}
					tl.IDs, tl.Logprobs = append(tl.IDs, ids), append(tl.Logprobs, lps)
				}
				out.TopLogprobs = append(out.TopLogprobs, tl)
			}
		}
		if weight > 0 {
			out.LossMean = 2
		}
		resp.Figures = &protocol.Figures{LossSum: out.LossSum, WeightSum: weight, Tokens: tokens}
		if req.Call == protocol.CallForwardBackward {
			g := 1.5
			out.GradNorm, resp.Figures.GradNorm = &g, &g
			resp.Usage.TrainTokens = tokens
		} else {
			resp.Usage.PrefillTokens = tokens
		}
		resp.Body, _ = json.Marshal(out)
	case protocol.CallOptimStep:
		s.step++
		resp.Body, _ = json.Marshal(protocol.OptimStepResponse{Step: s.step, LearningRate: 1e-4, GradNorm: 1.5})
		g := 1.5
		resp.Figures = &protocol.Figures{Step: s.step, LearningRate: 1e-4, GradNorm: &g}
		if every := s.spec.CheckpointEvery; every > 0 && s.step%every == 0 {
			resp.Checkpoint = &protocol.Checkpoint{ID: fmt.Sprintf("ck-%s-%d", req.RunID, s.step), RunID: req.RunID, Step: s.step, Mode: "full", URI: fmt.Sprintf("file:///ck/%s/%d", req.RunID, s.step)}
		}
	case protocol.CallSample:
		var sr protocol.SampleRequest
		if err := json.Unmarshal(req.Body, &sr); err != nil {
			return fail(protocol.CodeInvalidRequest, err.Error())
		}
		num := 1
		if sr.NumSamples != nil {
			num = *sr.NumSamples
		}
		var out protocol.SampleResponse
		for range sr.Prompts {
			var ss []protocol.Sample
			for i := 0; i < num; i++ {
				ss = append(ss, protocol.Sample{Tokens: make([]int, sr.SamplingParams.MaxTokens), Text: "x", Logprobs: make([]float64, sr.SamplingParams.MaxTokens), StopReason: "length"})
			}
			out.Samples = append(out.Samples, ss)
			resp.Usage.PrefillTokens += int64(len(sr.Prompts))
			resp.Usage.SampledTokens += int64(num * sr.SamplingParams.MaxTokens)
		}
		resp.Body, _ = json.Marshal(out)
	case protocol.CallSaveState:
		cp := protocol.Checkpoint{ID: fmt.Sprintf("ck-%s-save-%d", req.RunID, s.step), RunID: req.RunID, Step: s.step, Mode: "full", URI: "file:///ck/" + req.RunID}
		resp.Checkpoint = &cp
		resp.Usage.StoredBytes = 2_000_000_000
		resp.Body, _ = json.Marshal(protocol.SaveStateResponse{Checkpoint: cp})
	case protocol.CallLoadState:
		resp.Body, _ = json.Marshal(map[string]int{"step": s.step})
	case protocol.CallClose:
		delete(nd.sessions, req.RunID)
		resp.Body = json.RawMessage(`{}`)
	}
	n.executed[peer+"/"+req.RequestID] = resp
	return resp, nil
}

// testConfig is a coordinator config for loopback tests with fast raft timing.
func testConfig(t testing.TB, id string) Config {
	t.Helper()
	cfg := DefaultConfig()
	cfg.ID = id
	cfg.DataDir = t.TempDir()
	cfg.RaftAddr = "127.0.0.1:0"
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.AdminToken = testAdmin
	cfg.HeartbeatTimeout = 300 * time.Millisecond
	cfg.ElectionTimeout = 300 * time.Millisecond
	cfg.LeaderLeaseTimeout = 150 * time.Millisecond
	cfg.CommitTimeout = 5 * time.Millisecond
	cfg.NodeLostAfter = 300 * time.Millisecond
	cfg.RetryAfter = time.Second
	// Capacity challenges (challenge.go) would add node calls that tests
	// counting them do not expect; the tests of challenges turn them on.
	cfg.ChallengeInterval = -1
	// AdapterBytesPerRank bounds a rank-8 full checkpoint at 2.4 GB: room
	// for the fake node's 2 GB save_state.
	cfg.Models = []ModelSpec{{Name: "tiny", ContextLength: 128, MemoryBytes: 1 << 20, AdapterBytesPerRank: 100_000_000, Prices: protocol.Prices{TrainMicroCreditsPer1K: 1000, PrefillMicroCreditsPer1K: 500, SampleMicroCreditsPer1K: 2000, StorageMicroCreditsPerGBHour: 100}}}
	return cfg
}

func mustStart(t testing.TB, cfg Config) *Coordinator {
	t.Helper()
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Stop() })
	return c
}

// startCluster starts n members over loopback: the first bootstraps, the
// others join through it. mod adjusts each config.
func startCluster(t testing.TB, n int, mod func(*Config)) []*Coordinator {
	t.Helper()
	var cs []*Coordinator
	for i := 0; i < n; i++ {
		cfg := testConfig(t, fmt.Sprintf("c%d", i))
		if i == 0 {
			cfg.Bootstrap = true
		} else {
			cfg.Join = cs[0].URL()
		}
		if mod != nil {
			mod(&cfg)
		}
		cs = append(cs, mustStart(t, cfg))
		if i == 0 {
			waitFor(t, 10*time.Second, "first leader", cs[0].IsLeader)
		}
	}
	waitFor(t, 15*time.Second, "all members joined", func() bool {
		l := leaderOf(cs)
		if l == nil {
			return false
		}
		f := l.raft.GetConfiguration()
		if f.Error() != nil || len(f.Configuration().Servers) != n {
			return false
		}
		for _, c := range cs {
			if c.raft.AppliedIndex() < l.raft.AppliedIndex() {
				return false
			}
		}
		return true
	})
	return cs
}

func leaderOf(cs []*Coordinator) *Coordinator {
	for _, c := range cs {
		if c != nil && c.IsLeader() {
			return c
		}
	}
	return nil
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// apiResp is one HTTP answer.
type apiResp struct {
	status int
	body   []byte
	header http.Header
}

func (r apiResp) decode(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
}

func (r apiResp) errCode(t *testing.T) string {
	t.Helper()
	var e protocol.ErrorResponse
	r.decode(t, &e)
	return e.Error.Code
}

func do(t *testing.T, method, url, token string, body any, hdr ...string) apiResp {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	case string:
		rd = bytes.NewReader([]byte(b))
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return apiResp{status: resp.StatusCode, body: b, header: resp.Header}
}

func mustStatus(t *testing.T, r apiResp, want int) {
	t.Helper()
	if r.status != want {
		t.Fatalf("status %d, want %d: %s", r.status, want, r.body)
	}
}

// createKey makes an API key with credits through the admin API.
func createKey(t *testing.T, base string, credits int64) (key, account string) {
	t.Helper()
	r := do(t, "POST", base+"/v1/admin/keys", testAdmin, protocol.CreateKeyRequest{Credits: credits, Name: "test"})
	mustStatus(t, r, 200)
	var out protocol.CreateKeyResponse
	r.decode(t, &out)
	return out.APIKey, out.Account
}

// joinNodes registers fake peers as joined nodes through the registry API.
func joinNodes(t *testing.T, c *Coordinator, operator string, peers ...string) {
	t.Helper()
	r := do(t, "POST", c.URL()+"/v1/admin/join_tokens", testAdmin, protocol.JoinTokenRequest{OperatorAccount: operator})
	mustStatus(t, r, 200)
	var jt protocol.JoinTokenResponse
	r.decode(t, &jt)
	for _, p := range peers {
		if _, err := c.AdmitNode(context.Background(), p, jt.JoinToken); err != nil {
			t.Fatal(err)
		}
	}
}

// charge commits one bare charge through raft on c (the leader): the path
// the reliability tests and the benchmark measure.
func (c *Coordinator) charge(ctx context.Context, account string, credits int64, idemKey string) (ChargeResult, error) {
	cmd := chargeCmd{Account: account, Operator: "op", FeeBPS: c.cfg.FeeBasisPoints, Cost: protocol.Cost{MicroCredits: credits}, Time: now(), RequireAll: true}
	if idemKey != "" {
		cmd.Idem = &IdemTag{Scope: account + "\x00" + idemKey, BodyHash: "bench"}
	}
	v, err := c.propose(ctx, cmdCharge, cmd)
	if err != nil {
		return ChargeResult{}, err
	}
	return v.(ChargeResult), nil
}

var _ = raft.Leader

// createRun creates a run with body as the POST /v1/runs request, requiring 201.
func createRun(t *testing.T, base, key string, body map[string]any) protocol.Run {
	t.Helper()
	r := do(t, "POST", base+"/v1/runs", key, body)
	mustStatus(t, r, 201)
	var run protocol.Run
	r.decode(t, &run)
	return run
}

func (r apiResp) errMessage(t *testing.T) string {
	t.Helper()
	var e protocol.ErrorResponse
	r.decode(t, &e)
	return e.Error.Message
}
