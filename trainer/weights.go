package trainer

import (
	"fmt"
	"os"
	"strings"

	"github.com/signal-p2p/signal/trainer/half"
	"github.com/signal-p2p/signal/trainer/packed"
	"github.com/signal-p2p/signal/trainer/safetensors"
	"github.com/signal-p2p/signal/trainer/team"
)

// Precision is how a model keeps its frozen base matrices (projections,
// embedding, LM head). Norms, biases, LoRA adapters, their gradients and
// AdamW state are f32 whatever the precision.
type Precision string

const (
	// PrecisionAuto keeps the matrices in their file's type: an F32 file in
	// f32 (with the packed copy on AVX-512), a BF16 or F16 file as it is
	// stored (package half), about 2 bytes a parameter.
	PrecisionAuto Precision = ""
	// PrecisionF32 widens every matrix to f32, whatever the file holds:
	// about 8 bytes a parameter with the packed copy, f32 products.
	PrecisionF32 Precision = "f32"
)

// LoadOptions are LoadModelWith's options.
type LoadOptions struct {
	// Precision; the zero value takes SIGNAL_ENGINE_PRECISION (auto or
	// f32), else PrecisionAuto.
	Precision Precision
}

// precisionFromEnv reads SIGNAL_ENGINE_PRECISION.
func precisionFromEnv() (Precision, error) {
	switch v := strings.ToLower(strings.TrimSpace(os.Getenv("SIGNAL_ENGINE_PRECISION"))); v {
	case "", "auto":
		return PrecisionAuto, nil
	case "f32":
		return PrecisionF32, nil
	default:
		return "", fmt.Errorf("%w: SIGNAL_ENGINE_PRECISION=%q: use auto (keep the file's dtype) or f32", ErrInvalidInput, v)
	}
}

// WeightDType is the type the model keeps its base matrices in: "F32"
// (Embed, LMHead and the layers' matrices are set), or "BF16" / "F16"
// (package half; those f32 fields are nil).
func (m *Model) WeightDType() string {
	if m.half {
		return m.halfType.String()
	}
	return "F32"
}

// ProductPath names how the model's base products run, for reports:
// "f32 (packed avx512)", "f32 (openblas)", "onednn/avx512_bf16", ...
func (m *Model) ProductPath() string {
	if m.half {
		return half.Describe(m.halfType)
	}
	return f32Path(m.lmHead().p != nil)
}

// f32Path names the f32 product path, packed or not.
func f32Path(packed bool) string {
	if packed {
		return "f32 (packed avx512)"
	}
	return "f32 (openblas)"
}

// EngineInfo is how this process's native engine multiplies: the CPU
// features it chose from, and the path for each weight dtype.
type EngineInfo struct {
	half.Engine
	// F32Path is how F32 matrices are multiplied: "f32 (packed avx512)" or
	// "f32 (openblas)".
	F32Path string `json:"f32_path"`
}

// Engine reports this process's product paths.
func Engine() EngineInfo {
	return EngineInfo{Engine: half.Report(), F32Path: f32Path(PackedWeights())}
}

// base is one frozen matrix W [out, in] in the form this model multiplies
// by: f32 row-major (and packed for the forward where the CPU has
// AVX-512), or half (BF16/F16), the only copy.
type base struct {
	out, in int
	f32     []float32
	p       *packed.Weights
	h       *half.Matrix
}

// project is y = x·Wᵀ + beta·y (beta 0 or 1) for x [rows, in]: the half
// product, the packed kernel, or OpenBLAS, shared out on tm.
func project(tm *team.Team, y []float32, ldy int, x []float32, ldx int, w *base, rows int, beta float32) {
	switch {
	case w.h != nil:
		tm.HalfMulT(w.h, y, ldy, x, ldx, rows, beta)
	case w.p != nil:
		tm.Mul(w.p, y, ldy, x, ldx, rows, beta)
	default:
		tm.Gemm(false, true, rows, w.out, w.in, 1, x, ldx, w.f32, w.in, beta, y, ldy)
	}
}

// projectBack is the input gradient dx = dy·W + beta·dx for dy [rows, out].
func projectBack(tm *team.Team, dx []float32, lddx int, dy []float32, lddy int, w *base, rows int, beta float32) {
	if w.h != nil {
		tm.HalfMul(w.h, dx, lddx, dy, lddy, rows, beta)
		return
	}
	tm.Gemm(false, false, rows, w.in, w.out, 1, dy, lddy, w.f32, w.in, beta, dx, lddx)
}

// row widens row i of W into dst [in] (an embedding lookup).
func (w *base) row(dst []float32, i int) {
	if w.h != nil {
		w.h.Rows(dst[:w.in], i, i+1)
		return
	}
	copy(dst[:w.in], w.f32[i*w.in:(i+1)*w.in])
}

// bytes is the memory the matrix holds (f32, packed and half copies).
func (w *base) bytes() int64 {
	var n int64
	if w.f32 != nil {
		n += int64(len(w.f32)) * 4
	}
	if w.p != nil {
		n += w.p.Bytes()
	}
	if w.h != nil {
		n += w.h.Bytes()
	}
	return n
}

func (w *base) free() {
	if w.p != nil {
		w.p.Free()
		w.p = nil
	}
	if w.h != nil {
		w.h.Free()
		w.h = nil
	}
}

// bases lists the model's matrices: the embedding, the LM head when it is
// not the embedding, and each layer's four projections.
func (m *Model) bases() []*base {
	out := []*base{&m.embed}
	if !m.cfg.TieWordEmbeddings {
		out = append(out, &m.head)
	}
	for i := range m.Layers {
		ly := &m.Layers[i]
		out = append(out, &ly.qkv, &ly.o, &ly.gateUp, &ly.down)
	}
	return out
}

// lmHead is the matrix the LM head multiplies by.
func (m *Model) lmHead() *base {
	if m.cfg.TieWordEmbeddings {
		return &m.embed
	}
	return &m.head
}

// bindF32 points the f32 model's bases at its public matrices.
func (m *Model) bindF32() {
	c := m.cfg
	hid, inter, hd := c.HiddenSize, c.IntermediateSize, c.NumAttentionHeads*c.HeadDim
	m.embed = base{out: c.VocabSize, in: hid, f32: m.Embed}
	m.head = base{out: c.VocabSize, in: hid, f32: m.LMHead}
	for i := range m.Layers {
		ly := &m.Layers[i]
		ly.qkv = base{out: c.QKVDim(), in: hid, f32: ly.WQKV}
		ly.o = base{out: hid, in: hd, f32: ly.WO}
		ly.gateUp = base{out: 2 * inter, in: hid, f32: ly.WGateUp}
		ly.down = base{out: hid, in: inter, f32: ly.WDown}
	}
}

// halfDType is the half type a model file's projections are stored in, or
// false for F32 files (q_proj of the first layer decides).
func halfDType(set *safetensors.Set) (half.DType, bool) {
	_, info, ok := set.Lookup("model.layers.0.self_attn.q_proj.weight")
	if !ok {
		return 0, false
	}
	switch info.DType {
	case safetensors.BF16:
		return half.BF16, true
	case safetensors.F16:
		return half.F16, true
	}
	return 0, false
}

// part is one tensor of a (fused) matrix: its name and rows.
type part struct {
	name string
	rows int
}

// loadHalf reads a base matrix [Σ rows, in] into a half matrix of dtype:
// bits copied as stored where the tensor has that dtype, rounded from f32
// otherwise. A fused matrix is its tensors' rows stacked.
func (l *loader) loadHalf(w *base, dtype half.DType, in int, parts ...part) error {
	out := 0
	for _, p := range parts {
		out += p.rows
	}
	h := half.New(out, in, dtype)
	data := h.Data()
	row := 0
	for _, p := range parts {
		name, rows := p.name, p.rows
		f, info, err := l.lookup(name, []int{rows, in})
		if err != nil {
			h.Free()
			return err
		}
		dst := data[row*in : (row+rows)*in]
		raw, _, err := f.Bytes(name)
		if err != nil {
			h.Free()
			return err
		}
		if (info.DType == safetensors.BF16 && dtype == half.BF16) || (info.DType == safetensors.F16 && dtype == half.F16) {
			for i := range dst {
				dst[i] = uint16(raw[2*i]) | uint16(raw[2*i+1])<<8
			}
		} else {
			tmp := make([]float32, len(dst))
			if err := f.ReadFloat32(name, tmp); err != nil {
				h.Free()
				return err
			}
			half.FromFloat32Into(dst, tmp, dtype)
		}
		row += rows
	}
	*w = base{out: out, in: in, h: h}
	l.bytes += h.Bytes()
	return nil
}

// loadHalfWeights loads the base matrices as half (dtype); the norms and
// biases stay f32. The public f32 matrices stay nil.
func (m *Model) loadHalfWeights(dtype half.DType) error {
	c := m.cfg
	hid, inter, hd, kvd := c.HiddenSize, c.IntermediateSize, c.NumAttentionHeads*c.HeadDim, c.NumKeyValueHeads*c.HeadDim
	l := &loader{set: m.weights}
	var err error
	if err = l.loadHalf(&m.embed, dtype, hid, part{"model.embed_tokens.weight", c.VocabSize}); err != nil {
		return err
	}
	if m.Norm, err = l.tensor("model.norm.weight", hid); err != nil {
		return err
	}
	if !c.TieWordEmbeddings {
		if err = l.loadHalf(&m.head, dtype, hid, part{"lm_head.weight", c.VocabSize}); err != nil {
			return err
		}
	}
	m.Layers = make([]Layer, c.NumHiddenLayers)
	for i := range m.Layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		ly := &m.Layers[i]
		if err = l.layerVectors(c, ly, p); err != nil {
			return err
		}
		if err = l.loadHalf(&ly.qkv, dtype, hid, part{p + "self_attn.q_proj.weight", hd},
			part{p + "self_attn.k_proj.weight", kvd}, part{p + "self_attn.v_proj.weight", kvd}); err != nil {
			return err
		}
		if err = l.loadHalf(&ly.o, dtype, hd, part{p + "self_attn.o_proj.weight", hid}); err != nil {
			return err
		}
		if err = l.loadHalf(&ly.gateUp, dtype, hid, part{p + "mlp.gate_proj.weight", inter}, part{p + "mlp.up_proj.weight", inter}); err != nil {
			return err
		}
		if err = l.loadHalf(&ly.down, dtype, inter, part{p + "mlp.down_proj.weight", hid}); err != nil {
			return err
		}
	}
	m.ownBytes = l.bytes
	return nil
}

// layerVectors loads a layer's f32 vectors: its norms, Qwen3's q/k norms
// and Qwen2's q/k/v biases.
func (l *loader) layerVectors(c Config, ly *Layer, p string) error {
	hid, hd, kvd := c.HiddenSize, c.NumAttentionHeads*c.HeadDim, c.NumKeyValueHeads*c.HeadDim
	var err error
	if ly.AttnNorm, err = l.tensor(p+"input_layernorm.weight", hid); err != nil {
		return err
	}
	if ly.MLPNorm, err = l.tensor(p+"post_attention_layernorm.weight", hid); err != nil {
		return err
	}
	if c.QKNorm() {
		if ly.QNorm, err = l.tensor(p+"self_attn.q_norm.weight", c.HeadDim); err != nil {
			return err
		}
		if ly.KNorm, err = l.tensor(p+"self_attn.k_norm.weight", c.HeadDim); err != nil {
			return err
		}
	}
	if c.QKVBias() {
		ly.BQKV = make([]float32, c.QKVDim())
		for _, b := range []struct {
			name   string
			lo, hi int
		}{{"q_proj", 0, hd}, {"k_proj", hd, hd + kvd}, {"v_proj", hd + kvd, hd + 2*kvd}} {
			if err = l.into(ly.BQKV[b.lo:b.hi], p+"self_attn."+b.name+".bias", b.hi-b.lo); err != nil {
				return err
			}
		}
	}
	return nil
}

// EstimateMemory returns the bytes a model directory will hold once loaded
// with o (MemoryBytes after LoadModelWith), from its headers alone, so that
// a node can advertise what each model it serves costs before loading it.
// Adapters, optimizer state and activations come on top, per session.
func EstimateMemory(dir string, o LoadOptions) (int64, error) {
	prec := o.Precision
	if prec == PrecisionAuto {
		var err error
		if prec, err = precisionFromEnv(); err != nil {
			return 0, err
		}
	}
	cfg, err := ReadConfig(dir)
	if err != nil {
		return 0, err
	}
	set, err := safetensors.OpenDir(dir)
	if err != nil {
		return 0, fmt.Errorf("model %s: %w", dir, err)
	}
	defer set.Close()
	_, halfFile := halfDType(set)
	halfHeld := halfFile && prec == PrecisionAuto
	packs := !halfHeld && PackedWeights()
	var n int64
	for name, shape := range expectedTensors(cfg) {
		if name == "lm_head.weight" && cfg.TieWordEmbeddings {
			continue
		}
		elems := int64(1)
		for _, d := range shape {
			elems *= int64(d)
		}
		switch {
		case len(shape) < 2:
			n += 4 * elems
		case halfHeld:
			n += 2 * elems
		default:
			n += 4 * elems
		}
	}
	if packs {
		// The packed copies (packWeights), of the fused matrices, in
		// 32-column panels.
		pad := func(rows, cols int) int64 {
			return 4 * int64((rows+packed.PanelCols-1)/packed.PanelCols*packed.PanelCols) * int64(cols)
		}
		hid, inter, hd := cfg.HiddenSize, cfg.IntermediateSize, cfg.NumAttentionHeads*cfg.HeadDim
		n += pad(cfg.VocabSize, hid)
		n += int64(cfg.NumHiddenLayers) * (pad(cfg.QKVDim(), hid) + pad(hid, hd) + pad(2*inter, hid) + pad(hid, inter))
	}
	return n, nil
}
