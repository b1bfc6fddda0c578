package coordinator

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestFailedStartFreesRaftPort: a start that fails after binding the raft
// port (here: the raft-wal directory is a file) releases it, so the member
// can be started again in the same process; Stop after it is harmless.
func TestFailedStartFreesRaftPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	cfg := testConfig(t, "broken")
	cfg.Bootstrap = true
	cfg.RaftAddr = addr
	if err := os.WriteFile(filepath.Join(cfg.DataDir, walDirName), []byte("not a directory"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err == nil {
		_ = c.Stop()
		t.Fatal("Start succeeded with a file where the raft wal directory belongs")
	}
	if err := c.Stop(); err != nil {
		t.Fatalf("Stop after a failed Start: %v", err)
	}
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("raft port %s still held after the failed start: %v", addr, err)
	}
	ln.Close()

	if err := os.Remove(filepath.Join(cfg.DataDir, walDirName)); err != nil {
		t.Fatal(err)
	}
	c = mustStart(t, cfg)
	waitFor(t, 10*time.Second, "leader after the retry", c.IsLeader)
}
