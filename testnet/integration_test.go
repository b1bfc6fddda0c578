package testnet

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/node/miniotest"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

// repoRoot is the module root (the examples live there).
func repoRoot(t *testing.T) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

// python is $SIGNAL_PYTHON (default /usr/bin/python3); the examples need
// only the standard library.
func python(t *testing.T) string {
	t.Helper()
	py := os.Getenv("SIGNAL_PYTHON")
	if py == "" {
		py = "/usr/bin/python3"
	}
	if _, err := exec.LookPath(py); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("python %s: %v", py, err)
		}
		t.Skipf("python %s not found (set SIGNAL_PYTHON)", py)
	}
	return py
}

// torchPython is python(t) when it imports torch (the testnet's cpu-torch
// nodes run on it); without torch the test skips, or fails in CI.
func torchPython(t *testing.T) string {
	t.Helper()
	py := python(t)
	if err := exec.Command(py, "-c", "import torch").Run(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s has no torch: %v", py, err)
		}
		t.Skipf("%s has no torch (set $SIGNAL_PYTHON): %v", py, err)
	}
	return py
}

// exampleSummary is the SUMMARY line both examples print last.
type exampleSummary struct {
	RunID         string    `json:"run_id"`
	Losses        []float64 `json:"losses"`
	Cost          int64     `json:"cost_micro_credits"`
	CheckpointURI string    `json:"checkpoint_uri"`
	CheckpointID  string    `json:"checkpoint_id"`
}

// runExample runs an example command and parses its SUMMARY line.
func runExample(ctx context.Context, t *testing.T, name string, cmd *exec.Cmd) exampleSummary {
	t.Helper()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v\n%s", name, err, out.String())
	}
	var s exampleSummary
	for _, line := range strings.Split(out.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "SUMMARY "); ok {
			if err := json.Unmarshal([]byte(rest), &s); err != nil {
				t.Fatalf("%s SUMMARY: %v: %s", name, err, rest)
			}
		}
	}
	if s.RunID == "" {
		t.Fatalf("%s printed no SUMMARY:\n%s", name, out.String())
	}
	t.Logf("%s: run %s, loss %.3f -> %.3f, checkpoint %s", name, s.RunID, s.Losses[0], s.Losses[len(s.Losses)-1], s.CheckpointURI)
	return s
}

// checkLossFalls asserts the examples' 20 steps learned their sentences.
func checkLossFalls(t *testing.T, name string, losses []float64) {
	t.Helper()
	if len(losses) != 20 {
		t.Fatalf("%s: %d losses, want 20", name, len(losses))
	}
	if !(losses[19] < losses[0]/2) {
		t.Fatalf("%s: loss %.3f -> %.3f: did not fall to half over 20 steps: %.3f", name, losses[0], losses[19], losses)
	}
}

// verifyOnMinIO downloads a checkpoint's objects straight from MinIO and
// checks each one's bytes hash to the CID it is named and listed by.
func verifyOnMinIO(ctx context.Context, t *testing.T, srv *miniotest.Server, cp protocol.Checkpoint) {
	t.Helper()
	if len(cp.Files) == 0 {
		t.Fatalf("checkpoint %s lists no files", cp.ID)
	}
	objects := []struct{ uri, cid string }{{cp.URI, cp.ID}}
	for _, f := range cp.Files {
		objects = append(objects, struct{ uri, cid string }{f.URI, f.CID})
	}
	for _, o := range objects {
		bucket, key, ok := strings.Cut(strings.TrimPrefix(o.uri, "s3://"), "/")
		if !strings.HasPrefix(o.uri, "s3://") || !ok {
			t.Fatalf("object URI %q: not s3://bucket/key", o.uri)
		}
		obj, err := srv.Client.GetObject(ctx, bucket, key, minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(obj)
		obj.Close()
		if err != nil {
			t.Fatalf("read %s: %v", o.uri, err)
		}
		if got := storage.NewCID(data).String(); got != o.cid || !strings.HasSuffix(key, o.cid) {
			t.Fatalf("%s: bytes hash to %s, listed as %s", o.uri, got, o.cid)
		}
	}
}

// checkpointOf finds a run's checkpoint by id.
func checkpointOf(ctx context.Context, t *testing.T, c *client.Client, runID, id string) protocol.Checkpoint {
	t.Helper()
	r, err := c.GetRun(ctx, runID)
	if err != nil {
		t.Fatal(err)
	}
	for _, cp := range r.Info().Checkpoints {
		if cp.ID == id {
			return cp
		}
	}
	t.Fatalf("run %s has no checkpoint %s (has %+v)", runID, id, r.Info().Checkpoints)
	return protocol.Checkpoint{}
}

// TestExamplesOnMinIOTestnet is issue 8's CI check: the Python and Go
// examples against a 3-coordinator, 2-node testnet storing checkpoints in
// a real MinIO; the loss falls over the 20 steps and the saved adapter's
// objects verify against their CIDs.
func TestExamplesOnMinIOTestnet(t *testing.T) {
	py := python(t)
	srv := miniotest.Start(t, "signal")
	tn := startTestnet(t, func(c *Config) {
		c.StorageURL = srv.StorageURL("signal", "checkpoints")
		c.Creds = storage.Credentials{AccessKey: miniotest.AccessKey, SecretKey: miniotest.SecretKey}
	})
	info := tn.Info()
	tnFile := filepath.Join(info.Dir, "testnet.json")
	root := repoRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c, err := client.New(info.Coordinators[0], info.APIKey)
	if err != nil {
		t.Fatal(err)
	}

	pyCmd := exec.CommandContext(ctx, py, filepath.Join(root, "examples", "simple_example.py"), "--testnet", tnFile)
	pyCmd.Dir = root
	s := runExample(ctx, t, "simple_example.py", pyCmd)
	checkLossFalls(t, "simple_example.py", s.Losses)
	verifyOnMinIO(ctx, t, srv, checkpointOf(ctx, t, c, s.RunID, s.CheckpointID))

	goBin := filepath.Join(t.TempDir(), "simple_example")
	build := exec.CommandContext(ctx, "go", "build", "-o", goBin, "./examples/simple_example")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the Go example: %v\n%s", err, out)
	}
	g := runExample(ctx, t, "simple_example (Go)", exec.CommandContext(ctx, goBin, "--testnet", tnFile))
	checkLossFalls(t, "simple_example (Go)", g.Losses)
	verifyOnMinIO(ctx, t, srv, checkpointOf(ctx, t, c, g.RunID, g.CheckpointID))

	// Both runs were billed to the testnet's key.
	acct, err := c.Account(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if acct.SpentMicroCredits != s.Cost+g.Cost {
		t.Errorf("account spent %d, the examples report %d + %d", acct.SpentMicroCredits, s.Cost, g.Cost)
	}
}

// TestFailoverResumesFromCheckpoint kills the node serving a run after its
// automatic checkpoint; the run must move to the other node, resume from
// that checkpoint's step, and keep training from the learned state.
func TestFailoverResumesFromCheckpoint(t *testing.T) {
	t.Run("idle", func(t *testing.T) { testFailover(t, false, false) })
	t.Run("calling", func(t *testing.T) { testFailover(t, true, false) })
	t.Run("drained", func(t *testing.T) { testFailover(t, false, true) })
}

// testFailover trains 7 steps (automatic checkpoint at 5), kills the run's
// node, and trains on: either calling at once (the calls see 503 +
// Retry-After until the run has moved; the SDK retries) or after the
// coordinator has moved the run by itself. With graceful, the node is
// stopped instead of killed: it checkpoints the run at step 7 and reports
// it, so the run resumes from 7, not from the automatic checkpoint at 5.
func testFailover(t *testing.T, callAtOnce, graceful bool) {
	// The default timing (coordinator NodeLostAfter, p2p NodeTTL, node
	// advert interval): what a real network runs.
	tn := startTestnet(t, nil)
	info := tn.Info()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.New(info.Coordinators[2], info.APIKey, client.WithRetries(60, 200*time.Millisecond, 2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	r, losses := trainRun(ctx, t, c, 7)
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	before := r.Info()
	if len(before.Checkpoints) == 0 || before.Checkpoints[len(before.Checkpoints)-1].Step != 5 {
		t.Fatalf("no automatic checkpoint at step 5: %+v", before.Checkpoints)
	}
	victim := tn.NodeIndex(before.Node)
	if victim < 0 {
		t.Fatalf("run on unknown node %s", before.Node)
	}
	killed := time.Now()
	stop := tn.KillNode
	wantResumed := 5
	if graceful {
		stop, wantResumed = tn.StopNode, 7
	}
	if err := stop(victim); err != nil {
		t.Fatal(err)
	}
	if !callAtOnce {
		for {
			if err := r.Refresh(ctx); err != nil {
				t.Fatal(err)
			}
			if in := r.Info(); in.Status == protocol.RunReady && in.Node != before.Node {
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("run did not move off the dead node: %+v", r.Info())
			case <-time.After(100 * time.Millisecond):
			}
		}
		t.Logf("moved %.1fs after the kill", time.Since(killed).Seconds())
	}

	lr := 5e-3
	batch := protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{
		{Text: "The cat sat on the mat."},
		{Text: "The dog sat on the log."},
		{Prompt: "Question: What color is the sky?\nAnswer:", Completion: " The sky is blue."},
	}}
	fb, err := r.ForwardBackward(ctx, batch)
	if err != nil {
		t.Fatalf("forward_backward after the node died: %v", err)
	}
	t.Logf("serving again %.1fs after the kill", time.Since(killed).Seconds())
	st, err := r.OptimStep(ctx, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	after := r.Info()
	if after.Node == before.Node || after.Node == "" {
		t.Fatalf("run still on node %q after it died", after.Node)
	}
	if after.ResumedFromStep == nil || *after.ResumedFromStep != wantResumed {
		t.Fatalf("resumed_from_step = %v, want %d", after.ResumedFromStep, wantResumed)
	}
	if st.Step != wantResumed+1 {
		t.Fatalf("first step after resuming is %d, want %d (checkpoint %d + 1)", st.Step, wantResumed+1, wantResumed)
	}
	// The restored adapter remembers what steps 1..5 learned: the loss is
	// near the pre-kill losses, far below the untrained first step's.
	if !(fb.LossMean < losses[0]/2) {
		t.Fatalf("loss after resuming %.3f; first %.3f, before the kill %.3f", fb.LossMean, losses[0], losses)
	}
}
