package trainer

import (
	"context"
	"encoding/json"
	"math"
	"path/filepath"
	"testing"
)

// TestFamiliesSavedByTransformers loads models that transformers itself
// made and saved (its current config.json spelling: rope_parameters, dtype,
// layer_types), one per family the engine serves, and checks them against
// transformers: the model check passes, and logits and greedy
// continuations agree as in TestMatchesPyTorch.
func TestFamiliesSavedByTransformers(t *testing.T) {
	hf := references(t)[0]
	tmp := t.TempDir()
	shape := map[string]any{"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
		"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
	with := func(extra map[string]any) map[string]any {
		out := map[string]any{}
		for k, v := range shape {
			out[k] = v
		}
		for k, v := range extra {
			out[k] = v
		}
		return out
	}
	families := []struct {
		name, family string
		config       map[string]any
		dtype        string
	}{
		{"llama3-bf16", "llama", with(map[string]any{"rope_parameters": map[string]any{"rope_type": "llama3", "rope_theta": 500000.0,
			"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}), "bfloat16"},
		{"mistral", "mistral", with(map[string]any{"sliding_window": 128, "rope_theta": 1e6}), "float32"},
		{"qwen2-tied", "qwen2", with(map[string]any{"tie_word_embeddings": true, "rope_theta": 1e6}), "bfloat16"},
		{"qwen3", "qwen3", with(map[string]any{"head_dim": 24, "tie_word_embeddings": true, "rope_theta": 1e6}), "bfloat16"},
	}
	var reqs []map[string]any
	for i, f := range families {
		dir := filepath.Join(tmp, f.name)
		reqs = append(reqs, map[string]any{"cmd": "model_init", "family": f.family, "out": dir, "config": f.config, "dtype": f.dtype, "seed": i + 1})
	}
	var made struct{ Answers []json.RawMessage }
	runRef(t, hf, nil, map[string]any{"cmd": "batch", "requests": reqs}, &made)
	reqs = nil
	for _, f := range families {
		dir := filepath.Join(tmp, f.name)
		if err := CheckModelDir(dir); err != nil {
			t.Fatalf("%s, saved by transformers, fails the model check: %v", f.name, err)
		}
		V := 320
		reqs = append(reqs,
			map[string]any{"cmd": "logits", "model": dir, "tokens": testTokens(17, V, 1), "out": filepath.Join(tmp, f.name+".f32")},
			map[string]any{"cmd": "greedy", "model": dir, "prompts": [][]int{testTokens(5, V, 2)}, "max_tokens": 8})
	}
	var ans struct{ Answers []json.RawMessage }
	runRef(t, hf, nil, map[string]any{"cmd": "batch", "requests": reqs}, &ans)
	for i, f := range families {
		t.Run(f.name, func(t *testing.T) {
			dir := filepath.Join(tmp, f.name)
			m := mustLoad(t, dir)
			if f.family == "llama" && (m.Config().RopeScaling == nil || m.Config().RopeScaling.Kind() != "llama3" || m.Config().RopeTheta != 500000) {
				t.Fatalf("rope_parameters not read: theta %v, scaling %+v", m.Config().RopeTheta, m.Config().RopeScaling)
			}
			got, err := m.Logits(context.Background(), testTokens(17, 320, 1), nil)
			if err != nil {
				t.Fatal(err)
			}
			compareLogits(t, got, readF32(t, filepath.Join(tmp, f.name+".f32")))
			var want refGreedy
			if err := json.Unmarshal(ans.Answers[2*i+1], &want); err != nil {
				t.Fatal(err)
			}
			p := DefaultSamplingParams()
			p.Temperature, p.MaxTokens = 0, 8
			samples, err := m.Sample(context.Background(), [][]int{testTokens(5, 320, 2)}, 1, p, nil)
			if err != nil {
				t.Fatal(err)
			}
			g := samples[0][0]
			for j := range g.Tokens {
				if g.Tokens[j] != want.Samples[0].Tokens[j] {
					t.Fatalf("greedy %v, transformers %v", g.Tokens, want.Samples[0].Tokens)
				}
				if d := math.Abs(float64(g.Logprobs[j]) - want.Samples[0].Logprobs[j]); d > 1e-4*math.Max(1, math.Abs(want.Samples[0].Logprobs[j])) {
					t.Errorf("logprob %d: %v, transformers %v", j, g.Logprobs[j], want.Samples[0].Logprobs[j])
				}
			}
		})
	}
}
