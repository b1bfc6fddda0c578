package trainer

import (
	"fmt"
	"testing"

	"github.com/signal-p2p/signal/trainer/blas"
)

// BenchmarkGemmShapes measures single-threaded OpenBLAS sgemm on the 135M
// shape's products (what each worker of a split runs), to see which shapes
// lose rate and how close the 128-token prefill's come to the core's peak:
//
//	go test ./trainer -run x -bench GemmShapes
func BenchmarkGemmShapes(b *testing.B) {
	type shape struct {
		name    string
		tA, tB  bool
		m, n, k int
	}
	shapes := []shape{
		// A 128-token prefill's products, one worker's half of the columns.
		{"qkv-prefill128", false, true, 128, 480, 576},
		{"o-prefill128", false, true, 128, 288, 576},
		{"gateup-prefill128", false, true, 128, 1536, 576},
		{"down-prefill128", false, true, 128, 288, 1536},
		{"qkv-fwd", false, true, 256, 960, 576},
		{"gateup-fwd", false, true, 256, 3072, 576},
		{"down-fwd", false, true, 256, 576, 1536},
		{"gateup-dx", false, false, 256, 576, 3072},
		{"down-dx", false, false, 256, 1536, 576},
		{"head-fwd-64", false, true, 64, 49152 / 2, 576},
		{"head-dx-64", false, false, 64, 576 / 2, 49152},
		{"head-fwd-256", false, true, 256, 49152 / 2, 576},
		{"head-dx-256", false, false, 256, 576 / 2, 49152},
	}
	blas.SetThreads(1)
	defer blas.SetThreads(2)
	for _, s := range shapes {
		ar, ac := s.m, s.k
		if s.tA {
			ar, ac = s.k, s.m
		}
		br, bc := s.k, s.n
		if s.tB {
			br, bc = s.n, s.k
		}
		a, bm, c := make([]float32, ar*ac), make([]float32, br*bc), make([]float32, s.m*s.n)
		for i := range a {
			a[i] = float32(i%7) * 0.1
		}
		for i := range bm {
			bm[i] = float32(i%5) * 0.1
		}
		b.Run(fmt.Sprintf("%s-%dx%dx%d", s.name, s.m, s.n, s.k), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				blas.Sgemm(s.tA, s.tB, s.m, s.n, s.k, 1, a, ac, bm, bc, 0, c, s.n)
			}
			b.ReportMetric(2*float64(s.m*s.n*s.k)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}
