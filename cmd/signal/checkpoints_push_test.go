package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/protocol"
)

// TestCheckpointsPush: the token comes from $HF_TOKEN, the repository is
// private unless --public, and the files are listed with how they went.
func TestCheckpointsPush(t *testing.T) {
	var got []protocol.PushRequest
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req protocol.PushRequest
		if r.Method != http.MethodPost || r.URL.Path != "/v1/checkpoints/ck-1/push" || json.NewDecoder(r.Body).Decode(&req) != nil {
			w.WriteHeader(404)
			_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "not_found", Message: "checkpoint not found"}})
			return
		}
		got = append(got, req)
		_ = json.NewEncoder(w).Encode(protocol.PushResponse{Checkpoint: "ck-1", Repo: req.Repo, URL: "https://hub/" + req.Repo,
			CommitURL: "https://hub/" + req.Repo + "/commit/abc", CommitOID: "abc", Files: []protocol.PushedFile{
				{Name: "adapter_model.safetensors", Size: 4096, CID: "bafkreiabc", Sent: false},
				{Name: "README.md", Size: 900, Sent: true}}})
	}))
	t.Cleanup(srv.Close)
	t.Setenv("SIGNAL_URL", srv.URL)
	t.Setenv("SIGNAL_API_KEY", "sk")
	t.Setenv("HF_TOKEN", "hf_cli_token")

	out, err := runCLI(t, "checkpoints", "push", "ck-1", "--repo", "alice/lora")
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"checkpoint ck-1 pushed to https://hub/alice/lora", "commit/abc", "held by the Hub already", "bafkreiabc", "(written by the push)"} {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
	if _, err := runCLI(t, "checkpoints", "push", "ck-1", "--repo", "alice/lora", "--public", "-m", "v1"); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Token != "hf_cli_token" || !got[0].IsPrivate() || got[1].IsPrivate() || got[1].CommitMessage != "v1" {
		t.Fatalf("requests %v", got)
	}
	if out, err := runCLI(t, "checkpoints", "push", "ck-1", "--repo", "alice/lora", "--json"); err != nil || !strings.Contains(out, `"commit_oid": "abc"`) {
		t.Fatalf("--json: %q, %v", out, err)
	}
	if _, err := runCLI(t, "checkpoints", "push", "ck-1"); err == nil || !strings.Contains(err.Error(), "--repo") {
		t.Errorf("no --repo: %v", err)
	}
	t.Setenv("HF_TOKEN", "")
	if _, err := runCLI(t, "checkpoints", "push", "ck-1", "--repo", "alice/lora"); err == nil || !strings.Contains(err.Error(), "HF_TOKEN") {
		t.Errorf("no HF_TOKEN: %v", err)
	}
}
