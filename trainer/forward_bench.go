package trainer

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"time"
)

// InferBenchOptions configure BenchInfer.
type InferBenchOptions struct {
	PrefillTokens int // one sequence of this many tokens
	DecodeTokens  int // tokens decoded per sequence after an 8-token prompt
	DecodeBatch   int // sequences decoded together
	Repeats       int // the median of this many runs (after a warm-up run) is reported
	// AllRows runs the prefill's last block on every row (a full forward,
	// as the PyTorch reference does) instead of on the last row alone, as
	// sampling does (pass.lastRows).
	AllRows bool
}

// InferBenchResult is what BenchInfer measured. FLOP counts are model
// FLOPs: 2 per multiply-add of every projection, causal attention counted
// over its lower triangle, the LM head on the one row sampling needs.
type InferBenchResult struct {
	PrefillFLOPs      float64 `json:"prefill_flops"` // model FLOPs of one prefill (PrefillFLOPs)
	PrefillTokensPerS float64 `json:"prefill_tokens_per_s"`
	DecodeTokensPerS  float64 `json:"decode_tokens_per_s"`
	PrefillGFLOPS     float64 `json:"prefill_gflops"`
	SgemmGFLOPS       float64 `json:"sgemm_gflops"`
	PrefillOfSgemm    float64 `json:"prefill_fraction_of_sgemm"`
	Threads           int     `json:"threads"` // threads of the model's team (GOMAXPROCS)
}

// PrefillFLOPs returns the model FLOPs of prefilling one sequence of T
// tokens and computing the logits of its last row.
func (c Config) PrefillFLOPs(T int) float64 {
	hd := c.NumAttentionHeads * c.HeadDim
	perTok := float64(c.HiddenSize*c.QKVDim()+hd*c.HiddenSize+3*c.HiddenSize*c.IntermediateSize) * float64(c.NumHiddenLayers)
	attn := 2 * float64(c.NumHiddenLayers) * float64(hd) * float64(T) * float64(T+1) / 2 // q·k and p·v
	return 2*(perTok*float64(T)+attn) + 2*float64(c.HiddenSize*c.VocabSize)
}

// BenchInfer measures prefill and decode throughput of m on random tokens.
func (m *Model) BenchInfer(ctx context.Context, o InferBenchOptions) (InferBenchResult, error) {
	c := m.cfg
	if o.PrefillTokens <= 0 || o.DecodeTokens <= 0 || o.DecodeBatch <= 0 || o.Repeats <= 0 {
		return InferBenchResult{}, fmt.Errorf("%w: bench sizes must be positive: %+v", ErrInvalidInput, o)
	}
	if o.PrefillTokens > c.MaxPositionEmbeddings || 8+o.DecodeTokens > c.MaxPositionEmbeddings {
		return InferBenchResult{}, fmt.Errorf("%w: bench lengths exceed the context of %d", ErrInvalidInput, c.MaxPositionEmbeddings)
	}
	// The reference rate is OpenBLAS with its own threads, before Acquire.
	res := InferBenchResult{Threads: runtime.GOMAXPROCS(0), SgemmGFLOPS: MeasureSgemm(512)}
	AcquireSingleThreadBLAS() // as Sample does: the team's jobs call OpenBLAS
	defer ReleaseSingleThreadBLAS()
	rng := rand.New(rand.NewPCG(3, 4))
	tokens := func(n int) []int {
		t := make([]int, n)
		for i := range t {
			t[i] = rng.IntN(c.VocabSize)
		}
		return t
	}
	prompt := tokens(o.PrefillTokens)
	logits := make([]float32, c.VocabSize)
	// Run 0 warms up (page faults of fresh arenas, thread start-up) and is
	// not counted; the median of the rest resists a busy moment either way.
	times := make([]time.Duration, 0, o.Repeats)
	for r := 0; r <= o.Repeats; r++ {
		ar := m.arenas.get()
		t0 := time.Now()
		T := len(prompt)
		p := newPass(m, nil, ar, []int{T}, T, T, false)
		p.lastRows = !o.AllRows
		copy(p.tokens, prompt)
		if err := p.forward(ctx); err != nil {
			m.arenas.put(ar)
			return res, err
		}
		m.headLogits(logits, p.out[(p.outRows-1)*c.HiddenSize:], 1)
		if r > 0 {
			times = append(times, time.Since(t0))
		}
		m.arenas.put(ar)
	}
	med := medianDuration(times)
	res.PrefillFLOPs = c.PrefillFLOPs(o.PrefillTokens)
	res.PrefillTokensPerS = float64(o.PrefillTokens) / med.Seconds()
	res.PrefillGFLOPS = res.PrefillFLOPs / med.Seconds() / 1e9

	// Decode: DecodeBatch sequences of an 8-token prompt, greedy, one
	// batched step per token against the KV cache (what Sample runs).
	times = times[:0]
	B := o.DecodeBatch
	for r := 0; r <= o.Repeats; r++ {
		ar := m.arenas.get()
		cache := newKVCache(ar, B, c.NumHiddenLayers, c.NumAttentionHeads, c.NumKeyValueHeads, 8+o.DecodeTokens, c.HeadDim)
		prompts := make([][]int, B)
		slots := make([]int, B)
		for i := range prompts {
			prompts[i], slots[i] = tokens(8), i
		}
		if _, err := m.prefill(ctx, ar, cache, prompts, 1, nil); err != nil {
			m.arenas.put(ar)
			return res, err
		}
		next := make([]int, B)
		for i := range next {
			next[i] = prompts[i][7] // any valid id: the timing does not depend on it
		}
		dec := newDecodePass(m, nil, ar, cache, B)
		picker := newTokenPicker(c.VocabSize)
		greedy := &SamplingParams{Temperature: 0, TopP: 1}
		t0 := time.Now()
		for step := 0; step < o.DecodeTokens; step++ {
			lg, err := dec.step(ctx, slots, next)
			if err != nil {
				m.arenas.put(ar)
				return res, err
			}
			for i := range next {
				next[i], _ = picker.pick(lg[i*c.VocabSize:(i+1)*c.VocabSize], greedy, 0)
			}
		}
		if r > 0 {
			times = append(times, time.Since(t0))
		}
		m.arenas.put(ar)
	}
	res.DecodeTokensPerS = float64(B*o.DecodeTokens) / medianDuration(times).Seconds()
	// On a shared machine a single sgemm sample can land in a busy moment:
	// take the best of before and after, so the fraction is not inflated.
	ReleaseSingleThreadBLAS()
	res.SgemmGFLOPS = max(res.SgemmGFLOPS, MeasureSgemm(512))
	AcquireSingleThreadBLAS()
	res.PrefillOfSgemm = res.PrefillGFLOPS / res.SgemmGFLOPS
	return res, nil
}

// medianDuration returns the median of ts (which it sorts).
func medianDuration(ts []time.Duration) time.Duration {
	slices.Sort(ts)
	n := len(ts)
	if n%2 == 1 {
		return ts[n/2]
	}
	return (ts[n/2-1] + ts[n/2]) / 2
}
