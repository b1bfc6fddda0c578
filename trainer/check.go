package trainer

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

// CheckModelDir is the one model check both engines share, run when a node
// starts (and by LoadModel): the config's architecture, activation, biases
// and rope (Config.Validate), then every tensor's name, shape and dtype
// against what that architecture needs, with none missing and none left
// unused. A directory that passes computes what Hugging Face transformers
// computes on it; one that fails is never served, because an engine that
// ignored what it does not know would train a different model silently.
// It reads config.json and the safetensors headers only.
func CheckModelDir(dir string) error {
	cfg, err := ReadConfig(dir)
	if err != nil {
		return err
	}
	set, err := safetensors.OpenDir(dir)
	if err != nil {
		return fmt.Errorf("model %s: %w", dir, err)
	}
	defer set.Close()
	return checkWeights(dir, cfg, set)
}

// checkWeights is CheckModelDir's tensor half, on a set already open (so
// LoadModel reads the headers once).
func checkWeights(dir string, cfg Config, set *safetensors.Set) error {
	want := expectedTensors(cfg)
	for _, name := range sortedNames(want) {
		f, info, ok := set.Lookup(name)
		if !ok {
			if name == "lm_head.weight" && cfg.TieWordEmbeddings {
				continue
			}
			return fmt.Errorf("%w: model %s: tensor %q is missing from the weights", ErrInvalidInput, dir, name)
		}
		if !slices.Equal(info.Shape, want[name]) {
			return fmt.Errorf("%w: %s: tensor %q has shape %v, config.json implies %v", ErrInvalidInput, f.Path, name, info.Shape, want[name])
		}
		switch info.DType {
		case safetensors.F32, safetensors.BF16, safetensors.F16:
		default:
			return fmt.Errorf("%w: %s: tensor %q has dtype %s (want F32, BF16 or F16)", ErrUnsupported, f.Path, name, info.DType)
		}
	}
	var unused []string
	for _, name := range set.Names() {
		if _, ok := want[name]; !ok && !strings.HasSuffix(name, ".rotary_emb.inv_freq") {
			unused = append(unused, name)
		}
	}
	if len(unused) > 0 {
		more := ""
		if len(unused) > 3 {
			more = fmt.Sprintf(" and %d more", len(unused)-3)
			unused = unused[:3]
		}
		return fmt.Errorf("%w: model %s: tensors %s%s are not part of a %v model: this engine would ignore them and compute another model",
			ErrUnsupported, dir, strings.Join(unused, ", "), more, cfg.Architectures)
	}
	return nil
}

// expectedTensors is every tensor a model of cfg has, with its shape.
// lm_head.weight is listed for tied models too: some exports keep a copy,
// which tied models ignore.
func expectedTensors(c Config) map[string][]int {
	hid, inter, hd := c.HiddenSize, c.IntermediateSize, c.HeadDim
	q, kv := c.NumAttentionHeads*hd, c.NumKeyValueHeads*hd
	out := map[string][]int{
		"model.embed_tokens.weight": {c.VocabSize, hid},
		"model.norm.weight":         {hid},
		"lm_head.weight":            {c.VocabSize, hid},
	}
	for i := 0; i < c.NumHiddenLayers; i++ {
		p := fmt.Sprintf("model.layers.%d.", i)
		out[p+"input_layernorm.weight"] = []int{hid}
		out[p+"post_attention_layernorm.weight"] = []int{hid}
		out[p+"self_attn.q_proj.weight"] = []int{q, hid}
		out[p+"self_attn.k_proj.weight"] = []int{kv, hid}
		out[p+"self_attn.v_proj.weight"] = []int{kv, hid}
		out[p+"self_attn.o_proj.weight"] = []int{hid, q}
		out[p+"mlp.gate_proj.weight"] = []int{inter, hid}
		out[p+"mlp.up_proj.weight"] = []int{inter, hid}
		out[p+"mlp.down_proj.weight"] = []int{hid, inter}
		if c.QKNorm() {
			out[p+"self_attn.q_norm.weight"] = []int{hd}
			out[p+"self_attn.k_norm.weight"] = []int{hd}
		}
		if c.QKVBias() {
			out[p+"self_attn.q_proj.bias"] = []int{q}
			out[p+"self_attn.k_proj.bias"] = []int{kv}
			out[p+"self_attn.v_proj.bias"] = []int{kv}
		}
	}
	return out
}

func sortedNames(m map[string][]int) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
