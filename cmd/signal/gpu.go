package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/node/fingerprint"
	"github.com/signal-p2p/signal/node/gpu"
)

func init() { register(newGPUCmd) }

func newGPUCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "gpu",
		Short: "The CUDA engine backend: a supervised PyTorch worker per GPU",
	}
	cfg := gpu.DefaultConfig()
	var verbose bool
	check := &cobra.Command{
		Use:   "check",
		Short: "Start the PyTorch worker on a device, print its health and the backend a node would advertise, stop it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			if verbose {
				cfg.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			}
			// "cuda" is advertised only when NVML also sees GPUs.
			nvmlErr := ""
			if src, err := fingerprint.OpenNVML(); err != nil {
				nvmlErr = err.Error()
			} else if d, err := src.Probe(ctx); err != nil {
				nvmlErr = err.Error()
			} else {
				cfg.NVMLGPUs = len(d.GPUs)
			}
			e, err := gpu.NewEngine(cfg)
			if err != nil {
				return err
			}
			startErr := e.Start(ctx)
			h, _ := e.Supervisor().LastHealth()
			out := map[string]any{"device": cfg.Device, "backend": e.Backend(), "nvml_gpus": cfg.NVMLGPUs,
				"models": e.Models(), "worker": h}
			if nvmlErr != "" {
				out["nvml_error"] = nvmlErr
			}
			if startErr != nil {
				out["error"] = startErr.Error()
			}
			stopErr := e.Stop()
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			if err := enc.Encode(out); err != nil {
				return err
			}
			if startErr != nil {
				return fmt.Errorf("gpu check: %w", startErr)
			}
			return stopErr
		},
	}
	f := check.Flags()
	f.StringVar(&cfg.Device, "device", "cuda:0", "torch device: cuda:N or cpu")
	f.StringVar(&cfg.Python, "python", cfg.Python, "Python interpreter with torch (default $SIGNAL_PYTHON or /usr/bin/python3)")
	f.StringVar(&cfg.ModelsDir, "models", "", "models directory (Hugging Face layout, one directory per model)")
	f.DurationVar(&cfg.StartTimeout, "timeout", cfg.StartTimeout, "how long to wait for the worker to start")
	f.BoolVarP(&verbose, "verbose", "v", false, "log the worker's output to stderr")
	root.AddCommand(check)
	return root
}
