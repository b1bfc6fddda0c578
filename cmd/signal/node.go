package main

// signal node: the node daemon; signal node token create: issue a join
// token through the admin API; signal node fingerprint: print what NVML
// (or the CPU fallback) reports.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/fingerprint"
	"github.com/signal-p2p/signal/node/gpu"
	"github.com/signal-p2p/signal/node/hub"
	"github.com/signal-p2p/signal/node/native"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

func init() { register(newNodeCmd) }

func newNodeCmd() *cobra.Command {
	cfg := node.DefaultConfig()
	var modelsDir string
	var hfModels []string
	engineKind, precision := "auto", "auto"
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Run a node daemon: join the network and serve training sessions",
		Long: `signal node joins the Signal network through the coordinators given with
--bootstrap (their libp2p multiaddrs, ending in /p2p/PEER_ID), proves its join
token, advertises its capacity (GPUs through NVML, else CPU cores and memory)
and serves run sessions with the models in --models on the engine --engine
selects (auto: the CUDA worker when NVML finds GPUs, else the native engine)
(Hugging Face layout, one directory per model). Checkpoints go to --storage:
file:///dir (default: DATA/checkpoints) or
s3://bucket/prefix?endpoint=host:port&secure=false with credentials from
$AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY or the --s3-* flags.
Ctrl-C or SIGTERM shuts down gracefully: running calls finish and open
sessions are checkpointed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			warnSecretFlags(cmd, map[string]string{"join-token": "SIGNAL_JOIN_TOKEN", "s3-secret-key": "AWS_SECRET_ACCESS_KEY"})
			if cfg.JoinToken == "" {
				cfg.JoinToken = os.Getenv("SIGNAL_JOIN_TOKEN")
			}
			if cfg.DataDir == "" {
				return errors.New("--data: directory required")
			}
			if modelsDir == "" {
				modelsDir = filepath.Join(cfg.DataDir, "models")
				if err := os.MkdirAll(modelsDir, 0o755); err != nil {
					return err
				}
			}
			cfg.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			eng, stopEngine, err := openNodeEngine(cmd.Context(), engineKind, precision, modelsDir, hfModels, cfg.Logger)
			if err != nil {
				return err
			}
			defer stopEngine()
			n, err := node.New(cfg, eng)
			if err != nil {
				return err
			}
			if err := n.Start(cmd.Context()); err != nil {
				_ = n.Stop()
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "node %s\n", n.PeerID())
			for _, a := range n.Addrs() {
				fmt.Fprintf(cmd.OutOrStdout(), "listening %s\n", a)
			}
			<-cmd.Context().Done()
			fmt.Fprintln(cmd.ErrOrStderr(), "shutting down: finishing calls and checkpointing open sessions")
			return n.Stop()
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.DataDir, "data", "", "data directory (identity key, default checkpoint storage)")
	f.StringSliceVar(&cfg.Bootstrap, "bootstrap", nil, "coordinator multiaddr with /p2p/ID (repeatable)")
	f.StringVar(&cfg.JoinToken, "join-token", "", "join token from `signal node token create` (default $SIGNAL_JOIN_TOKEN)")
	f.StringSliceVar(&cfg.ListenAddrs, "listen", cfg.ListenAddrs, "multiaddr to listen on (repeatable)")
	f.StringVar(&cfg.StorageURL, "storage", "", "checkpoint storage URL: file:///dir or s3://bucket/prefix?endpoint=host:port&secure=false")
	f.StringVar(&cfg.Creds.AccessKey, "s3-access-key", "", "S3 access key (default $AWS_ACCESS_KEY_ID)")
	f.StringVar(&cfg.Creds.SecretKey, "s3-secret-key", "", "S3 secret key (default $AWS_SECRET_ACCESS_KEY)")
	f.StringVar(&modelsDir, "models", "", "models directory, one Hugging Face model per subdirectory (default DATA/models)")
	f.IntVar(&cfg.MaxSessions, "max-sessions", cfg.MaxSessions, "most sessions open at once")
	f.DurationVar(&cfg.AdvertInterval, "advert-interval", cfg.AdvertInterval, "how often to publish a capacity advert")
	f.DurationVar(&cfg.DrainTimeout, "drain-timeout", cfg.DrainTimeout, "bound on graceful shutdown")
	f.BoolVar(&cfg.MDNS, "mdns", cfg.MDNS, "discover peers on the LAN with mDNS")
	f.BoolVar(&cfg.DHT, "dht", cfg.DHT, "run a Kademlia DHT")
	f.StringVar(&engineKind, "engine", engineKind, "engine backend: auto, native, cuda or cpu-torch (the PyTorch worker on the CPU)")
	f.StringVar(&precision, "precision", precision, "native engine: auto keeps BF16/F16 model files as stored (2 bytes a parameter, bf16 products), f32 widens them (as SIGNAL_ENGINE_PRECISION)")
	f.StringSliceVar(&hfModels, "hf", nil, "NAME=OWNER/REPO[@REV]: download model NAME from the Hugging Face Hub when it is not in --models (repeatable; $HF_TOKEN for gated models)")
	cmd.AddCommand(newNodeTokenCmd(), newNodeFingerprintCmd(), newNodeQuarantineCmd())
	return cmd
}

// openNodeEngine builds the engine a node serves sessions on. auto picks the
// PyTorch worker pool (one worker per GPU) when NVML reports GPUs, and the
// native Go engine otherwise; the returned stop function releases it.
func openNodeEngine(ctx context.Context, kind, precision, modelsDir string, hfModels []string, log *slog.Logger) (node.Engine, func(), error) {
	var prec trainer.Precision
	switch precision {
	case "", "auto":
	case "f32":
		prec = trainer.PrecisionF32
	default:
		return nil, nil, fmt.Errorf("%w: --precision %q: use auto or f32", trainer.ErrInvalidInput, precision)
	}
	gpus := 0
	if kind == "auto" || kind == "cuda" {
		fp, _ := fingerprint.Detect(time.Second)
		fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if r, ok := <-fp.Fingerprint(fctx); ok {
			gpus = len(r.Devices.GPUs)
		}
		cancel()
		if kind == "auto" {
			kind = "native"
			if gpus > 0 {
				kind = "cuda"
			}
		}
	}
	switch kind {
	case "native":
		eng, err := native.New(modelsDir, log)
		if err != nil {
			return nil, nil, fmt.Errorf("--models: %w", err)
		}
		eng.Precision = prec
		if len(hfModels) > 0 {
			if eng.Fetch, err = hubFetcher(hfModels); err != nil {
				_ = eng.Close()
				return nil, nil, err
			}
		}
		return eng, func() { _ = eng.Close() }, nil
	case "cuda", "cpu-torch":
		var cfgs []gpu.Config
		devices := []string{"cpu"}
		if kind == "cuda" {
			if gpus == 0 {
				return nil, nil, errors.New("--engine cuda: NVML found no GPU on this machine")
			}
			devices = devices[:0]
			for i := 0; i < gpus; i++ {
				devices = append(devices, fmt.Sprintf("cuda:%d", i))
			}
		}
		for _, d := range devices {
			c := gpu.DefaultConfig()
			c.Device, c.ModelsDir, c.NVMLGPUs, c.Logger = d, modelsDir, gpus, log
			cfgs = append(cfgs, c)
		}
		pool, err := gpu.NewPool(cfgs)
		if err != nil {
			return nil, nil, err
		}
		if err := pool.Start(ctx); err != nil {
			_ = pool.Stop()
			return nil, nil, fmt.Errorf("start %s workers: %w", kind, err)
		}
		return pool, func() { _ = pool.Stop() }, nil
	default:
		return nil, nil, fmt.Errorf("--engine %q: want auto, native, cuda or cpu-torch", kind)
	}
}

// hubFetcher maps model names to Hugging Face repositories and downloads
// them on first use.
func hubFetcher(specs []string) (func(ctx context.Context, name, dir string) error, error) {
	type ref struct{ repo, rev string }
	refs := make(map[string]ref, len(specs))
	for _, s := range specs {
		name, repo, ok := strings.Cut(s, "=")
		if !ok || name == "" || repo == "" {
			return nil, fmt.Errorf("--hf %q: want NAME=OWNER/REPO[@REV]", s)
		}
		repo, rev, _ := strings.Cut(repo, "@")
		refs[name] = ref{repo, rev}
	}
	c := &hub.Client{}
	return func(ctx context.Context, name, dir string) error {
		r, ok := refs[name]
		if !ok {
			return fmt.Errorf("%w: %q is neither in --models nor named by --hf", node.ErrUnknownModel, name)
		}
		_, err := c.Download(ctx, r.repo, r.rev, dir, nil)
		return err
	}, nil
}

func newNodeTokenCmd() *cobra.Command {
	token := &cobra.Command{Use: "token", Short: "Manage node join tokens (admin)"}
	var operator string
	create, _ := adminCmd("create", "Issue a join token; nodes that present it earn for the operator account", noArgs,
		func(ctx context.Context, c *client.Client, admin string, o *conn, out io.Writer, _ []string) error {
			res, err := c.CreateJoinToken(ctx, admin, protocol.JoinTokenRequest{OperatorAccount: operator})
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, res)
			}
			_, err = fmt.Fprintf(out, "join_token %s\noperator_account %s\n", res.JoinToken, res.OperatorAccount)
			return err
		})
	create.Flags().StringVar(&operator, "operator", "", "operator account the node's earnings go to (default: a new account)")
	token.AddCommand(create)
	return token
}

func newNodeQuarantineCmd() *cobra.Command {
	q := &cobra.Command{Use: "quarantine", Short: "Manage quarantined nodes (admin)"}
	var reason string
	lift, _ := adminCmd("lift PEER_ID", "End a node's quarantine: it takes runs again, and its operator's new nodes may join", exactArgs(1),
		func(ctx context.Context, c *client.Client, admin string, o *conn, out io.Writer, args []string) error {
			if strings.TrimSpace(reason) == "" {
				return usageErrorf("--reason is required: say why the quarantine is lifted")
			}
			v, err := c.LiftQuarantine(ctx, admin, args[0], reason)
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, v)
			}
			_, err = fmt.Fprintf(out, "node %s: quarantine lifted (%s); its audits: %d passed, %d failed\n", args[0], v.LiftReason, v.Passed, v.Failed)
			return err
		})
	lift.Flags().StringVar(&reason, "reason", "", "why the quarantine is lifted (recorded in the node's history)")
	q.AddCommand(lift)
	return q
}

// fingerprintReport is what `signal node fingerprint` prints.
type fingerprintReport struct {
	Source  string         `json:"source"`
	NVMLErr string         `json:"nvml_error,omitempty"`
	GPUs    []protocol.GPU `json:"gpus"`
	CPU     protocol.CPU   `json:"cpu"`
	Error   string         `json:"error,omitempty"`
	// Engine is how the native engine multiplies on this CPU.
	Engine trainer.EngineInfo `json:"engine"`
}

func newNodeFingerprintCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "fingerprint",
		Short: "Print the devices this machine would advertise (NVML GPUs, or CPU fallback) as JSON",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fp, why := fingerprint.Detect(time.Second)
			rep := fingerprintReport{Source: fp.Source(), Engine: trainer.Engine()}
			if why != nil {
				rep.NVMLErr = why.Error()
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			r, ok := <-fp.Fingerprint(ctx)
			if !ok {
				return fmt.Errorf("fingerprint: %w", ctx.Err())
			}
			rep.GPUs, rep.CPU = r.Devices.GPUs, r.Devices.CPU
			if rep.GPUs == nil {
				rep.GPUs = []protocol.GPU{}
			}
			if r.Err != nil {
				rep.Error = r.Err.Error()
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(rep)
		},
	}
}
