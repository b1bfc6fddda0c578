package coordinator

import (
	"bytes"
	"encoding/json"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// tinkerDo posts one Tinker call with the SDK's header and key form.
func tinkerDo(t *testing.T, base, key, path string, body any) apiResp {
	t.Helper()
	return do(t, "POST", base+"/api/v1/"+path, "", body, "X-API-Key", "tml-"+key)
}

func tinkerModelFor(t *testing.T, base, key string) string {
	t.Helper()
	r := tinkerDo(t, base, key, "create_model", map[string]any{"session_id": "s1", "model_seq_id": 0, "base_model": "tiny", "lora_config": map[string]any{"rank": 4}})
	mustStatus(t, r, 200)
	var fut struct {
		RequestID string `json:"request_id"`
		ModelID   string `json:"model_id"`
	}
	r.decode(t, &fut)
	res := retrieve(t, base, key, fut.RequestID)
	if !strings.Contains(string(res.body), `"model_id"`) {
		t.Fatalf("create_model answered %s", res.body)
	}
	return fut.ModelID
}

func retrieve(t *testing.T, base, key, id string) apiResp {
	t.Helper()
	for i := 0; i < 100; i++ {
		r := tinkerDo(t, base, key, "retrieve_future", map[string]string{"request_id": id})
		mustStatus(t, r, 200)
		if !bytes.Contains(r.body, []byte(`"try_again"`)) {
			return r
		}
	}
	t.Fatalf("future %s never finished", id)
	return apiResp{}
}

func optimBody(model string, seq int) map[string]any {
	return map[string]any{"model_id": model, "seq_id": seq, "adam_params": map[string]any{"learning_rate": 1e-3}}
}

func fwdBwdBody(model string, seq int) map[string]any {
	return map[string]any{"model_id": model, "seq_id": seq, "forward_backward_input": map[string]any{
		"loss_fn": "cross_entropy",
		"data": []any{map[string]any{"model_input": map[string]any{"chunks": []any{map[string]any{"type": "encoded_text", "tokens": []int{1, 2, 3}}}},
			"loss_fn_inputs": map[string]any{"target_tokens": map[string]any{"data": []int{2, 3, 4}, "dtype": "int64"}, "weights": map[string]any{"data": []float64{1, 1, 1}, "dtype": "float32"}}}}}}
}

// A model's calls run in seq_id order whatever order they arrive in; a
// repeated seq_id is the same call; nothing runs before the gap fills.
func TestTinkerSeqOrder(t *testing.T) {
	c, fnet := startOne(t, func(cfg *Config) { cfg.TinkerPoll = 200 * time.Millisecond })
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	model := tinkerModelFor(t, base, key)

	ids := map[int]string{}
	submit := func(seq int, body map[string]any, path string) {
		r := tinkerDo(t, base, key, path, body)
		mustStatus(t, r, 200)
		var fut struct {
			RequestID string `json:"request_id"`
		}
		r.decode(t, &fut)
		if old, ok := ids[seq]; ok && old != fut.RequestID {
			t.Fatalf("seq_id %d sent twice: futures %s and %s", seq, old, fut.RequestID)
		}
		ids[seq] = fut.RequestID
	}
	submit(3, optimBody(model, 3), "optim_step")
	submit(2, optimBody(model, 2), "optim_step")
	submit(2, optimBody(model, 2), "optim_step") // the client's retry
	// Seq 1 has not come: nothing runs, the polls say try_again.
	r := tinkerDo(t, base, key, "retrieve_future", map[string]string{"request_id": ids[2]})
	if !bytes.Contains(r.body, []byte(`"try_again"`)) || fnet.count(protocol.CallOptimStep) != 0 {
		t.Fatalf("before seq 1: %s, %d optim_steps ran", r.body, fnet.count(protocol.CallOptimStep))
	}
	submit(1, fwdBwdBody(model, 1), "forward_backward")
	steps := map[int]float64{}
	for seq := 2; seq <= 3; seq++ {
		var out struct {
			Metrics map[string]float64 `json:"metrics"`
		}
		retrieve(t, base, key, ids[seq]).decode(t, &out)
		steps[seq] = out.Metrics["step:max"]
	}
	if steps[2] != 1 || steps[3] != 2 {
		t.Errorf("optimizer steps by seq_id %v: want seq 2 → step 1, seq 3 → step 2", steps)
	}
	if n := fnet.count(protocol.CallOptimStep); n != 2 {
		t.Errorf("%d optim_steps ran for 2 calls (one sent twice)", n)
	}
	// The forward_backward's answer as the SDK asks for it: protobuf.
	pr := do(t, "POST", base+"/api/v1/retrieve_future", "", map[string]string{"request_id": ids[1]}, "X-API-Key", "tml-"+key, "Accept", "application/x-protobuf")
	if pr.status != 200 || !strings.HasPrefix(pr.header.Get("Content-Type"), "application/x-protobuf") {
		t.Errorf("forward_backward answer: %d %s", pr.status, pr.header.Get("Content-Type"))
	}
	// A seq_id that already ran and a model that is not the caller's.
	other, _ := createKey(t, base, 1000)
	r = tinkerDo(t, base, other, "optim_step", optimBody(model, 4))
	if r.status != http.StatusNotFound || r.header.Get("X-Should-Retry") != "false" {
		t.Errorf("another account's model: %d (x-should-retry %q) %s", r.status, r.header.Get("X-Should-Retry"), r.body)
	}
	r = tinkerDo(t, base, other, "retrieve_future", map[string]string{"request_id": ids[1]})
	if r.status != http.StatusGone {
		t.Errorf("another account's future: %d %s, want 410", r.status, r.body)
	}
}

// The queue is bounded in bytes per account: past it a submit is refused
// 429 (the SDK retries it), and the calls before it still run.
func TestTinkerQueueBounded(t *testing.T) {
	c, _ := startOne(t, func(cfg *Config) { cfg.TinkerQueueBytes = 700; cfg.TinkerPoll = 200 * time.Millisecond })
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	model := tinkerModelFor(t, base, key)
	// Seq 1 never comes, so seq 2.. wait in the queue.
	var refused apiResp
	for seq := 2; seq < 40; seq++ {
		r := tinkerDo(t, base, key, "forward_backward", fwdBwdBody(model, seq))
		if r.status != 200 {
			refused = r
			break
		}
	}
	if refused.status != http.StatusTooManyRequests || !strings.Contains(refused.errMessage(t), "limit of 700 bytes") {
		t.Fatalf("a full queue: %d %s, want 429 naming the limit", refused.status, refused.body)
	}
}

// Futures and models survive a snapshot and restore bit for bit.
func TestTinkerBookSnapshot(t *testing.T) {
	s := NewState()
	s.tinker.models["m"] = TinkerModel{ID: "m", Account: "a", RunID: "run_1", BaseModel: "tiny", Rank: 4}
	for i := 1; i <= 3; i++ {
		f := TinkerFuture{ID: orderedID("m", i), Account: "a", Model: "m", Seq: i, Kind: kindOptimStep, Request: json.RawMessage(`{}`), Time: now()}
		if _, err := s.ApplyTinker(tinkerCmd{Submit: &f}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.ApplyTinker(tinkerCmd{Finish: &tinkerFinish{ID: orderedID("m", 1), Status: futureDone, Result: json.RawMessage(`{"x":1}`)},
		Samplers: []TinkerSampler{{ID: "sm", Account: "a", BaseModel: "tiny"}}, Checkpoints: []TinkerCheckpoint{{Path: "tinker://run_1/weights/a", Account: "a", RunID: "run_1"}}}); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := writeSnapshot(&buf, s); err != nil {
		t.Fatal(err)
	}
	r, err := readSnapshot(&buf)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := json.Marshal(s.tinker.records())
	b, _ := json.Marshal(r.tinker.records())
	if !bytes.Equal(a, b) || r.tinker.bytes["a"] != s.tinker.bytes["a"] || r.tinker.pending["a"] != s.tinker.pending["a"] {
		t.Errorf("restored book differs:\n%s\n%s", b, a)
	}
	if m, _ := r.TinkerModel("m"); m.Done != 1 {
		t.Errorf("model's done seq after restore: %d, want 1", m.Done)
	}
	// Eviction forgets finished futures, oldest first, never queued ones.
	s.ApplyTinker(tinkerCmd{Finish: &tinkerFinish{ID: orderedID("m", 2), Status: futureDone}, MaxBytes: 1})
	if _, ok := s.TinkerFuture(orderedID("m", 1)); ok {
		t.Error("finished future 1 kept past the byte bound")
	}
	if f, ok := s.TinkerFuture(orderedID("m", 3)); !ok || f.Status != futurePending {
		t.Error("a queued future was forgotten")
	}
}

// BenchmarkTinkerFutures reports what 1,000 queued forward_backward calls
// (4 × 256 tokens each) hold in the replicated book: the bytes it counts
// against the account's bound, and the Go heap they take on each member.
func BenchmarkTinkerFutures(b *testing.B) {
	req := fbBody(256)
	req.Data = append(req.Data, req.Data[0], req.Data[0], req.Data[0])
	body, _ := json.Marshal(req)
	for i := 0; i < b.N; i++ {
		s := NewState()
		s.tinker.models["m"] = TinkerModel{ID: "m", Account: "a"}
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		for seq := 2; seq < 1002; seq++ {
			f := TinkerFuture{ID: orderedID("m", seq), Account: "a", Model: "m", Seq: seq, Kind: kindForwardBackward, Request: append([]byte(nil), body...), Time: now()} // each its own copy, as decoded from the log
			if _, err := s.ApplyTinker(tinkerCmd{Submit: &f}); err != nil {
				b.Fatal(err)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(s.tinker.bytes["a"])/(1<<20), "MiB-counted/1k-calls")
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), "MiB-heap/1k-calls")
		b.ReportMetric(float64(len(body)), "request-bytes")
		runtime.KeepAlive(s)
	}
}

// Download URLs: a token verifies only as signed, before it expires, and
// under the cluster's key.
func TestFileTokens(t *testing.T) {
	c := &Coordinator{cfg: Config{AdminToken: "adm-1"}}
	now := time.Now()
	want := fileToken{Account: "acct_1", Checkpoint: "ck_1", File: "adapter_model.safetensors", Expires: now.Add(time.Minute).Truncate(time.Second)}
	tok := c.signFile(want)
	if got, err := c.verifyFile(tok, now); err != nil || !got.Expires.Equal(want.Expires) || got.Account != want.Account || got.Checkpoint != want.Checkpoint || got.File != want.File {
		t.Fatalf("a fresh token: %+v %v, want %+v", got, err, want)
	}
	if _, err := c.verifyFile(tok, now.Add(2*time.Minute)); err == nil {
		t.Error("an expired token verified")
	}
	other := &Coordinator{cfg: Config{AdminToken: "adm-2"}}
	if _, err := other.verifyFile(tok, now); err == nil {
		t.Error("a token verified under another cluster's key")
	}
	forged := want
	forged.Account = "acct_2"
	payload, _, _ := strings.Cut(c.signFile(forged), ".")
	_, mac, _ := strings.Cut(tok, ".")
	if _, err := c.verifyFile(payload+"."+mac, now); err == nil {
		t.Error("another account's checkpoint verified under this token's MAC")
	}
}

// A sampling session or model id is its account's: another account naming
// the same id (ids derive from session ids clients send) changes nothing.
func TestTinkerRecordsStayTheirAccounts(t *testing.T) {
	s := NewState()
	if _, err := s.ApplyTinker(tinkerCmd{Samplers: []TinkerSampler{{ID: "s:sample:0", Account: "a", BaseModel: "tiny"}},
		Models: []TinkerModel{{ID: "s:train:0", Account: "a", RunID: "run_a"}}}); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []tinkerCmd{
		{Samplers: []TinkerSampler{{ID: "s:sample:0", Account: "b", BaseModel: "tiny", Checkpoint: "ck_b"}}},
		{Models: []TinkerModel{{ID: "s:train:0", Account: "b", RunID: "run_b"}}},
	} {
		if _, err := s.ApplyTinker(cmd); err == nil {
			t.Errorf("%+v: another account's record taken", cmd)
		}
	}
	if sm, _ := s.TinkerSampler("s:sample:0"); sm.Account != "a" || sm.Checkpoint != "" {
		t.Errorf("sampler after another account's put: %+v", sm)
	}
	if m, _ := s.TinkerModel("s:train:0"); m.RunID != "run_a" {
		t.Errorf("model after another account's put: %+v", m)
	}
}

// A call that waits for capacity says so in retrieve_future's try_again,
// and runs once capacity comes.
func TestTinkerQueueStateWhilePaused(t *testing.T) {
	c, fnet := startOne(t, func(cfg *Config) { cfg.TinkerPoll = 300 * time.Millisecond; cfg.RetryAfter = 200 * time.Millisecond })
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	fnet.setDown("nodeA", true)
	fnet.setDown("nodeB", true)
	r := tinkerDo(t, base, key, "create_model", map[string]any{"session_id": "s2", "model_seq_id": 0, "base_model": "tiny", "lora_config": map[string]any{"rank": 4}})
	mustStatus(t, r, 200)
	var fut struct {
		RequestID string `json:"request_id"`
	}
	r.decode(t, &fut)
	var poll struct {
		Type   string `json:"type"`
		State  string `json:"queue_state"`
		Reason string `json:"queue_state_reason"`
	}
	waitFor(t, 10*time.Second, "a paused try_again", func() bool {
		tinkerDo(t, base, key, "retrieve_future", map[string]string{"request_id": fut.RequestID}).decode(t, &poll)
		return poll.State == "paused_capacity"
	})
	if poll.Type != "try_again" || poll.Reason == "" {
		t.Errorf("try_again while no node has capacity: %+v", poll)
	}
	fnet.setDown("nodeA", false)
	if res := retrieve(t, base, key, fut.RequestID); !strings.Contains(string(res.body), `"model_id"`) {
		t.Errorf("after capacity came back: %s", res.body)
	}
}

// A member that stops answers its open long polls at once: its graceful
// HTTP shutdown (5 s) does not wait out a 30 s poll.
func TestTinkerLongPollEndsWithTheMember(t *testing.T) {
	c, _ := startOne(t, func(cfg *Config) { cfg.TinkerPoll = 30 * time.Second })
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	model := tinkerModelFor(t, base, key)
	r := tinkerDo(t, base, key, "optim_step", optimBody(model, 2)) // seq 1 never comes
	mustStatus(t, r, 200)
	var fut struct {
		RequestID string `json:"request_id"`
	}
	r.decode(t, &fut)
	polled := make(chan apiResp, 1)
	go func() {
		polled <- tinkerDo(t, base, key, "retrieve_future", map[string]string{"request_id": fut.RequestID})
	}()
	time.Sleep(300 * time.Millisecond) // the poll is waiting
	start := time.Now()
	if err := c.Stop(); err != nil {
		t.Fatalf("stop with a long poll open: %v", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("stop took %v with a long poll open", d)
	}
	if p := <-polled; !bytes.Contains(p.body, []byte(`"try_again"`)) {
		t.Errorf("the open poll got %d %s", p.status, p.body)
	}
}
