package main

// signal model merge | export-gguf: weights out of Signal (issue 20), a
// merged Hugging Face directory and llama.cpp's GGUF (package export).

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/export"
	"github.com/signal-p2p/signal/trainer"
)

func init() {
	modelSubcommands = append(modelSubcommands, newModelMergeCmd, newModelExportGGUFCmd)
}

// loadForExport loads a model (and an adapter when adapterDir is set) for
// an export. Exports run no forward pass, so the packed copy of the weights
// the engine makes for its products (as large as the projections again)
// is turned off for this load unless the user set SIGNAL_ENGINE_PACKED.
// The merge reads f32 matrices: a BF16 or F16 file widens exactly, so the
// export is the same as from the half engine's copy.
func loadForExport(dir, adapterDir string) (*trainer.Model, *trainer.LoRA, error) {
	if _, set := os.LookupEnv("SIGNAL_ENGINE_PACKED"); !set {
		os.Setenv("SIGNAL_ENGINE_PACKED", "0")
		defer os.Unsetenv("SIGNAL_ENGINE_PACKED")
	}
	m, err := trainer.LoadModelWith(dir, trainer.LoadOptions{Precision: trainer.PrecisionF32})
	if err != nil {
		return nil, nil, err
	}
	if adapterDir == "" {
		return m, nil, nil
	}
	l, err := trainer.LoadAdapter(adapterDir, m)
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	return m, l, nil
}

func newModelMergeCmd() *cobra.Command {
	var (
		dir, adapter, out, dtype string
		maxShard                 int64
	)
	cmd := &cobra.Command{
		Use:   "merge --model DIR --adapter DIR --out DIR [--dtype bf16|f16|f32]",
		Short: "Fold a LoRA adapter into its base model: a Hugging Face directory transformers loads",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o := export.MergeOptions{MaxShardBytes: maxShard}
			if dtype != "" {
				d, err := export.ParseDType(dtype)
				if err != nil {
					return err
				}
				o.DType = d
			}
			m, l, err := loadForExport(dir, adapter)
			if err != nil {
				return err
			}
			defer m.Close()
			if err := export.Merge(m, l, out, o); err != nil {
				return err
			}
			return writeModelJSON(cmd.OutOrStdout(), map[string]string{"out": out})
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "model", "", "base model directory (required)")
	f.StringVar(&adapter, "adapter", "", "PEFT LoRA adapter directory (required)")
	f.StringVar(&out, "out", "", "output directory, new or empty (required)")
	f.StringVar(&dtype, "dtype", "", "weights' dtype: bf16, f16 or f32 (default: the base model's)")
	f.Int64Var(&maxShard, "max-shard-bytes", export.DefaultMaxShardBytes, "largest safetensors file before the weights are sharded")
	for _, name := range []string{"model", "adapter", "out"} {
		_ = cmd.MarkFlagRequired(name)
	}
	return cmd
}

func newModelExportGGUFCmd() *cobra.Command {
	var dir, adapter, out, dtype, name string
	cmd := &cobra.Command{
		Use:   "export-gguf --model DIR [--adapter DIR] --out FILE.gguf [--dtype f32|f16|bf16|q8_0]",
		Short: "Write a model, or with --adapter the adapter alone, as a llama.cpp GGUF file",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			d, err := export.ParseDType(dtype)
			if err != nil {
				return err
			}
			o := export.GGUFOptions{DType: d, Name: name}
			m, l, err := loadForExport(dir, adapter)
			if err != nil {
				return err
			}
			defer m.Close()
			if l != nil {
				err = export.WriteAdapterGGUF(m, l, out, o)
			} else {
				err = export.WriteGGUF(m, out, o)
			}
			if err != nil {
				return err
			}
			kind := "model"
			if l != nil {
				kind = "adapter"
			}
			return writeModelJSON(cmd.OutOrStdout(), map[string]string{"out": out, "type": kind, "dtype": fmt.Sprint(d)})
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "model", "", "model directory: a base or a merged model (required)")
	f.StringVar(&adapter, "adapter", "", "PEFT LoRA adapter directory: write it alone, as a llama.cpp LoRA adapter")
	f.StringVar(&out, "out", "", "output .gguf file (required)")
	f.StringVar(&dtype, "dtype", "f32", "2-D weights' type: f32, f16, bf16 or q8_0 (models only)")
	f.StringVar(&name, "name", "", "general.name (default: the model's name)")
	_ = cmd.MarkFlagRequired("model")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}
