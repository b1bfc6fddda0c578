package coordinator

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// A pipeline runs its calls in order in one request, each billed as its
// own route bills it; a retry under the same Idempotency-Key replays what
// ran and runs the rest; the failed call is named.
func TestPipeline(t *testing.T) {
	c, fnet := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 8})
	fb, _ := json.Marshal(fbBody(100))
	bad := json.RawMessage(`{"adam_params":{"learning_rate":-1}}`)
	good := json.RawMessage(`{"adam_params":{"learning_rate":0.001}}`)
	url := base + "/v1/runs/" + run.ID + "/pipeline"

	r := do(t, "POST", url, key, protocol.PipelineRequest{Calls: []protocol.PipelineCall{{Call: "forward_backward", Body: fb}, {Call: "optim_step", Body: bad}}}, "Idempotency-Key", "k1")
	if r.status != 400 || !strings.HasPrefix(r.errMessage(t), "calls[1] (optim_step): adam_params.learning_rate") {
		t.Fatalf("a bad second call: %d %s", r.status, r.body)
	}
	if n := fnet.count(protocol.CallForwardBackward); n != 1 {
		t.Fatalf("the first call ran %d times", n)
	}
	// The retry fixes the second call: the first is answered from its record.
	r = do(t, "POST", url, key, protocol.PipelineRequest{Calls: []protocol.PipelineCall{{Call: "forward_backward", Body: fb}, {Call: "optim_step", Body: good}}}, "Idempotency-Key", "k1")
	mustStatus(t, r, 200)
	var out protocol.PipelineResponse
	r.decode(t, &out)
	var f protocol.ForwardBackwardResponse
	var o protocol.OptimStepResponse
	if len(out.Results) != 2 || json.Unmarshal(out.Results[0], &f) != nil || json.Unmarshal(out.Results[1], &o) != nil {
		t.Fatalf("results %s", r.body)
	}
	if f.Tokens != 100 || f.Cost == nil || f.Cost.MicroCredits != 100 || o.Step != 1 {
		t.Errorf("forward_backward %+v, optim_step %+v", f, o)
	}
	if fb, op := fnet.count(protocol.CallForwardBackward), fnet.count(protocol.CallOptimStep); fb != 1 || op != 1 {
		t.Errorf("after the retry: %d forward_backward, %d optim_step ran; want 1 each", fb, op)
	}
	acct := do(t, "GET", base+"/v1/account", key, nil)
	var a protocol.Account
	acct.decode(t, &a)
	n := map[string]int{}
	for _, ch := range a.Charges {
		n[ch.Call]++
	}
	if n["forward_backward"] != 1 || n["optim_step"] != 1 {
		t.Errorf("charges %v: want one of each", n)
	}
	r = do(t, "POST", url, key, protocol.PipelineRequest{Calls: []protocol.PipelineCall{{Call: "load_state"}}})
	if r.status != 400 || !strings.Contains(r.errMessage(t), `calls[0].call "load_state" is not a pipeline call`) {
		t.Errorf("a call a pipeline cannot hold: %d %s", r.status, r.body)
	}
}

// top_k_logprobs: forward answers the node's top tokens; forward_backward
// and a k past the bound are refused before a node sees them.
func TestTopKLogprobsValidated(t *testing.T) {
	c, fnet := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 8})
	req := fbBody(10)
	req.TopKLogprobs = 3
	r := do(t, "POST", base+"/v1/runs/"+run.ID+"/forward", key, req)
	mustStatus(t, r, 200)
	var out protocol.ForwardBackwardResponse
	r.decode(t, &out)
	if len(out.TopLogprobs) != 1 || len(out.TopLogprobs[0].IDs) != 10 || len(out.TopLogprobs[0].IDs[0]) != 3 {
		t.Errorf("forward's top logprobs: %+v", out.TopLogprobs)
	}
	for _, tc := range []struct {
		call string
		k    int
	}{{"forward_backward", 3}, {"forward", 21}, {"forward", -1}} {
		req.TopKLogprobs = tc.k
		r := do(t, "POST", base+"/v1/runs/"+run.ID+"/"+tc.call, key, req)
		if r.status != 400 || !strings.Contains(r.errMessage(t), "top_k_logprobs") {
			t.Errorf("%s with top_k_logprobs %d: %d %s", tc.call, tc.k, r.status, r.body)
		}
	}
	if n := fnet.count(protocol.CallForwardBackward); n != 0 {
		t.Errorf("%d refused forward_backward calls reached a node", n)
	}
}

// POST /v1/admin/nodes/{peer}/lift_quarantine: admin only, a reason
// required, a node not quarantined refused.
func TestLiftQuarantineAPI(t *testing.T) {
	c, _ := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 1000)
	url := base + "/v1/admin/nodes/nodeA/lift_quarantine"
	if r := do(t, "POST", url, key, protocol.LiftQuarantineRequest{Reason: "x"}); r.status != 403 {
		t.Errorf("a user's lift: %d %s", r.status, r.body)
	}
	if r := do(t, "POST", url, testAdmin, protocol.LiftQuarantineRequest{Reason: "x"}); r.status != 409 || !strings.Contains(r.errMessage(t), "not quarantined") {
		t.Errorf("lifting a node not quarantined: %d %s", r.status, r.body)
	}
	if _, err := c.propose(context.Background(), cmdAuditResult, auditResultCmd{Node: "nodeA", At: 1, Audit: protocol.Audit{ID: "a1", Validator: "nodeB", Reason: "loss_sum off", Time: now()}}); err != nil {
		t.Fatal(err)
	}
	if r := do(t, "POST", url, testAdmin, protocol.LiftQuarantineRequest{}); r.status != 400 || !strings.Contains(r.errMessage(t), "reason") {
		t.Errorf("a lift without a reason: %d %s", r.status, r.body)
	}
	r := do(t, "POST", url, testAdmin, protocol.LiftQuarantineRequest{Reason: "a faulty GPU was replaced"})
	mustStatus(t, r, 200)
	var v protocol.NodeAudits
	r.decode(t, &v)
	if v.Quarantined || v.Failed != 1 || v.LiftReason != "a faulty GPU was replaced" {
		t.Errorf("after the lift: %+v", v)
	}
}

// A challenge goes to a node with a free session (a user's runs come
// first) that is not waiting out a failed try.
func TestDueForChallenge(t *testing.T) {
	c, fnet := startOne(t, nil)
	fnet.serve("tiny")
	fnet.mu.Lock()
	fnet.nodes["nodeA"].info.MaxSessions = 1
	fnet.nodes["nodeA"].sessions["busy"] = &fakeSession{}
	fnet.mu.Unlock()
	none := func(string) bool { return false }
	n, ok := c.dueForChallenge(time.Minute, none)
	if !ok || n.PeerID != "nodeB" {
		t.Fatalf("due: %v %s; want nodeB (nodeA is full)", ok, n.PeerID)
	}
	if _, ok := c.dueForChallenge(time.Minute, func(p string) bool { return p == "nodeB" }); ok {
		t.Error("a node waiting out a failed challenge was due")
	}
	if _, err := c.propose(context.Background(), cmdMeasure, measureCmd{PeerID: "nodeB", Model: "tiny", TokensPerSec: 100, Time: now()}); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.dueForChallenge(time.Minute, none); ok {
		t.Error("a node measured within the interval was due")
	}
}
