package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// startLying starts one member over a fake network whose nodes answer as
// lie rewrites their honest answers: issue 13's lying engine behind a node.
func startLying(t *testing.T, lie func(req protocol.SessionRequest, resp *protocol.SessionResponse), mod func(*Config)) (*Coordinator, *fakeNet) {
	t.Helper()
	return startOne(t, func(cfg *Config) {
		b := cfg.Backend.(*fakeBackend)
		honest := b.DoFn
		b.DoFn = func(ctx context.Context, peer string, req protocol.SessionRequest) (protocol.SessionResponse, error) {
			resp, err := honest(ctx, peer, req)
			if err == nil && resp.Error == nil && lie != nil {
				lie(req, &resp)
			}
			return resp, err
		}
		if mod != nil {
			mod(cfg)
		}
	})
}

// slowForwardBackward is a node that takes d over every forward_backward,
// so calls overlap it.
func slowForwardBackward(d time.Duration) func(protocol.SessionRequest, *protocol.SessionResponse) {
	return func(req protocol.SessionRequest, _ *protocol.SessionResponse) {
		if req.Call == protocol.CallForwardBackward {
			time.Sleep(d)
		}
	}
}

// hangUp posts body and hangs up after wait; the call must not have
// answered by then.
func hangUp(t *testing.T, url, key string, body any, wait time.Duration) {
	t.Helper()
	b, _ := json.Marshal(body)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(b))
	req.Header.Set("Authorization", "Bearer "+key)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("the call answered %d before the client hung up", resp.StatusCode)
	}
}

func accountOf(t *testing.T, base, key string) protocol.Account {
	t.Helper()
	var a protocol.Account
	r := do(t, "GET", base+"/v1/account", key, nil)
	mustStatus(t, r, 200)
	r.decode(t, &a)
	return a
}

// TestNodeCannotSetTheBill: a node that reports a thousand times the work
// it was given is billed the coordinator's own count (token Datum), and
// the most the request allows (sampled tokens, stored bytes).
func TestNodeCannotSetTheBill(t *testing.T) {
	c, _ := startLying(t, func(req protocol.SessionRequest, resp *protocol.SessionResponse) {
		resp.Usage.TrainTokens *= 1000
		resp.Usage.PrefillTokens *= 1000
		resp.Usage.SampledTokens *= 1000
		if req.Call == protocol.CallSaveState {
			resp.Usage.StoredBytes = 1 << 50
		}
	}, nil)
	base := c.URL()
	key, _ := createKey(t, base, 100_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 1, "checkpoint_every": 0})

	// 3 tokens at 1000 µc/1K: 3, not 3000.
	r := do(t, "POST", base+"/v1/runs/"+run.ID+"/forward_backward", key, fbBody(3))
	mustStatus(t, r, 200)
	var fb protocol.ForwardBackwardResponse
	r.decode(t, &fb)
	if fb.Cost.MicroCredits != 3 || fb.Cost.TrainTokens != 3 {
		t.Fatalf("forward_backward of 3 tokens charged %+v", fb.Cost)
	}
	// 1 prompt × 1 sample × 4 tokens at 2000/1K = 8, + 2 prefill tokens at 500/1K = 1.
	r = do(t, "POST", base+"/v1/runs/"+run.ID+"/sample", key, map[string]any{"prompts": []any{map[string]any{"tokens": []int{1, 2}}}, "sampling_params": map[string]any{"max_tokens": 4}})
	mustStatus(t, r, 200)
	var sr protocol.SampleResponse
	r.decode(t, &sr)
	if sr.Cost.SampledTokens != 4 || sr.Cost.PrefillTokens != 2 || sr.Cost.MicroCredits != 9 {
		t.Fatalf("sample of 4 tokens charged %+v", sr.Cost)
	}
	// A rank-1 full checkpoint of this model is at most 3 × 100 MB + 1 MiB:
	// 0.3 GB-hour at 100/GB-hour, not 2^50 bytes.
	r = do(t, "POST", base+"/v1/runs/"+run.ID+"/save_state", key, map[string]any{"mode": "full"})
	mustStatus(t, r, 200)
	var ss protocol.SaveStateResponse
	r.decode(t, &ss)
	bound := priceUsage(c.cfg.Models[0].Prices, protocol.Usage{StoredBytes: checkpointBound(c.cfg.Models[0], 1, "full")}).MicroCredits
	if ss.Cost.MicroCredits != bound || bound > 32 {
		t.Fatalf("save_state charged %d, want the bound %d", ss.Cost.MicroCredits, bound)
	}
	if a := accountOf(t, base, key); a.SpentMicroCredits != 3+9+bound {
		t.Fatalf("spent %d, want %d", a.SpentMicroCredits, 3+9+bound)
	}
}

// TestNodeCannotPlantCheckpoints: checkpoints a node attaches to calls
// that make none, for another run, at another step, or outside the
// network's store, never enter the run; a save_state answered with one is
// refused and not charged.
func TestNodeCannotPlantCheckpoints(t *testing.T) {
	var mu sync.Mutex
	var plant func(req protocol.SessionRequest) *protocol.Checkpoint
	c, _ := startLying(t, func(req protocol.SessionRequest, resp *protocol.SessionResponse) {
		mu.Lock()
		defer mu.Unlock()
		if plant == nil {
			return
		}
		if cp := plant(req); cp != nil {
			resp.Checkpoint = cp
			if req.Call == protocol.CallSaveState {
				resp.Body, _ = json.Marshal(protocol.SaveStateResponse{Checkpoint: *cp})
			}
		}
	}, func(cfg *Config) { cfg.CheckpointStores = []string{"file:///ck"} })
	base := c.URL()
	key, _ := createKey(t, base, 100_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 1, "checkpoint_every": 1})
	good := func(req protocol.SessionRequest, step int) protocol.Checkpoint {
		return protocol.Checkpoint{ID: "bafk-planted", RunID: req.RunID, Step: step, Mode: "full", URI: "file:///ck/planted"}
	}
	cases := []struct {
		name string
		call string
		cp   func(req protocol.SessionRequest) protocol.Checkpoint
	}{
		{"on forward_backward", "forward_backward", func(req protocol.SessionRequest) protocol.Checkpoint { return good(req, 0) }},
		{"another run's", "optim_step", func(req protocol.SessionRequest) protocol.Checkpoint {
			cp := good(req, 1)
			cp.RunID = "run_victim"
			return cp
		}},
		{"outside the store", "optim_step", func(req protocol.SessionRequest) protocol.Checkpoint {
			cp := good(req, 2)
			cp.URI = "s3://attacker/ck?endpoint=evil.example:9000"
			return cp
		}},
		{"a file outside the store", "optim_step", func(req protocol.SessionRequest) protocol.Checkpoint {
			cp := good(req, 3)
			cp.Files = []protocol.CheckpointFile{{Name: "adapter_model.safetensors", URI: "file:///etc/passwd"}}
			return cp
		}},
		{"an old step", "optim_step", func(req protocol.SessionRequest) protocol.Checkpoint { return good(req, 0) }},
	}
	for _, tc := range cases {
		mu.Lock()
		plant = func(req protocol.SessionRequest) *protocol.Checkpoint {
			if string(req.Call) != tc.call {
				return nil
			}
			cp := tc.cp(req)
			return &cp
		}
		mu.Unlock()
		body := any(map[string]any{})
		if tc.call == "forward_backward" {
			body = fbBody(2)
		}
		mustStatus(t, do(t, "POST", base+"/v1/runs/"+run.ID+"/"+tc.call, key, body), 200)
	}
	r := do(t, "GET", base+"/v1/runs/"+run.ID, key, nil)
	r.decode(t, &run)
	for _, cp := range run.Checkpoints {
		if cp.ID == "bafk-planted" {
			t.Fatalf("planted checkpoint recorded: %+v", cp)
		}
	}
	// Every optim_step's honest checkpoint was replaced by a planted one.
	if len(run.Checkpoints) != 0 || run.Step != 4 {
		t.Fatalf("run at step %d with checkpoints %+v, want step 4 and none", run.Step, run.Checkpoints)
	}

	mu.Lock()
	plant = func(req protocol.SessionRequest) *protocol.Checkpoint {
		if req.Call != protocol.CallSaveState {
			return nil
		}
		cp := good(req, 4)
		cp.URI = "file:///tmp/attacker/ck"
		return &cp
	}
	mu.Unlock()
	before := accountOf(t, base, key)
	r = do(t, "POST", base+"/v1/runs/"+run.ID+"/save_state", key, map[string]any{"mode": "full"})
	mustStatus(t, r, 503)
	if after := accountOf(t, base, key); after.BalanceMicroCredits != before.BalanceMicroCredits {
		t.Fatalf("a refused save_state was charged: %d -> %d", before.BalanceMicroCredits, after.BalanceMicroCredits)
	}
}

// TestConcurrentCallsCannotOverdraw is issue 13's fourth attack: balance
// 1,000 µc, 20 concurrent calls quoted 820 µc each. One runs; the others
// are refused before they reach a node, so no work goes unpaid.
func TestConcurrentCallsCannotOverdraw(t *testing.T) {
	c, fnet := startLying(t, slowForwardBackward(300*time.Millisecond), nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 1})
	// 820 tokens in 10 Datum of 82 (the model's context is 128).
	body := fbBody(82)
	for len(body.Data) < 10 {
		body.Data = append(body.Data, body.Data[0])
	}
	var wg sync.WaitGroup
	statuses := make([]int, 20)
	for i := range statuses {
		wg.Add(1)
		go func() {
			defer wg.Done()
			statuses[i] = do(t, "POST", base+"/v1/runs/"+run.ID+"/forward_backward", key, body).status
		}()
	}
	wg.Wait()
	ok, refused := 0, 0
	for _, s := range statuses {
		switch s {
		case 200:
			ok++
		case http.StatusPaymentRequired:
			refused++
		}
	}
	if ok != 1 || refused != 19 {
		t.Fatalf("statuses %v: want one 200 and nineteen 402", statuses)
	}
	if n := fnet.count(protocol.CallForwardBackward); n != 1 {
		t.Fatalf("%d calls reached a node, want 1", n)
	}
	if a := accountOf(t, base, key); a.BalanceMicroCredits != 180 || a.SpentMicroCredits != 820 {
		t.Fatalf("balance %d spent %d, want 180 and 820", a.BalanceMicroCredits, a.SpentMicroCredits)
	}
	var holds int
	c.fsm.read(func(s *State) { holds = len(s.Holds()) })
	if holds != 0 {
		t.Fatalf("%d holds left after every call ended", holds)
	}
}

// TestHangUpStillBills is the fifth attack: a client that hangs up while
// its call runs is charged for the work, and the run records it.
func TestHangUpStillBills(t *testing.T) {
	c, fnet := startLying(t, slowForwardBackward(500*time.Millisecond), nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 1})
	hangUp(t, base+"/v1/runs/"+run.ID+"/forward_backward", key, fbBody(100), 100*time.Millisecond)
	waitFor(t, 5*time.Second, "the abandoned call's charge", func() bool { return accountOf(t, base, key).SpentMicroCredits == 100 })
	if n := fnet.count(protocol.CallForwardBackward); n != 1 {
		t.Fatalf("node ran %d calls", n)
	}
	var rec *RunRecord
	c.fsm.read(func(s *State) { rec, _ = s.Run(run.ID) })
	if rec.PendingTokens != 100 {
		t.Fatalf("run's pending tokens %d, want 100: the applied gradients are on record", rec.PendingTokens)
	}
}

// TestCheckpointsBelongToTheirOwner is the ninth attack: user B names user
// A's checkpoint by id and by URI on B's own run; neither reaches a node.
// A checkpoint of another rank is refused on A's own runs too.
func TestCheckpointsBelongToTheirOwner(t *testing.T) {
	c, fnet := startOne(t, nil)
	base := c.URL()
	keyA, _ := createKey(t, base, 100_000_000)
	keyB, _ := createKey(t, base, 100_000_000)
	runA := createRun(t, base, keyA, map[string]any{"base_model": "tiny", "lora_rank": 8})
	r := do(t, "POST", base+"/v1/runs/"+runA.ID+"/save_state", keyA, map[string]any{"mode": "full"})
	mustStatus(t, r, 200)
	var ss protocol.SaveStateResponse
	r.decode(t, &ss)
	runB := createRun(t, base, keyB, map[string]any{"base_model": "tiny", "lora_rank": 8})
	for _, ref := range []string{ss.Checkpoint.ID, ss.Checkpoint.URI} {
		r := do(t, "POST", base+"/v1/runs/"+runB.ID+"/load_state", keyB, map[string]any{"checkpoint": ref})
		mustStatus(t, r, 404)
	}
	if n := fnet.count(protocol.CallLoadState); n != 0 {
		t.Fatalf("%d cross-tenant load_state calls reached a node", n)
	}
	other := createRun(t, base, keyA, map[string]any{"base_model": "tiny", "lora_rank": 4})
	r = do(t, "POST", base+"/v1/runs/"+other.ID+"/load_state", keyA, map[string]any{"checkpoint": ss.Checkpoint.ID})
	mustStatus(t, r, 400)
	same := createRun(t, base, keyA, map[string]any{"base_model": "tiny", "lora_rank": 8})
	mustStatus(t, do(t, "POST", base+"/v1/runs/"+same.ID+"/load_state", keyA, map[string]any{"checkpoint": ss.Checkpoint.URI}), 200)
	if n := fnet.count(protocol.CallLoadState); n != 1 {
		t.Fatalf("%d load_state calls reached a node, want the owner's one", n)
	}
}

// TestSessionSlotsNeedFundsAndHaveAQuota is the sixth attack: a 0-credit
// account opens no run, a funded one at most MaxRunsPerAccount, and the
// slots it cannot take stay for others.
func TestSessionSlotsNeedFundsAndHaveAQuota(t *testing.T) {
	c, _ := startOne(t, func(cfg *Config) { cfg.MaxRunsPerAccount = 3 })
	base := c.URL()
	broke, _ := createKey(t, base, 0)
	r := do(t, "POST", base+"/v1/runs", broke, map[string]any{"base_model": "tiny", "lora_rank": 1})
	mustStatus(t, r, http.StatusPaymentRequired)
	greedy, _ := createKey(t, base, 1_000_000)
	var runs []protocol.Run
	for i := 0; i < 3; i++ {
		runs = append(runs, createRun(t, base, greedy, map[string]any{"base_model": "tiny", "lora_rank": 1}))
	}
	r = do(t, "POST", base+"/v1/runs", greedy, map[string]any{"base_model": "tiny", "lora_rank": 1})
	mustStatus(t, r, http.StatusTooManyRequests)
	if r.header.Get("Retry-After") == "" {
		t.Fatal("429 without Retry-After")
	}
	victim, _ := createKey(t, base, 1_000_000)
	createRun(t, base, victim, map[string]any{"base_model": "tiny", "lora_rank": 1})
	mustStatus(t, do(t, "DELETE", base+"/v1/runs/"+runs[0].ID, greedy, nil), 200)
	createRun(t, base, greedy, map[string]any{"base_model": "tiny", "lora_rank": 1})
}

// TestMoveFallsBackThenFails: a move whose newest checkpoint a node
// refuses falls back to the one before it; when every one is refused the
// run ends failed with the reason, instead of moving forever.
func TestMoveFallsBackThenFails(t *testing.T) {
	var mu sync.Mutex
	refused := map[int]bool{}
	c, fnet := startLying(t, func(req protocol.SessionRequest, resp *protocol.SessionResponse) {
		if req.Call != protocol.CallInit {
			return
		}
		var spec protocol.SessionSpec
		_ = json.Unmarshal(req.Body, &spec)
		mu.Lock()
		defer mu.Unlock()
		if spec.ResumeFrom != nil && refused[spec.ResumeFrom.Step] {
			resp.Body = nil
			resp.Error = &protocol.ErrorBody{Code: protocol.CodeInvalidRequest, Message: "checkpoint does not match its cid"}
		}
	}, nil)
	base := c.URL()
	key, _ := createKey(t, base, 100_000_000)
	trained := func() protocol.Run {
		run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 1, "checkpoint_every": 1})
		for i := 0; i < 3; i++ {
			mustStatus(t, do(t, "POST", base+"/v1/runs/"+run.ID+"/optim_step", key, nil), 200)
		}
		return run
	}
	settle := func(run protocol.Run, lost string) protocol.Run {
		var cur protocol.Run
		waitFor(t, 15*time.Second, "the move to end", func() bool {
			do(t, "GET", base+"/v1/runs/"+run.ID, key, nil).decode(t, &cur)
			return cur.Status == protocol.RunFailed || (cur.Status == protocol.RunReady && cur.Node != lost)
		})
		return cur
	}

	mu.Lock()
	refused[3] = true
	mu.Unlock()
	run := trained()
	fnet.setDown(run.Node, true)
	got := settle(run, run.Node)
	if got.Status != protocol.RunReady || got.ResumedFromStep == nil || *got.ResumedFromStep != 2 {
		t.Fatalf("run after one refused checkpoint: %s, resumed from %v; want ready from step 2", got.Status, got.ResumedFromStep)
	}
	fnet.setDown(run.Node, false)

	mu.Lock()
	refused[1], refused[2] = true, true
	mu.Unlock()
	run = trained()
	fnet.setDown(run.Node, true)
	got = settle(run, run.Node)
	if got.Status != protocol.RunFailed || !strings.Contains(got.StatusReason, "3 checkpoints") {
		t.Fatalf("run with every checkpoint refused: %s (%q), want failed naming its checkpoints", got.Status, got.StatusReason)
	}
}

// TestQueuedCallOfAGoneClientNeverRuns: a call waiting behind another on
// the same run, whose client hangs up, is dropped before any node sees it
// and costs nothing; the running one is billed.
func TestQueuedCallOfAGoneClientNeverRuns(t *testing.T) {
	c, fnet := startLying(t, slowForwardBackward(600*time.Millisecond), nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 1})
	first := make(chan int)
	go func() { first <- do(t, "POST", base+"/v1/runs/"+run.ID+"/forward_backward", key, fbBody(10)).status }()
	time.Sleep(150 * time.Millisecond) // the first call is on the node
	hangUp(t, base+"/v1/runs/"+run.ID+"/forward_backward", key, fbBody(20), 200*time.Millisecond)
	if s := <-first; s != 200 {
		t.Fatalf("first call: %d", s)
	}
	time.Sleep(300 * time.Millisecond)
	if n := fnet.count(protocol.CallForwardBackward); n != 1 {
		t.Fatalf("%d calls reached the node, want only the first", n)
	}
	if a := accountOf(t, base, key); a.SpentMicroCredits != 10 {
		t.Fatalf("spent %d, want the first call's 10", a.SpentMicroCredits)
	}
	// The gone call's hold is released through raft after the call ends:
	// wait for it, as a loaded machine may take a moment.
	waitFor(t, 5*time.Second, "no hold left", func() bool {
		var holds int
		c.fsm.read(func(s *State) { holds = len(s.Holds()) })
		return holds == 0
	})
}

// TestIdleRunIsSavedAndEnded: a run without a call for IdleRunTTL is saved
// (full) and ended, freeing its slot; its checkpoint loads on a new run.
func TestIdleRunIsSavedAndEnded(t *testing.T) {
	// The TTL is several times a call's worst round trip on a loaded
	// machine under -race, so the busy run's calls keep it alive.
	c, fnet := startOne(t, func(cfg *Config) { cfg.IdleRunTTL = 1500 * time.Millisecond })
	base := c.URL()
	key, _ := createKey(t, base, 100_000_000)
	busy := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 2})
	idle := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 2})
	mustStatus(t, do(t, "POST", base+"/v1/runs/"+idle.ID+"/optim_step", key, nil), 200)
	stop := time.Now().Add(3500 * time.Millisecond)
	for time.Now().Before(stop) { // keep one run busy past the TTL
		mustStatus(t, do(t, "POST", base+"/v1/runs/"+busy.ID+"/forward_backward", key, fbBody(2)), 200)
		time.Sleep(100 * time.Millisecond)
	}
	var got protocol.Run
	waitFor(t, 5*time.Second, "the idle run ended", func() bool {
		do(t, "GET", base+"/v1/runs/"+idle.ID, key, nil).decode(t, &got)
		return got.Status == protocol.RunEnded
	})
	if len(got.Checkpoints) == 0 || got.Checkpoints[len(got.Checkpoints)-1].Mode != "full" || !strings.Contains(got.StatusReason, "load_state") {
		t.Fatalf("idle run ended as %+v", got)
	}
	do(t, "GET", base+"/v1/runs/"+busy.ID, key, nil).decode(t, &got)
	if got.Status != protocol.RunReady {
		t.Fatalf("the busy run is %s", got.Status)
	}
	if n := fnet.count(protocol.CallClose); n != 1 {
		t.Fatalf("%d sessions closed, want the idle one", n)
	}
	var ended protocol.Run
	do(t, "GET", base+"/v1/runs/"+idle.ID, key, nil).decode(t, &ended)
	again := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 2})
	mustStatus(t, do(t, "POST", base+"/v1/runs/"+again.ID+"/load_state", key, map[string]any{"checkpoint": ended.Checkpoints[len(ended.Checkpoints)-1].ID}), 200)
}
