package trainer

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

// checkModel generates a small F32 Llama into a temp dir and lets edit
// change its config and tensors before the check.
func checkModel(t *testing.T, editConfig func(map[string]any), editTensors func(map[string]safetensors.Tensor)) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "m")
	if err := GenerateRandomModel(dir, Config{HiddenSize: 16, IntermediateSize: 32, NumHiddenLayers: 2,
		NumAttentionHeads: 4, NumKeyValueHeads: 2, VocabSize: 64, TorchDtype: "float32"}, 1, ""); err != nil {
		t.Fatal(err)
	}
	if editConfig != nil {
		raw, err := os.ReadFile(filepath.Join(dir, "config.json"))
		if err != nil {
			t.Fatal(err)
		}
		var cfg map[string]any
		if err := json.Unmarshal(raw, &cfg); err != nil {
			t.Fatal(err)
		}
		editConfig(cfg)
		raw, _ = json.Marshal(cfg)
		if err := os.WriteFile(filepath.Join(dir, "config.json"), raw, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if editTensors != nil {
		path := filepath.Join(dir, "model.safetensors")
		f, err := safetensors.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		ts := map[string]safetensors.Tensor{}
		for name, info := range f.Tensors {
			v, _, err := f.Float32(name)
			if err != nil {
				t.Fatal(err)
			}
			ts[name] = safetensors.Tensor{Name: name, Shape: info.Shape, Data: append([]float32(nil), v...)}
		}
		f.Close()
		editTensors(ts)
		var list []safetensors.Tensor
		for _, x := range ts {
			list = append(list, x)
		}
		if err := safetensors.WriteFile(path, list, map[string]string{"format": "pt"}); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestCheckModelDir is the one model check: a Llama passes; a family the
// engines do not serve (by name, or by the tensors it carries), names that
// disagree, a family's missing tensor, a wrong shape or an unknown tensor
// is refused with a message naming it, never run as a different model.
func TestCheckModelDir(t *testing.T) {
	if err := CheckModelDir(checkModel(t, nil, nil)); err != nil {
		t.Fatalf("a Llama directory was refused: %v", err)
	}
	for _, name := range tinyModels {
		if err := CheckModelDir(modelDir(name)); err != nil {
			t.Fatalf("%s refused: %v", name, err)
		}
	}
	qnorm := func(ts map[string]safetensors.Tensor) {
		for i := 0; i < 2; i++ {
			n := fmt.Sprintf("model.layers.%d.self_attn.q_norm.weight", i)
			ts[n] = safetensors.Tensor{Name: n, Shape: []int{4}, Data: []float32{1, 1, 1, 1}}
		}
	}
	for _, tc := range []struct {
		name    string
		cfg     func(map[string]any)
		tensors func(map[string]safetensors.Tensor)
		want    error
		says    string
	}{
		// A Llama's tensors under Qwen2's name lack Qwen2's q/k/v biases.
		{"qwen2 without biases", func(c map[string]any) { c["model_type"] = "qwen2"; c["architectures"] = []string{"Qwen2ForCausalLM"} }, nil, ErrInvalidInput, "_proj.bias"},
		{"qwen3 without q/k norms", func(c map[string]any) { c["model_type"] = "qwen3"; c["architectures"] = []string{"Qwen3ForCausalLM"} }, nil, ErrInvalidInput, "_norm.weight"},
		{"relabelled qwen2", func(c map[string]any) { c["architectures"] = []string{"Qwen2ForCausalLM"} }, nil, ErrUnsupported, "Qwen2ForCausalLM"},
		{"gemma", func(c map[string]any) { c["model_type"] = "gemma"; c["architectures"] = []string{"GemmaForCausalLM"} }, nil, ErrUnsupported, "GemmaForCausalLM"},
		{"q/k norms under a llama name", nil, qnorm, ErrUnsupported, "q_norm"},
		{"q bias", nil, func(ts map[string]safetensors.Tensor) {
			n := "model.layers.0.self_attn.q_proj.bias"
			ts[n] = safetensors.Tensor{Name: n, Shape: []int{16}, Data: make([]float32, 16)}
		}, ErrUnsupported, "q_proj.bias"},
		{"missing tensor", nil, func(ts map[string]safetensors.Tensor) { delete(ts, "model.layers.1.mlp.up_proj.weight") }, ErrInvalidInput, "up_proj"},
		{"wrong shape", nil, func(ts map[string]safetensors.Tensor) {
			n := "model.layers.0.mlp.down_proj.weight"
			ts[n] = safetensors.Tensor{Name: n, Shape: []int{32, 16}, Data: make([]float32, 512)}
		}, ErrInvalidInput, "down_proj"},
		{"gelu", func(c map[string]any) { c["hidden_act"] = "gelu" }, nil, ErrUnsupported, "hidden_act"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckModelDir(checkModel(t, tc.cfg, tc.tensors))
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("err %v, want %v naming %q", err, tc.want, tc.says)
			}
			if _, lerr := LoadModel(checkModel(t, tc.cfg, tc.tensors)); lerr == nil {
				t.Fatal("LoadModel took a directory the check refuses")
			}
		})
	}
}
