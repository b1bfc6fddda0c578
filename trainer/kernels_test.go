package trainer

import (
	"math"
	"math/rand/v2"
	"testing"
)

// Linear's three paths (gemv, blocked gemv, gemm) must agree with a plain
// float64 product, with strided x and y and beta 0 or 1.
func TestLinearPaths(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	// in 2000 makes the blocked path use several blocks of W.
	for _, shape := range [][2]int{{37, 300}, {2000, 150}} {
		in, out := shape[0], shape[1]
		for _, rows := range []int{1, 2, 3, 4, 5, 9} {
			for _, beta := range []float32{0, 1} {
				ldx, ldy := in+3, out+5
				x := make([]float32, rows*ldx)
				w := make([]float32, out*in)
				y := make([]float32, rows*ldy)
				for i := range x {
					x[i] = float32(rng.NormFloat64())
				}
				for i := range w {
					w[i] = float32(rng.NormFloat64())
				}
				for i := range y {
					y[i] = float32(rng.NormFloat64())
				}
				want := make([]float64, rows*out)
				for r := 0; r < rows; r++ {
					for o := 0; o < out; o++ {
						var s float64
						for k := 0; k < in; k++ {
							s += float64(x[r*ldx+k]) * float64(w[o*in+k])
						}
						want[r*out+o] = s + float64(beta)*float64(y[r*ldy+o])
					}
				}
				pad := y[ldy-1]
				Linear(y, ldy, x, ldx, w, rows, in, out, beta)
				for r := 0; r < rows; r++ {
					for o := 0; o < out; o++ {
						if d := math.Abs(float64(y[r*ldy+o]) - want[r*out+o]); d > 1e-4*math.Sqrt(float64(in)) {
							t.Fatalf("rows %d beta %v: y[%d,%d] = %v, want %v", rows, beta, r, o, y[r*ldy+o], want[r*out+o])
						}
					}
				}
				if y[ldy-1] != pad {
					t.Fatalf("rows %d: Linear wrote into the row padding", rows)
				}
			}
		}
	}
}
