package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
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
DIR/logs; each start is a fresh network (the model and checkpoints stay).`,
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
	f.StringVar(&cfg.Engine, "engine", cfg.Engine, "node engine")
	f.DurationVar(&cfg.NodeLostAfter, "node-lost-after", cfg.NodeLostAfter, "how long a run's node may be silent before the run moves")
	f.Float64Var(&cfg.RatePerSecond, "rate", cfg.RatePerSecond, "requests per second per API key (lower it to see a client meet 429s)")
	f.IntVar(&cfg.RateBurst, "burst", cfg.RateBurst, "burst per API key")
	f.DurationVar(&cfg.ReadyTimeout, "ready-timeout", cfg.ReadyTimeout, "how long to wait for the network to come up")
	f.BoolVar(&inProcess, "in-process", false, "run every member inside this process instead of child processes")
	cmd.AddCommand(newTestnetMemberCmd(), newTestnetStopCmd())
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
		"testnet_json", filepath.Join(info.Dir, "testnet.json"), "stop", "Ctrl-C or: signal testnet stop --dir "+info.Dir)

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("stopping testnet")
	case name := <-exited:
		runErr = fmt.Errorf("%w: %s; see %s", testnet.ErrMemberExited, name, filepath.Join(info.Logs, name+".log"))
		log.Error("member exited; stopping testnet", "member", name)
	}
	if err := tn.Stop(); err != nil {
		runErr = errors.Join(runErr, err)
	}
	if runErr == nil {
		log.Info("testnet stopped")
	}
	return runErr
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
