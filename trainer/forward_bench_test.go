package trainer

import (
	"context"
	"fmt"
	"testing"
)

func TestBenchInferRuns(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	r, err := m.BenchInfer(context.Background(), InferBenchOptions{PrefillTokens: 32, DecodeTokens: 4, DecodeBatch: 2, Repeats: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !(r.PrefillTokensPerS > 0 && r.DecodeTokensPerS > 0 && r.SgemmGFLOPS > 0 && r.PrefillOfSgemm > 0) {
		t.Errorf("result has non-positive figures: %+v", r)
	}
	if _, err := m.BenchInfer(context.Background(), InferBenchOptions{PrefillTokens: 1000, DecodeTokens: 1, DecodeBatch: 1, Repeats: 1}); err == nil {
		t.Error("prefill over the context accepted")
	}
}

// BenchmarkPrefill135M is the engine's prefill on the SmolLM-135M shape,
// for profiling: go test ./trainer -run x -bench Prefill135M -cpuprofile cpu.out
func BenchmarkPrefill135M(b *testing.B) {
	cfg := SmolLM135MConfig()
	dir := b.TempDir()
	if err := GenerateRandomModel(dir, cfg, 1, ""); err != nil {
		b.Fatal(err)
	}
	m, err := LoadModel(dir)
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	AcquireSingleThreadBLAS() // as Sample and BenchInfer do
	defer ReleaseSingleThreadBLAS()
	for _, T := range []int{128, 512} {
		toks := testTokens(T, cfg.VocabSize, 1)
		b.Run(fmt.Sprintf("T=%d", T), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				ar := m.arenas.get()
				p := newPass(m, nil, ar, []int{T}, T, T, false)
				copy(p.tokens, toks)
				if err := p.forward(context.Background()); err != nil {
					b.Fatal(err)
				}
				m.arenas.put(ar)
			}
			b.ReportMetric(float64(T*b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}
