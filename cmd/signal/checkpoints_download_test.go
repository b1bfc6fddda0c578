package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

// TestCheckpointsDownload: without --storage the files come through the
// coordinator's signed URLs, each checked against its CID; a file whose
// bytes do not match is refused and not left behind.
func TestCheckpointsDownload(t *testing.T) {
	adapter, cfg := []byte("adapter bytes"), []byte(`{"r": 8}`)
	files := map[string][]byte{"adapter_model.safetensors": adapter, "adapter_config.json": cfg}
	cp := protocol.Checkpoint{ID: "ck-1", RunID: "run-1", Step: 3, Mode: "adapter", URI: "s3://bucket/ck-1"}
	for name, b := range files {
		cp.Files = append(cp.Files, protocol.CheckpointFile{Name: name, CID: storage.NewCID(b).String(), Size: int64(len(b))})
	}
	corrupt := false
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v1/runs":
			_ = json.NewEncoder(w).Encode(protocol.RunList{Runs: []protocol.Run{{ID: "run-1", Checkpoints: []protocol.Checkpoint{cp}}}})
		case r.URL.Path == "/v1/checkpoints/ck-1/files":
			out := protocol.CheckpointFiles{Checkpoint: cp, Expires: "2026-12-07T20:00:00Z"}
			for _, f := range cp.Files {
				out.Files = append(out.Files, protocol.CheckpointFileURL{Name: f.Name, CID: f.CID, Size: f.Size, URL: srv.URL + "/files/" + f.Name})
			}
			_ = json.NewEncoder(w).Encode(out)
		case strings.HasPrefix(r.URL.Path, "/files/"):
			b := files[strings.TrimPrefix(r.URL.Path, "/files/")]
			if corrupt {
				b = append([]byte{'X'}, b[1:]...)
			}
			_, _ = w.Write(b)
		default:
			w.WriteHeader(404)
			_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "not_found", Message: r.URL.Path}})
		}
	}))
	t.Cleanup(srv.Close)
	t.Setenv("SIGNAL_URL", srv.URL)
	t.Setenv("SIGNAL_API_KEY", "sk")
	t.Setenv("SIGNAL_STORAGE", "")
	dir := filepath.Join(t.TempDir(), "out")
	out, err := runCLI(t, "checkpoints", "download", "ck-1", "--out", dir)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for name, want := range files {
		if got, err := os.ReadFile(filepath.Join(dir, name)); err != nil || string(got) != string(want) {
			t.Errorf("%s: %q %v", name, got, err)
		}
		if !strings.Contains(out, name) {
			t.Errorf("the listing lacks %s:\n%s", name, out)
		}
	}
	corrupt = true
	dir2 := filepath.Join(t.TempDir(), "out")
	out, err = runCLI(t, "checkpoints", "download", "ck-1", "--out", dir2)
	if err == nil || !strings.Contains(err.Error(), "the checkpoint names") {
		t.Fatalf("corrupt bytes: %v\n%s", err, out)
	}
	if left, _ := filepath.Glob(filepath.Join(dir2, "*")); len(left) != 0 {
		t.Errorf("a refused download left %v behind", left)
	}
}

// TestQuarantineLift: the admin token, the peer in the path, the reason
// in the body; without --reason the command refuses before any request.
func TestQuarantineLift(t *testing.T) {
	var got protocol.LiftQuarantineRequest
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/admin/nodes/12D3Koo/lift_quarantine" || r.Header.Get("Authorization") != "Bearer adm" || json.NewDecoder(r.Body).Decode(&got) != nil {
			w.WriteHeader(404)
			_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "not_found", Message: r.URL.Path}})
			return
		}
		_ = json.NewEncoder(w).Encode(protocol.NodeAudits{Failed: 1, LiftReason: got.Reason})
	}))
	t.Cleanup(srv.Close)
	t.Setenv("SIGNAL_URL", srv.URL)
	t.Setenv("SIGNAL_ADMIN_TOKEN", "adm")
	if _, err := runCLI(t, "node", "quarantine", "lift", "12D3Koo"); err == nil || !strings.Contains(err.Error(), "--reason") {
		t.Fatalf("without --reason: %v", err)
	}
	out, err := runCLI(t, "node", "quarantine", "lift", "12D3Koo", "--reason", "GPU replaced")
	if err != nil || got.Reason != "GPU replaced" || !strings.Contains(out, "quarantine lifted (GPU replaced)") {
		t.Fatalf("lift: %v %q %s", err, got.Reason, out)
	}
}
