package export

import (
	"fmt"
	"strings"

	"github.com/signal-p2p/signal/trainer"
)

// GGUFOptions says how WriteGGUF and WriteAdapterGGUF write a file.
type GGUFOptions struct {
	// DType is the element type of the 2-D weights: F32, F16, BF16 or (for
	// a model, not an adapter) Q8_0. Norms, biases and rope factors stay
	// F32, as llama.cpp's converter writes them; so does its fallback to
	// F16 for a Q8_0 matrix whose rows are not whole 32-value blocks.
	DType DType
	// Name is general.name; empty: the model directory's name.
	Name string
}

// ggufFileType is general.file_type (llama.cpp's LLAMA_FTYPE): what most
// of the tensors are.
var ggufFileType = map[DType]uint32{F32: 0, F16: 1, Q8_0: 7, BF16: 32}

var ggmlOf = map[DType]ggmlType{F32: ggmlF32, F16: ggmlF16, BF16: ggmlBF16, Q8_0: ggmlQ8_0}

// ggufArch is general.architecture for a family: llama.cpp runs Mistral
// (within its window, which is all Signal serves) as "llama".
func ggufArch(c trainer.Config) (string, error) {
	switch f := c.Family(); f {
	case "llama", "mistral":
		return "llama", nil
	case "qwen2", "qwen3":
		return f, nil
	default:
		return "", fmt.Errorf("%w: no GGUF architecture for model family %q", trainer.ErrUnsupported, f)
	}
}

// permutesQK reports whether q and k rows must be reordered for llama.cpp:
// its "llama" architecture rotates adjacent pairs (2i, 2i+1) where Hugging
// Face rotates halves (i, i+D/2), so its converter interleaves each head's
// two halves. qwen2 and qwen3 use the halves layout (NEOX) as Hugging Face
// does.
func permutesQK(arch string) bool { return arch == "llama" }

// permuteRows returns w (rows of cols values, heads·D rows) with each
// head's rows reordered from halves to interleaved: new row 2j+h of a head
// is old row h·D/2+j, as convert_hf_to_gguf.py's LlamaModel.permute does.
func permuteRows(w []float32, heads, cols int) []float32 {
	rows := len(w) / cols
	d := rows / heads
	out := make([]float32, len(w))
	for hd := 0; hd < heads; hd++ {
		for j := 0; j < d/2; j++ {
			for h := 0; h < 2; h++ {
				src := (hd*d + h*d/2 + j) * cols
				dst := (hd*d + 2*j + h) * cols
				copy(out[dst:dst+cols], w[src:src+cols])
			}
		}
	}
	return out
}

// blockNames are llama.cpp's names for a layer's adaptable projections.
var blockNames = [trainer.NumModules]string{
	trainer.ModQ: "attn_q", trainer.ModK: "attn_k", trainer.ModV: "attn_v", trainer.ModO: "attn_output",
	trainer.ModGate: "ffn_gate", trainer.ModUp: "ffn_up", trainer.ModDown: "ffn_down",
}

// projection returns layer i's weight for mod, [out, in] row-major, as a
// view of the model's fused weights (see trainer's weight layout).
func projection(m *trainer.Model, i int, mod trainer.Module) []float32 {
	c := m.Config()
	hid, inter := c.HiddenSize, c.IntermediateSize
	hd, kvd := c.NumAttentionHeads*c.HeadDim, c.NumKeyValueHeads*c.HeadDim
	ly := &m.Layers[i]
	switch mod {
	case trainer.ModQ:
		return ly.WQKV[:hd*hid]
	case trainer.ModK:
		return ly.WQKV[hd*hid : (hd+kvd)*hid]
	case trainer.ModV:
		return ly.WQKV[(hd+kvd)*hid:]
	case trainer.ModO:
		return ly.WO
	case trainer.ModGate:
		return ly.WGateUp[:inter*hid]
	case trainer.ModUp:
		return ly.WGateUp[inter*hid:]
	default:
		return ly.WDown
	}
}

// qkHeads returns the head count whose rows permuteRows groups for mod
// (q: attention heads, k: key/value heads), or 0 when mod is not permuted.
func qkHeads(c trainer.Config, arch string, mod trainer.Module) int {
	if !permutesQK(arch) {
		return 0
	}
	switch mod {
	case trainer.ModQ:
		return c.NumAttentionHeads
	case trainer.ModK:
		return c.NumKeyValueHeads
	}
	return 0
}

func view(v []float32) func() ([]float32, error) {
	return func() ([]float32, error) { return v, nil }
}

// WriteGGUF writes model m (a base model, or a merged one: see Merge) as a
// llama.cpp GGUF file at path: the architecture's metadata, the tokenizer
// from m's directory (tokenizer.json, tokenizer_config.json) and every
// weight under llama.cpp's names, as convert_hf_to_gguf.py writes them.
func WriteGGUF(m *trainer.Model, path string, o GGUFOptions) error {
	if dt := m.WeightDType(); dt != "F32" {
		return fmt.Errorf("export gguf: %w: the model holds its weights as %s; load it with trainer.PrecisionF32 (widening is exact)", trainer.ErrInvalidInput, dt)
	}
	c := m.Config()
	arch, err := ggufArch(c)
	if err != nil {
		return fmt.Errorf("export gguf: %w", err)
	}
	wt, ok := ggmlOf[o.DType]
	if !ok {
		return fmt.Errorf("export gguf: %w: dtype %q (want f32, f16, bf16 or q8_0)", trainer.ErrInvalidInput, o.DType)
	}
	g := &ggufFile{}
	g.set("general.architecture", arch)
	g.set("general.type", "model")
	g.set("general.name", modelName(m, o))
	g.set("general.file_type", ggufFileType[o.DType])
	g.set("general.quantization_version", uint32(2))
	g.set(arch+".vocab_size", uint32(c.VocabSize))
	g.set(arch+".context_length", uint32(c.MaxPositionEmbeddings))
	g.set(arch+".embedding_length", uint32(c.HiddenSize))
	g.set(arch+".block_count", uint32(c.NumHiddenLayers))
	g.set(arch+".feed_forward_length", uint32(c.IntermediateSize))
	g.set(arch+".attention.head_count", uint32(c.NumAttentionHeads))
	g.set(arch+".attention.head_count_kv", uint32(c.NumKeyValueHeads))
	g.set(arch+".attention.key_length", uint32(c.HeadDim))
	g.set(arch+".attention.value_length", uint32(c.HeadDim))
	g.set(arch+".rope.dimension_count", uint32(c.HeadDim))
	g.set(arch+".rope.freq_base", float32(c.RopeTheta))
	g.set(arch+".attention.layer_norm_rms_epsilon", float32(c.RMSNormEps))
	if err := addVocab(g, m); err != nil {
		return fmt.Errorf("export gguf: %w", err)
	}

	hid, inter, V := c.HiddenSize, c.IntermediateSize, c.VocabSize
	hd, kvd := c.NumAttentionHeads*c.HeadDim, c.NumKeyValueHeads*c.HeadDim
	// matrix is a 2-D weight's type: wt, except that Q8_0 needs rows of
	// whole 32-value blocks and, like llama.cpp's converter, a matrix with
	// shorter rows falls back to F16 (signal-tiny's down_proj, 344 wide).
	matrix := func(in int) ggmlType {
		if wt == ggmlQ8_0 && in%q8Block != 0 {
			return ggmlF16
		}
		return wt
	}
	g.addTensor("token_embd.weight", matrix(hid), view(m.Embed), V, hid)
	if f := ropeFactors(c); f != nil {
		g.addTensor("rope_freqs.weight", ggmlF32, view(f), len(f))
	}
	for i := range m.Layers {
		ly := &m.Layers[i]
		p := fmt.Sprintf("blk.%d.", i)
		g.addTensor(p+"attn_norm.weight", ggmlF32, view(ly.AttnNorm), hid)
		for _, mod := range []trainer.Module{trainer.ModQ, trainer.ModK, trainer.ModV} {
			w := projection(m, i, mod)
			data := view(w)
			if heads := qkHeads(c, arch, mod); heads > 0 {
				data = func() ([]float32, error) { return permuteRows(w, heads, hid), nil }
			}
			in, out := c.Dims(mod)
			g.addTensor(p+blockNames[mod]+".weight", matrix(in), data, out, in)
		}
		if ly.BQKV != nil {
			g.addTensor(p+"attn_q.bias", ggmlF32, view(ly.BQKV[:hd]), hd)
			g.addTensor(p+"attn_k.bias", ggmlF32, view(ly.BQKV[hd:hd+kvd]), kvd)
			g.addTensor(p+"attn_v.bias", ggmlF32, view(ly.BQKV[hd+kvd:]), kvd)
		}
		if ly.QNorm != nil {
			g.addTensor(p+"attn_q_norm.weight", ggmlF32, view(ly.QNorm), c.HeadDim)
			g.addTensor(p+"attn_k_norm.weight", ggmlF32, view(ly.KNorm), c.HeadDim)
		}
		g.addTensor(p+"attn_output.weight", matrix(hd), view(ly.WO), hid, hd)
		g.addTensor(p+"ffn_norm.weight", ggmlF32, view(ly.MLPNorm), hid)
		g.addTensor(p+"ffn_gate.weight", matrix(hid), view(projection(m, i, trainer.ModGate)), inter, hid)
		g.addTensor(p+"ffn_up.weight", matrix(hid), view(projection(m, i, trainer.ModUp)), inter, hid)
		g.addTensor(p+"ffn_down.weight", matrix(inter), view(ly.WDown), hid, inter)
	}
	g.addTensor("output_norm.weight", ggmlF32, view(m.Norm), hid)
	if !c.TieWordEmbeddings {
		// Without output.weight llama.cpp uses token_embd, as tied models do.
		g.addTensor("output.weight", matrix(hid), view(m.LMHead), V, hid)
	}
	return g.writeFile(path)
}

// ropeFactors returns llama.cpp's rope_freqs for llama3 rope scaling: per
// frequency, the factor its rope divides the unscaled frequency by. They
// are taken from the engine's own scaled frequencies (Config.InvFreq), so
// llama.cpp rotates by the angles Signal does. nil without scaling.
func ropeFactors(c trainer.Config) []float32 {
	if c.RopeScaling == nil || c.RopeScaling.Kind() != "llama3" {
		return nil
	}
	scaled := c.InvFreq()
	plain := c
	plain.RopeScaling = nil
	unscaled := plain.InvFreq()
	f := make([]float32, len(scaled))
	for i := range f {
		f[i] = float32(float64(unscaled[i]) / float64(scaled[i]))
	}
	return f
}

func modelName(m *trainer.Model, o GGUFOptions) string {
	if o.Name != "" {
		return o.Name
	}
	return m.BaseModelID()
}

// WriteAdapterGGUF writes adapter l of model m as a llama.cpp LoRA adapter
// GGUF at path (general.type "adapter", adapter.type "lora"): for each
// adapted projection, NAME.weight.lora_a [in, r] and NAME.weight.lora_b
// [r, out] in ggml's order, as convert_lora_to_gguf.py writes them, with
// B's rows permuted as the base's q and k rows are. llama.cpp scales the
// update by adapter.lora.alpha / r; an rsLoRA adapter (alpha/√r) is written
// with alpha·√r so the product is the same.
func WriteAdapterGGUF(m *trainer.Model, l *trainer.LoRA, path string, o GGUFOptions) error {
	c := m.Config()
	arch, err := ggufArch(c)
	if err != nil {
		return fmt.Errorf("export adapter gguf: %w", err)
	}
	wt, ok := ggmlOf[o.DType]
	if !ok || wt == ggmlQ8_0 {
		return fmt.Errorf("export adapter gguf: %w: dtype %q (want f32, f16 or bf16)", trainer.ErrInvalidInput, o.DType)
	}
	if len(l.Layers) != c.NumHiddenLayers {
		return fmt.Errorf("export adapter gguf: %w: adapter has %d layers, model %d", trainer.ErrInvalidInput, len(l.Layers), c.NumHiddenLayers)
	}
	g := &ggufFile{}
	g.set("general.architecture", arch)
	g.set("general.type", "adapter")
	name := o.Name
	if name == "" {
		name = m.BaseModelID() + "-lora"
	}
	g.set("general.name", name)
	g.set("general.file_type", ggufFileType[o.DType])
	g.set("adapter.type", "lora")
	g.set("adapter.lora.alpha", l.Scale()*float32(l.Rank))
	for i := range l.Layers {
		for mod, p := range l.Layers[i] {
			if p == nil {
				continue
			}
			mod := trainer.Module(mod)
			if in, out := c.Dims(mod); p.In != in || p.Out != out {
				return fmt.Errorf("export adapter gguf: %w: layer %d %s is [%d, %d], model's is [%d, %d]", trainer.ErrInvalidInput, i, mod, p.Out, p.In, out, in)
			}
			name := fmt.Sprintf("blk.%d.%s.weight", i, blockNames[mod])
			b := view(p.B)
			if heads := qkHeads(c, arch, mod); heads > 0 {
				b = func() ([]float32, error) { return permuteRows(p.B, heads, l.Rank), nil }
			}
			g.addTensor(name+".lora_a", wt, view(p.A), l.Rank, p.In)
			g.addTensor(name+".lora_b", wt, b, p.Out, l.Rank)
		}
	}
	return g.writeFile(path)
}

// DType is an output precision of the exports.
type DType string

// The precisions. Q8_0 is GGUF only (ggml's 8-bit blocks, byte for byte
// what llama.cpp's converter writes).
const (
	F32  DType = "f32"
	F16  DType = "f16"
	BF16 DType = "bf16"
	Q8_0 DType = "q8_0"
)

// ParseDType reads a --dtype value.
func ParseDType(s string) (DType, error) {
	d := DType(strings.ToLower(s))
	switch d {
	case F32, F16, BF16, Q8_0:
		return d, nil
	case "float32":
		return F32, nil
	case "float16":
		return F16, nil
	case "bfloat16":
		return BF16, nil
	}
	return "", fmt.Errorf("%w: dtype %q (want f32, f16, bf16 or q8_0)", trainer.ErrInvalidInput, s)
}
