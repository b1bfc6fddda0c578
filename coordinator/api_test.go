package coordinator

import (
	"strings"
	"testing"
	"time"

	"github.com/signal-p2p/signal/ledger"
	"github.com/signal-p2p/signal/protocol"
)

func fbBody(tokens int) protocol.ForwardBackwardRequest {
	d := protocol.Datum{}
	for i := 0; i < tokens; i++ {
		d.ModelInput.Tokens = append(d.ModelInput.Tokens, i+1)
		d.LossFnInputs.TargetTokens = append(d.LossFnInputs.TargetTokens, i+2)
		d.LossFnInputs.Weights = append(d.LossFnInputs.Weights, 1)
	}
	return protocol.ForwardBackwardRequest{Data: []protocol.Datum{d}}
}

// startOne starts a single-member cluster with a fake node network of two
// joined nodes.
func startOne(t *testing.T, mod func(*Config)) (*Coordinator, *fakeNet) {
	t.Helper()
	net := newFakeNet("nodeA", "nodeB")
	cfg := testConfig(t, "solo")
	cfg.Bootstrap = true
	cfg.Backend = net.backend()
	if mod != nil {
		mod(&cfg)
	}
	c := mustStart(t, cfg)
	waitFor(t, 10*time.Second, "leader", c.IsLeader)
	joinNodes(t, c, "operator-1", "nodeA", "nodeB")
	return c, net
}

func TestAPITrainingFlowBillsExactly(t *testing.T) {
	c, fnet := startOne(t, nil)
	base := c.URL()
	key, acct := createKey(t, base, 1_000_000)

	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 8, "checkpoint_every": 2})
	if run.Status != protocol.RunReady || run.Node == "" || run.LoRARank != 8 || len(run.TargetModules) != 7 {
		t.Fatalf("created run %+v", run)
	}

	// forward_backward over 100 tokens at 1000 µcredits/1K = 100.
	r := do(t, "POST", base+"/v1/runs/"+run.ID+"/forward_backward", key, fbBody(100))
	mustStatus(t, r, 200)
	var fb protocol.ForwardBackwardResponse
	r.decode(t, &fb)
	if fb.Cost == nil || fb.Cost.MicroCredits != 100 || fb.Cost.TrainTokens != 100 || fb.Balance == nil || *fb.Balance != 999_900 {
		t.Fatalf("fb billing: cost %+v balance %v", fb.Cost, fb.Balance)
	}
	if fb.Tokens != 100 || fb.GradNorm == nil || fb.PendingBatches != 1 {
		t.Fatalf("fb body %s", r.body)
	}

	for i := 0; i < 2; i++ {
		r = do(t, "POST", base+"/v1/runs/"+run.ID+"/optim_step", key, map[string]any{"adam_params": map[string]any{"learning_rate": 1e-4}})
		mustStatus(t, r, 200)
	}
	var os protocol.OptimStepResponse
	r.decode(t, &os)
	if os.Step != 2 || os.Cost == nil || os.Cost.MicroCredits != 0 {
		t.Fatalf("optim_step %s", r.body)
	}
	// sample: 1 prompt × 2 samples × 10 tokens = 20 sampled (at 2000/1K → 40) + 1 prefill (500/1K → 1).
	r = do(t, "POST", base+"/v1/runs/"+run.ID+"/sample", key, map[string]any{"prompts": []any{map[string]any{"tokens": []int{1, 2}}}, "num_samples": 2, "sampling_params": map[string]any{"max_tokens": 10}})
	mustStatus(t, r, 200)
	var sr protocol.SampleResponse
	r.decode(t, &sr)
	if len(sr.Samples) != 1 || len(sr.Samples[0]) != 2 || sr.Cost.MicroCredits != 41 || *sr.Balance != 999_859 {
		t.Fatalf("sample %s", r.body)
	}
	// save_state: 2 GB for one hour at 100/GB-hour = 200 (+1 rounding unit).
	r = do(t, "POST", base+"/v1/runs/"+run.ID+"/save_state", key, map[string]any{"mode": "full"})
	mustStatus(t, r, 200)
	var ss protocol.SaveStateResponse
	r.decode(t, &ss)
	if ss.Checkpoint.ID == "" || ss.Cost.MicroCredits != 201 {
		t.Fatalf("save_state %s", r.body)
	}

	r = do(t, "GET", base+"/v1/runs/"+run.ID, key, nil)
	mustStatus(t, r, 200)
	r.decode(t, &run)
	if run.Step != 2 || run.SpentMicroCredits != 100+41+201 || len(run.Checkpoints) != 2 || run.LastMetrics == nil || run.LastMetrics.Step != 2 {
		t.Fatalf("run after calls %s", r.body)
	}
	r = do(t, "GET", base+"/v1/runs/"+run.ID+"/metrics", key, nil)
	var ms protocol.MetricsResponse
	r.decode(t, &ms)
	if len(ms.Metrics) != 2 || ms.Metrics[0].LossMean == nil || *ms.Metrics[0].LossMean != 2 || ms.Metrics[0].Tokens != 100 {
		t.Fatalf("metrics %s", r.body)
	}

	r = do(t, "GET", base+"/v1/account", key, nil)
	var a protocol.Account
	r.decode(t, &a)
	if a.Account != acct || a.BalanceMicroCredits != 1_000_000-342 || a.SpentMicroCredits != 342 || len(a.Charges) != 5 {
		t.Fatalf("account %s", r.body)
	}
	// The operator earned 90%, held in its nodes' escrows until audits
	// release it, and the network 10% (fee rounded down).
	c.State(func(s *State) {
		held := s.Balance(ledger.EscrowAccount("nodeA")) + s.Balance(ledger.EscrowAccount("nodeB"))
		if got := s.Balance("operator-1") + held + s.Balance(DefaultFeeAccount); got != 342 || held == 0 {
			t.Errorf("operator+held+fee = %d (held %d), want 342, held", got, held)
		}
		if err := s.Ledger().Check(); err != nil {
			t.Error(err)
		}
	})

	r = do(t, "POST", base+"/v1/runs/"+run.ID+"/load_state", key, map[string]any{"checkpoint": ss.Checkpoint.ID})
	mustStatus(t, r, 200)
	r = do(t, "GET", base+"/v1/runs", key, nil)
	var rl protocol.RunList
	r.decode(t, &rl)
	if len(rl.Runs) != 1 {
		t.Fatalf("runs %s", r.body)
	}
	r = do(t, "DELETE", base+"/v1/runs/"+run.ID, key, nil)
	mustStatus(t, r, 200)
	r.decode(t, &run)
	if run.Status != protocol.RunEnded || fnet.count(protocol.CallClose) != 1 {
		t.Fatalf("ended run %s, closes %d", r.body, fnet.count(protocol.CallClose))
	}
	r = do(t, "POST", base+"/v1/runs/"+run.ID+"/optim_step", key, nil)
	mustStatus(t, r, 409)
}

func TestAPIErrors(t *testing.T) {
	c, _ := startOne(t, func(cfg *Config) { cfg.MaxBodyBytes = 4096 })
	base := c.URL()
	key, _ := createKey(t, base, 50)
	other, _ := createKey(t, base, 1000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny"})
	runURL := base + "/v1/runs/" + run.ID

	tests := []struct {
		name, method, url, token string
		body                     any
		status                   int
		code, msg                string
	}{
		{"no key", "GET", base + "/v1/account", "", nil, 401, "unauthorized", `the Authorization header is missing: send "Authorization: Bearer <API key>"`},
		{"bad key", "GET", base + "/v1/account", "sk-sig-nope", nil, 401, "unauthorized", "the API key is unknown: check SIGNAL_API_KEY (signal keys create makes one)"},
		{"admin without token", "POST", base + "/v1/admin/keys", key, map[string]any{"credits": 1}, 403, "forbidden", "this is an admin call: send the admin token, not an API key"},
		{"unknown model", "POST", base + "/v1/runs", key, map[string]any{"base_model": "gpt-9"}, 400, "unknown_model", `base_model "gpt-9" is not supported; supported models: tiny`},
		{"unknown field", "POST", base + "/v1/runs", key, map[string]any{"base_model": "tiny", "lora_rnak": 4}, 400, "invalid_request", `unknown field "lora_rnak" in the request body: check its spelling against the API`},
		{"wrong type", "POST", base + "/v1/runs", key, `{"base_model": "tiny", "lora_rank": "big"}`, 400, "invalid_request", "field lora_rank is a JSON string: send a number"},
		{"out of range", "POST", base + "/v1/runs", key, map[string]any{"base_model": "tiny", "lora_rank": 0}, 400, "invalid_request", "lora_rank 0 is out of range: use 1..256"},
		{"malformed json", "POST", base + "/v1/runs", key, `{"base_model": `, 400, "invalid_request", "the request body is not JSON: it ends too early"},
		{"trailing data", "POST", base + "/v1/runs", key, `{"base_model": "tiny"} {}`, 400, "invalid_request", "the request body has data after the JSON object: send one object"},
		{"too large", "POST", runURL + "/forward_backward", key, `{"name": "` + strings.Repeat("x", 5000) + `"}`, 413, "too_large", "4096 bytes"},
		{"negative credit", "POST", base + "/v1/admin/credit", testAdmin, map[string]any{"account": "a", "amount": -5}, 400, "invalid_request", "micro_credits -5 is out of range: use 1..9007199254740992 (9007199254.740992 credits)"},
		{"overflowing credit", "POST", base + "/v1/admin/credit", testAdmin, `{"account": "a", "amount": 99999999999999999999}`, 400, "invalid_request", "field amount is 99999999999999999999: send a whole number in range for it"},
		{"unknown account credit", "POST", base + "/v1/admin/credit", testAdmin, map[string]any{"account": "nobody", "amount": 5}, 404, "not_found", "nobody"},
		{"other's run", "GET", runURL, other, nil, 403, "forbidden", "another account"},
		{"unknown run", "GET", base + "/v1/runs/run_x", key, nil, 404, "not_found", "run_x"},
		{"over balance", "POST", runURL + "/forward_backward", key, fbBody(100), 402, "insufficient_balance", "this call's estimated cost of 0.000100 credits (100 micro-credits) is over account "},
		{"datum mismatch", "POST", runURL + "/forward_backward", key, `{"data":[{"model_input":{"tokens":[1,2]},"loss_fn_inputs":{"target_tokens":[1],"weights":[1,1]}}]}`, 400, "invalid_request", "data[0].loss_fn_inputs has 1 target_tokens and 2 weights: give 2 of each, one per model_input token"},
		{"context too long", "POST", runURL + "/forward", key, fbBody(129), 400, "invalid_request", "data[0].model_input.tokens has 129 tokens, over the 128 model tiny allows: shorten it or split it"},
		{"bad adam", "POST", runURL + "/optim_step", key, map[string]any{"adam_params": map[string]any{"beta1": 1.5}}, 400, "invalid_request", "adam_params.beta1 1.5 is out of range: use [0, 1)"},
		{"huge weight", "POST", runURL + "/forward_backward", key, map[string]any{"data": []any{map[string]any{"model_input": map[string]any{"tokens": []int{1}}, "loss_fn_inputs": map[string]any{"target_tokens": []int{2}, "weights": []float64{-1e30}}}}}, 400, "invalid_request", "data[0].loss_fn_inputs.weights[0] is -1e+30: give a number in [-1e6, 1e6]"},
		{"bad sample", "POST", runURL + "/sample", key, map[string]any{"prompts": []any{map[string]any{"text": "hi"}}, "sampling_params": map[string]any{"max_tokens": 0}}, 400, "invalid_request", "sampling_params.max_tokens 0 is out of range: use 1..128 (the context of tiny)"},
		{"tokenize without tokenizer", "POST", base + "/v1/tokenize", key, map[string]any{"base_model": "tiny", "text": "hi"}, 503, "unavailable", "tokenizer"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before protocol.Account
			do(t, "GET", base+"/v1/account", key, nil).decode(t, &before)
			r := do(t, tt.method, tt.url, tt.token, tt.body)
			mustStatus(t, r, tt.status)
			var e protocol.ErrorResponse
			r.decode(t, &e)
			if e.Error.Code != tt.code || !strings.Contains(e.Error.Message, tt.msg) {
				t.Fatalf("error %+v, want code %s with %q", e.Error, tt.code, tt.msg)
			}
			// One sentence for the user: no chain of sentinels after it.
			for _, chain := range []string{": invalid request", ": unauthorized", ": forbidden", ": not found", ": unknown model", ": request too large", ": insufficient balance", "\n"} {
				if strings.HasSuffix(e.Error.Message, chain) || strings.Contains(e.Error.Message, "\n") {
					t.Fatalf("message %q ends in a chain (%q)", e.Error.Message, chain)
				}
			}
			if tt.status == 503 && r.header.Get("Retry-After") == "" {
				t.Error("503 without Retry-After")
			}
			var after protocol.Account
			do(t, "GET", base+"/v1/account", key, nil).decode(t, &after)
			if after.BalanceMicroCredits != before.BalanceMicroCredits || len(after.Charges) != len(before.Charges) {
				t.Fatalf("state changed: %+v -> %+v", before, after)
			}
		})
	}
}

func TestAPIModelsHealthNodesMetrics(t *testing.T) {
	c, _ := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 0)
	r := do(t, "GET", base+"/v1/health", "", nil)
	mustStatus(t, r, 200)
	var h protocol.Health
	r.decode(t, &h)
	if h.Status != "ok" || !h.Leader {
		t.Fatalf("health %s", r.body)
	}
	var ml protocol.ModelList
	do(t, "GET", base+"/v1/models", key, nil).decode(t, &ml)
	if len(ml.Models) != 1 || ml.Models[0].Name != "tiny" || ml.Models[0].Prices.TrainMicroCreditsPer1K != 1000 {
		t.Fatalf("models %+v", ml)
	}
	var nl protocol.NodeList
	do(t, "GET", base+"/v1/nodes", key, nil).decode(t, &nl)
	if len(nl.Nodes) != 2 {
		t.Fatalf("nodes %+v", nl)
	}
	r = do(t, "GET", base+"/metrics", "", nil)
	mustStatus(t, r, 200)
	if !strings.Contains(string(r.body), `signal_http_requests_total{route="nodes",status="200"} 1`) {
		t.Fatalf("metrics lack the request counter:\n%.2000s", r.body)
	}
}

func TestAPIRateLimit(t *testing.T) {
	c, _ := startOne(t, func(cfg *Config) { cfg.RatePerSecond = 1; cfg.RateBurst = 3 })
	key, _ := createKey(t, c.URL(), 0)
	var limited apiResp
	for i := 0; i < 5; i++ {
		r := do(t, "GET", c.URL()+"/v1/account", key, nil)
		if r.status == 429 {
			limited = r
			break
		}
		mustStatus(t, r, 200)
	}
	if limited.status != 429 || limited.header.Get("Retry-After") == "" || limited.errCode(t) != "rate_limited" {
		t.Fatalf("no 429 with Retry-After after the burst: %+v %s", limited.header, limited.body)
	}
	// Another key has its own bucket.
	other, _ := createKey(t, c.URL(), 0)
	mustStatus(t, do(t, "GET", c.URL()+"/v1/account", other, nil), 200)
}

func TestAPIIdempotency(t *testing.T) {
	c, fnet := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	r := do(t, "POST", base+"/v1/runs", key, map[string]any{"base_model": "tiny"}, "Idempotency-Key", "create-1")
	mustStatus(t, r, 201)
	var run protocol.Run
	r.decode(t, &run)
	r2 := do(t, "POST", base+"/v1/runs", key, map[string]any{"base_model": "tiny"}, "Idempotency-Key", "create-1")
	var run2 protocol.Run
	r2.decode(t, &run2)
	if r2.status != 201 || run2.ID != run.ID || r2.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("replayed create: %d %s", r2.status, r2.body)
	}

	url := base + "/v1/runs/" + run.ID + "/forward_backward"
	first := do(t, "POST", url, key, fbBody(10), "Idempotency-Key", "fb-1")
	mustStatus(t, first, 200)
	again := do(t, "POST", url, key, fbBody(10), "Idempotency-Key", "fb-1")
	mustStatus(t, again, 200)
	if string(first.body) != string(again.body) {
		t.Fatalf("retry answered differently:\n%s\n%s", first.body, again.body)
	}
	if n := fnet.count(protocol.CallForwardBackward); n != 1 {
		t.Fatalf("node ran forward_backward %d times, want 1", n)
	}
	var a protocol.Account
	do(t, "GET", base+"/v1/account", key, nil).decode(t, &a)
	if a.SpentMicroCredits != 10 {
		t.Fatalf("spent %d after a retried call, want 10", a.SpentMicroCredits)
	}
	conflict := do(t, "POST", url, key, fbBody(11), "Idempotency-Key", "fb-1")
	mustStatus(t, conflict, 409)

	// Credits: a retried admin credit mints once.
	_, acct := createKey(t, base, 0)
	for i := 0; i < 2; i++ {
		mustStatus(t, do(t, "POST", base+"/v1/admin/credit", testAdmin, map[string]any{"account": acct, "amount": 7}, "Idempotency-Key", "credit-1"), 200)
	}
	c.State(func(s *State) {
		if b := s.Balance(acct); b != 7 {
			t.Errorf("balance %d after a retried credit, want 7", b)
		}
	})
}

func TestAPINodeLostMovesRunFromCheckpoint(t *testing.T) {
	c, fnet := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "checkpoint_every": 2})
	url := base + "/v1/runs/" + run.ID
	for i := 0; i < 3; i++ { // steps 1..3; automatic checkpoint at step 2
		mustStatus(t, do(t, "POST", url+"/optim_step", key, nil), 200)
	}
	lost := run.Node
	fnet.setDown(lost, true)
	r := do(t, "POST", url+"/optim_step", key, nil)
	mustStatus(t, r, 503)
	if r.header.Get("Retry-After") == "" {
		t.Fatal("503 without Retry-After")
	}
	waitFor(t, 10*time.Second, "run moved", func() bool {
		var cur protocol.Run
		do(t, "GET", url, key, nil).decode(t, &cur)
		run = cur
		return cur.Status == protocol.RunReady && cur.Node != lost
	})
	if run.ResumedFromStep == nil || *run.ResumedFromStep != 2 || run.Step != 2 {
		t.Fatalf("moved run %+v, want resumed from step 2", run)
	}
	// A call that went to the dead node before the move and fails only now
	// reports the old node lost; the run must stay on its new node (with
	// the old node still down, moving it again would leave it moving).
	moved := run.Node
	c.markLost(run.ID, lost)
	waitFor(t, 10*time.Second, "stale mark dropped", func() bool {
		c.movingMu.Lock()
		defer c.movingMu.Unlock()
		_, marked := c.missing[run.ID]
		return !marked && !c.moving[run.ID]
	})
	do(t, "GET", url, key, nil).decode(t, &run)
	if run.Status != protocol.RunReady || run.Node != moved {
		t.Fatalf("after a stale node-lost report the run is %s on %s, want ready on %s", run.Status, run.Node, moved)
	}
	r = do(t, "POST", url+"/optim_step", key, nil)
	mustStatus(t, r, 200)
	var os protocol.OptimStepResponse
	r.decode(t, &os)
	if os.Step != 3 {
		t.Fatalf("step after move %d, want 3", os.Step)
	}
}

func TestAPINoCapacity(t *testing.T) {
	c, fnet := startOne(t, nil)
	fnet.setDown("nodeA", true)
	fnet.setDown("nodeB", true)
	key, _ := createKey(t, c.URL(), 10)
	r := do(t, "POST", c.URL()+"/v1/runs", key, map[string]any{"base_model": "tiny"})
	mustStatus(t, r, 503)
	if r.errCode(t) != "unavailable" || r.header.Get("Retry-After") == "" {
		t.Fatalf("no capacity answer %s", r.body)
	}
}

// TestAPIMetricsLossMeanIsWeighted: a step's loss_mean in the run's metrics
// is the mean forward_backward returned (over the loss weights), also when
// examples carry weight-0 prompt tokens.
func TestAPIMetricsLossMeanIsWeighted(t *testing.T) {
	c, _ := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny"})
	url := base + "/v1/runs/" + run.ID

	// Two calls in one step: 10 tokens of which the first 6 are prompt
	// (weight 0), then 4 unweighted tokens.
	prompt := fbBody(10)
	for i := range 6 {
		prompt.Data[0].LossFnInputs.Weights[i] = 0
	}
	var means []float64
	for _, body := range []protocol.ForwardBackwardRequest{prompt, fbBody(4)} {
		r := do(t, "POST", url+"/forward_backward", key, body)
		mustStatus(t, r, 200)
		var fb protocol.ForwardBackwardResponse
		r.decode(t, &fb)
		means = append(means, fb.LossMean)
	}
	mustStatus(t, do(t, "POST", url+"/optim_step", key, nil), 200)

	var ms protocol.MetricsResponse
	do(t, "GET", url+"/metrics", key, nil).decode(t, &ms)
	if len(ms.Metrics) != 1 || ms.Metrics[0].LossMean == nil {
		t.Fatalf("metrics %+v", ms.Metrics)
	}
	// Both calls returned the same mean, so the step's mean over their
	// 4 + 4 weighted tokens is that mean too; over the 14 tokens it would
	// be 8/14 of it.
	if got := *ms.Metrics[0].LossMean; got != means[0] || got != means[1] || ms.Metrics[0].Tokens != 14 {
		t.Fatalf("step loss_mean %v over %d tokens; forward_backward returned %v", got, ms.Metrics[0].Tokens, means)
	}
}

// TestAPIBurstOfRunsSpreadsAcrossNodes: nodes advertise every few seconds,
// so runs created in a burst all see the same adverts. Placement must count
// the runs the registry has already put on each node, or every run of the
// burst lands on the node that looked emptiest.
func TestAPIBurstOfRunsSpreadsAcrossNodes(t *testing.T) {
	c, _ := startOne(t, func(cfg *Config) {
		live := cfg.Backend.(*fakeBackend)
		stale := live.NodesFn() // the adverts as they stood before the burst: no sessions
		cfg.Backend = &fakeBackend{NodesFn: func() []protocol.Node { return stale }, DoFn: live.DoFn}
	})
	key, _ := createKey(t, c.URL(), 1_000_000)
	per := map[string]int{}
	for i := 0; i < 6; i++ {
		per[createRun(t, c.URL(), key, map[string]any{"base_model": "tiny"}).Node]++
	}
	if per["nodeA"] != 3 || per["nodeB"] != 3 {
		t.Fatalf("runs per node %v, want 3 on each", per)
	}
}

// TestAPIForwardBackwardSaysWhatWaits: each forward_backward answer counts
// the batches whose gradients wait for optim_step.
func TestAPIForwardBackwardSaysWhatWaits(t *testing.T) {
	c, _ := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 1})
	fb := func() int {
		t.Helper()
		r := do(t, "POST", base+"/v1/runs/"+run.ID+"/forward_backward", key, fbBody(3))
		mustStatus(t, r, 200)
		var out protocol.ForwardBackwardResponse
		r.decode(t, &out)
		return out.PendingBatches
	}
	if a, b := fb(), fb(); a != 1 || b != 2 {
		t.Fatalf("pending batches %d then %d, want 1 then 2", a, b)
	}
	mustStatus(t, do(t, "POST", base+"/v1/runs/"+run.ID+"/optim_step", key, nil), 200)
	if n := fb(); n != 1 {
		t.Fatalf("after optim_step: %d pending, want 1", n)
	}
}
