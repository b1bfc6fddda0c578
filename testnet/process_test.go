package testnet

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// buildSignal builds the signal binary once per test run.
func buildSignal(ctx context.Context, t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "signal")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/signal")
	cmd.Dir = repoRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build signal: %v\n%s", err, out)
	}
	return bin
}

// alive reports whether a process exists.
func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// TestSignalTestnetCommand runs `signal testnet` as a user does: it prints
// one JSON line when ready (the same as testnet.json), serves a training
// run through its child processes, survives a node process being killed,
// and on SIGINT stops every child and exits cleanly.
func TestSignalTestnetCommand(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	bin := buildSignal(ctx, t)
	dir := t.TempDir()
	seedModel(t, dir)
	info, stop := startSignalTestnet(ctx, t, bin, "--coordinators", "3", "--nodes", "2", "--dir", dir)
	raw, err := os.ReadFile(filepath.Join(dir, "testnet.json"))
	if err != nil {
		t.Fatal(err)
	}
	var onDisk Info
	if err := json.Unmarshal(raw, &onDisk); err != nil || onDisk.APIKey != info.APIKey || strings.Join(onDisk.Coordinators, ",") != strings.Join(info.Coordinators, ",") {
		t.Fatalf("testnet.json %s differs from the printed line %+v", raw, info)
	}
	if len(info.Coordinators) != 3 || len(info.Nodes) != 2 || len(info.PIDs) != 5 {
		t.Fatalf("info = %+v", info)
	}
	for _, name := range []string{"c1", "c2", "c3", "n1", "n2"} {
		if _, err := os.Stat(filepath.Join(dir, "logs", name+".log")); err != nil {
			t.Errorf("member log: %v", err)
		}
	}

	c, err := client.New(info.Coordinators[1], info.APIKey)
	if err != nil {
		t.Fatal(err)
	}
	r, losses := trainRun(ctx, t, c, 3)
	if len(losses) != 3 {
		t.Fatalf("losses %v", losses)
	}
	if _, err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	nodes, err := c.Nodes(ctx)
	if err != nil || len(nodes) != 2 {
		t.Fatalf("nodes = %+v, %v", nodes, err)
	}

	// SIGINT, as Ctrl-C sends it to the parent: every child ends, and the
	// parent exits 0 (stop fails the test otherwise).
	stop()
	for _, pid := range info.PIDs {
		if alive(pid) {
			t.Errorf("member process %d still running after the testnet stopped", pid)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "testnet.pid")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("testnet.pid left behind: %v", err)
	}
}

// TestProcessesKillNode kills a node's process; the parent reports it as
// exited and the coordinators drop it from /v1/nodes.
func TestProcessesKillNode(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	bin := buildSignal(ctx, t)
	dir := t.TempDir()
	seedModel(t, dir)
	// An earlier start's ready file names dead addresses; it must not be
	// taken for this start's.
	if err := os.MkdirAll(filepath.Join(dir, "run"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "run", "c1.ready"), []byte(`{"url":"http://127.0.0.1:1","pid":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Dir, cfg.Coordinators, cfg.Nodes = dir, 1, 2
	cfg.NodeTTL = 2 * time.Second
	tn, err := StartProcesses(ctx, cfg, bin)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := tn.Stop(); err != nil {
			t.Error(err)
		}
	}()
	info := tn.Info()
	if err := tn.KillNode(0); err != nil {
		t.Fatal(err)
	}
	if alive(info.PIDs[1]) {
		t.Fatalf("node process %d survived SIGKILL", info.PIDs[1])
	}
	c, err := client.New(info.Coordinators[0], info.APIKey)
	if err != nil {
		t.Fatal(err)
	}
	for {
		nodes, err := c.Nodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(nodes) == 1 && nodes[0].PeerID == info.Nodes[1] {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("killed node still listed: %+v", nodes)
		case <-time.After(200 * time.Millisecond):
		}
	}
	// A kill the testnet did itself is not reported as a member failure.
	select {
	case name := <-tn.Exited():
		t.Fatalf("KillNode reported %s as exited on its own", name)
	default:
	}
	// The surviving node still trains.
	rank := 4
	run, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: DefaultModelName, LoRARank: &rank})
	if err != nil {
		t.Fatal(err)
	}
	if run.Info().Node != info.Nodes[1] {
		t.Fatalf("run placed on %s, want the live node %s", run.Info().Node, info.Nodes[1])
	}
}

func TestConfigValidate(t *testing.T) {
	good := DefaultConfig()
	good.Dir = t.TempDir()
	if err := good.Validate(); err != nil {
		t.Fatalf("default config: %v", err)
	}
	modelDir := t.TempDir()
	for name, tc := range map[string]struct {
		mut  func(*Config)
		want string
	}{
		"no coordinators":  {func(c *Config) { c.Coordinators = 0 }, "coordinators 0"},
		"too many nodes":   {func(c *Config) { c.Nodes = 99 }, "nodes 99"},
		"no dir":           {func(c *Config) { c.Dir = "" }, "dir: required"},
		"negative credits": {func(c *Config) { c.MicroCredits = -1 }, "credits -1 micro-credits"},
		"no sessions":      {func(c *Config) { c.MaxSessions = 0 }, "max sessions 0"},
		"zero timings":     {func(c *Config) { c.NodeLostAfter = 0 }, "node lost after 0s"},
		"zero rate":        {func(c *Config) { c.RatePerSecond = 0 }, "rate 0/s"},
		"zero burst":       {func(c *Config) { c.RateBurst = 0 }, "burst 0"},
		"unknown engine":   {func(c *Config) { c.Engine = "warp" }, `engine "warp"`},
		"bad storage":      {func(c *Config) { c.StorageURL = "ftp://x/y" }, `storage "ftp://x/y"`},
		"no models":        {func(c *Config) { c.NoDefaultModel = true }, "no models"},
		"bad model name":   {func(c *Config) { c.Models = map[string]string{"a b": modelDir} }, `model name "a b"`},
		"default name":     {func(c *Config) { c.Models = map[string]string{DefaultModelName: modelDir} }, "embedded default"},
		"not a model dir":  {func(c *Config) { c.Models = map[string]string{"m": modelDir} }, "not a Hugging Face model directory"},
	} {
		t.Run(name, func(t *testing.T) {
			c := good
			tc.mut(&c)
			err := c.Validate()
			if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate = %v, want ErrInvalidConfig naming %q", err, tc.want)
			}
			// StartInProcess refuses it before touching the directory.
			if c.Dir != "" {
				if _, err := StartInProcess(context.Background(), c); !errors.Is(err, ErrInvalidConfig) {
					t.Fatalf("StartInProcess = %v", err)
				}
			}
		})
	}
	for _, bad := range []string{"", "x", "=dir", "name="} {
		if _, _, err := ParseModelFlag(bad); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("ParseModelFlag(%q) = %v", bad, err)
		}
	}
	if n, d, err := ParseModelFlag("m=/a=b"); err != nil || n != "m" || d != "/a=b" {
		t.Errorf("ParseModelFlag(m=/a=b) = %q %q %v", n, d, err)
	}
}
