package coordinator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/signal-p2p/signal/protocol"
)

// fakeHubError is a push failure the Hub answered with status.
type fakeHubError struct{ status int }

func (e fakeHubError) Error() string   { return fmt.Sprintf("hub commit: %d", e.status) }
func (e fakeHubError) HTTPStatus() int { return e.status }

// syncBuffer is a log sink tests read while the coordinator writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.b.Bytes()...)
}

// grepDir lists the files under dir that contain needle.
func grepDir(t *testing.T, dir string, needle []byte) []string {
	t.Helper()
	var hits []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if bytes.Contains(b, needle) {
			hits = append(hits, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hits
}

// TestPushCheckpoint: the owner's push reaches the pusher with the run,
// the checkpoint and the token; anyone else's is a 404; the Hub's answers
// map to 403, 400 and a retried 503; and the token is in no raft log or
// snapshot and no log line.
func TestPushCheckpoint(t *testing.T) {
	const token = "hf_secret_token_7f3a9c"
	logs := &syncBuffer{}
	var mu sync.Mutex
	var got []protocol.PushRequest
	var fail error
	var dataDir string
	c, _ := startOne(t, func(cfg *Config) {
		dataDir = cfg.DataDir
		cfg.Logger = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		cfg.RaftLogLevel = "trace"
		cfg.PushCheckpoint = func(_ context.Context, run protocol.Run, cp protocol.Checkpoint, req protocol.PushRequest) (protocol.PushResponse, error) {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, req)
			if fail != nil {
				return protocol.PushResponse{}, fail
			}
			if run.BaseModel != "tiny" || cp.Step != 0 {
				return protocol.PushResponse{}, fmt.Errorf("run %+v checkpoint %+v", run, cp)
			}
			return protocol.PushResponse{Checkpoint: cp.ID, Repo: req.Repo, CommitOID: "abc"}, nil
		}
	})
	base := c.URL()
	key, _ := createKey(t, base, 100_000_000)
	saved := savedAdapter(t, base, key)
	push := func(k, id string, body any) apiResp {
		return do(t, "POST", base+"/v1/checkpoints/"+id+"/push", k, body, "Idempotency-Key", "push-key-1")
	}
	body := map[string]any{"repo": "alice/tiny-lora", "token": token}

	r := push(key, saved.Checkpoint.ID, body)
	mustStatus(t, r, 200)
	var ans protocol.PushResponse
	r.decode(t, &ans)
	if ans.Checkpoint != saved.Checkpoint.ID || ans.Repo != "alice/tiny-lora" || len(got) != 1 || got[0].Token != token || !got[0].IsPrivate() {
		t.Fatalf("answer %+v, pusher got %v", ans, got)
	}
	mustStatus(t, push(key, saved.Checkpoint.ID, map[string]any{"repo": "alice/tiny-lora", "token": token, "private": false}), 200)
	if got[1].IsPrivate() {
		t.Fatal(`"private": false did not reach the pusher`)
	}

	other, _ := createKey(t, base, 100_000_000)
	if r := push(other, saved.Checkpoint.ID, body); r.status != 404 {
		t.Fatalf("another account's push: %d %s", r.status, r.body)
	}
	if r := push(key, "no-such-checkpoint", body); r.status != 404 {
		t.Fatalf("unknown checkpoint: %d %s", r.status, r.body)
	}
	for _, b := range []map[string]any{{"repo": "alice/x"}, {"token": token}, {"repo": "alice/x", "token": token, "extra": 1}} {
		if r := push(key, saved.Checkpoint.ID, b); r.status != 400 {
			t.Fatalf("body %v: %d %s", b, r.status, r.body)
		}
	}
	for _, c := range []struct {
		err    error
		status int
	}{
		{fakeHubError{401}, 403}, {fakeHubError{403}, 403}, {fakeHubError{422}, 400}, {fakeHubError{404}, 400},
		{fakeHubError{500}, 503}, {fakeHubError{0}, 503}, {fmt.Errorf("read: %w", fakeHubError{429}), 503},
		{errors.New("content does not match its cid"), 500},
	} {
		mu.Lock()
		fail = c.err
		mu.Unlock()
		r := push(key, saved.Checkpoint.ID, body)
		if r.status != c.status || (c.status == 503 && r.header.Get("Retry-After") == "") {
			t.Errorf("pusher error %v: %d %s (Retry-After %q), want %d", c.err, r.status, r.body, r.header.Get("Retry-After"), c.status)
		}
	}

	// The token reached the pusher and nothing else: not the raft log,
	// not a snapshot, not a log line.
	if err := c.raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	if hits := grepDir(t, dataDir, []byte(token)); len(hits) > 0 {
		t.Fatalf("the token is in %v", hits)
	}
	if l := logs.Bytes(); bytes.Contains(l, []byte(token)) || !bytes.Contains(l, []byte("checkpoint pushed")) {
		t.Fatalf("the token is in the log, or the push is not (%d bytes of log)", len(l))
	}
}

// TestPushWithoutStore: a network without a checkpoint store refuses
// pushes with a sentence saying why.
func TestPushWithoutStore(t *testing.T) {
	c, _ := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 100_000_000)
	saved := savedAdapter(t, base, key)
	r := do(t, "POST", base+"/v1/checkpoints/"+saved.Checkpoint.ID+"/push", key, map[string]any{"repo": "alice/x", "token": "hf_x"})
	if r.status != 400 || !bytes.Contains(r.body, []byte("--storage")) {
		t.Fatalf("%d %s", r.status, r.body)
	}
}

// savedAdapter creates a run for key and saves its adapter: a checkpoint to
// push.
func savedAdapter(t *testing.T, base, key string) protocol.SaveStateResponse {
	t.Helper()
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 1, "checkpoint_every": 0})
	r := do(t, "POST", base+"/v1/runs/"+run.ID+"/save_state", key, map[string]any{"mode": "adapter"})
	mustStatus(t, r, 200)
	var saved protocol.SaveStateResponse
	r.decode(t, &saved)
	return saved
}
