package testnet

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// startSignalTestnet runs `signal testnet args...` as a user does and
// returns once it prints its ready line; stop sends SIGINT and waits.
func startSignalTestnet(ctx context.Context, t *testing.T, bin string, args ...string) (info Info, stop func()) {
	t.Helper()
	cmd := exec.CommandContext(ctx, bin, append([]string{"testnet"}, args...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
		exited <- cmd.Wait()
	}()
	select {
	case line := <-lines:
		if err := json.Unmarshal([]byte(line), &info); err != nil {
			t.Fatalf("ready line %q: %v", line, err)
		}
	case err := <-exited:
		t.Fatalf("signal testnet exited before ready: %v\n%s", err, stderr.String())
	case <-ctx.Done():
		t.Fatalf("signal testnet not ready:\n%s", stderr.String())
	}
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("signal testnet exited with %v after SIGINT:\n%s", err, stderr.String())
			}
		case <-time.After(90 * time.Second):
			_ = cmd.Process.Kill()
			t.Errorf("signal testnet still running 90s after SIGINT:\n%s", stderr.String())
		}
	}
	t.Cleanup(stop)
	return info, stop
}

// signalCLI runs one signal command and returns its output.
func signalCLI(ctx context.Context, bin string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	return string(out), err
}

// TestTestnetBehavesLikeANetwork runs `signal testnet` as a process and
// treats it as a network: its directory is locked (a second testnet there
// is refused, naming the first one's process); a node killed stays dead
// while the rest serves (the run on it moves and trains on); `signal
// testnet node restart` brings it back with its identity; and a killed
// coordinator costs the SDK a reconnect to another, not the call.
func TestTestnetBehavesLikeANetwork(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	bin := buildSignal(ctx, t)
	dir := t.TempDir()
	seedModel(t, dir)
	info, stop := startSignalTestnet(ctx, t, bin, "--coordinators", "3", "--nodes", "2", "--dir", dir, "--node-lost-after", "2s")
	holder := LockHolder(dir)
	if holder <= 0 || !alive(holder) {
		t.Fatalf("lock holder %d is not the running testnet", holder)
	}

	// A second testnet in the same directory is refused, naming the first.
	out, err := signalCLI(ctx, bin, "testnet", "--coordinators", "1", "--nodes", "0", "--dir", dir)
	if err == nil || !strings.Contains(out, "runs a testnet already (process "+strconv.Itoa(holder)+")") {
		t.Fatalf("a second testnet in %s: %v\n%s", dir, err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "testnet.json")); err != nil {
		t.Fatalf("the refused start touched the running testnet's files: %v", err)
	}

	c, err := client.FromTestnet(dir, client.WithRetries(20, 100*time.Millisecond, 2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	r, _ := trainRun(ctx, t, c, 2)
	defer r.Close(context.WithoutCancel(ctx))
	victim := slicesIndex(info.Nodes, r.Info().Node)
	if victim < 0 {
		t.Fatalf("run on %q, not a testnet node %v", r.Info().Node, info.Nodes)
	}
	name := "n" + strconv.Itoa(victim+1)

	// Kill the run's node: the testnet keeps serving, and the run moves.
	if out, err := signalCLI(ctx, bin, "testnet", "node", "kill", "--dir", dir, "--node", name); err != nil || !strings.Contains(out, name+" dead") {
		t.Fatalf("node kill: %v\n%s", err, out)
	}
	if alive(info.PIDs[3+victim]) {
		t.Fatalf("node process %d survived the kill", info.PIDs[3+victim])
	}
	if !alive(holder) {
		t.Fatal("the testnet stopped when a node died")
	}
	batch := protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{{Text: "The cat sat on the mat."}}}
	if _, err := r.ForwardBackward(ctx, batch); err != nil {
		t.Fatalf("training after the run's node died: %v", err)
	}
	if err := r.Refresh(ctx); err != nil || r.Info().Node == info.Nodes[victim] {
		t.Fatalf("run still on the dead node: %+v, %v", r.Info(), err)
	}
	out, err = signalCLI(ctx, bin, "testnet", "node", "list", "--dir", dir)
	if err != nil || !hasLine(out, name, "dead") || !hasLine(out, "n"+strconv.Itoa(2-victim), "running") {
		t.Fatalf("node list after the kill: %v\n%s", err, out)
	}

	// Restart it: the same peer id is listed again.
	out, err = signalCLI(ctx, bin, "testnet", "node", "restart", "--dir", dir, "--node", name)
	if err != nil || !strings.Contains(out, name+" running") || !strings.Contains(out, info.Nodes[victim]) {
		t.Fatalf("node restart: %v\n%s", err, out)
	}
	nodes, err := c.Nodes(ctx)
	if err != nil || len(nodes) != 2 {
		t.Fatalf("nodes after the restart: %+v, %v", nodes, err)
	}
	var onDisk Info
	if raw, err := os.ReadFile(filepath.Join(dir, "testnet.json")); err != nil || json.Unmarshal(raw, &onDisk) != nil || onDisk.PIDs[3+victim] == info.PIDs[3+victim] || !alive(onDisk.PIDs[3+victim]) {
		t.Fatalf("testnet.json does not name the restarted node's process: %+v (%v)", onDisk.PIDs, err)
	}

	// Kill the first coordinator, the one the client calls: it goes on
	// through another, and a billed call is charged once.
	if err := syscall.Kill(info.PIDs[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	before, err := c.Account(ctx)
	if err != nil {
		t.Fatalf("account after c1 died: %v", err)
	}
	if c.BaseURL() == info.Coordinators[0] {
		t.Fatalf("the client still calls the dead coordinator %s", c.BaseURL())
	}
	fb, err := r.ForwardBackward(ctx, batch)
	if err != nil {
		t.Fatalf("training after c1 died: %v", err)
	}
	after, err := c.Account(ctx)
	if err != nil || after.BalanceMicroCredits != before.BalanceMicroCredits-fb.Cost.MicroCredits {
		t.Fatalf("balance %d -> %d, the call cost %d: %v", before.BalanceMicroCredits, after.BalanceMicroCredits, fb.Cost.MicroCredits, err)
	}
	if _, err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	stop()
	if alive(holder) {
		t.Fatal("signal testnet still running")
	}
	// The lock went with it: the directory takes a new testnet.
	if l, err := lockDir(dir); err != nil {
		t.Fatalf("directory still locked after the testnet stopped: %v", err)
	} else {
		l.release()
	}
}

// hasLine reports whether a line of out starts with first and holds word.
func hasLine(out, first, word string) bool {
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[0] == first && strings.Contains(l, word) {
			return true
		}
	}
	return false
}

func slicesIndex(xs []string, x string) int {
	for i, v := range xs {
		if v == x {
			return i
		}
	}
	return -1
}

// TestDirLockedInProcess: two testnets of one process in one directory
// are refused too (each open of the lock file is its own lock).
func TestDirLockedInProcess(t *testing.T) {
	dir := t.TempDir()
	l, err := lockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Dir = dir
	_, err = StartInProcess(context.Background(), cfg)
	if !errors.Is(err, ErrDirInUse) || !strings.Contains(err.Error(), "process "+strconv.Itoa(os.Getpid())) {
		t.Fatalf("StartInProcess in a locked dir = %v", err)
	}
	l.release()
	if pid := LockHolder(dir); pid != os.Getpid() {
		t.Fatalf("LockHolder = %d", pid)
	}
}

// TestTestnetTorchEngine: --engine cpu-torch serves the network's runs on
// the PyTorch worker on the CPU; the loss falls as on the Go engine.
func TestTestnetTorchEngine(t *testing.T) {
	torchPython(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	bin := buildSignal(ctx, t)
	dir := t.TempDir()
	seedModel(t, dir)
	info, stop := startSignalTestnet(ctx, t, bin, "--coordinators", "1", "--nodes", "1", "--dir", dir, "--engine", "cpu-torch")
	c, err := client.FromTestnet(dir)
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := c.Nodes(ctx)
	if err != nil || len(nodes) != 1 || strings.Join(nodes[0].Backends, ",") != "cpu-torch" {
		t.Fatalf("nodes %+v, %v: want one cpu-torch node", nodes, err)
	}
	r, losses := trainRun(ctx, t, c, 4)
	if !(losses[3] < losses[0]) {
		t.Fatalf("losses on the torch engine %v: not falling", losses)
	}
	if _, err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	worker := descendants(info.PIDs[len(info.PIDs)-1])
	if len(worker) == 0 {
		t.Error("the node runs no worker process")
	}
	stop()
	for _, pid := range append(info.PIDs, worker...) {
		if alive(pid) {
			t.Errorf("process %d still running after the testnet stopped", pid)
		}
	}
}
