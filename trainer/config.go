package trainer

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Errors callers map to API statuses with errors.Is (400 for both).
var (
	// ErrInvalidInput marks a request or file whose content is wrong: token
	// ids outside the vocabulary, bad sampling parameters, wrong shapes.
	ErrInvalidInput = errors.New("invalid input")
	// ErrUnsupported marks a valid model or adapter that this engine cannot
	// run: another architecture, an activation or RoPE variant it lacks.
	ErrUnsupported = errors.New("unsupported")
)

// RopeScaling is config.json's rope_scaling object. Only the "llama3" type
// (Llama 3.1/3.2) and the plain "default" type are supported.
type RopeScaling struct {
	RopeType                      string  `json:"rope_type"`
	Type                          string  `json:"type"` // older spelling of rope_type
	Factor                        float64 `json:"factor"`
	LowFreqFactor                 float64 `json:"low_freq_factor"`
	HighFreqFactor                float64 `json:"high_freq_factor"`
	OriginalMaxPositionEmbeddings int     `json:"original_max_position_embeddings"`
}

// Kind returns rope_type, or the older "type" when rope_type is absent.
func (r *RopeScaling) Kind() string {
	if r.RopeType != "" {
		return r.RopeType
	}
	return r.Type
}

// TokenIDs is a token id field that config.json writes as an int, a list of
// ints or null.
type TokenIDs []int

// UnmarshalJSON accepts an int, a list of ints or null.
func (t *TokenIDs) UnmarshalJSON(b []byte) error {
	var one *int
	if err := json.Unmarshal(b, &one); err == nil {
		*t = nil
		if one != nil {
			*t = TokenIDs{*one}
		}
		return nil
	}
	var many []int
	if err := json.Unmarshal(b, &many); err != nil {
		return fmt.Errorf("token id must be an int or a list of ints: %s", b)
	}
	*t = many
	return nil
}

// Config is the parsed config.json of a Llama-family model.
type Config struct {
	Architectures         []string `json:"architectures"`
	ModelType             string   `json:"model_type"`
	HiddenSize            int      `json:"hidden_size"`
	IntermediateSize      int      `json:"intermediate_size"`
	NumHiddenLayers       int      `json:"num_hidden_layers"`
	NumAttentionHeads     int      `json:"num_attention_heads"`
	NumKeyValueHeads      int      `json:"num_key_value_heads"`
	HeadDim               int      `json:"head_dim"`
	VocabSize             int      `json:"vocab_size"`
	MaxPositionEmbeddings int      `json:"max_position_embeddings"`
	// SlidingWindow is Mistral's (and, with UseSlidingWindow, Qwen2's)
	// attention window (null: none).
	SlidingWindow     *int         `json:"sliding_window,omitempty"`
	UseSlidingWindow  *bool        `json:"use_sliding_window,omitempty"`
	RMSNormEps        float64      `json:"rms_norm_eps"`
	RopeTheta         float64      `json:"rope_theta"`
	RopeScaling       *RopeScaling `json:"rope_scaling,omitempty"`
	HiddenAct         string       `json:"hidden_act"`
	TieWordEmbeddings bool         `json:"tie_word_embeddings"`
	AttentionBias     bool         `json:"attention_bias"`
	MLPBias           bool         `json:"mlp_bias"`
	BOSTokenID        TokenIDs     `json:"bos_token_id,omitempty"`
	EOSTokenID        TokenIDs     `json:"eos_token_id,omitempty"`
	TorchDtype        string       `json:"torch_dtype,omitempty"`
}

// ReadConfig reads and validates dir/config.json, filling the defaults
// Hugging Face applies (head_dim = hidden/heads, kv heads = heads, ...).
func ReadConfig(dir string) (Config, error) {
	path := filepath.Join(dir, "config.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read model config: %w", err)
	}
	cfg, err := ParseConfig(raw)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig parses config.json bytes, applies defaults and validates.
func ParseConfig(raw []byte) (Config, error) {
	cfg := Config{RMSNormEps: 1e-6, RopeTheta: 10000, HiddenAct: "silu", MaxPositionEmbeddings: 2048}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return Config{}, fmt.Errorf("%w: config.json: %v", ErrInvalidInput, err)
	}
	// transformers 5 writes rope_theta and the scaling into one
	// rope_parameters object; older configs (most on the Hub) keep them apart.
	var v5 struct {
		RopeParameters *struct {
			RopeTheta float64 `json:"rope_theta"`
			RopeScaling
		} `json:"rope_parameters"`
	}
	if err := json.Unmarshal(raw, &v5); err == nil && v5.RopeParameters != nil {
		rp := v5.RopeParameters
		if rp.RopeTheta > 0 {
			cfg.RopeTheta = rp.RopeTheta
		}
		if k := rp.RopeScaling.Kind(); k != "" && k != "default" && cfg.RopeScaling == nil {
			sc := rp.RopeScaling
			cfg.RopeScaling = &sc
		}
	}
	if cfg.NumKeyValueHeads == 0 {
		cfg.NumKeyValueHeads = cfg.NumAttentionHeads
	}
	if cfg.HeadDim == 0 && cfg.NumAttentionHeads > 0 {
		cfg.HeadDim = cfg.HiddenSize / cfg.NumAttentionHeads
	}
	cfg.MaxPositionEmbeddings = cfg.ContextLength()
	return cfg, cfg.Validate()
}

// ContextLength is the longest sequence the model is served for: its
// max_position_embeddings, or Mistral's sliding window when that is
// shorter. Within the window, windowed attention is plain causal
// attention, so serving at most the window computes exactly what
// transformers computes, without a windowed kernel.
func (c Config) ContextLength() int {
	if c.UseSlidingWindow != nil && !*c.UseSlidingWindow {
		return c.MaxPositionEmbeddings // Qwen2 lists a window it does not use
	}
	if w := c.SlidingWindow; w != nil && *w > 0 && *w < c.MaxPositionEmbeddings {
		return *w
	}
	return c.MaxPositionEmbeddings
}

// QKVBias reports whether the family has q/k/v projection biases (Qwen2;
// frozen, like every base weight).
func (c Config) QKVBias() bool { return c.Family() == "qwen2" }

// QKNorm reports whether the family normalises each q and k head (RMSNorm
// over head_dim, weights q_norm/k_norm) before RoPE: Qwen3.
func (c Config) QKNorm() bool { return c.Family() == "qwen3" }

// Family is the model_type of the config's architecture.
func (c Config) Family() string {
	if len(c.Architectures) > 0 {
		return familyOf[c.Architectures[0]]
	}
	return c.ModelType
}

// families maps the model_type of each supported family to its
// architecture. Mistral is Llama's math with a sliding window (see
// ContextLength); Qwen2 adds q/k/v biases (QKVBias); Qwen3 dense, per-head
// q/k norms (QKNorm) and a head_dim of its own.
var families = map[string]string{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
	"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

// familyOf is families inverted: architecture → model_type.
var familyOf = func() map[string]string {
	out := make(map[string]string, len(families))
	for mt, arch := range families {
		out[arch] = mt
	}
	return out
}()

// supportedFamilies names them for messages.
var supportedFamilies = func() string {
	var names []string
	for mt, arch := range families {
		names = append(names, fmt.Sprintf("%s (model_type %s)", arch, mt))
	}
	sort.Strings(names)
	return strings.Join(names, ", ") + " only"
}()

// Validate reports the first field that this engine cannot run.
func (c Config) Validate() error {
	// Both names must agree where given: a Qwen2 checkpoint relabelled
	// model_type "llama" still has Qwen2's biases and norms.
	arch, ok := families[c.ModelType]
	if c.ModelType == "" && len(c.Architectures) > 0 {
		arch, ok = c.Architectures[0], true
	}
	for _, a := range c.Architectures {
		ok = ok && a == arch
	}
	if _, known := familyOf[arch]; !ok || !known {
		return fmt.Errorf("%w: architecture %v / model_type %q: this engine runs %s", ErrUnsupported, c.Architectures, c.ModelType, supportedFamilies)
	}
	positive := []struct {
		name string
		v    int
	}{
		{"hidden_size", c.HiddenSize}, {"intermediate_size", c.IntermediateSize},
		{"num_hidden_layers", c.NumHiddenLayers}, {"num_attention_heads", c.NumAttentionHeads},
		{"num_key_value_heads", c.NumKeyValueHeads}, {"head_dim", c.HeadDim},
		{"vocab_size", c.VocabSize}, {"max_position_embeddings", c.MaxPositionEmbeddings},
	}
	for _, p := range positive {
		if p.v <= 0 {
			return fmt.Errorf("%w: config %s = %d, must be positive", ErrInvalidInput, p.name, p.v)
		}
	}
	if c.NumAttentionHeads%c.NumKeyValueHeads != 0 {
		return fmt.Errorf("%w: config num_attention_heads %d is not a multiple of num_key_value_heads %d", ErrInvalidInput, c.NumAttentionHeads, c.NumKeyValueHeads)
	}
	if c.HeadDim%2 != 0 {
		return fmt.Errorf("%w: config head_dim %d must be even for rotary embeddings", ErrInvalidInput, c.HeadDim)
	}
	if c.HiddenAct != "silu" {
		return fmt.Errorf("%w: config hidden_act %q (want silu)", ErrUnsupported, c.HiddenAct)
	}
	if c.AttentionBias || c.MLPBias {
		return fmt.Errorf("%w: config attention_bias/mlp_bias = true", ErrUnsupported)
	}
	if !(c.RMSNormEps > 0) || !(c.RopeTheta > 0) || math.IsInf(c.RopeTheta, 0) {
		return fmt.Errorf("%w: config rms_norm_eps %v and rope_theta %v must be positive", ErrInvalidInput, c.RMSNormEps, c.RopeTheta)
	}
	if r := c.RopeScaling; r != nil {
		switch r.Kind() {
		case "", "default":
		case "llama3":
			if !(r.Factor > 0) || !(r.LowFreqFactor > 0) || !(r.HighFreqFactor > r.LowFreqFactor) || r.OriginalMaxPositionEmbeddings <= 0 {
				return fmt.Errorf("%w: config rope_scaling llama3 needs factor > 0, 0 < low_freq_factor < high_freq_factor, original_max_position_embeddings > 0: %+v", ErrInvalidInput, *r)
			}
		default:
			return fmt.Errorf("%w: config rope_scaling type %q (want llama3)", ErrUnsupported, r.Kind())
		}
	}
	for _, id := range append(append([]int{}, c.BOSTokenID...), c.EOSTokenID...) {
		if id < 0 || id >= c.VocabSize {
			return fmt.Errorf("%w: config bos/eos token id %d outside the vocabulary of %d", ErrInvalidInput, id, c.VocabSize)
		}
	}
	return nil
}

// QKVDim is the width of the fused q,k,v projection: (heads + 2·kv heads)·head_dim.
func (c Config) QKVDim() int { return (c.NumAttentionHeads + 2*c.NumKeyValueHeads) * c.HeadDim }

// InvFreq returns the rotary inverse frequencies, [head_dim/2], with llama3
// scaling applied. Like Hugging Face they are computed in f32, so positions
// rotate by the same angles as in PyTorch.
func (c Config) InvFreq() []float32 {
	half := c.HeadDim / 2
	inv := make([]float32, half)
	for i := range inv {
		exp := float32(2*i) / float32(c.HeadDim)
		inv[i] = float32(1 / math.Pow(c.RopeTheta, float64(exp)))
	}
	if r := c.RopeScaling; r != nil && r.Kind() == "llama3" {
		old := float64(r.OriginalMaxPositionEmbeddings)
		lowWavelen := old / r.LowFreqFactor
		highWavelen := old / r.HighFreqFactor
		for i, f := range inv {
			wavelen := 2 * math.Pi / float64(f)
			switch {
			case wavelen < highWavelen:
				// high frequency: unchanged
			case wavelen > lowWavelen:
				inv[i] = float32(float64(f) / r.Factor)
			default:
				smooth := (old/wavelen - r.LowFreqFactor) / (r.HighFreqFactor - r.LowFreqFactor)
				inv[i] = float32((1-smooth)*float64(f)/r.Factor + smooth*float64(f))
			}
		}
	}
	return inv
}
