package trainer

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

// Module names one linear layer of a decoder block that LoRA can adapt.
type Module int

// The adaptable modules, in PEFT's naming order.
const (
	ModQ Module = iota
	ModK
	ModV
	ModO
	ModGate
	ModUp
	ModDown
	NumModules
)

var moduleNames = [NumModules]string{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

// String returns the PEFT module name, e.g. "q_proj".
func (mod Module) String() string {
	if mod < 0 || mod >= NumModules {
		return fmt.Sprintf("Module(%d)", int(mod))
	}
	return moduleNames[mod]
}

// ParseModule maps a PEFT module name ("q_proj", ...) to a Module.
func ParseModule(name string) (Module, bool) {
	for i, n := range moduleNames {
		if n == name {
			return Module(i), true
		}
	}
	return 0, false
}

// AllModules are the PEFT names of every adaptable module (PEFT's "all-linear"
// for a Llama block), the default target set.
func AllModules() []string { return moduleNames[:] }

// peftPrefix is the module path PEFT writes for a layer's linear: the
// tensor names are prefix + ".lora_A.weight" / ".lora_B.weight".
func peftPrefix(layer int, mod Module) string {
	sub := "self_attn"
	if mod >= ModGate {
		sub = "mlp"
	}
	return fmt.Sprintf("base_model.model.model.layers.%d.%s.%s", layer, sub, mod)
}

// Dims returns a module's (in, out) features under cfg.
func (c Config) Dims(mod Module) (in, out int) {
	hd, kvd := c.NumAttentionHeads*c.HeadDim, c.NumKeyValueHeads*c.HeadDim
	switch mod {
	case ModQ:
		return c.HiddenSize, hd
	case ModK, ModV:
		return c.HiddenSize, kvd
	case ModO:
		return hd, c.HiddenSize
	case ModGate, ModUp:
		return c.HiddenSize, c.IntermediateSize
	default:
		return c.IntermediateSize, c.HiddenSize
	}
}

// LoRAPair is one adapted module's weights: A [Rank, In] and B [Out, Rank],
// row-major as PEFT stores them, so the update is y += s·(x·Aᵀ)·Bᵀ.
type LoRAPair struct {
	A, B    []float32
	In, Out int
}

// LoRA is a set of adapter weights applied without merging:
// y = x·Wᵀ + Scale()·(x·Aᵀ)·Bᵀ. Layers[l][mod] is nil for modules not targeted.
type LoRA struct {
	Rank          int
	Alpha         float32
	TargetModules []string // PEFT names, in Module order
	UseRSLoRA     bool     // scale alpha/sqrt(r) instead of alpha/r
	BaseModel     string   // base_model_name_or_path written to adapter_config.json
	Layers        [][NumModules]*LoRAPair
}

// Scale returns the factor multiplying the low-rank update.
func (l *LoRA) Scale() float32 {
	if l.UseRSLoRA {
		return l.Alpha / float32(math.Sqrt(float64(l.Rank)))
	}
	return l.Alpha / float32(l.Rank)
}

// Targets reports whether the adapter adapts mod (on every layer).
func (l *LoRA) Targets(mod Module) bool {
	return l != nil && len(l.Layers) > 0 && l.Layers[0][mod] != nil
}

// Pairs returns every adapted module's weights in a fixed order (layer, then
// Module), the order in which optimizers and gradient buffers can index them.
func (l *LoRA) Pairs() []*LoRAPair {
	var out []*LoRAPair
	for i := range l.Layers {
		for _, p := range l.Layers[i] {
			if p != nil {
				out = append(out, p)
			}
		}
	}
	return out
}

// NumParams returns the number of adapter parameters.
func (l *LoRA) NumParams() int {
	n := 0
	for _, p := range l.Pairs() {
		n += len(p.A) + len(p.B)
	}
	return n
}

// Clone returns a deep copy.
func (l *LoRA) Clone() *LoRA {
	c := *l
	c.TargetModules = slices.Clone(l.TargetModules)
	c.Layers = make([][NumModules]*LoRAPair, len(l.Layers))
	for i := range l.Layers {
		for j, p := range l.Layers[i] {
			if p != nil {
				c.Layers[i][j] = &LoRAPair{A: slices.Clone(p.A), B: slices.Clone(p.B), In: p.In, Out: p.Out}
			}
		}
	}
	return &c
}

func normaliseTargets(targets []string) ([]string, error) {
	if len(targets) == 0 {
		return AllModules(), nil
	}
	seen := [NumModules]bool{}
	for _, t := range targets {
		if t == "all-linear" {
			return AllModules(), nil
		}
		mod, ok := ParseModule(t)
		if !ok {
			return nil, fmt.Errorf("%w: target module %q (want q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear)", ErrInvalidInput, t)
		}
		seen[mod] = true
	}
	var out []string
	for i, s := range seen {
		if s {
			out = append(out, moduleNames[i])
		}
	}
	return out, nil
}

func newEmptyLoRA(c Config, rank int, alpha float32, targets []string) (*LoRA, error) {
	if rank <= 0 {
		return nil, fmt.Errorf("%w: LoRA rank %d must be positive", ErrInvalidInput, rank)
	}
	if !(alpha > 0) || math.IsInf(float64(alpha), 0) {
		return nil, fmt.Errorf("%w: LoRA alpha %v must be positive and finite", ErrInvalidInput, alpha)
	}
	ts, err := normaliseTargets(targets)
	if err != nil {
		return nil, err
	}
	l := &LoRA{Rank: rank, Alpha: alpha, TargetModules: ts, Layers: make([][NumModules]*LoRAPair, c.NumHiddenLayers)}
	for i := range l.Layers {
		for _, t := range ts {
			mod, _ := ParseModule(t)
			in, out := c.Dims(mod)
			l.Layers[i][mod] = &LoRAPair{A: make([]float32, rank*in), B: make([]float32, out*rank), In: in, Out: out}
		}
	}
	return l, nil
}

// NewLoRA returns a fresh adapter initialised as PEFT does: A from
// kaiming_uniform(a=√5), i.e. U(−1/√in, 1/√in), and B zero, so the adapted
// model's outputs equal the base model's. The same seed gives the same A.
func NewLoRA(m *Model, rank int, alpha float32, targets []string, seed int64) (*LoRA, error) {
	l, err := NewLoRAFromConfig(m.cfg, rank, alpha, targets, seed)
	if err != nil {
		return nil, err
	}
	l.BaseModel = m.BaseModelID()
	return l, nil
}

// NewLoRAFromConfig is NewLoRA for a model known by its config alone: the
// one initializer of a seed's adapter. The PyTorch worker is handed the
// adapter it draws, so a run starts from the same A matrices on every
// engine, whichever node placement picks.
func NewLoRAFromConfig(cfg Config, rank int, alpha float32, targets []string, seed int64) (*LoRA, error) {
	l, err := newEmptyLoRA(cfg, rank, alpha, targets)
	if err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(uint64(seed), 0x5349474e414c)) // "SIGNAL"
	for _, p := range l.Pairs() {
		bound := 1 / math.Sqrt(float64(p.In))
		for i := range p.A {
			p.A[i] = float32((2*rng.Float64() - 1) * bound)
		}
	}
	return l, nil
}

// peftConfig is adapter_config.json; only the fields this engine reads or
// must refuse are listed.
type peftConfig struct {
	PeftType          string          `json:"peft_type"`
	TaskType          string          `json:"task_type,omitempty"`
	R                 int             `json:"r"`
	LoraAlpha         float64         `json:"lora_alpha"`
	LoraDropout       float64         `json:"lora_dropout"`
	TargetModules     json.RawMessage `json:"target_modules"`
	Bias              string          `json:"bias"`
	FanInFanOut       bool            `json:"fan_in_fan_out"`
	UseRSLoRA         bool            `json:"use_rslora"`
	UseDoRA           bool            `json:"use_dora"`
	BaseModel         string          `json:"base_model_name_or_path"`
	InferenceMode     bool            `json:"inference_mode"`
	LayersToTransform json.RawMessage `json:"layers_to_transform,omitempty"`
	RankPattern       map[string]any  `json:"rank_pattern,omitempty"`
	AlphaPattern      map[string]any  `json:"alpha_pattern,omitempty"`
	ModulesToSave     []string        `json:"modules_to_save,omitempty"`
}

// LoadAdapter reads a PEFT LoRA adapter directory (adapter_config.json and
// adapter_model.safetensors) for model m. Features that change the math in
// ways this engine does not implement (DoRA, per-module ranks, biases,
// fan_in_fan_out, partial layers) are refused with ErrUnsupported.
func LoadAdapter(dir string, m *Model) (*LoRA, error) {
	cfgPath := filepath.Join(dir, "adapter_config.json")
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		return nil, fmt.Errorf("load adapter: %w", err)
	}
	var pc peftConfig
	if err := json.Unmarshal(raw, &pc); err != nil {
		return nil, fmt.Errorf("load adapter %s: %w: %v", cfgPath, ErrInvalidInput, err)
	}
	var targets []string
	if len(pc.TargetModules) > 0 {
		if err := json.Unmarshal(pc.TargetModules, &targets); err != nil {
			var one string
			if json.Unmarshal(pc.TargetModules, &one) != nil || one != "all-linear" {
				return nil, fmt.Errorf("load adapter %s: %w: target_modules %s (want a list of module names or \"all-linear\")", cfgPath, ErrUnsupported, pc.TargetModules)
			}
			targets = []string{one}
		}
	}
	switch {
	case pc.PeftType != "LORA":
		return nil, fmt.Errorf("load adapter %s: %w: peft_type %q (want LORA)", cfgPath, ErrUnsupported, pc.PeftType)
	case pc.UseDoRA:
		return nil, fmt.Errorf("load adapter %s: %w: use_dora", cfgPath, ErrUnsupported)
	case pc.FanInFanOut:
		return nil, fmt.Errorf("load adapter %s: %w: fan_in_fan_out", cfgPath, ErrUnsupported)
	case pc.Bias != "" && pc.Bias != "none":
		return nil, fmt.Errorf("load adapter %s: %w: bias %q", cfgPath, ErrUnsupported, pc.Bias)
	case len(pc.RankPattern) > 0 || len(pc.AlphaPattern) > 0:
		return nil, fmt.Errorf("load adapter %s: %w: rank_pattern/alpha_pattern", cfgPath, ErrUnsupported)
	case len(pc.LayersToTransform) > 0 && string(pc.LayersToTransform) != "null":
		return nil, fmt.Errorf("load adapter %s: %w: layers_to_transform", cfgPath, ErrUnsupported)
	case len(pc.ModulesToSave) > 0:
		return nil, fmt.Errorf("load adapter %s: %w: modules_to_save %v", cfgPath, ErrUnsupported, pc.ModulesToSave)
	case len(targets) == 0:
		return nil, fmt.Errorf("load adapter %s: %w: target_modules is empty", cfgPath, ErrInvalidInput)
	}
	l, err := newEmptyLoRA(m.cfg, pc.R, float32(pc.LoraAlpha), targets)
	if err != nil {
		return nil, fmt.Errorf("load adapter %s: %w", cfgPath, err)
	}
	l.UseRSLoRA = pc.UseRSLoRA
	l.BaseModel = pc.BaseModel
	wPath := filepath.Join(dir, "adapter_model.safetensors")
	f, err := safetensors.Open(wPath)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("load adapter %s: %w: adapter_model.safetensors is missing", dir, ErrInvalidInput)
		}
		return nil, fmt.Errorf("load adapter: %w", err)
	}
	defer f.Close()
	used := map[string]bool{}
	read := func(name string, dst []float32, shape ...int) error {
		info, ok := f.Tensors[name]
		if !ok {
			return fmt.Errorf("load adapter %s: %w: tensor %q is missing", wPath, ErrInvalidInput, name)
		}
		if !slices.Equal(info.Shape, shape) {
			return fmt.Errorf("load adapter %s: %w: tensor %q has shape %v, want %v", wPath, ErrInvalidInput, name, info.Shape, shape)
		}
		used[name] = true
		if err := f.ReadFloat32(name, dst); err != nil {
			return fmt.Errorf("load adapter: %w", err)
		}
		for _, v := range dst {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return fmt.Errorf("load adapter %s: %w: tensor %q holds NaN or Inf", wPath, ErrInvalidInput, name)
			}
		}
		return nil
	}
	for i := range l.Layers {
		for mod, p := range l.Layers[i] {
			if p == nil {
				continue
			}
			pre := peftPrefix(i, Module(mod))
			if err := read(pre+".lora_A.weight", p.A, l.Rank, p.In); err != nil {
				return nil, err
			}
			if err := read(pre+".lora_B.weight", p.B, p.Out, l.Rank); err != nil {
				return nil, err
			}
		}
	}
	for _, name := range f.Names() {
		if !used[name] {
			return nil, fmt.Errorf("load adapter %s: %w: unexpected tensor %q (not a LoRA A/B of the target modules)", wPath, ErrUnsupported, name)
		}
	}
	return l, nil
}

// Save writes the adapter as PEFT files into dir (created if needed):
// adapter_config.json and adapter_model.safetensors (F32, PEFT tensor names),
// which Hugging Face PEFT loads unchanged.
func (l *LoRA) Save(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("save adapter: %w", err)
	}
	var tensors []safetensors.Tensor
	for i := range l.Layers {
		for mod, p := range l.Layers[i] {
			if p == nil {
				continue
			}
			pre := peftPrefix(i, Module(mod))
			tensors = append(tensors,
				safetensors.Tensor{Name: pre + ".lora_A.weight", Shape: []int{l.Rank, p.In}, Data: p.A},
				safetensors.Tensor{Name: pre + ".lora_B.weight", Shape: []int{p.Out, l.Rank}, Data: p.B})
		}
	}
	if err := safetensors.WriteFile(filepath.Join(dir, "adapter_model.safetensors"), tensors, map[string]string{"format": "pt"}); err != nil {
		return fmt.Errorf("save adapter: %w", err)
	}
	targets, _ := json.Marshal(l.TargetModules)
	pc := peftConfig{
		PeftType: "LORA", TaskType: "CAUSAL_LM", R: l.Rank, LoraAlpha: float64(l.Alpha),
		TargetModules: targets, Bias: "none", UseRSLoRA: l.UseRSLoRA, BaseModel: l.BaseModel,
	}
	raw, err := json.MarshalIndent(pc, "", "  ")
	if err != nil {
		return fmt.Errorf("save adapter: %w", err)
	}
	tmp := filepath.Join(dir, ".adapter_config.json.tmp")
	if err := os.WriteFile(tmp, append(raw, '\n'), 0o644); err != nil {
		return fmt.Errorf("save adapter: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "adapter_config.json")); err != nil {
		return fmt.Errorf("save adapter: %w", err)
	}
	return nil
}
