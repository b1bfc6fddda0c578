package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// fakeTrainer plays a run whose loss halves at every optim step: it checks
// the example's flow and output, not training (the testnet tests do that).
type fakeTrainer struct {
	mu    sync.Mutex
	step  int
	calls []string
	fb    []protocol.ForwardBackwardRequest
}

func (f *fakeTrainer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, r.Method+" "+r.URL.Path)
	cost := &protocol.Cost{MicroCredits: 10}
	bal := protocol.MicroCredits(1_000_000 - 10*len(f.calls))
	billed := protocol.Billed{Cost: cost, BalanceMicroCredits: &bal}
	var v any
	switch {
	case r.URL.Path == "/v1/runs":
		v = protocol.Run{ID: "run-1", BaseModel: "signal-tiny", Status: protocol.RunReady, Node: "n1"}
	case r.URL.Path == "/v1/tokenize":
		var req protocol.TokenizeRequest
		_ = json.NewDecoder(r.Body).Decode(&req)
		var toks []int
		if req.AddSpecialTokens {
			toks = append(toks, 1)
		}
		for _, c := range req.Text {
			toks = append(toks, int(c))
		}
		v = protocol.TokenizeResponse{Tokens: toks}
	case strings.HasSuffix(r.URL.Path, "/forward_backward"):
		var req protocol.ForwardBackwardRequest
		_ = json.NewDecoder(r.Body).Decode(&req)
		f.fb = append(f.fb, req)
		v = protocol.ForwardBackwardResponse{LossMean: 4 / float64(int(1)<<f.step), Tokens: 50, Billed: billed}
	case strings.HasSuffix(r.URL.Path, "/optim_step"):
		f.step++
		v = protocol.OptimStepResponse{Step: f.step, LearningRate: 5e-3, GradNorm: 1, Billed: billed}
	case strings.HasSuffix(r.URL.Path, "/sample"):
		v = protocol.SampleResponse{Samples: [][]protocol.Sample{{{Text: " on the mat"}}, {{Text: " blue"}}}, Billed: billed}
	case strings.HasSuffix(r.URL.Path, "/save_state"):
		v = protocol.SaveStateResponse{Checkpoint: protocol.Checkpoint{ID: "ck-1", Step: f.step, Mode: "adapter", URI: "file:///data/ck-1",
			Files: []protocol.CheckpointFile{{Name: "adapter_model.safetensors", CID: "bafy", Size: 9}}}, Billed: billed}
	case r.Method == http.MethodDelete:
		v = protocol.Run{ID: "run-1", Status: protocol.RunEnded}
	default:
		w.WriteHeader(404)
		v = protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "not_found", Message: r.URL.Path}}
	}
	_ = json.NewEncoder(w).Encode(v)
}

func runExample(t *testing.T, args ...string) (*fakeTrainer, string, summary) {
	t.Helper()
	f := &fakeTrainer{}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	cfg, err := parseFlags(append([]string{"--url", srv.URL, "--api-key", "sk"}, args...))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := run(context.Background(), cfg, &out); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	var s summary
	if err := json.Unmarshal([]byte(strings.TrimPrefix(lines[len(lines)-1], "SUMMARY ")), &s); err != nil {
		t.Fatalf("summary line %q: %v", lines[len(lines)-1], err)
	}
	return f, out.String(), s
}

func TestExampleTextFlow(t *testing.T) {
	f, out, s := runExample(t)
	if len(s.Losses) != 20 || !(s.Losses[19] < s.Losses[0]) || s.CheckpointURI != "file:///data/ck-1" || s.CostMicroCredits <= 0 {
		t.Errorf("summary = %+v", s)
	}
	if len(f.fb) != 20 || len(f.fb[0].Examples) != len(dataset) || len(f.fb[0].Data) != 0 {
		t.Errorf("forward_backward calls %d, first %+v", len(f.fb), f.fb[0])
	}
	samples := 0
	for _, c := range f.calls {
		if strings.HasSuffix(c, "/sample") {
			samples++
		}
	}
	if samples != 4 || f.calls[len(f.calls)-1] != "DELETE /v1/runs/run-1" {
		t.Errorf("%d samples (want 4: steps 0,5,10,15), last call %s", samples, f.calls[len(f.calls)-1])
	}
	for _, want := range []string{"falling", `"The cat sat" -> " on the mat"`, "adapter_model.safetensors"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestExampleTokenFlow(t *testing.T) {
	f, _, s := runExample(t, "--tokens", "--steps", "3", "--keep-run")
	if len(s.Losses) != 3 || len(f.fb[0].Data) != len(dataset) || len(f.fb[0].Examples) != 0 {
		t.Fatalf("summary %+v, first batch %+v", s, f.fb[0])
	}
	d := f.fb[0].Data[4] // a prompt/completion pair: weights 0 on the prompt
	if d.LossFnInputs.Weights[0] != 0 || d.LossFnInputs.Weights[len(d.LossFnInputs.Weights)-1] != 1 {
		t.Errorf("weights %v", d.LossFnInputs.Weights)
	}
	if last := f.calls[len(f.calls)-1]; strings.HasPrefix(last, "DELETE") {
		t.Errorf("--keep-run still ended the run")
	}
}

func TestParseFlags(t *testing.T) {
	t.Setenv("SIGNAL_URL", "")
	t.Setenv("SIGNAL_API_KEY", "")
	t.Setenv("SIGNAL_BASE_MODEL", "")
	if _, err := parseFlags(nil); err == nil || !strings.Contains(err.Error(), "SIGNAL_URL") {
		t.Errorf("no URL: %v", err)
	}
	if _, err := parseFlags([]string{"--url", "http://x", "--api-key", "k", "--steps", "0"}); err == nil {
		t.Error("--steps 0 accepted")
	}
	tn := filepath.Join(t.TempDir(), "testnet.json")
	if err := os.WriteFile(tn, []byte(`{"coordinators":["http://127.0.0.1:7001"],"api_key":"sk-tn"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := parseFlags([]string{"--testnet", tn, "--api-key", "sk-flag"})
	if err != nil || c.url != "http://127.0.0.1:7001" || c.apiKey != "sk-flag" || c.baseModel != "signal-tiny" {
		t.Errorf("parseFlags(--testnet) = %+v, %v", c, err)
	}
}

// TestExampleEndsRunOnFailure: a call failing midway still ends the run.
func TestExampleEndsRunOnFailure(t *testing.T) {
	f := &fakeTrainer{}
	var deleted bool
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/optim_step") {
			w.WriteHeader(http.StatusPaymentRequired)
			_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "insufficient_balance", Message: "balance 1 below 9"}})
			return
		}
		if r.Method == http.MethodDelete {
			mu.Lock()
			deleted = true
			mu.Unlock()
		}
		f.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	cfg, err := parseFlags([]string{"--url", srv.URL, "--api-key", "sk"})
	if err != nil {
		t.Fatal(err)
	}
	err = run(context.Background(), cfg, io.Discard)
	if !errors.Is(err, client.ErrInsufficientBalance) || !strings.Contains(err.Error(), "optim_step 0") {
		t.Fatalf("err = %v, want the 402 of optim_step 0", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !deleted {
		t.Error("the run was not ended after the failure")
	}
}
