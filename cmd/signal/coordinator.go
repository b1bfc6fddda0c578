package main

// signal coordinator: one member of the raft-replicated control plane, with
// its libp2p host for the node network.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/coordinator"
	"github.com/signal-p2p/signal/coordinator/dashboard"
	"github.com/signal-p2p/signal/coordinator/p2p"
	"github.com/signal-p2p/signal/node/hub"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/trainer/tokenizer"
)

func init() { register(newCoordinatorCmd) }

type coordinatorOpts struct {
	id, data, raftAddr, httpAddr, join, adminToken, modelsFile, logLevel, logStore, storage string
	bootstrap, noP2P                                                                        bool
	models, p2pListen                                                                       []string
	feeBPS, burst                                                                           int
	rate                                                                                    float64
}

func newCoordinatorCmd() *cobra.Command {
	o := coordinatorOpts{}
	d := coordinator.DefaultConfig()
	cmd := &cobra.Command{
		Use:   "coordinator",
		Short: "Run a coordinator: raft member, public HTTP API, libp2p host for nodes",
		Long: `Run one coordinator. A single coordinator started with --bootstrap is a
working cluster; start more with --join URL (any member's HTTP URL) to form
a cluster of three or five. Restarting with the same --data resumes.

Members authenticate each other on the raft port with mutual TLS under a CA
derived from $SIGNAL_CLUSTER_SECRET (every member needs the same one; unset, it
is derived from the admin token).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runCoordinator(cmd.Context(), cmd, o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.id, "id", "", "raft server ID, unique in the cluster (required)")
	f.StringVar(&o.data, "data", "", "data directory: raft log, snapshots, p2p identity (required)")
	f.StringVar(&o.raftAddr, "raft-addr", d.RaftAddr, "raft TCP address HOST:PORT (advertised to the other members)")
	f.StringVar(&o.httpAddr, "http-addr", d.HTTPAddr, "public API address HOST:PORT")
	f.BoolVar(&o.bootstrap, "bootstrap", false, "start a new cluster with this member (first start only)")
	f.StringVar(&o.join, "join", "", "join the cluster through this member's HTTP URL")
	f.StringVar(&o.adminToken, "admin-token", "", "admin token for /v1/admin and cluster calls (default $SIGNAL_ADMIN_TOKEN)")
	f.StringVar(&o.modelsFile, "models", "", "model registry file (JSON array of {name, hf_repo, path, context_length, memory_bytes, prices})")
	f.StringArrayVar(&o.models, "model", nil, "add a local model NAME=DIR (Hugging Face layout); repeatable")
	f.StringArrayVar(&o.p2pListen, "p2p-listen", nil, "libp2p listen multiaddr; repeatable (default TCP and QUIC, random ports)")
	f.BoolVar(&o.noP2P, "no-p2p", false, "run without a node network (placement answers 503)")
	f.IntVar(&o.feeBPS, "fee-bps", d.FeeBasisPoints, "network fee in basis points of each charge")
	f.Float64Var(&o.rate, "rate", d.RatePerSecond, "requests per second per API key")
	f.IntVar(&o.burst, "burst", d.RateBurst, "burst per API key")
	f.StringVar(&o.logLevel, "log-level", "info", "audit/infrastructure log level: debug, info, warn, error")
	f.StringVar(&o.storage, "storage", "", "the network's checkpoint store (file:///shared/dir or s3://bucket/prefix?endpoint=...), the one the nodes use: node checkpoints are recorded only inside it, and ended runs' checkpoints are deleted from it after the retention")
	f.StringVar(&o.logStore, "log-store", d.LogStore, "raft log store of a fresh --data dir: wal (raft-wal) or bolt (raft-boltdb); an existing dir keeps its own")
	return cmd
}

func runCoordinator(ctx context.Context, cmd *cobra.Command, o coordinatorOpts) error {
	warnSecretFlags(cmd, map[string]string{"admin-token": "SIGNAL_ADMIN_TOKEN"})
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: %w", o.logLevel, err)
	}
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	cfg := coordinator.DefaultConfig()
	cfg.ID, cfg.DataDir, cfg.RaftAddr, cfg.HTTPAddr = o.id, o.data, o.raftAddr, o.httpAddr
	cfg.Bootstrap, cfg.Join = o.bootstrap, o.join
	cfg.LogStore = o.logStore
	cfg.AdminToken = o.adminToken
	if cfg.AdminToken == "" {
		cfg.AdminToken = os.Getenv("SIGNAL_ADMIN_TOKEN")
	}
	// Only from the environment: a secret in argv is readable by every
	// user of the host (ps).
	cfg.ClusterSecret = os.Getenv("SIGNAL_CLUSTER_SECRET")
	cfg.FeeBasisPoints, cfg.RatePerSecond, cfg.RateBurst = o.feeBPS, o.rate, o.burst
	if o.storage != "" {
		ns, err := storage.OpenNetwork(o.storage, storage.Credentials{})
		if err != nil {
			return fmt.Errorf("--storage: %w", err)
		}
		cfg.CheckpointStores, cfg.DeleteCheckpointFiles = []string{ns.Prefix}, ns.Delete
		// Pushes read the store; the Hub is $HF_ENDPOINT or huggingface.co.
		cfg.PushCheckpoint = hub.Pusher(&hub.Client{}, ns.Store)
		cfg.OpenCheckpointFile = storage.FileOpener(ns.Store)
	} else {
		logger.Warn("no --storage: node checkpoints are recorded from any file or s3 URI and never collected; "+
			"runs cannot move between machines whose nodes keep node-local stores. Give every coordinator and node the network's shared store", "category", "security")
	}
	cfg.Logger = logger
	cfg.LoadTokenizer = func(dir string) (coordinator.Tokenizer, error) { return tokenizer.Load(dir) }
	if o.modelsFile != "" {
		ms, err := coordinator.LoadModels(o.modelsFile)
		if err != nil {
			return err
		}
		cfg.Models = append(cfg.Models, ms...)
	}
	for _, m := range o.models {
		name, dir, ok := strings.Cut(m, "=")
		if !ok || name == "" || dir == "" {
			return fmt.Errorf("--model %q: want NAME=DIR", m)
		}
		spec, err := coordinator.ModelFromDir(name, dir)
		if err != nil {
			return fmt.Errorf("--model %s: %w", m, err)
		}
		cfg.Models = append(cfg.Models, spec)
	}
	var pc *p2p.Config
	if !o.noP2P {
		d := p2p.DefaultConfig()
		if len(o.p2pListen) > 0 {
			d.ListenAddrs = o.p2pListen
		}
		pc = &d
	}
	// The dashboard reads through this member's own API (a follower
	// forwards to the leader), at the address it listens on once started.
	var m *coordinator.Member
	cfg.UI = dashboard.New(dashboard.NewSelfSource(func() string { return m.URL() }), dashboard.Options{Title: "Signal · " + cfg.ID, Logger: logger})
	m, err := coordinator.NewMember(cfg, pc)
	if err != nil {
		return err
	}
	if err := m.Start(ctx); err != nil {
		return err
	}
	c := m.Coordinator()
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "coordinator %s: api %s raft %s dashboard %s/dashboard\n", cfg.ID, c.URL(), c.RaftAddr(), c.URL())
	for _, a := range m.P2PAddrs() {
		fmt.Fprintf(out, "p2p %s\n", a)
	}
	<-ctx.Done()
	if err := m.Stop(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
