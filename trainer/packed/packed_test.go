package packed

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"testing"
)

func randSlice(r *rand.Rand, n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = float32(r.NormFloat64())
	}
	return s
}

// reference computes columns [n0, n1) of y = x·Wᵀ + beta·y in float64.
func reference(y []float32, ldy int, x []float32, ldx int, w []float32, rows, k, n0, n1 int, beta float32) []float32 {
	out := append([]float32(nil), y...)
	for i := 0; i < rows; i++ {
		for j := n0; j < n1; j++ {
			var s float64
			for kk := 0; kk < k; kk++ {
				s += float64(x[i*ldx+kk]) * float64(w[j*k+kk])
			}
			if beta != 0 {
				s += float64(beta) * float64(y[i*ldy+j])
			}
			out[i*ldy+j] = float32(s)
		}
	}
	return out
}

func skipWithout(t testing.TB) {
	if !Available() {
		t.Skip("CPU lacks AVX-512F; the engine uses OpenBLAS's sgemm there")
	}
}

// TestMulMatchesFloat64 covers the edges of the tiling: rows around the
// 12-row block, columns around the 32-column panel (masked stores), depths
// around the 1024-deep pass, leading dimensions wider than the matrix,
// beta 0 (y not read: NaNs there must not leak), 1 and 0.5, and column
// ranges.
func TestMulMatchesFloat64(t *testing.T) {
	skipWithout(t)
	r := rand.New(rand.NewPCG(1, 2))
	for _, rows := range []int{1, 2, 11, 12, 13, 25, 128} {
		for _, n := range []int{1, 17, 32, 33, 80} {
			for _, k := range []int{1, 7, 64, 1023, 1025, 2100} {
				if rows*n*k > 4_000_000 {
					continue
				}
				for _, beta := range []float32{0, 1, 0.5} {
					ldx, ldy := k+3, n+5
					x := randSlice(r, (rows-1)*ldx+k)
					w := randSlice(r, n*k)
					y := randSlice(r, (rows-1)*ldy+n)
					if beta == 0 {
						for i := range y {
							y[i] = float32(math.NaN())
						}
					}
					n0 := 0
					if n > PanelCols {
						n0 = PanelCols
					}
					want := reference(y, ldy, x, ldx, w, rows, k, n0, n, beta)
					got := append([]float32(nil), y...)
					Pack(w, n, k).MulCols(got, ldy, x, ldx, rows, n0, n, beta)
					tol := 1e-5 * math.Sqrt(float64(k)) * 4
					for i := range got {
						g, wv := float64(got[i]), float64(want[i])
						if math.IsNaN(wv) {
							if !math.IsNaN(g) {
								t.Fatalf("rows %d n %d k %d beta %v: y[%d] outside the columns was written (%v)", rows, n, k, beta, i, g)
							}
							continue
						}
						if math.Abs(g-wv) > tol*(1+math.Abs(wv)) {
							t.Fatalf("rows %d n %d k %d beta %v: y[%d] = %v, want %v", rows, n, k, beta, i, g, wv)
						}
					}
				}
			}
		}
	}
}

// TestConcurrentColumnRanges runs disjoint panel ranges of one product on
// goroutines, as the engine's GEMM workers do, and compares with one call.
func TestConcurrentColumnRanges(t *testing.T) {
	skipWithout(t)
	r := rand.New(rand.NewPCG(3, 4))
	rows, n, k := 40, 300, 96
	x, w := randSlice(r, rows*k), randSlice(r, n*k)
	p := Pack(w, n, k)
	whole := make([]float32, rows*n)
	p.Mul(whole, n, x, k, rows, 0)
	split := make([]float32, rows*n)
	var wg sync.WaitGroup
	for n0 := 0; n0 < n; n0 += 2 * PanelCols {
		wg.Add(1)
		go func(n0 int) {
			defer wg.Done()
			p.MulCols(split, n, x, k, rows, n0, min(n, n0+2*PanelCols), 0)
		}(n0)
	}
	wg.Wait()
	for i := range whole {
		if whole[i] != split[i] {
			t.Fatalf("y[%d]: split %v, whole %v", i, split[i], whole[i])
		}
	}
}

// TestPanelChunk: at most parts chunks of whole panels cover N, for N on
// and off a panel edge and more parts than panels.
func TestPanelChunk(t *testing.T) {
	skipWithout(t)
	for _, n := range []int{1, 32, 33, 300, 3072} {
		p := Pack(make([]float32, n), n, 1)
		for _, parts := range []int{1, 2, 3, 7, 200} {
			c := p.PanelChunk(parts)
			if c%PanelCols != 0 || c <= 0 {
				t.Fatalf("N %d parts %d: chunk %d is not whole panels", n, parts, c)
			}
			if chunks := (n + c - 1) / c; chunks > parts || (chunks-1)*c >= n {
				t.Fatalf("N %d parts %d: chunk %d gives %d chunks", n, parts, c, chunks)
			}
		}
	}
}

func TestShapeErrorsPanic(t *testing.T) {
	skipWithout(t)
	p := Pack(make([]float32, 64*8), 64, 8)
	for name, f := range map[string]func(){
		"unaligned start": func() { p.MulCols(make([]float32, 64), 64, make([]float32, 8), 8, 1, 16, 64, 0) },
		"past N":          func() { p.MulCols(make([]float32, 64), 64, make([]float32, 8), 8, 1, 0, 65, 0) },
		"short x":         func() { p.Mul(make([]float32, 128), 64, make([]float32, 8), 8, 2, 0) },
		"short y":         func() { p.Mul(make([]float32, 64), 64, make([]float32, 16), 8, 2, 0) },
		"short w":         func() { Pack(make([]float32, 10), 4, 4) },
		"after Free": func() {
			q := Pack(make([]float32, 64*8), 64, 8)
			q.Free()
			q.Free() // idempotent
			q.Mul(make([]float32, 64), 64, make([]float32, 8), 8, 1, 0)
		},
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			f()
		})
	}
}

// BenchmarkMul compares the packed kernel with OpenBLAS on the 135M
// shape's products with cold weights (as in a forward pass): see
// trainer's BenchmarkGemmShapes for the sgemm side.
func BenchmarkMul(b *testing.B) {
	if !Available() {
		b.Skip("no AVX-512F")
	}
	for _, s := range []struct{ m, n, k int }{{128, 480, 576}, {128, 1536, 576}, {128, 288, 1536}, {1, 480, 576}, {4, 1536, 576}} {
		r := rand.New(rand.NewPCG(5, 6))
		x := randSlice(r, s.m*s.k)
		// Enough copies of W to leave the last-level cache, as a forward does.
		copies := max(1, (64<<20)/(4*s.n*s.k))
		ws := make([]*Weights, copies)
		for i := range ws {
			ws[i] = Pack(randSlice(r, s.n*s.k), s.n, s.k)
		}
		y := make([]float32, s.m*s.n)
		b.Run(fmt.Sprintf("%dx%dx%d", s.m, s.n, s.k), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				ws[i%copies].Mul(y, s.n, x, s.k, s.m, 0)
			}
			b.ReportMetric(2*float64(s.m*s.n*s.k)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}
