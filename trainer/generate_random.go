package trainer

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

// MarshalJSON writes one id as an int, several as a list, none as null, as
// Hugging Face configs do.
func (t TokenIDs) MarshalJSON() ([]byte, error) {
	switch len(t) {
	case 0:
		return []byte("null"), nil
	case 1:
		return json.Marshal(t[0])
	}
	return json.Marshal([]int(t))
}

// GenerateRandomModel writes a deterministic random-weight Llama model in
// Hugging Face layout into dir: config.json, model.safetensors (BF16, or F32
// when cfg.TorchDtype is "float32") and, when tokenizerDir is not empty, the
// tokenizer files copied from it. Weights are N(0, 0.02) as Hugging Face
// initialises Llama, norms are 1; the same cfg and seed give the same bytes.
func GenerateRandomModel(dir string, cfg Config, seed int64, tokenizerDir string) error {
	if cfg.ModelType == "" {
		cfg.ModelType = "llama"
	}
	if len(cfg.Architectures) == 0 {
		cfg.Architectures = []string{"LlamaForCausalLM"}
	}
	if cfg.HiddenAct == "" {
		cfg.HiddenAct = "silu"
	}
	if cfg.NumKeyValueHeads == 0 {
		cfg.NumKeyValueHeads = cfg.NumAttentionHeads
	}
	if cfg.HeadDim == 0 && cfg.NumAttentionHeads > 0 {
		cfg.HeadDim = cfg.HiddenSize / cfg.NumAttentionHeads
	}
	if cfg.RMSNormEps == 0 {
		cfg.RMSNormEps = 1e-5
	}
	if cfg.RopeTheta == 0 {
		cfg.RopeTheta = 10000
	}
	if cfg.MaxPositionEmbeddings == 0 {
		cfg.MaxPositionEmbeddings = 2048
	}
	dtype := safetensors.BF16
	if cfg.TorchDtype == "float32" {
		dtype = safetensors.F32
	} else {
		cfg.TorchDtype = "bfloat16"
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("generate model: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("generate model: %w", err)
	}
	rng := rand.New(rand.NewPCG(uint64(seed), 0x52414e444f4d)) // "RANDOM"
	normal := func(n int) []float32 { return randomWeights(rng, n) }
	hid, inter := cfg.HiddenSize, cfg.IntermediateSize
	hd, kvd := cfg.NumAttentionHeads*cfg.HeadDim, cfg.NumKeyValueHeads*cfg.HeadDim
	var ts []safetensors.Tensor
	add := func(name string, data []float32, shape ...int) {
		ts = append(ts, safetensors.Tensor{Name: name, Shape: shape, Data: data, DType: dtype})
	}
	add("model.embed_tokens.weight", normal(cfg.VocabSize*hid), cfg.VocabSize, hid)
	for l := 0; l < cfg.NumHiddenLayers; l++ {
		p := fmt.Sprintf("model.layers.%d.", l)
		add(p+"input_layernorm.weight", ones(hid), hid)
		add(p+"self_attn.q_proj.weight", normal(hd*hid), hd, hid)
		add(p+"self_attn.k_proj.weight", normal(kvd*hid), kvd, hid)
		add(p+"self_attn.v_proj.weight", normal(kvd*hid), kvd, hid)
		add(p+"self_attn.o_proj.weight", normal(hid*hd), hid, hd)
		if cfg.QKNorm() {
			// Away from 1, so a dropped norm weight shows.
			add(p+"self_attn.q_norm.weight", around1(rng, cfg.HeadDim), cfg.HeadDim)
			add(p+"self_attn.k_norm.weight", around1(rng, cfg.HeadDim), cfg.HeadDim)
		}
		if cfg.QKVBias() {
			// Larger than the weights' scale, so a dropped bias shows.
			add(p+"self_attn.q_proj.bias", scaled(normal(hd), 10), hd)
			add(p+"self_attn.k_proj.bias", scaled(normal(kvd), 10), kvd)
			add(p+"self_attn.v_proj.bias", scaled(normal(kvd), 10), kvd)
		}
		add(p+"post_attention_layernorm.weight", ones(hid), hid)
		add(p+"mlp.gate_proj.weight", normal(inter*hid), inter, hid)
		add(p+"mlp.up_proj.weight", normal(inter*hid), inter, hid)
		add(p+"mlp.down_proj.weight", normal(hid*inter), hid, inter)
	}
	add("model.norm.weight", ones(hid), hid)
	if !cfg.TieWordEmbeddings {
		add("lm_head.weight", normal(cfg.VocabSize*hid), cfg.VocabSize, hid)
	}
	if err := safetensors.WriteFile(filepath.Join(dir, "model.safetensors"), ts, map[string]string{"format": "pt"}); err != nil {
		return fmt.Errorf("generate model: %w", err)
	}
	raw, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return fmt.Errorf("generate model: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), append(raw, '\n'), 0o644); err != nil {
		return fmt.Errorf("generate model: %w", err)
	}
	if tokenizerDir != "" {
		for _, f := range []string{"tokenizer.json", "tokenizer_config.json"} {
			b, err := os.ReadFile(filepath.Join(tokenizerDir, f))
			if err != nil {
				if f == "tokenizer_config.json" && os.IsNotExist(err) {
					continue
				}
				return fmt.Errorf("generate model: copy tokenizer: %w", err)
			}
			if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
				return fmt.Errorf("generate model: copy tokenizer: %w", err)
			}
		}
	}
	return nil
}

// randomWeights returns n weights drawn from N(0, 0.02²), the initialisation
// Hugging Face gives Llama's linear layers.
func randomWeights(rng *rand.Rand, n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = float32(rng.NormFloat64() * 0.02)
	}
	return s
}

func around1(rng *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(0.5 + rng.Float64())
	}
	return v
}

func scaled(v []float32, k float32) []float32 {
	for i := range v {
		v[i] *= k
	}
	return v
}

// ones returns n weights of 1, a norm's initial scale.
func ones(n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = 1
	}
	return s
}
