// Package trainer is Signal's native training and inference engine for
// Llama-family models: loading, the forward pass, LoRA, sampling (this half),
// and backward, losses, AdamW and sessions (the training half).
//
// # Weight layout
//
// LoadModel keeps Hugging Face's [out_features, in_features] row-major
// orientation. A BF16 or F16 file's matrices stay in that dtype, one copy
// (package half, weights.go); with PrecisionF32, or from an F32 file, every
// tensor is f32 and the exported fields below hold it. Either way a
// projection is
// y = x·Wᵀ (blas.Sgemm with transB) and its input gradient dx = dy·W needs
// no transpose. Projections that read the same input are fused by stacking
// their rows:
//
//	Embed    [vocab, hidden]
//	per layer (Layer):
//	  AttnNorm [hidden]
//	  WQKV     [(H + 2·KV)·D, hidden]  rows: q_proj (H·D), k_proj (KV·D), v_proj (KV·D)
//	  WO       [hidden, H·D]
//	  MLPNorm  [hidden]
//	  WGateUp  [2·I, hidden]           rows: gate_proj (I), up_proj (I)
//	  WDown    [hidden, I]
//	Norm     [hidden]
//	LMHead   [vocab, hidden]           the same slice as Embed when tied
//
// with H heads, KV key/value heads, D = head_dim, I = intermediate_size.
// Activations are packed: every sequence of a call is a block of rows of one
// [tokens, width] matrix (no padding), and a pass records where each starts.
// The fused q,k,v output row of a token is [q heads | k heads | v heads],
// each head D wide; attention reads heads in place with a leading dimension
// of QKVDim.
//
// On CPUs with AVX-512F, LoadModel also packs WQKV, WO, WGateUp, WDown and
// LMHead into 32-column panels (package packed) for every forward product
// (there is one forward: inference and training alike); the row-major
// copies stay for the backward's dx = dy·W and for other CPUs
// (PackedWeights).
//
// LoRA adapters (LoRA) are never merged into these weights: the base is
// read-only after LoadModel and shared by every session.
package trainer

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"

	"github.com/signal-p2p/signal/trainer/half"
	"github.com/signal-p2p/signal/trainer/packed"
	"github.com/signal-p2p/signal/trainer/safetensors"
	"github.com/signal-p2p/signal/trainer/team"
)

// Layer holds one decoder block's weights in the fused layout above.
type Layer struct {
	AttnNorm []float32 // [hidden]
	WQKV     []float32 // [(H+2·KV)·D, hidden]
	BQKV     []float32 // [(H+2·KV)·D] q, k, v biases (Qwen2); nil without
	QNorm    []float32 // [D] per-head RMSNorm of q before RoPE (Qwen3); nil without
	KNorm    []float32 // [D] the same for k
	WO       []float32 // [hidden, H·D]
	MLPNorm  []float32 // [hidden]
	WGateUp  []float32 // [2·I, hidden]
	WDown    []float32 // [hidden, I]

	// The four projections as the engine multiplies by them (weights.go):
	// the f32 matrices above (and their packed copies), or half matrices
	// when the model keeps its file's BF16/F16 (the f32 fields are nil then).
	qkv, o, gateUp, down base
}

// Model is a loaded base model. It is read-only after LoadModel and safe for
// concurrent use by many sessions.
type Model struct {
	cfg     Config
	dir     string
	Embed   []float32 // [vocab, hidden]
	Layers  []Layer
	Norm    []float32 // [hidden]
	LMHead  []float32 // [vocab, hidden]; aliases Embed when tied
	InvFreq []float32 // [D/2] rotary inverse frequencies (llama3 scaling applied)
	// embed and head are Embed and LMHead as the engine multiplies by them
	// (head unused when tied), like Layer's projections.
	embed, head base
	// halfType is the base matrices' type when the model keeps them half
	// (half true); Embed, LMHead and the layers' matrices are nil then.
	halfType half.DType
	half     bool

	weights  *safetensors.Set // kept open while views alias its mapping
	mapped   bool             // some weights are views of the mapping
	ownBytes int64
	tok      tokenizerHandle
	arenas   arenaPool
	// team runs the parallel work of every pass (package team); nil with
	// one CPU.
	team *team.Team
}

// Config returns the model's configuration.
func (m *Model) Config() Config { return m.cfg }

// Dir returns the directory the model was loaded from.
func (m *Model) Dir() string { return m.dir }

// MemoryBytes returns the bytes of weights the model holds (heap copies plus
// mapped F32 tensors used in place).
func (m *Model) MemoryBytes() int64 { return m.ownBytes }

// Close stops the model's team and releases the packed weights and the
// mapped weight files. The model must not be used after.
func (m *Model) Close() error {
	if m.team != nil {
		m.team.Close()
		m.team = nil
	}
	m.freeBases()
	if m.weights == nil {
		return nil
	}
	err := m.weights.Close()
	m.weights = nil
	return err
}

// LoadModel loads a Hugging Face Llama directory: config.json, the weights
// (model.safetensors or a sharded index; F32, BF16 or F16) and, when present,
// tokenizer.json. A missing tensor or a wrong shape is an error naming the
// file and the tensor. The model starts GOMAXPROCS−1 helper threads for its
// passes (startTeam); Close stops them. The base matrices keep the file's
// dtype unless SIGNAL_ENGINE_PRECISION says f32 (see Precision).
func LoadModel(dir string) (*Model, error) { return LoadModelWith(dir, LoadOptions{}) }

// LoadModelWith is LoadModel with options.
func LoadModelWith(dir string, o LoadOptions) (*Model, error) {
	prec := o.Precision
	if prec == PrecisionAuto {
		var err error
		if prec, err = precisionFromEnv(); err != nil {
			return nil, err
		}
	}
	cfg, err := ReadConfig(dir)
	if err != nil {
		return nil, err
	}
	set, err := safetensors.OpenDir(dir)
	if err != nil {
		return nil, fmt.Errorf("load model %s: %w", dir, err)
	}
	// The one model check (CheckModelDir) on the headers just opened.
	if err := checkWeights(dir, cfg, set); err != nil {
		set.Close()
		return nil, err
	}
	m := &Model{cfg: cfg, dir: dir, weights: set, InvFreq: cfg.InvFreq()}
	if dt, ok := halfDType(set); ok && prec == PrecisionAuto {
		if err := m.loadHalfWeights(dt); err != nil {
			m.freeBases()
			set.Close()
			return nil, fmt.Errorf("load model %s: %w", dir, err)
		}
		m.halfType, m.half = dt, true
	} else {
		if err := m.loadWeights(); err != nil {
			set.Close()
			return nil, fmt.Errorf("load model %s: %w", dir, err)
		}
		m.bindF32()
		if PackedWeights() {
			m.packWeights()
		}
	}
	if !m.mapped {
		// Everything was converted into heap copies: the mapping can go.
		set.Close()
		m.weights = nil
	}
	if err := m.loadTokenizer(); err != nil {
		m.Close()
		return nil, fmt.Errorf("load model %s: %w", dir, err)
	}
	if err := m.startTeam(); err != nil {
		m.Close()
		return nil, fmt.Errorf("load model %s: %w", dir, err)
	}
	return m, nil
}

type loader struct {
	set   *safetensors.Set
	views int
	bytes int64
}

// tensor returns name as f32 with the given shape: a view of the mapping
// when the file stores F32, otherwise a converted copy.
func (l *loader) tensor(name string, shape ...int) ([]float32, error) {
	f, info, err := l.lookup(name, shape)
	if err != nil {
		return nil, err
	}
	l.bytes += int64(info.NumElements()) * 4
	if v, ok := f.View(name); ok {
		l.views++
		return v, nil
	}
	dst := make([]float32, info.NumElements())
	return dst, f.ReadFloat32(name, dst)
}

// into converts name (of the given shape) into dst, a block of a fused matrix.
func (l *loader) into(dst []float32, name string, shape ...int) error {
	f, _, err := l.lookup(name, shape)
	if err != nil {
		return err
	}
	return f.ReadFloat32(name, dst)
}

func (l *loader) lookup(name string, shape []int) (*safetensors.File, safetensors.TensorInfo, error) {
	f, info, ok := l.set.Lookup(name)
	if !ok {
		return nil, info, fmt.Errorf("%w: tensor %q is missing from the weights", ErrInvalidInput, name)
	}
	if !slices.Equal(info.Shape, shape) {
		return nil, info, fmt.Errorf("%w: %s: tensor %q has shape %v, config.json implies %v", ErrInvalidInput, f.Path, name, info.Shape, shape)
	}
	switch info.DType {
	case safetensors.F32, safetensors.BF16, safetensors.F16:
	default:
		return nil, info, fmt.Errorf("%w: %s: tensor %q has dtype %s (want F32, BF16 or F16)", ErrUnsupported, f.Path, name, info.DType)
	}
	return f, info, nil
}

func (m *Model) loadWeights() error {
	c := m.cfg
	hid, inter, hd, kvd := c.HiddenSize, c.IntermediateSize, c.NumAttentionHeads*c.HeadDim, c.NumKeyValueHeads*c.HeadDim
	l := &loader{set: m.weights}
	var err error
	if m.Embed, err = l.tensor("model.embed_tokens.weight", c.VocabSize, hid); err != nil {
		return err
	}
	if m.Norm, err = l.tensor("model.norm.weight", hid); err != nil {
		return err
	}
	if c.TieWordEmbeddings {
		m.LMHead = m.Embed
		// Some exports keep a copy of lm_head; tied models ignore it
		// (CheckModelDir allows it).
	} else if m.LMHead, err = l.tensor("lm_head.weight", c.VocabSize, hid); err != nil {
		return err
	}
	m.Layers = make([]Layer, c.NumHiddenLayers)
	for i := range m.Layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		ly := &m.Layers[i]
		if err = l.layerVectors(c, ly, p); err != nil {
			return err
		}
		if ly.WO, err = l.tensor(p+"self_attn.o_proj.weight", hid, hd); err != nil {
			return err
		}
		if ly.WDown, err = l.tensor(p+"mlp.down_proj.weight", hid, inter); err != nil {
			return err
		}
		ly.WQKV = make([]float32, c.QKVDim()*hid)
		if err = l.into(ly.WQKV[:hd*hid], p+"self_attn.q_proj.weight", hd, hid); err != nil {
			return err
		}
		if err = l.into(ly.WQKV[hd*hid:(hd+kvd)*hid], p+"self_attn.k_proj.weight", kvd, hid); err != nil {
			return err
		}
		if err = l.into(ly.WQKV[(hd+kvd)*hid:], p+"self_attn.v_proj.weight", kvd, hid); err != nil {
			return err
		}
		ly.WGateUp = make([]float32, 2*inter*hid)
		if err = l.into(ly.WGateUp[:inter*hid], p+"mlp.gate_proj.weight", inter, hid); err != nil {
			return err
		}
		if err = l.into(ly.WGateUp[inter*hid:], p+"mlp.up_proj.weight", inter, hid); err != nil {
			return err
		}
		l.bytes += int64(len(ly.WQKV)+len(ly.WGateUp)) * 4
	}
	m.ownBytes = l.bytes
	m.mapped = l.views > 0
	return nil
}

// PackedWeights reports whether LoadModel packs the projection weights for
// the forward: on CPUs with AVX-512F, unless SIGNAL_ENGINE_PACKED is 0,
// false or off.
func PackedWeights() bool {
	switch strings.ToLower(os.Getenv("SIGNAL_ENGINE_PACKED")) {
	case "0", "false", "off", "no":
		return false
	}
	return packed.Available()
}

// startTeam starts the team that shares every pass's parallel work with
// its caller: GOMAXPROCS−1 helper threads (none with one CPU, where every
// task runs on the caller).
func (m *Model) startTeam() error {
	n := runtime.GOMAXPROCS(0)
	if n < 2 {
		return nil
	}
	t, err := team.New(n - 1)
	if err != nil {
		return err
	}
	m.team = t
	return nil
}

// packWeights gives every projection the forward runs (and the LM head) a
// packed copy (package packed), the layers on parallel goroutines. The
// row-major weights stay: the backward's dx = dy·W reads them with OpenBLAS, as do
// CPUs without AVX-512F. The copy costs the projections' size again in
// memory (about 0.54 GB on the 135M shape) and buys 20–30 % on every
// forward product: OpenBLAS re-packs W on each call, from memory.
func (m *Model) packWeights() {
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				if i == len(m.Layers) {
					h := m.lmHead()
					h.p = packed.Pack(h.f32, h.out, h.in)
					continue
				}
				ly := &m.Layers[i]
				for _, w := range []*base{&ly.qkv, &ly.o, &ly.gateUp, &ly.down} {
					w.p = packed.Pack(w.f32, w.out, w.in)
				}
			}
		}()
	}
	for i := 0; i <= len(m.Layers); i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	m.ownBytes += m.lmHead().p.Bytes()
	for i := range m.Layers {
		ly := &m.Layers[i]
		m.ownBytes += ly.qkv.p.Bytes() + ly.o.p.Bytes() + ly.gateUp.p.Bytes() + ly.down.p.Bytes()
	}
}

// freeBases releases the packed and half matrices (memory outside Go's
// heap, which the garbage collector would otherwise free only when it next
// runs).
func (m *Model) freeBases() {
	for _, w := range m.bases() {
		w.free()
	}
}
