package coordinator

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/signal-p2p/signal/protocol"
)

// ModelSpec is one entry of the model registry.
type ModelSpec struct {
	Name string `json:"name"`
	// HFRepo is the Hugging Face repository nodes download the model from.
	HFRepo string `json:"hf_repo,omitempty"`
	// Path is a local model directory (Hugging Face layout).
	Path string `json:"path,omitempty"`
	// Aliases are other names the model answers to: the Hugging Face repo
	// ids Tinker recipes name models by ("meta-llama/Llama-3.2-1B"), for a
	// model registered under a name of its own. HFRepo answers too.
	Aliases       []string `json:"aliases,omitempty"`
	ContextLength int      `json:"context_length"`
	MemoryBytes   int64    `json:"memory_bytes"`
	// AdapterBytesPerRank is the size of a rank-1 f32 LoRA adapter on every
	// target module; it bounds what a checkpoint may bill (0: unknown, the
	// model's size bounds it).
	AdapterBytesPerRank int64           `json:"adapter_bytes_per_rank,omitempty"`
	Prices              protocol.Prices `json:"prices"`
}

// DefaultPrices are the prices of a model whose registry entry names none,
// in micro-credits (per 1K tokens; per GB-hour of checkpoints).
var DefaultPrices = protocol.Prices{TrainMicroCreditsPer1K: 400, PrefillMicroCreditsPer1K: 100, SampleMicroCreditsPer1K: 200, StorageMicroCreditsPerGBHour: 500}

// Validate checks a registry entry.
func (m ModelSpec) Validate() error {
	switch {
	case m.Name == "" || strings.ContainsAny(m.Name, " \t\n/"):
		return fmt.Errorf("model name %q: must be non-empty without spaces or slashes: %w", m.Name, ErrInvalidRequest)
	case m.ContextLength <= 0:
		return fmt.Errorf("model %s context_length %d: must be positive: %w", m.Name, m.ContextLength, ErrInvalidRequest)
	case slices.ContainsFunc(m.Aliases, func(a string) bool { return a == "" || strings.ContainsAny(a, " \t\n") }):
		return fmt.Errorf("model %s aliases %q: each must be non-empty without spaces: %w", m.Name, m.Aliases, ErrInvalidRequest)
	case m.MemoryBytes < 0 || m.AdapterBytesPerRank < 0:
		return fmt.Errorf("model %s memory_bytes %d / adapter_bytes_per_rank %d: must not be negative: %w", m.Name, m.MemoryBytes, m.AdapterBytesPerRank, ErrInvalidRequest)
	case m.Prices.TrainMicroCreditsPer1K < 0 || m.Prices.PrefillMicroCreditsPer1K < 0 || m.Prices.SampleMicroCreditsPer1K < 0 || m.Prices.StorageMicroCreditsPerGBHour < 0:
		return fmt.Errorf("model %s prices: must not be negative: %w", m.Name, ErrInvalidRequest)
	}
	return nil
}

// LoadModels reads a registry file: a JSON array of ModelSpec.
func LoadModels(file string) ([]ModelSpec, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("read models %s: %w", file, err)
	}
	var ms []ModelSpec
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ms); err != nil {
		return nil, fmt.Errorf("parse models %s: %w", file, err)
	}
	for i := range ms {
		if ms[i].Prices == (protocol.Prices{}) {
			ms[i].Prices = DefaultPrices
		}
		if err := ms[i].Validate(); err != nil {
			return nil, fmt.Errorf("models %s entry %d: %w", file, i, err)
		}
	}
	return ms, nil
}

// ModelFromDir describes a local Hugging Face model directory: context
// length from config.json, memory from the safetensors files at f32 (the
// engine's compute type), default prices.
func ModelFromDir(name, dir string) (ModelSpec, error) {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return ModelSpec{}, fmt.Errorf("model %s: %w", name, err)
	}
	var cfg struct {
		MaxPositionEmbeddings int    `json:"max_position_embeddings"`
		SlidingWindow         *int   `json:"sliding_window"`
		UseSlidingWindow      *bool  `json:"use_sliding_window"`
		TorchDtype            string `json:"torch_dtype"`
		Hidden                int64  `json:"hidden_size"`
		Intermediate          int64  `json:"intermediate_size"`
		Layers                int64  `json:"num_hidden_layers"`
		Heads                 int64  `json:"num_attention_heads"`
		KVHeads               int64  `json:"num_key_value_heads"`
		HeadDim               int64  `json:"head_dim"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return ModelSpec{}, fmt.Errorf("model %s config.json: %w", name, err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	var size int64
	for _, f := range files {
		if st, err := os.Stat(f); err == nil {
			size += st.Size()
		}
	}
	if cfg.TorchDtype == "bfloat16" || cfg.TorchDtype == "float16" {
		size *= 2
	}
	m := ModelSpec{Name: name, Path: dir, ContextLength: cfg.MaxPositionEmbeddings, MemoryBytes: size, Prices: DefaultPrices}
	if cfg.Hidden > 0 && cfg.Layers > 0 && cfg.Heads > 0 {
		hd, kv := cfg.HeadDim, cfg.KVHeads
		if hd == 0 {
			hd = cfg.Hidden / cfg.Heads
		}
		if kv == 0 {
			kv = cfg.Heads
		}
		h, q, k, i := cfg.Hidden, cfg.Heads*hd, kv*hd, cfg.Intermediate
		// A and B of q, k, v, o, gate, up, down: (in + out) × rank each.
		perLayer := (h + q) + 2*(h+k) + (q + h) + 3*(h+i)
		m.AdapterBytesPerRank = 4 * cfg.Layers * perLayer
	}
	if m.ContextLength == 0 {
		m.ContextLength = 2048
	}
	// Mistral's engines serve at most the sliding window (trainer.Config.ContextLength).
	if w := cfg.SlidingWindow; w != nil && *w > 0 && *w < m.ContextLength && (cfg.UseSlidingWindow == nil || *cfg.UseSlidingWindow) {
		m.ContextLength = *w
	}
	return m, m.Validate()
}

// registry is the read-only model table.
type registry struct {
	byName map[string]ModelSpec
	// byRepo finds a model by its Hugging Face repository id and its
	// aliases too ("meta-llama/Llama-3.2-1B"): the names Tinker recipes use.
	byRepo map[string]ModelSpec
	names  []string
}

func newRegistry(ms []ModelSpec) *registry {
	r := &registry{byName: map[string]ModelSpec{}, byRepo: map[string]ModelSpec{}}
	for _, m := range ms {
		r.byName[m.Name] = m
		if m.HFRepo != "" {
			r.byRepo[m.HFRepo] = m
		}
		for _, a := range m.Aliases {
			r.byRepo[a] = m
		}
		r.names = append(r.names, m.Name)
	}
	sort.Strings(r.names)
	return r
}

func (r *registry) get(name string) (ModelSpec, error) {
	m, ok := r.byName[name]
	if !ok {
		m, ok = r.byRepo[name]
	}
	if !ok {
		supported := "none"
		if len(r.names) > 0 {
			supported = strings.Join(r.names, ", ")
		}
		return ModelSpec{}, protocol.UserErrorf(ErrUnknownModel, "base_model %q is not supported; supported models: %s", name, supported)
	}
	return m, nil
}

func (r *registry) list() protocol.ModelList {
	out := protocol.ModelList{Models: []protocol.Model{}}
	for _, n := range r.names {
		m := r.byName[n]
		out.Models = append(out.Models, protocol.Model{Name: m.Name, ContextLength: m.ContextLength, MemoryBytes: m.MemoryBytes, Prices: m.Prices})
	}
	return out
}
