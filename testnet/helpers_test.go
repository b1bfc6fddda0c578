package testnet

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"log/slog"
)

// sharedModelDir caches signal-tiny across the package's tests: tests
// share one generated copy (read-only) instead of generating it each time.
var (
	modelOnce sync.Once
	modelRoot string
	modelErr  error
)

// seedModel puts a generated signal-tiny into dir/models so that prepare
// finds it there instead of generating it again.
func seedModel(t testing.TB, dir string) {
	t.Helper()
	modelOnce.Do(func() {
		modelRoot, modelErr = os.MkdirTemp("", "signal-testnet-model-")
		if modelErr == nil {
			modelErr = EnsureDefaultModel(filepath.Join(modelRoot, DefaultModelName))
		}
	})
	if modelErr != nil {
		t.Fatal(modelErr)
	}
	dst := filepath.Join(dir, "models", DefaultModelName)
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(modelRoot, DefaultModelName)
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		// Hard links: no copy, and the test's writes never touch these files.
		if err := os.Link(filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if modelRoot != "" {
		_ = os.RemoveAll(modelRoot)
	}
	os.Exit(code)
}

// testLogger writes the testnet's logs to the test log when -v asks.
func testLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return nil
	}
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// startTestnet starts an in-process testnet for one test and stops it at
// the end.
func startTestnet(t testing.TB, mut func(*Config)) *InProcess {
	t.Helper()
	dir := t.TempDir()
	seedModel(t, dir)
	cfg := DefaultConfig()
	cfg.Dir = dir
	cfg.Logger = testLogger(t)
	if mut != nil {
		mut(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tn, err := StartInProcess(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tn.Stop(); err != nil {
			t.Errorf("stop testnet: %v", err)
		}
	})
	return tn
}
