package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// fakeUserAPI answers the user commands' calls; it checks the bearer key.
func fakeUserAPI(t *testing.T, wantKey string) *httptest.Server {
	t.Helper()
	loss, gn, lr := 2.5, 1.25, 1e-4
	run := protocol.Run{ID: "run-1", Name: "demo", BaseModel: "signal-tiny", LoRARank: 8, LoRAAlpha: 16,
		TargetModules: []string{"q_proj", "v_proj"}, Status: protocol.RunReady, Node: "12D3KooWabcdefghijklmnop",
		Step: 3, CheckpointEvery: 10, SpentMicroCredits: 1_234_567, CreatedAt: "2026-03-01T12:00:00Z",
		LastMetrics: &protocol.Metrics{Step: 3, LossMean: &loss, GradNorm: &gn, LearningRate: &lr, Time: "t"},
		Checkpoints: []protocol.Checkpoint{{ID: "ck-1", Step: 3, Mode: "adapter", URI: "file:///ck/1",
			Files: []protocol.CheckpointFile{{Name: "adapter_model.safetensors", Size: 2048}}}}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+wantKey {
			w.WriteHeader(401)
			_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "unauthorized", Message: "unknown API key"}})
			return
		}
		var v any
		switch r.Method + " " + r.URL.Path {
		case "GET /v1/runs":
			v = protocol.RunList{Runs: []protocol.Run{run}}
		case "GET /v1/runs/run-1":
			v = run
		case "GET /v1/runs/run-1/metrics":
			v = protocol.MetricsResponse{Metrics: []protocol.Metrics{*run.LastMetrics}}
		case "DELETE /v1/runs/run-1":
			ended := run
			ended.Status = protocol.RunEnded
			v = ended
		case "GET /v1/account":
			v = protocol.Account{Account: "acct-9", BalanceMicroCredits: 98_765_432, SpentMicroCredits: 1_234_568,
				Charges: []protocol.Charge{{RunID: "run-1", Call: "forward_backward", MicroCredits: 1_000, Time: "t1"}}}
		case "GET /v1/models":
			v = protocol.ModelList{Models: []protocol.Model{{Name: "signal-tiny", ContextLength: 512, MemoryBytes: 3 << 20,
				Prices: protocol.Prices{TrainMicroCreditsPer1K: 500, PrefillMicroCreditsPer1K: 100, SampleMicroCreditsPer1K: 200, StorageMicroCreditsPerGBHour: 10}}}}
		case "GET /v1/nodes":
			v = protocol.NodeList{Nodes: []protocol.Node{
				{PeerID: "12D3KooWnode1", CPU: protocol.CPU{Cores: 16, MemoryTotal: 64 << 30}, Backends: []string{"cpu"}, Models: []string{"signal-tiny"}, Sessions: 1, MaxSessions: 4},
				{PeerID: "12D3KooWnode2", GPUs: []protocol.GPU{{Name: "NVIDIA H200", MemoryTotal: 141 << 30, MemoryFree: 100 << 30, Utilization: 0.37}}, MaxSessions: 8},
			}}
		default:
			w.WriteHeader(404)
			_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "not_found", Message: "run " + r.URL.Path + " not found"}})
			return
		}
		_ = json.NewEncoder(w).Encode(v)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestUserCommands(t *testing.T) {
	srv := fakeUserAPI(t, "sk-env")
	t.Setenv("SIGNAL_URL", srv.URL)
	t.Setenv("SIGNAL_API_KEY", "sk-env")
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"runs", "list"}, []string{"ID", "run-1", "demo", "signal-tiny", "ready", "2.5000", "1.234567", "12D3Ko…klmnop"}},
		{[]string{"runs", "show", "run-1"}, []string{"12D3KooWabcdefghijklmnop", "rank 8, alpha 16, modules q_proj,v_proj",
			"loss 2.5, grad norm 1.25, lr 0.0001", "ck-1 step 3 adapter file:///ck/1 (2.0 KiB, 1 files)"}},
		{[]string{"runs", "metrics", "run-1"}, []string{"STEP", "3", "2.5", "1.25"}},
		{[]string{"runs", "delete", "run-1"}, []string{"run run-1 ended at step 3, spent 1.234567 credits"}},
		{[]string{"account"}, []string{"acct-9", "98.765432 credits", "1.234568 credits", "forward_backward", "0.001000"}},
		{[]string{"models"}, []string{"signal-tiny", "512", "3.0 MiB", "0.000500", "0.000010"}},
		{[]string{"nodes"}, []string{"cpu 16 cores, 64.0 GiB", "NVIDIA H200, 100.0 GiB of 141.0 GiB free, 37% busy", "1/4", "0/8"}},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			out, err := runCLI(t, tc.args...)
			if err != nil {
				t.Fatalf("signal %v: %v", tc.args, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("signal %v output lacks %q:\n%s", tc.args, w, out)
				}
			}
		})
	}
}

func TestUserCommandsJSON(t *testing.T) {
	srv := fakeUserAPI(t, "sk-env")
	out, err := runCLI(t, "runs", "list", "--json", "--url", srv.URL, "--api-key", "sk-env")
	if err != nil {
		t.Fatal(err)
	}
	var rl protocol.RunList
	if err := json.Unmarshal([]byte(out), &rl); err != nil || len(rl.Runs) != 1 || rl.Runs[0].SpentMicroCredits != 1_234_567 {
		t.Fatalf("--json output %q: %+v, %v", out, rl, err)
	}
}

func TestUserFlagsOverrideEnvAndTestnet(t *testing.T) {
	srv := fakeUserAPI(t, "sk-flag")
	t.Setenv("SIGNAL_URL", "http://127.0.0.1:1") // nothing there
	t.Setenv("SIGNAL_API_KEY", "sk-env")
	if _, err := runCLI(t, "account", "--url", srv.URL, "--api-key", "sk-flag"); err != nil {
		t.Fatalf("flags should override env: %v", err)
	}
	// The env key is wrong for this server: the typed 401 comes through.
	_, err := runCLI(t, "account", "--url", srv.URL)
	if !errors.Is(err, client.ErrUnauthorized) || !strings.Contains(err.Error(), "unknown API key") {
		t.Fatalf("err = %v, want ErrUnauthorized with the server's message", err)
	}
	tn := filepath.Join(t.TempDir(), "testnet.json")
	data, _ := json.Marshal(map[string]any{"coordinators": []string{srv.URL}, "api_key": "sk-flag", "admin_token": "a"})
	if err := os.WriteFile(tn, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runCLI(t, "models", "--testnet", tn); err != nil || !strings.Contains(out, "signal-tiny") {
		t.Fatalf("--testnet: %q, %v", out, err)
	}
}

func TestUserCommandErrors(t *testing.T) {
	srv := fakeUserAPI(t, "k")
	t.Setenv("SIGNAL_URL", "")
	t.Setenv("SIGNAL_API_KEY", "")
	if _, err := runCLI(t, "runs", "list"); err == nil || !strings.Contains(err.Error(), "SIGNAL_URL") {
		t.Errorf("no URL: err = %v", err)
	}
	if _, err := runCLI(t, "runs", "list", "--url", srv.URL); err == nil || !strings.Contains(err.Error(), "SIGNAL_API_KEY") {
		t.Errorf("no key: err = %v", err)
	}
	if _, err := runCLI(t, "runs", "show", "nope", "--url", srv.URL, "--api-key", "k"); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("unknown run: err = %v, want ErrNotFound", err)
	}
	if _, err := runCLI(t, "runs", "show", "--url", srv.URL, "--api-key", "k"); err == nil {
		t.Error("show without a run id succeeded")
	}
	if _, err := runCLI(t, "nodes", "--url", srv.URL, "--api-key", "k", "--timeout", "0s"); err == nil || !strings.Contains(err.Error(), "--timeout") {
		t.Errorf("zero timeout: err = %v", err)
	}
}

func TestCredits(t *testing.T) {
	for mc, want := range map[protocol.MicroCredits]string{0: "0.000000", 1: "0.000001", 1_500_000: "1.500000", -2_000_001: "-2.000001"} {
		if got := credits(mc); got != want {
			t.Errorf("credits(%d) = %q, want %q", mc, got, want)
		}
	}
}

// TestSecretFlagsWarn: a secret passed in argv (readable by every user of
// the host) is used but warned about, naming the environment variable.
func TestSecretFlagsWarn(t *testing.T) {
	var stderr bytes.Buffer
	cmd := &cobra.Command{Use: "x", RunE: func(cmd *cobra.Command, _ []string) error {
		warnSecretFlags(cmd, map[string]string{"admin-token": "SIGNAL_ADMIN_TOKEN"})
		return nil
	}}
	cmd.Flags().String("admin-token", "", "")
	cmd.SetErr(&stderr)
	cmd.SetArgs([]string{"--admin-token", "s3cret"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stderr.String(), "--admin-token is visible") || !strings.Contains(stderr.String(), "$SIGNAL_ADMIN_TOKEN") {
		t.Fatalf("warning %q", stderr.String())
	}
	stderr.Reset()
	quiet := &cobra.Command{Use: "y", RunE: func(cmd *cobra.Command, _ []string) error {
		warnSecretFlags(cmd, map[string]string{"admin-token": "SIGNAL_ADMIN_TOKEN"})
		return nil
	}}
	quiet.Flags().String("admin-token", "", "")
	quiet.SetErr(&stderr)
	quiet.SetArgs([]string{})
	if err := quiet.Execute(); err != nil || stderr.Len() != 0 {
		t.Fatalf("warned without the flag: %q (%v)", stderr.String(), err)
	}
}
