package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/internal/retry"
	"github.com/signal-p2p/signal/testnet"
)

func init() { register(newTestnetCmd) }

func newTestnetCmd() *cobra.Command {
	cfg := testnet.DefaultConfig()
	var models []string
	var inProcess bool
	testnetCredits := &creditsFlag{mc: cfg.MicroCredits, set: true}
	cmd := &cobra.Command{
		Use:   "testnet",
		Short: "Run a local Signal network: coordinators (raft) and nodes on loopback",
		Long: `Start N coordinators (a raft cluster) and M nodes as child processes on
loopback with free ports, serving the embedded default model signal-tiny
(generated once into DIR/models) and any --model NAME=DIR. When every
coordinator lists every node, write DIR/testnet.json and print the same as
one JSON line on stdout: coordinator URLs, admin token, a funded API key,
models, nodes. Ctrl-C (or SIGTERM, or "signal testnet stop --dir DIR")
stops everything: nodes first, then coordinators. Member logs are in
DIR/logs; each start is a fresh network (the model and checkpoints stay).

DIR is locked while the testnet runs: a second testnet in it is refused,
naming the first one's process. A member that dies stays dead while the
others keep serving, as in a real network (runs on a dead node move to a
live one); "signal testnet node kill|restart --dir DIR --node N" kills a
node or starts it again, and "signal testnet node list --dir DIR" shows
them. --engine cpu-torch runs the nodes on the PyTorch worker on the CPU
(python3 with torch: $SIGNAL_PYTHON) instead of the native Go engine.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, m := range models {
				name, dir, err := testnet.ParseModelFlag(m)
				if err != nil {
					return err
				}
				if cfg.Models == nil {
					cfg.Models = map[string]string{}
				}
				cfg.Models[name] = dir
			}
			cfg.MicroCredits = testnetCredits.mc
			cfg.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelInfo}))
			return runTestnet(cmd, cfg, inProcess)
		},
	}
	f := cmd.Flags()
	f.IntVar(&cfg.Coordinators, "coordinators", cfg.Coordinators, "coordinators to start (a raft cluster)")
	f.IntVar(&cfg.Nodes, "nodes", cfg.Nodes, "nodes to start")
	f.StringVar(&cfg.Dir, "dir", cfg.Dir, "directory for data, logs, the default model and testnet.json")
	f.StringVar(&cfg.StorageURL, "storage", "", "checkpoint storage URL: file:///dir or s3://bucket/prefix?endpoint=host:port&secure=false (default file://DIR/checkpoints)")
	f.StringArrayVar(&models, "model", nil, "extra base model NAME=DIR (Hugging Face layout); repeatable")
	f.Var(testnetCredits, "credits", "credits on the minted API key, e.g. 1000 or 0.5 (1 credit = 1,000,000 micro-credits)")
	f.StringVar(&cfg.Engine, "engine", cfg.Engine, "node engine: native (the Go engine) or cpu-torch (the PyTorch worker, on the CPU)")
	f.DurationVar(&cfg.NodeLostAfter, "node-lost-after", cfg.NodeLostAfter, "how long a run's node may be silent before the run moves")
	f.Float64Var(&cfg.RatePerSecond, "rate", cfg.RatePerSecond, "requests per second per API key (lower it to see a client meet 429s)")
	f.IntVar(&cfg.RateBurst, "burst", cfg.RateBurst, "burst per API key")
	f.DurationVar(&cfg.ReadyTimeout, "ready-timeout", cfg.ReadyTimeout, "how long to wait for the network to come up")
	f.BoolVar(&inProcess, "in-process", false, "run every member inside this process instead of child processes")
	cmd.AddCommand(newTestnetMemberCmd(), newTestnetStopCmd(), newTestnetNodeCmd())
	return cmd
}

// testnetRunner is what both variants offer the command.
type testnetRunner interface {
	Info() testnet.Info
	Stop() error
}

func runTestnet(cmd *cobra.Command, cfg testnet.Config, inProcess bool) error {
	ctx := cmd.Context()
	log := cfg.Logger
	var tn testnetRunner
	var exited <-chan string
	control := "the node commands need the process testnet (without --in-process)"
	if inProcess {
		t, err := testnet.StartInProcess(ctx, cfg)
		if err != nil {
			return err
		}
		tn = t
	} else {
		self, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find the signal binary: %w", err)
		}
		t, err := testnet.StartProcesses(ctx, cfg, self)
		if err != nil {
			return err
		}
		tn, exited = t, t.Exited()
		if err := t.ServeControl(ctx); err != nil {
			_ = tn.Stop()
			return err
		}
		control = "signal testnet node list|kill|restart --dir " + t.Info().Dir + " [--node N]"
	}
	info := tn.Info()
	pidFile := filepath.Join(info.Dir, "testnet.pid")
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
		_ = tn.Stop()
		return fmt.Errorf("pid file: %w", err)
	}
	defer os.Remove(pidFile)
	line, _ := json.Marshal(info)
	fmt.Fprintln(cmd.OutOrStdout(), string(line))
	log.Info("testnet ready", "coordinators", info.Coordinators, "dashboard", info.Dashboard+"?key="+info.APIKey,
		"testnet_json", filepath.Join(info.Dir, "testnet.json"), "members", control, "stop", "Ctrl-C or: signal testnet stop --dir "+info.Dir)

	// A member that dies stays dead and the others keep serving, as in a
	// network: its runs move, and the user may restart it.
	for {
		select {
		case <-ctx.Done():
			log.Info("stopping testnet")
			if err := tn.Stop(); err != nil {
				return err
			}
			log.Info("testnet stopped")
			return nil
		case name := <-exited:
			restart := ""
			if strings.HasPrefix(name, "n") {
				restart = "signal testnet node restart --dir " + info.Dir + " --node " + name
			}
			log.Warn("member exited; the others keep serving", "member", name, "log", filepath.Join(info.Logs, name+".log"), "restart", restart)
		}
	}
}

func newTestnetMemberCmd() *cobra.Command {
	var spec string
	cmd := &cobra.Command{
		Use:    "member",
		Short:  "Run one testnet member (started by signal testnet)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := slog.New(slog.NewJSONHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelInfo}))
			return testnet.RunMember(cmd.Context(), spec, log)
		},
	}
	cmd.Flags().StringVar(&spec, "spec", "", "member spec file (JSON)")
	_ = cmd.MarkFlagRequired("spec")
	return cmd
}

func newTestnetNodeCmd() *cobra.Command {
	node := &cobra.Command{Use: "node", Short: "List, kill or restart the nodes of a running testnet"}
	for _, a := range []struct{ use, short string }{
		{"list", "List the testnet's nodes: process, peer id, running or not"},
		{"kill", "Kill a node's process (SIGKILL, as a machine dies): its runs move to a live node"},
		{"restart", "Start a node again (stopping it first if it runs), with its data: the same peer id"},
	} {
		var dir, which string
		var timeout time.Duration
		c := &cobra.Command{
			Use:   a.use,
			Short: a.short,
			Args:  noArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				action := a.use
				if action == "list" {
					action = ""
				} else if which == "" {
					return usageErrorf("--node is required: the node to %s (n1, n2, ...; signal testnet node list --dir %s shows them)", a.use, dir)
				}
				ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
				defer cancel()
				sts, err := testnet.Control(ctx, dir, action, which)
				if err != nil {
					return err
				}
				out := cmd.OutOrStdout()
				if action != "" {
					st := sts[0]
					state := map[bool]string{true: "running", false: "dead"}[st.Running]
					_, err := fmt.Fprintf(out, "%s %s (pid %d, peer %s)\n", st.Name, state, st.PID, st.PeerID)
					return err
				}
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintf(tw, "NODE\tSTATE\tPID\tPEER\n")
				for _, st := range sts {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", st.Name, map[bool]string{true: "running", false: "dead"}[st.Running], st.PID, st.PeerID)
				}
				return tw.Flush()
			},
		}
		c.Flags().StringVar(&dir, "dir", testnet.DefaultConfig().Dir, "the testnet's directory")
		if a.use != "list" {
			c.Flags().StringVar(&which, "node", "", "the node: n1, n2, ... (or 1, 2, ...)")
		}
		c.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "give up after this long")
		node.AddCommand(c)
	}
	return node
}

func newTestnetStopCmd() *cobra.Command {
	var dir string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "stop",
		Short: "Stop a testnet started with signal testnet (by its DIR/testnet.pid)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			raw, err := os.ReadFile(filepath.Join(dir, "testnet.pid"))
			if err != nil {
				return fmt.Errorf("no running testnet in %s: %w", dir, err)
			}
			pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
			if err != nil || pid <= 0 {
				return fmt.Errorf("testnet.pid in %s: %q is not a process id", dir, raw)
			}
			if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
				return fmt.Errorf("signal testnet process %d: %w", pid, err)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			errRunning := fmt.Errorf("testnet process %d still running", pid)
			if err := retry.Do(ctx, func() error {
				if syscall.Kill(pid, 0) == nil {
					return errRunning
				}
				return nil
			}, nil); err != nil {
				return fmt.Errorf("testnet process %d still running after %v: %w", pid, timeout, ctx.Err())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "testnet in %s stopped\n", dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", testnet.DefaultConfig().Dir, "the testnet's directory")
	cmd.Flags().DurationVar(&timeout, "timeout", time.Minute, "how long to wait for it to stop")
	return cmd
}
