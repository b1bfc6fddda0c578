package blas

import (
	"math"
	"math/rand/v2"
	"testing"
)

// naive computes alpha·op(A)·op(B) + beta·C in float64 for comparison.
func naive(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) []float64 {
	out := make([]float64, m*n)
	for i := 0; i < m; i++ {
		for j := 0; j < n; j++ {
			var s float64
			for p := 0; p < k; p++ {
				var av, bv float32
				if transA {
					av = a[p*lda+i]
				} else {
					av = a[i*lda+p]
				}
				if transB {
					bv = b[j*ldb+p]
				} else {
					bv = b[p*ldb+j]
				}
				s += float64(av) * float64(bv)
			}
			out[i*n+j] = float64(alpha)*s + float64(beta)*float64(c[i*ldc+j])
		}
	}
	return out
}

func randSlice(r *rand.Rand, n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = float32(r.NormFloat64())
	}
	return s
}

func TestSgemmAllTransposesWithStrides(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	m, n, k := 7, 5, 9
	for _, ta := range []bool{false, true} {
		for _, tb := range []bool{false, true} {
			ar, ac := m, k
			if ta {
				ar, ac = k, m
			}
			br, bc := k, n
			if tb {
				br, bc = n, k
			}
			lda, ldb, ldc := ac+3, bc+2, n+4 // strided sub-matrices
			a := randSlice(r, ar*lda)
			b := randSlice(r, br*ldb)
			c := randSlice(r, m*ldc)
			want := naive(ta, tb, m, n, k, 0.5, a, lda, b, ldb, 2, c, ldc)
			pad := c[m*ldc-1]
			Sgemm(ta, tb, m, n, k, 0.5, a, lda, b, ldb, 2, c, ldc)
			for i := 0; i < m; i++ {
				for j := 0; j < n; j++ {
					if d := math.Abs(float64(c[i*ldc+j]) - want[i*n+j]); d > 1e-4 {
						t.Errorf("ta=%v tb=%v C[%d,%d] = %v, want %v", ta, tb, i, j, c[i*ldc+j], want[i*n+j])
					}
				}
			}
			if c[m*ldc-1] != pad {
				t.Errorf("ta=%v tb=%v wrote into padding", ta, tb)
			}
		}
	}
}

func TestSgemv(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	m, n := 6, 4
	a := randSlice(r, m*n)
	x := randSlice(r, m)
	y := make([]float32, n)
	Sgemv(true, m, n, 1, a, n, x, 0, y)
	for j := 0; j < n; j++ {
		var s float64
		for i := 0; i < m; i++ {
			s += float64(a[i*n+j]) * float64(x[i])
		}
		if math.Abs(s-float64(y[j])) > 1e-5 {
			t.Errorf("y[%d] = %v, want %v", j, y[j], s)
		}
	}
}

func TestShapeErrorPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("short B did not panic")
		}
	}()
	Sgemm(false, false, 2, 2, 2, 1, make([]float32, 4), 2, make([]float32, 3), 2, 0, make([]float32, 4), 2)
}

func TestThreads(t *testing.T) {
	old := Threads()
	defer SetThreads(old)
	SetThreads(1)
	if got := Threads(); got != 1 {
		t.Errorf("Threads() = %d after SetThreads(1)", got)
	}
}

func BenchmarkSgemm512(b *testing.B) {
	n := 512
	r := rand.New(rand.NewPCG(5, 6))
	a, bb, c := randSlice(r, n*n), randSlice(r, n*n), make([]float32, n*n)
	b.SetBytes(0)
	for i := 0; i < b.N; i++ {
		Sgemm(false, true, n, n, n, 1, a, n, bb, n, 0, c, n)
	}
	b.ReportMetric(2*float64(n*n*n)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
}
