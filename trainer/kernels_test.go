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

// TestCausalAttentionBlocksMatchDirect checks the query-blocked attention
// (attnBlockRows) on a sequence of several blocks, the last one partial,
// against attention computed directly in float64, and that the kept
// probabilities are causal rows summing to 1.
func TestCausalAttentionBlocksMatchDirect(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	a := AttnDims{H: 4, KV: 2, D: 8}
	L := 2*attnBlockRows + 37
	ld := a.QKVDim()
	qkv := make([]float32, L*ld)
	for i := range qkv {
		qkv[i] = float32(r.NormFloat64())
	}
	ldOut := a.H*a.D + 3 // a strided output must keep its padding
	out := make([]float32, L*ldOut)
	for i := range out {
		out[i] = 7
	}
	probs := make([]float32, a.H*L*L)
	for i := range probs {
		probs[i] = float32(math.NaN()) // every entry must be written
	}
	CausalAttention(out, ldOut, qkv, L, a, probs)
	scale := 1 / math.Sqrt(float64(a.D))
	for h := 0; h < a.H; h++ {
		g := h / (a.H / a.KV)
		for i := 0; i < L; i += 13 { // a spread of rows in every block
			w := make([]float64, i+1)
			var m, z float64 = math.Inf(-1), 0
			for j := 0; j <= i; j++ {
				var s float64
				for c := 0; c < a.D; c++ {
					s += float64(qkv[i*ld+h*a.D+c]) * float64(qkv[j*ld+(a.H+g)*a.D+c])
				}
				w[j] = s * scale
				m = math.Max(m, w[j])
			}
			for j := range w {
				w[j] = math.Exp(w[j] - m)
				z += w[j]
			}
			var rowSum float64
			for j := 0; j < L; j++ {
				p := float64(probs[h*L*L+i*L+j])
				want := 0.0
				if j <= i {
					want = w[j] / z
				}
				if math.IsNaN(p) || math.Abs(p-want) > 1e-5 {
					t.Fatalf("head %d p[%d][%d] = %v, want %v", h, i, j, p, want)
				}
				rowSum += p
			}
			if math.Abs(rowSum-1) > 1e-5 {
				t.Fatalf("head %d row %d sums to %v", h, i, rowSum)
			}
			for c := 0; c < a.D; c++ {
				var o float64
				for j := 0; j <= i; j++ {
					o += w[j] / z * float64(qkv[j*ld+(a.H+a.KV+g)*a.D+c])
				}
				if got := float64(out[i*ldOut+h*a.D+c]); math.Abs(got-o) > 1e-4 {
					t.Fatalf("head %d out[%d][%d] = %v, direct %v", h, i, c, got, o)
				}
			}
		}
	}
	for i := 0; i < L; i++ {
		for c := a.H * a.D; c < ldOut; c++ {
			if out[i*ldOut+c] != 7 {
				t.Fatalf("out padding [%d][%d] written", i, c)
			}
		}
	}
}
