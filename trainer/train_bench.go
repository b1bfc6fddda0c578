package trainer

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/half"
	"github.com/signal-p2p/signal/trainer/team"
)

// SmolLM135MConfig is the SmolLM-135M-like shape the benchmarks use: hidden
// 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied.
func SmolLM135MConfig() Config {
	return Config{
		Architectures: []string{"LlamaForCausalLM"}, ModelType: "llama",
		HiddenSize: 576, IntermediateSize: 1536, NumHiddenLayers: 30, NumAttentionHeads: 9,
		NumKeyValueHeads: 3, HeadDim: 64, VocabSize: 49152, MaxPositionEmbeddings: 2048,
		RMSNormEps: 1e-5, RopeTheta: 10000, HiddenAct: "silu", TieWordEmbeddings: true,
	}
}

// Qwen3_06BConfig is the Qwen3-0.6B shape the benchmarks use beside the
// 135M one: 28 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 128
// (not hidden/heads), intermediate 3072, vocab 151936, tied head, q/k norms.
func Qwen3_06BConfig() Config {
	off := false
	return Config{
		Architectures: []string{"Qwen3ForCausalLM"}, ModelType: "qwen3",
		HiddenSize: 1024, IntermediateSize: 3072, NumHiddenLayers: 28, NumAttentionHeads: 16,
		NumKeyValueHeads: 8, HeadDim: 128, VocabSize: 151936, MaxPositionEmbeddings: 40960,
		RMSNormEps: 1e-6, RopeTheta: 1000000, HiddenAct: "silu", TieWordEmbeddings: true, UseSlidingWindow: &off,
	}
}

// Llama32Config is a Llama-3.2 shape: the 1B (hidden 2048, 16 layers, 32
// heads, head_dim 64) or the 3B (hidden 3072, 28 layers, 24 heads, head_dim
// 128); both 8 KV heads, intermediate 8192, vocabulary 128256, tied head,
// llama3 rope scaling.
func Llama32Config(hidden, layers, heads int) Config {
	return Config{
		Architectures: []string{"LlamaForCausalLM"}, ModelType: "llama",
		HiddenSize: hidden, IntermediateSize: 8192, NumHiddenLayers: layers, NumAttentionHeads: heads,
		NumKeyValueHeads: 8, HeadDim: hidden / heads, VocabSize: 128256, MaxPositionEmbeddings: 131072,
		RMSNormEps: 1e-5, RopeTheta: 500000, HiddenAct: "silu", TieWordEmbeddings: true,
		RopeScaling: &RopeScaling{RopeType: "llama3", Factor: 32, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 8192},
	}
}

// BenchShapes are the random model shapes `signal model bench`,
// `bench-infer` and `gen-random` take by name.
var BenchShapes = map[string]func() Config{
	"smollm-135m":  SmolLM135MConfig,
	"qwen3-0.6b":   Qwen3_06BConfig,
	"llama-3.2-1b": func() Config { return Llama32Config(2048, 16, 32) },
	"llama-3.2-3b": func() Config { return Llama32Config(3072, 28, 24) },
}

// RandomModel builds a model of shape cfg in memory with random weights
// (normal, std 0.02; norms 1), for benchmarks that need no files, in f32.
// Close stops its team.
func RandomModel(cfg Config, seed uint64) (*Model, error) { return RandomModelAs(cfg, seed, "F32") }

// RandomModelAs is RandomModel with the base matrices held as dtype ("F32",
// "BF16" or "F16"), as LoadModel holds a file of that dtype: the random f32
// values are rounded once, a matrix at a time.
func RandomModelAs(cfg Config, seed uint64, dtype string) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	fill := func(n int) []float32 { return randomWeights(rng, n) }
	H, I := cfg.HiddenSize, cfg.IntermediateSize
	AD := cfg.NumAttentionHeads * cfg.HeadDim
	m := &Model{cfg: cfg, dir: "random", InvFreq: cfg.InvFreq()}
	switch strings.ToUpper(dtype) {
	case "F32":
	case "BF16", "F16":
		hd := half.BF16
		if strings.ToUpper(dtype) == "F16" {
			hd = half.F16
		}
		m.randomHalf(fill, hd)
		if err := m.startTeam(); err != nil {
			m.Close()
			return nil, err
		}
		return m, nil
	default:
		return nil, fmt.Errorf("%w: dtype %q (want F32, BF16 or F16)", ErrInvalidInput, dtype)
	}
	m.Embed = fill(cfg.VocabSize * H)
	m.LMHead = m.Embed
	if !cfg.TieWordEmbeddings {
		m.LMHead = fill(cfg.VocabSize * H)
	}
	m.Norm = ones(H)
	m.Layers = make([]Layer, cfg.NumHiddenLayers)
	n := int64(len(m.Embed) + H)
	for i := range m.Layers {
		m.Layers[i] = Layer{AttnNorm: ones(H), WQKV: fill(cfg.QKVDim() * H), WO: fill(H * AD),
			MLPNorm: ones(H), WGateUp: fill(2 * I * H), WDown: fill(H * I)}
		if cfg.QKNorm() {
			m.Layers[i].QNorm, m.Layers[i].KNorm = ones(cfg.HeadDim), ones(cfg.HeadDim)
		}
		if cfg.QKVBias() {
			m.Layers[i].BQKV = fill(cfg.QKVDim())
		}
		n += int64(2*H + cfg.QKVDim()*H + H*AD + 3*I*H)
	}
	m.ownBytes = n * 4
	m.bindF32()
	if PackedWeights() {
		m.packWeights() // as LoadModel does, so that benchmarks run the engine's kernels
	}
	if err := m.startTeam(); err != nil {
		return nil, err
	}
	return m, nil
}

// randomHalf fills m's matrices with fill's values rounded to dtype, one
// matrix at a time, and its vectors as RandomModel does.
func (m *Model) randomHalf(fill func(int) []float32, dtype half.DType) {
	cfg := m.cfg
	H, I, AD := cfg.HiddenSize, cfg.IntermediateSize, cfg.NumAttentionHeads*cfg.HeadDim
	mk := func(out, in int) base {
		return base{out: out, in: in, h: half.FromFloat32(fill(out*in), out, in, dtype)}
	}
	m.half, m.halfType = true, dtype
	m.embed = mk(cfg.VocabSize, H)
	if !cfg.TieWordEmbeddings {
		m.head = mk(cfg.VocabSize, H)
	}
	m.Norm = ones(H)
	m.Layers = make([]Layer, cfg.NumHiddenLayers)
	vectors := int64(H)
	for i := range m.Layers {
		ly := &m.Layers[i]
		ly.AttnNorm, ly.MLPNorm = ones(H), ones(H)
		ly.qkv, ly.o, ly.gateUp, ly.down = mk(cfg.QKVDim(), H), mk(H, AD), mk(2*I, H), mk(H, I)
		vectors += int64(2 * H)
		if cfg.QKNorm() {
			ly.QNorm, ly.KNorm = ones(cfg.HeadDim), ones(cfg.HeadDim)
			vectors += int64(2 * cfg.HeadDim)
		}
		if cfg.QKVBias() {
			ly.BQKV = fill(cfg.QKVDim())
			vectors += int64(cfg.QKVDim())
		}
	}
	m.ownBytes = vectors * 4
	for _, w := range m.bases() {
		m.ownBytes += w.bytes()
	}
}

// TrainBenchResult is one training benchmark's figures.
type TrainBenchResult struct {
	Batch, Seq, Rank int
	TokensPerSec     float64
	StepSeconds      []float64 // each timed step (forward_backward + optim_step)
	GFLOPPerStep     float64   // model FLOPs of a step (see trainStepFLOPs)
	GFLOPS           float64   // GFLOPPerStep / median step time
	PeakRSSBytes     int64     // the process's peak resident set after the steps
	ArenaBytes       int64     // the activation arena of one call
}

// trainStepFLOPs counts the useful FLOPs of one LoRA training step on
// tokens = batch×seq: the frozen projections and LM head run forward and
// once more for the input gradient (no weight gradient), i.e. 2 × 2·params·
// tokens; causal attention's q·kᵀ and p·v forward (2·2·seq/2·heads·d per
// token) and twice that backward; LoRA's rank-r products are left out.
func trainStepFLOPs(c Config, batch, seq int) float64 {
	H, I, AD := float64(c.HiddenSize), float64(c.IntermediateSize), float64(c.NumAttentionHeads*c.HeadDim)
	perTokLinear := float64(c.NumHiddenLayers)*(H*float64(c.QKVDim())+AD*H+3*H*I) + H*float64(c.VocabSize)
	tokens := float64(batch * seq)
	linear := 2 * 2 * perTokLinear * tokens
	attn := 3 * 2 * 2 * float64(seq) / 2 * AD * float64(c.NumHiddenLayers) * tokens
	return linear + attn
}

// BenchTrain times LoRA training steps (ForwardBackward + OptimStep, rank
// `rank` on every linear layer, random tokens) on m, after one warm-up step.
func BenchTrain(ctx context.Context, m *Model, batch, seq, rank, steps int) (*TrainBenchResult, error) {
	cfg := m.cfg
	s, err := NewSession(m, SessionConfig{Rank: rank, Alpha: float32(2 * rank), Seed: 1})
	if err != nil {
		return nil, err
	}
	defer s.Close()
	rng := rand.New(rand.NewPCG(2, 2))
	data := make([]Datum, batch)
	for b := range data {
		seqIDs := make([]int, seq+1)
		for i := range seqIDs {
			seqIDs[i] = rng.IntN(cfg.VocabSize)
		}
		w := make([]float32, seq)
		for i := range w {
			w[i] = 1
		}
		data[b] = Datum{Tokens: seqIDs[:seq], TargetTokens: seqIDs[1:], Weights: w}
	}
	res := &TrainBenchResult{Batch: batch, Seq: seq, Rank: rank}
	for i := 0; i <= steps; i++ {
		t0 := time.Now()
		if _, err := s.ForwardBackward(ctx, data, LossCrossEntropy, nil); err != nil {
			return nil, err
		}
		if _, err := s.OptimStep(ctx, AdamParams{LearningRate: 1e-4, Beta1: 0.9, Beta2: 0.95, Eps: 1e-12}); err != nil {
			return nil, err
		}
		dt := time.Since(t0)
		if i == 0 {
			continue // warm-up: arenas and OpenBLAS buffers
		}
		res.StepSeconds = append(res.StepSeconds, dt.Seconds())
	}
	// The median step: a busy moment on a shared machine moves it less than
	// the mean, and unlike the best it is not a lucky outlier.
	ts := make([]time.Duration, len(res.StepSeconds))
	for i, s := range res.StepSeconds {
		ts[i] = time.Duration(s * float64(time.Second))
	}
	med := medianDuration(ts).Seconds()
	res.TokensPerSec = float64(batch*seq) / med
	res.GFLOPPerStep = trainStepFLOPs(cfg, batch, seq) / 1e9
	res.GFLOPS = res.GFLOPPerStep / med
	res.PeakRSSBytes = peakRSS()
	for _, b := range m.arenas.heldBytes() {
		res.ArenaBytes = max(res.ArenaBytes, b)
	}
	return res, nil
}

// SessionMemory is the Go heap in use with a model loaded and 0, 1 and n
// sessions open (each after one training step), and the activation arena.
type SessionMemory struct {
	ModelBytes               int64
	HeapBase, HeapOne, HeapN int64
	N                        int
	PerSessionBytes          int64 // (HeapN − HeapOne)/(N−1): adapter, grads, moments
	AdapterParams            int
	ArenaBytes               int64 // activations of one call in flight, shared by sessions
}

// BenchSessionMemory measures what sessions cost on top of one shared base
// model: the base is loaded once; every session holds only its adapter,
// gradients and AdamW moments; activation arenas exist per call in flight.
func BenchSessionMemory(ctx context.Context, m *Model, n, rank, seq int) (*SessionMemory, error) {
	cfg := m.cfg
	heap := func() int64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return int64(ms.HeapAlloc)
	}
	out := &SessionMemory{ModelBytes: m.MemoryBytes(), N: n}
	out.HeapBase = heap()
	ids := make([]int, seq+1)
	for i := range ids {
		ids[i] = (i * 7919) % cfg.VocabSize
	}
	w := make([]float32, seq)
	data := []Datum{{Tokens: ids[:seq], TargetTokens: ids[1:], Weights: w}}
	var sessions []*Session
	defer func() {
		for _, s := range sessions {
			s.Close()
		}
	}()
	for i := 0; i < n; i++ {
		s, err := NewSession(m, SessionConfig{Rank: rank, Seed: int64(i)})
		if err != nil {
			return nil, err
		}
		sessions = append(sessions, s)
		if _, err := s.ForwardBackward(ctx, data, LossCrossEntropy, nil); err != nil {
			return nil, err
		}
		if _, err := s.OptimStep(ctx, AdamParams{LearningRate: 1e-4, Beta1: 0.9, Beta2: 0.95}); err != nil {
			return nil, err
		}
		if i == 0 {
			out.HeapOne = heap()
			out.AdapterParams = s.LoRA().NumParams()
		}
	}
	out.HeapN = heap()
	if n > 1 {
		out.PerSessionBytes = (out.HeapN - out.HeapOne) / int64(n-1)
	}
	for _, b := range m.arenas.heldBytes() {
		out.ArenaBytes += b
	}
	return out, nil
}

// MeasureSgemm returns OpenBLAS's sgemm rate in GFLOP/s on n×n×n products
// (the best of ten: other processes on a shared machine only ever slow a
// run down), the reference for model FLOP utilisation.
func MeasureSgemm(n int) float64 {
	a, b, c := make([]float32, n*n), make([]float32, n*n), make([]float32, n*n)
	for i := range a {
		a[i], b[i] = float32(i%7)*0.1, float32(i%5)*0.1
	}
	best := 0.0
	for i := 0; i < 10; i++ {
		t0 := time.Now()
		blas.Sgemm(false, false, n, n, n, 1, a, n, b, n, 0, c, n)
		dt := time.Since(t0).Seconds()
		if r := 2 * float64(n) * float64(n) * float64(n) / dt / 1e9; r > best {
			best = r
		}
	}
	return best
}

// MeasureHalfGemm returns the rate in GFLOP/s of a bf16 product
// [1024, n]·[n, n]ᵀ on the engine's own product path (package half, shared
// out on a team of GOMAXPROCS threads as the engine does), the best of ten:
// the reference for a BF16 model's utilisation, as the bf16 GEMM rate.
func MeasureHalfGemm(n int) float64 {
	var tm *team.Team // nil: the caller alone, with one CPU
	if n := runtime.GOMAXPROCS(0); n > 1 {
		var err error
		if tm, err = team.New(n - 1); err != nil {
			return 0
		}
		defer tm.Close()
	}
	AcquireSingleThreadBLAS()
	defer ReleaseSingleThreadBLAS()
	const rows = 1024
	w := make([]float32, n*n)
	for i := range w {
		w[i] = float32(i%7) * 0.01
	}
	h := half.FromFloat32(w, n, n, half.BF16)
	defer h.Free()
	x, y := make([]float32, rows*n), make([]float32, rows*n)
	best := 0.0
	for range 10 {
		t0 := time.Now()
		tm.HalfMulT(h, y, n, x, n, rows, 0)
		if r := 2 * float64(rows) * float64(n) * float64(n) / time.Since(t0).Seconds() / 1e9; r > best {
			best = r
		}
	}
	return best
}

// peakRSS is the process's peak resident set (VmHWM), or 0 where /proc has
// no such line.
func peakRSS() int64 {
	raw, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024
		}
	}
	return 0
}

// String formats the result as one line.
func (r *TrainBenchResult) String() string {
	return fmt.Sprintf("batch %d x %d, rank %d: %.1f tokens/s, %.1f GFLOP/s", r.Batch, r.Seq, r.Rank, r.TokensPerSec, r.GFLOPS)
}
