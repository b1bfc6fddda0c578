package client

import (
	"context"
	"errors"
	"net/http"
	"testing"

	"github.com/signal-p2p/signal/protocol"
)

// TestPushCheckpoint: the push names the checkpoint in its path, sends the
// token from $HF_TOKEN when the request has none, and a 503 (the Hub
// failed mid-push) is retried, which resumes the push on the server.
func TestPushCheckpoint(t *testing.T) {
	t.Setenv("HF_TOKEN", "hf_env_token")
	tries := 0
	var f *fakeAPI
	f = newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		reqs := f.requests()
		var req protocol.PushRequest
		decodeStrict(t, reqs[len(reqs)-1].body, &req)
		if r.Method != http.MethodPost || r.URL.Path != "/v1/checkpoints/ck-1/push" || req.Repo != "alice/lora" || req.Token != "hf_env_token" || req.IsPrivate() {
			t.Errorf("%s %s %v", r.Method, r.URL.Path, req)
		}
		if tries++; tries == 1 {
			w.Header().Set("Retry-After", "1")
			writeErr(w, 503, protocol.CodeUnavailable, "the push failed at the Hub: push again")
			return
		}
		writeJSON(w, 200, protocol.PushResponse{Checkpoint: "ck-1", Repo: req.Repo, CommitOID: "abc"})
	})
	c, _ := mustClient(t, f)
	out, err := c.PushCheckpoint(context.Background(), "ck-1", protocol.PushRequest{Repo: "alice/lora", Private: ptr(false)})
	if err != nil || out.CommitOID != "abc" || tries != 2 {
		t.Fatalf("push: %+v, %v after %d tries", out, err, tries)
	}

	t.Setenv("HF_TOKEN", "")
	for _, bad := range []struct{ id, repo string }{{"", "a/b"}, {"a/b", "a/b"}, {"ck-1", ""}, {"ck-1", "a/b"}} {
		if _, err := c.PushCheckpoint(context.Background(), bad.id, protocol.PushRequest{Repo: bad.repo}); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("push %q to %q without a token: %v", bad.id, bad.repo, err)
		}
	}
}
