package main

// signal model forward-backward | train | bench: the trainer engine's
// training half on one machine (issue 4).

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/trainer"
	"github.com/signal-p2p/signal/trainer/blas"
)

func init() {
	modelSubcommands = append(modelSubcommands, newModelForwardBackwardCmd, newModelTrainCmd, newModelBenchTrainCmd)
}

// readTrainData reads a JSONL data file, encoding text lines with the
// model's tokenizer when it has one.
func readTrainData(path string, m *trainer.Model) ([]trainer.Datum, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read data: %w", err)
	}
	defer f.Close()
	var enc trainer.TextEncoder
	if tk := m.Tokenizer(); tk != nil {
		enc = tk
	}
	return trainer.ReadDataJSONL(f, enc)
}

// openSession opens a session on m: the adapter in adapterDir when given,
// else a fresh one of the given rank.
func openSession(m *trainer.Model, adapterDir string, cfg trainer.SessionConfig) (*trainer.Session, error) {
	s, err := trainer.NewSession(m, cfg)
	if err != nil {
		return nil, err
	}
	if adapterDir != "" {
		if err := s.LoadState(adapterDir); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

func newModelForwardBackwardCmd() *cobra.Command {
	var (
		dir, adapter, data, loss string
		rank                     int
		alpha                    float32
		clipLow, clipHigh        float64
		seed                     int64
	)
	cmd := &cobra.Command{
		Use:   "forward-backward --model DIR [--adapter DIR] --data FILE.jsonl [--loss cross_entropy]",
		Short: `One forward_backward; prints {"loss_sum","loss_mean","grad_norm","logprobs","tokens"}`,
		Long: `Runs one forward_backward over every datum of FILE.jsonl (one per line: the
API's Datum, or {"text"} / {"prompt","completion"}) and prints the loss, the
per-token logprobs and grad_norm, the L2 norm of the gradient of loss_sum over
all LoRA parameters: those of --adapter, or of a fresh adapter of --rank
(PEFT init, B = 0, so only B has a gradient).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := trainer.LoadModel(dir)
			if err != nil {
				return err
			}
			defer m.Close()
			ds, err := readTrainData(data, m)
			if err != nil {
				return err
			}
			s, err := openSession(m, adapter, trainer.SessionConfig{Rank: rank, Alpha: alpha, Seed: seed})
			if err != nil {
				return err
			}
			defer s.Close()
			lossCfg := map[string]float64{}
			if cmd.Flags().Changed("clip-low") {
				lossCfg["clip_low_threshold"] = clipLow
			}
			if cmd.Flags().Changed("clip-high") {
				lossCfg["clip_high_threshold"] = clipHigh
			}
			r, err := s.ForwardBackward(cmd.Context(), ds, loss, lossCfg)
			if err != nil {
				return err
			}
			return writeModelJSON(cmd.OutOrStdout(), map[string]any{
				"loss_sum": r.LossSum, "loss_mean": r.LossMean, "grad_norm": r.GradNorm,
				"logprobs": r.Logprobs, "tokens": r.Tokens,
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "model", "", "model directory (required)")
	f.StringVar(&adapter, "adapter", "", "PEFT adapter directory (default: a fresh adapter of --rank)")
	f.StringVar(&data, "data", "", "JSONL file, one datum per line (required)")
	f.StringVar(&loss, "loss", trainer.LossCrossEntropy, "loss function: cross_entropy, importance_sampling or ppo")
	f.IntVar(&rank, "rank", 8, "rank of the fresh adapter")
	f.Float32Var(&alpha, "alpha", 16, "alpha of the fresh adapter")
	f.Int64Var(&seed, "seed", 0, "seed of the fresh adapter's A")
	f.Float64Var(&clipLow, "clip-low", trainer.DefaultClipLow, "ppo clip_low_threshold")
	f.Float64Var(&clipHigh, "clip-high", trainer.DefaultClipHigh, "ppo clip_high_threshold")
	_ = cmd.MarkFlagRequired("model")
	_ = cmd.MarkFlagRequired("data")
	return cmd
}

func newModelTrainCmd() *cobra.Command {
	var (
		dir, adapter, data, out, loss, schedule string
		steps, rank, warmup                     int
		alpha                                   float32
		seed                                    int64
		adam                                    = trainer.DefaultAdamParams()
	)
	cmd := &cobra.Command{
		Use:   "train --model DIR --data FILE.jsonl --steps N --lr X [--rank R] --out DIR",
		Short: "Train a LoRA adapter locally; one JSON line of metrics per step, saves a PEFT adapter",
		Long: `Each step is one forward_backward over all of FILE.jsonl and one optim_step
(AdamW). Prints {"step","loss_sum","loss_mean","tokens","grad_norm",
"learning_rate","seconds"} per step and saves the adapter as PEFT files in --out.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if steps <= 0 {
				return fmt.Errorf("%w: --steps %d: want > 0", trainer.ErrInvalidInput, steps)
			}
			if !(adam.LearningRate > 0) {
				return fmt.Errorf("%w: --lr %v: want > 0", trainer.ErrInvalidInput, adam.LearningRate)
			}
			m, err := trainer.LoadModel(dir)
			if err != nil {
				return err
			}
			defer m.Close()
			ds, err := readTrainData(data, m)
			if err != nil {
				return err
			}
			cfg := trainer.SessionConfig{Rank: rank, Alpha: alpha, Seed: seed}
			if schedule != "constant" || warmup > 0 {
				cfg.Schedule = &trainer.LRSchedule{Kind: schedule, PeakLR: adam.LearningRate, WarmupSteps: warmup, TotalSteps: steps}
				adam.LearningRate = 0 // take it from the schedule
			}
			s, err := openSession(m, adapter, cfg)
			if err != nil {
				return err
			}
			defer s.Close()
			for i := 0; i < steps; i++ {
				t0 := time.Now()
				fb, err := s.ForwardBackward(cmd.Context(), ds, loss, nil)
				if err != nil {
					return err
				}
				st, err := s.OptimStep(cmd.Context(), adam)
				if err != nil {
					return err
				}
				if err := writeModelJSON(cmd.OutOrStdout(), map[string]any{
					"step": st.Step, "loss_sum": fb.LossSum, "loss_mean": fb.LossMean, "tokens": fb.Tokens,
					"grad_norm": st.GradNorm, "learning_rate": st.LearningRate,
					"seconds": time.Since(t0).Seconds(),
				}); err != nil {
					return err
				}
			}
			_, err = s.SaveState(out, trainer.SaveAdapter)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "model", "", "model directory (required)")
	f.StringVar(&data, "data", "", "JSONL file, one datum per line (required)")
	f.StringVar(&out, "out", "", "directory for the trained PEFT adapter (required)")
	f.StringVar(&adapter, "adapter", "", "start from this PEFT adapter instead of a fresh one")
	f.StringVar(&loss, "loss", trainer.LossCrossEntropy, "loss function")
	f.IntVar(&steps, "steps", 0, "optimizer steps (required)")
	f.Float64Var(&adam.LearningRate, "lr", 0, "peak learning rate (required)")
	f.StringVar(&schedule, "schedule", "constant", "learning-rate schedule: constant, linear or cosine (decay to 0 at --steps)")
	f.IntVar(&warmup, "warmup", 0, "linear warmup steps")
	f.Float64Var(&adam.WeightDecay, "weight-decay", 0, "AdamW weight decay")
	f.Float64Var(&adam.GradClipNorm, "grad-clip", 0, "clip the gradient's global norm to this (0 = off)")
	f.IntVar(&rank, "rank", 8, "LoRA rank")
	f.Float32Var(&alpha, "alpha", 16, "LoRA alpha")
	f.Int64Var(&seed, "seed", 0, "seed of the adapter's initial A")
	for _, n := range []string{"model", "data", "out", "steps", "lr"} {
		_ = cmd.MarkFlagRequired(n)
	}
	return cmd
}

func newModelBenchTrainCmd() *cobra.Command {
	var (
		dir, shape, dtype      string
		batch, seq, rank, runs int
		threads, sessions      int
	)
	cmd := &cobra.Command{
		Use:   "bench [--model DIR | --shape smollm-135m|qwen3-0.6b] [--batch B --seq T --rank R]",
		Short: "Time LoRA training steps (forward_backward + optim_step); prints JSON",
		Long: `Times training steps on --model (its shape, random tokens) or on an in-memory
random model of --shape, and prints tokens/s, GFLOP/s, the measured sgemm rate
and model FLOP utilisation, peak memory, the CPU features and product path;
with --sessions N instead the memory of the model and of each extra session
sharing it. A BF16 or F16 model (a file of that dtype, or --dtype for a random
shape) is multiplied on its half path, and its utilisation is against the
measured bf16 GEMM rate as well as sgemm's.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			blas.SetThreads(threads)
			var m *trainer.Model
			var err error
			switch {
			case dir != "":
				// --dtype f32 widens a half file; otherwise the file's dtype.
				var o trainer.LoadOptions
				if strings.EqualFold(dtype, "f32") && cmd.Flags().Changed("dtype") {
					o.Precision = trainer.PrecisionF32
				}
				m, err = trainer.LoadModelWith(dir, o)
			case trainer.BenchShapes[shape] != nil:
				m, err = trainer.RandomModelAs(trainer.BenchShapes[shape](), 1, dtype)
			default:
				err = fmt.Errorf("%w: --shape %q (want %s) or --model DIR", trainer.ErrInvalidInput, shape, shapeNames())
			}
			if err != nil {
				return err
			}
			defer m.Close()
			sgemm := trainer.MeasureSgemm(1024)
			res := map[string]any{"sgemm_gflops": sgemm, "engine": trainer.Engine(),
				"weights": map[string]any{"dtype": m.WeightDType(), "path": m.ProductPath(), "bytes": m.MemoryBytes()}}
			peak := sgemm
			if m.WeightDType() == "BF16" {
				peak = trainer.MeasureHalfGemm(2048)
				res["bf16_gemm_gflops"] = peak
			}
			if sessions > 0 {
				mem, err := trainer.BenchSessionMemory(cmd.Context(), m, sessions, rank, seq)
				if err != nil {
					return err
				}
				res["sessions"] = mem
			} else {
				r, err := trainer.BenchTrain(cmd.Context(), m, batch, seq, rank, runs)
				if err != nil {
					return err
				}
				res["train"] = r
				res["mfu"] = r.GFLOPS / sgemm
				if peak != sgemm && peak > 0 {
					res["of_bf16_gemm"] = r.GFLOPS / peak
				}
			}
			return writeModelJSON(cmd.OutOrStdout(), res)
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "model", "", "model directory (its shape is benchmarked)")
	f.StringVar(&shape, "shape", "smollm-135m", "random in-memory model shape when --model is not given")
	f.StringVar(&dtype, "dtype", "bf16", "dtype of the random model's matrices: bf16, f16 or f32 (as a file of that dtype loads); with --model, f32 widens a BF16/F16 file")
	f.IntVar(&batch, "batch", 1, "sequences per step")
	f.IntVar(&seq, "seq", 256, "tokens per sequence")
	f.IntVar(&rank, "rank", 8, "LoRA rank (all linear layers)")
	f.IntVar(&runs, "steps", 3, "timed steps (after one warm-up step); the median is reported")
	f.IntVar(&threads, "threads", 2, "OpenBLAS threads")
	f.IntVar(&sessions, "sessions", 0, "measure memory of 1 and N sessions instead of speed")
	return cmd
}
