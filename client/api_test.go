package client

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"

	"github.com/signal-p2p/signal/protocol"
)

func ptr[T any](v T) *T { return &v }

// TestRunFlow drives every call of a run's life against a fake that checks
// method, path, auth, idempotency and the request body's exact shape.
func TestRunFlow(t *testing.T) {
	const runID = "run-7"
	const adminToken = "admin-secret"
	run := protocol.Run{ID: runID, BaseModel: "signal-tiny", LoRARank: 8, Status: protocol.RunReady, CheckpointEvery: 10}
	ckpt := protocol.Checkpoint{ID: "ck-1", RunID: runID, Step: 1, Mode: "adapter", URI: "file:///tmp/ck-1",
		Files: []protocol.CheckpointFile{{Name: "adapter_model.safetensors", CID: "bafy", Size: 1234, URI: "file:///tmp/ck-1/a"}}}
	cost := &protocol.Cost{MicroCredits: 100, TrainTokens: 12}
	bal := ptr(protocol.MicroCredits(900))

	var f *fakeAPI
	f = newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		reqs := f.requests()
		last := reqs[len(reqs)-1]
		wantAuth := "Bearer " + testKey
		if len(r.URL.Path) > 9 && r.URL.Path[:9] == "/v1/admin" {
			wantAuth = "Bearer " + adminToken
		}
		if last.auth != wantAuth {
			t.Errorf("%s %s: Authorization %q, want %q", r.Method, r.URL.Path, last.auth, wantAuth)
		}
		if (r.Method == http.MethodGet) != (last.idemKey == "") {
			t.Errorf("%s %s: idempotency key %q: want one on mutating calls only", r.Method, r.URL.Path, last.idemKey)
		}
		switch r.Method + " " + r.URL.Path {
		case "POST /v1/runs":
			var req protocol.CreateRunRequest
			decodeStrict(t, last.body, &req)
			if req.BaseModel != "signal-tiny" || req.LoRARank == nil || *req.LoRARank != 8 {
				t.Errorf("create run body %s", last.body)
			}
			writeJSON(w, 201, run)
		case "GET /v1/runs":
			writeJSON(w, 200, protocol.RunList{Runs: []protocol.Run{run}})
		case "GET /v1/runs/" + runID:
			writeJSON(w, 200, run)
		case "POST /v1/runs/" + runID + "/forward_backward", "POST /v1/runs/" + runID + "/forward":
			var req protocol.ForwardBackwardRequest
			decodeStrict(t, last.body, &req)
			if len(req.Examples) != 1 || req.Examples[0].Prompt != "Q:" || req.Examples[0].Completion != " A" {
				t.Errorf("forward body %s", last.body)
			}
			writeJSON(w, 200, protocol.ForwardBackwardResponse{LossSum: 6, LossMean: 2, Tokens: 3,
				GradNorm: ptr(1.5), Logprobs: [][]float64{{-1, -2, -3}}, Billed: protocol.Billed{Cost: cost, Balance: bal}})
		case "POST /v1/runs/" + runID + "/optim_step":
			var req protocol.OptimStepRequest
			decodeStrict(t, last.body, &req)
			if req.AdamParams == nil || req.AdamParams.LearningRate == nil || *req.AdamParams.LearningRate != 1e-4 {
				t.Errorf("optim body %s", last.body)
			}
			writeJSON(w, 200, protocol.OptimStepResponse{Step: 1, LearningRate: 1e-4, GradNorm: 1.5,
				Billed: protocol.Billed{Cost: &protocol.Cost{MicroCredits: 1}, Balance: bal}})
		case "POST /v1/runs/" + runID + "/sample":
			var req protocol.SampleRequest
			decodeStrict(t, last.body, &req)
			if len(req.Prompts) != 1 || req.Prompts[0].Text != "Once" || req.SamplingParams.MaxTokens != 8 {
				t.Errorf("sample body %s", last.body)
			}
			writeJSON(w, 200, protocol.SampleResponse{Samples: [][]protocol.Sample{{{Tokens: []int{5, 6}, Text: " upon",
				Logprobs: []float64{-0.5, -0.7}, StopReason: "length"}}}, Billed: protocol.Billed{Cost: cost, Balance: bal}})
		case "POST /v1/runs/" + runID + "/save_state":
			var req protocol.SaveStateRequest
			decodeStrict(t, last.body, &req)
			if req.Mode != "adapter" {
				t.Errorf("save body %s", last.body)
			}
			writeJSON(w, 200, protocol.SaveStateResponse{Checkpoint: ckpt, Billed: protocol.Billed{Cost: cost, Balance: bal}})
		case "POST /v1/runs/" + runID + "/load_state":
			var req protocol.LoadStateRequest
			decodeStrict(t, last.body, &req)
			if req.Checkpoint != "ck-1" {
				t.Errorf("load body %s", last.body)
			}
			loaded := run
			loaded.Step = 1
			writeJSON(w, 200, loaded)
		case "GET /v1/runs/" + runID + "/metrics":
			writeJSON(w, 200, protocol.MetricsResponse{Metrics: []protocol.Metrics{{Step: 1, LossMean: ptr(2.0), Time: "t"}}})
		case "DELETE /v1/runs/" + runID:
			ended := run
			ended.Status = protocol.RunEnded
			writeJSON(w, 200, ended)
		case "POST /v1/tokenize":
			var req protocol.TokenizeRequest
			decodeStrict(t, last.body, &req)
			toks := map[string][]int{"Q:": {11, 12}, " A": {13}}[req.Text]
			if req.AddSpecialTokens {
				toks = append([]int{1}, toks...)
			}
			writeJSON(w, 200, protocol.TokenizeResponse{Tokens: toks})
		case "GET /v1/account":
			writeJSON(w, 200, protocol.Account{Account: "acct-1", BalanceMicroCredits: 900, SpentMicroCredits: 100,
				Charges: []protocol.Charge{{RunID: runID, Call: "forward_backward", MicroCredits: 100, Time: "t"}}})
		case "GET /v1/models":
			writeJSON(w, 200, protocol.ModelList{Models: []protocol.Model{{Name: "signal-tiny", ContextLength: 512}}})
		case "GET /v1/nodes":
			writeJSON(w, 200, protocol.NodeList{Nodes: []protocol.Node{{PeerID: "12D3", MaxSessions: 4}}})
		case "POST /v1/admin/keys":
			var req protocol.CreateKeyRequest
			decodeStrict(t, last.body, &req)
			writeJSON(w, 200, protocol.CreateKeyResponse{APIKey: "sk-new", Account: "acct-" + fmt.Sprint(req.MicroCredits), KeyID: "key_1"})
		case "GET /v1/admin/keys":
			writeJSON(w, 200, protocol.KeyList{Keys: []protocol.Key{{ID: "key_1", Account: r.URL.Query().Get("account")}}})
		case "DELETE /v1/admin/keys/key_1":
			writeJSON(w, 200, protocol.Key{ID: "key_1", Account: "acct-5"})
		case "POST /v1/admin/credit":
			var req protocol.CreditRequest
			decodeStrict(t, last.body, &req)
			writeJSON(w, 200, protocol.CreditResponse{Account: req.Account, BalanceMicroCredits: req.MicroCredits})
		case "POST /v1/admin/join_tokens":
			var req protocol.JoinTokenRequest
			decodeStrict(t, last.body, &req)
			writeJSON(w, 200, protocol.JoinTokenResponse{JoinToken: "jt", OperatorAccount: req.OperatorAccount})
		default:
			t.Errorf("unexpected %s %s", r.Method, r.URL.Path)
			writeErr(w, 404, protocol.CodeNotFound, "no route")
		}
	})
	c, _ := mustClient(t, f)
	ctx := context.Background()

	r, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: "signal-tiny", LoRARank: ptr(8)})
	if err != nil || r.ID() != runID || r.Info().Status != protocol.RunReady {
		t.Fatalf("CreateRun = %+v, %v", r, err)
	}
	batch := protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{{Prompt: "Q:", Completion: " A"}}}
	fb, err := r.ForwardBackward(ctx, batch)
	if err != nil || fb.LossMean != 2 || fb.GradNorm == nil || *fb.GradNorm != 1.5 || fb.Cost.MicroCredits != 100 || *fb.Balance != 900 {
		t.Fatalf("ForwardBackward = %+v, %v", fb, err)
	}
	if fw, err := r.Forward(ctx, batch); err != nil || len(fw.Logprobs[0]) != 3 {
		t.Fatalf("Forward = %+v, %v", fw, err)
	}
	st, err := r.OptimStep(ctx, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: ptr(1e-4)}})
	if err != nil || st.Step != 1 || r.Info().Step != 1 {
		t.Fatalf("OptimStep = %+v, %v", st, err)
	}
	if got := r.Info().SpentMicroCredits; got != 201 {
		t.Errorf("Info().Spent = %d, want 201 (100+100+1)", got)
	}
	sm, err := r.Sample(ctx, protocol.SampleRequest{Prompts: []protocol.Prompt{{Text: "Once"}}, SamplingParams: protocol.SamplingParams{MaxTokens: 8}})
	if err != nil || sm.Samples[0][0].Text != " upon" || sm.Samples[0][0].StopReason != "length" {
		t.Fatalf("Sample = %+v, %v", sm, err)
	}
	sv, err := r.SaveState(ctx, protocol.SaveStateRequest{Mode: "adapter"})
	if err != nil || sv.Checkpoint.URI != ckpt.URI || sv.Checkpoint.Files[0].CID != "bafy" {
		t.Fatalf("SaveState = %+v, %v", sv, err)
	}
	if ld, err := r.LoadState(ctx, "ck-1"); err != nil || ld.Step != 1 {
		t.Fatalf("LoadState = %+v, %v", ld, err)
	}
	if m, err := r.Metrics(ctx); err != nil || len(m) != 1 || *m[0].LossMean != 2 {
		t.Fatalf("Metrics = %+v, %v", m, err)
	}
	if err := r.Refresh(ctx); err != nil || r.Info().Step != 0 {
		t.Fatalf("Refresh: %v, step %d (the server's run says 0)", err, r.Info().Step)
	}
	d, err := r.DatumFromText(ctx, "Q:", " A")
	if err != nil || fmt.Sprint(d.ModelInput.Tokens) != "[1 11 12]" || fmt.Sprint(d.LossFnInputs.TargetTokens) != "[11 12 13]" ||
		fmt.Sprint(d.LossFnInputs.Weights) != "[0 0 1]" {
		t.Fatalf("DatumFromText = %+v, %v", d, err)
	}
	if runs, err := c.ListRuns(ctx); err != nil || len(runs) != 1 || runs[0].ID != runID {
		t.Fatalf("ListRuns = %+v, %v", runs, err)
	}
	if g, err := c.GetRun(ctx, runID); err != nil || g.Info().BaseModel != "signal-tiny" {
		t.Fatalf("GetRun = %+v, %v", g, err)
	}
	if a, err := c.Account(ctx); err != nil || a.BalanceMicroCredits != 900 || len(a.Charges) != 1 {
		t.Fatalf("Account = %+v, %v", a, err)
	}
	if m, err := c.Models(ctx); err != nil || m[0].Name != "signal-tiny" {
		t.Fatalf("Models = %+v, %v", m, err)
	}
	if n, err := c.Nodes(ctx); err != nil || n[0].PeerID != "12D3" {
		t.Fatalf("Nodes = %+v, %v", n, err)
	}
	if k, err := c.CreateKey(ctx, adminToken, protocol.CreateKeyRequest{MicroCredits: 5}); err != nil || k.APIKey != "sk-new" || k.Account != "acct-5" || k.KeyID != "key_1" {
		t.Fatalf("CreateKey = %+v, %v", k, err)
	}
	if ks, err := c.ListKeys(ctx, adminToken, "acct 5"); err != nil || len(ks) != 1 || ks[0].Account != "acct 5" {
		t.Fatalf("ListKeys = %+v, %v", ks, err)
	}
	if k, err := c.RevokeKey(ctx, adminToken, "key_1"); err != nil || k.Account != "acct-5" {
		t.Fatalf("RevokeKey = %+v, %v", k, err)
	}
	if cr, err := c.Credit(ctx, adminToken, protocol.CreditRequest{Account: "a", MicroCredits: 7}); err != nil || cr.BalanceMicroCredits != 7 {
		t.Fatalf("Credit = %+v, %v", cr, err)
	}
	if jt, err := c.CreateJoinToken(ctx, adminToken, protocol.JoinTokenRequest{OperatorAccount: "op"}); err != nil || jt.OperatorAccount != "op" {
		t.Fatalf("CreateJoinToken = %+v, %v", jt, err)
	}
	ended, err := r.Close(ctx)
	if err != nil || ended.Status != protocol.RunEnded || r.Info().Status != protocol.RunEnded {
		t.Fatalf("Close = %+v, %v", ended, err)
	}
}

// TestConcurrentUse runs many calls at once on one client and run (go test -race).
func TestConcurrentUse(t *testing.T) {
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/runs/r-1/optim_step":
			writeJSON(w, 200, protocol.OptimStepResponse{Step: 1, Billed: protocol.Billed{Cost: &protocol.Cost{MicroCredits: 2}}})
		default:
			writeJSON(w, 200, protocol.Run{ID: "r-1", Status: protocol.RunReady})
		}
	})
	c, _ := mustClient(t, f)
	run := c.NewRunHandle("r-1")
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := run.OptimStep(context.Background(), protocol.OptimStepRequest{}); err != nil {
				t.Error(err)
			}
			if err := run.Refresh(context.Background()); err != nil {
				t.Error(err)
			}
			_ = run.Info()
		}()
	}
	wg.Wait()
	keys := map[string]bool{}
	for _, r := range f.requests() {
		if r.method == http.MethodPost {
			if keys[r.idemKey] {
				t.Errorf("idempotency key %q reused across logical calls", r.idemKey)
			}
			keys[r.idemKey] = true
		}
	}
	if len(keys) != 16 {
		t.Errorf("%d distinct keys, want 16", len(keys))
	}
}
