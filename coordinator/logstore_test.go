package coordinator

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A data dir keeps the log store it was created with, whatever a later
// configuration asks for: switching would hide every entry after the last
// snapshot. Both stores bring a member back from disk with its state.
func TestLogStoreStaysWithDataDir(t *testing.T) {
	for _, tc := range []struct{ first, second string }{
		{LogStoreBolt, LogStoreWAL},
		{LogStoreWAL, LogStoreBolt},
		{"", LogStoreBolt}, // empty means the default, the WAL
	} {
		cfg := testConfig(t, "solo")
		cfg.Bootstrap = true
		cfg.LogStore = tc.first
		want := tc.first
		if want == "" {
			want = LogStoreWAL
		}
		c := mustStart(t, cfg)
		waitFor(t, 10*time.Second, "leader", c.IsLeader)
		if c.LogStore() != want {
			t.Fatalf("fresh dir with LogStore %q: store %q", tc.first, c.LogStore())
		}
		mintAccount(t, c, "acct", 1000)
		if _, err := c.charge(context.Background(), "acct", 7, "k1"); err != nil {
			t.Fatal(err)
		}
		cfg.RaftAddr = c.RaftAddr()
		if err := c.Stop(); err != nil {
			t.Fatal(err)
		}
		_, err := os.Stat(filepath.Join(cfg.DataDir, walDirName))
		if hasWAL := err == nil; hasWAL != (want == LogStoreWAL) {
			t.Fatalf("store %q but wal dir present=%v", want, hasWAL)
		}

		cfg.LogStore = tc.second
		again := mustStart(t, cfg)
		if again.LogStore() != want {
			t.Fatalf("restart of a %q dir configured %q: store %q", want, tc.second, again.LogStore())
		}
		waitFor(t, 10*time.Second, "leader after restart", again.IsLeader)
		waitFor(t, 5*time.Second, "state after restart", func() bool { return balanceOn(again, "acct") == 993 })
		res, err := again.charge(context.Background(), "acct", 7, "k1")
		if err != nil || !res.Replayed || balanceOn(again, "acct") != 993 {
			t.Fatalf("retried charge after restart from %q: %+v %v balance %d", want, res, err, balanceOn(again, "acct"))
		}
		if err := again.Stop(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestConfigLogStoreValidated(t *testing.T) {
	cfg := testConfig(t, "x")
	cfg.LogStore = "rocks"
	if err := cfg.Validate(); !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("LogStore %q: %v, want ErrInvalidRequest", cfg.LogStore, err)
	}
	for _, ok := range []string{"", LogStoreWAL, LogStoreBolt} {
		cfg.LogStore = ok
		if err := cfg.Validate(); err != nil {
			t.Fatalf("LogStore %q: %v", ok, err)
		}
	}
}
