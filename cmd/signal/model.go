package main

// signal model: the trainer engine's front door on one machine.
// tokenize and sample (and bench-infer, gen-random) live here; the training
// commands register themselves into modelSubcommands from their own file.

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/trainer"
	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/tokenizer"
)

// modelSubcommands are the constructors of `signal model` subcommands;
// files append to it from init so each command group stays in its own file.
var modelSubcommands []func() *cobra.Command

func init() {
	register(newModelCmd)
	modelSubcommands = append(modelSubcommands, newModelTokenizeCmd, newModelSampleCmd, newModelBenchInferCmd, newModelGenRandomCmd)
}

func newModelCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "model",
		Short: "Run the trainer engine locally on a Hugging Face model directory",
	}
	for _, f := range modelSubcommands {
		cmd.AddCommand(f())
	}
	return cmd
}

func writeModelJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

func newModelTokenizeCmd() *cobra.Command {
	var dir string
	var special bool
	cmd := &cobra.Command{
		Use:   "tokenize --model DIR [--special] TEXT",
		Short: `Print the token ids of TEXT as {"ids": [...]}`,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			tk, err := tokenizer.Load(dir)
			if err != nil {
				return err
			}
			ids := tk.Encode(args[0], special)
			if ids == nil {
				ids = []int{}
			}
			return writeModelJSON(cmd.OutOrStdout(), map[string][]int{"ids": ids})
		},
	}
	cmd.Flags().StringVar(&dir, "model", "", "model directory with tokenizer.json (required)")
	cmd.Flags().BoolVar(&special, "special", false, "add BOS/EOS as tokenizer_config.json says")
	_ = cmd.MarkFlagRequired("model")
	return cmd
}

// parseTokenList parses "1,2,3".
func parseTokenList(s string) ([]int, error) {
	var out []int
	for i, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		v, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("%w: --tokens entry %d %q is not an integer", trainer.ErrInvalidInput, i, f)
		}
		out = append(out, v)
	}
	return out, nil
}

type cliSample struct {
	Tokens     []int     `json:"tokens"`
	Text       string    `json:"text"`
	Logprobs   []float32 `json:"logprobs"`
	StopReason string    `json:"stop_reason"`
}

func newModelSampleCmd() *cobra.Command {
	var (
		dir, adapter, prompt, tokens string
		p                            = trainer.DefaultSamplingParams()
		numSamples                   int
	)
	cmd := &cobra.Command{
		Use:   "sample --model DIR [--adapter DIR] (--prompt TEXT | --tokens 1,2,3) --max-tokens N",
		Short: "Sample continuations of one prompt; prints {\"samples\": [...]}",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (prompt == "") == (tokens == "") {
				return fmt.Errorf("%w: give exactly one of --prompt and --tokens", trainer.ErrInvalidInput)
			}
			if !cmd.Flags().Changed("max-tokens") {
				return fmt.Errorf("%w: --max-tokens is required", trainer.ErrInvalidInput)
			}
			// Check the cheap things before loading weights.
			if err := p.Validate(1 << 30); err != nil {
				return err
			}
			m, err := trainer.LoadModel(dir)
			if err != nil {
				return err
			}
			defer m.Close()
			var lora *trainer.LoRA
			if adapter != "" {
				if lora, err = trainer.LoadAdapter(adapter, m); err != nil {
					return err
				}
			}
			var ids []int
			if tokens != "" {
				if ids, err = parseTokenList(tokens); err != nil {
					return err
				}
			} else {
				if m.Tokenizer() == nil {
					return fmt.Errorf("%w: --prompt needs tokenizer.json in %s; use --tokens", trainer.ErrInvalidInput, dir)
				}
				ids = m.Tokenizer().Encode(prompt, true)
			}
			res, err := m.Sample(cmd.Context(), [][]int{ids}, numSamples, p, lora)
			if err != nil {
				return err
			}
			out := struct {
				Samples []cliSample `json:"samples"`
			}{Samples: []cliSample{}}
			for _, s := range res[0] {
				out.Samples = append(out.Samples, cliSample{Tokens: s.Tokens, Text: s.Text, Logprobs: s.Logprobs, StopReason: s.StopReason})
			}
			return writeModelJSON(cmd.OutOrStdout(), out)
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "model", "", "model directory (required)")
	f.StringVar(&adapter, "adapter", "", "PEFT LoRA adapter directory")
	f.StringVar(&prompt, "prompt", "", "prompt text, encoded with BOS/EOS as the tokenizer files say")
	f.StringVar(&tokens, "tokens", "", "prompt token ids, comma-separated, used verbatim")
	f.IntVar(&p.MaxTokens, "max-tokens", 0, "tokens to generate (required, > 0)")
	f.Float32Var(&p.Temperature, "temperature", 1, "sampling temperature; 0 is greedy")
	f.IntVar(&p.TopK, "top-k", 0, "keep the K most likely tokens (0 or -1: off)")
	f.Float32Var(&p.TopP, "top-p", 1, "nucleus mass in (0, 1]")
	f.Int64Var(&p.Seed, "seed", 0, "random seed (same seed, same samples)")
	f.StringArrayVar(&p.Stop, "stop", nil, "stop string (repeatable)")
	f.IntVar(&numSamples, "num-samples", 1, "samples of the prompt")
	_ = cmd.MarkFlagRequired("model")
	return cmd
}

func newModelBenchInferCmd() *cobra.Command {
	var (
		dir, shape, dtype string
		threads           int
		o                 = trainer.InferBenchOptions{PrefillTokens: 256, DecodeTokens: 32, DecodeBatch: 1, Repeats: 3}
	)
	cmd := &cobra.Command{
		Use:   "bench-infer (--model DIR | --shape NAME [--dtype bf16|f16|f32])",
		Short: "Measure prefill and decode tokens/s and sgemm GFLOP/s; prints JSON",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			blas.SetThreads(threads)
			var m *trainer.Model
			var err error
			switch {
			case dir != "":
				m, err = trainer.LoadModel(dir)
			case trainer.BenchShapes[shape] != nil:
				m, err = trainer.RandomModelAs(trainer.BenchShapes[shape](), 1, dtype)
			default:
				err = fmt.Errorf("%w: give --model DIR or --shape (%s)", trainer.ErrInvalidInput, shapeNames())
			}
			if err != nil {
				return err
			}
			defer m.Close()
			r, err := m.BenchInfer(cmd.Context(), o)
			if err != nil {
				return err
			}
			return writeModelJSON(cmd.OutOrStdout(), struct {
				trainer.InferBenchResult
				Engine  trainer.EngineInfo `json:"engine"`
				Weights map[string]any     `json:"weights"`
			}{r, trainer.Engine(), map[string]any{"dtype": m.WeightDType(), "path": m.ProductPath(), "bytes": m.MemoryBytes()}})
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "model", "", "model directory")
	f.StringVar(&shape, "shape", "", "random in-memory model shape instead of --model")
	f.StringVar(&dtype, "dtype", "bf16", "dtype of the --shape model's matrices: bf16, f16 or f32")
	f.IntVar(&threads, "threads", 2, "OpenBLAS threads")
	f.IntVar(&o.PrefillTokens, "prefill-tokens", o.PrefillTokens, "prefill sequence length")
	f.IntVar(&o.DecodeTokens, "decode-tokens", o.DecodeTokens, "tokens decoded per sequence")
	f.IntVar(&o.DecodeBatch, "decode-batch", o.DecodeBatch, "sequences decoded together")
	f.IntVar(&o.Repeats, "repeats", o.Repeats, "report the median of this many runs (after a warm-up run)")
	f.BoolVar(&o.AllRows, "all-rows", false, "prefill runs the last block on every row, as a full forward does, not on the last row alone as sampling does")
	return cmd
}

func newModelGenRandomCmd() *cobra.Command {
	var (
		out, shape, tokDir string
		seed               int64
	)
	cmd := &cobra.Command{
		Use:   "gen-random --out DIR [--shape smollm-135m|qwen3-0.6b]",
		Short: "Write a deterministic random-weight Llama model (Hugging Face layout)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			mk, ok := trainer.BenchShapes[shape]
			if !ok {
				return fmt.Errorf("%w: --shape %q (want %s)", trainer.ErrInvalidInput, shape, shapeNames())
			}
			cfg := mk()
			cfg.BOSTokenID, cfg.EOSTokenID = trainer.TokenIDs{1}, trainer.TokenIDs{2}
			if err := trainer.GenerateRandomModel(out, cfg, seed, tokDir); err != nil {
				return err
			}
			_, err := fmt.Fprintln(cmd.OutOrStdout(), out)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&out, "out", "", "output directory (required)")
	f.StringVar(&shape, "shape", "smollm-135m", "model shape")
	f.StringVar(&tokDir, "tokenizer", "", "copy tokenizer.json and tokenizer_config.json from this directory")
	f.Int64Var(&seed, "seed", 1, "weight seed")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}

// shapeNames lists trainer.BenchShapes for messages.
func shapeNames() string {
	var names []string
	for n := range trainer.BenchShapes {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}
