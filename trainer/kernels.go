package trainer

import (
	"math"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/team"
	"github.com/signal-p2p/signal/trainer/vmath"
)

// The inference kernels. Every matrix is row-major float32; "packed" means
// all sequences of a call stacked as rows of one [tokens, width] matrix.
// They allocate nothing and are safe to call from concurrent goroutines on
// disjoint outputs.

// maxGemvRows and gemvBlockBytes tune Linear's small-batch path: measured
// on the 2-core EPYC, blocked sgemv beats sgemm up to about 4 rows, and a
// 512 KiB block of W stays in the 1 MiB L2 while it serves every row.
const (
	maxGemvRows    = 4
	gemvBlockBytes = 512 << 10
)

// Linear computes y = x·Wᵀ + beta·y for x [rows, in] (row stride ldx), W
// [out, in] as Hugging Face stores it, and y [rows, out] (row stride ldy).
func Linear(y []float32, ldy int, x []float32, ldx int, w []float32, rows, in, out int, beta float32) {
	if rows == 1 {
		// One row (a decode step) is a matrix-vector product; sgemm would
		// pack all of W first.
		blas.Sgemv(false, out, in, 1, w, in, x, beta, y)
		return
	}
	if rows <= maxGemvRows {
		// A few rows (a small decode batch): OpenBLAS's sgemm packs W and
		// runs 2–3× slower than reading W once. Walk W in blocks that stay
		// in L2 and apply each block to every row with sgemv.
		blk := max(16, gemvBlockBytes/(4*in))
		for n0 := 0; n0 < out; n0 += blk {
			n1 := min(out, n0+blk)
			for r := 0; r < rows; r++ {
				blas.Sgemv(false, n1-n0, in, 1, w[n0*in:], in, x[r*ldx:], beta, y[r*ldy+n0:])
			}
		}
		return
	}
	blas.Sgemm(false, true, rows, out, in, 1, x, ldx, w, in, beta, y, ldy)
}

// RMSNorm writes out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w for rows of
// width dim, and when rstd is non-nil stores each row's 1/rms there (what
// the backward needs). The mean of squares accumulates in float64.
func RMSNorm(out, rstd, x, w []float32, rows, dim int, eps float32) {
	vmath.RMSNorm(out, rstd, x, w, rows, dim, eps)
}

// RopeTables fills cos and sin, each [len(positions), D/2], with the rotary
// angles position·invFreq[i]. As in Hugging Face the angle is an f32
// product; its cosine and sine are taken in float64 and rounded.
func RopeTables(cos, sin []float32, positions []int, invFreq []float32) {
	half := len(invFreq)
	for r, p := range positions {
		c, s := cos[r*half:(r+1)*half], sin[r*half:(r+1)*half]
		for i, f := range invFreq {
			a := float64(float32(p) * f)
			c[i] = float32(math.Cos(a))
			s[i] = float32(math.Sin(a))
		}
	}
}

// ApplyRope rotates in place nHeads heads of width d that start at column
// col0 of each row of x (row stride ld), in Hugging Face's rotate-half
// layout: (x[i], x[i+d/2]) turns by row r's angle i, taken from the
// [rows, d/2] tables. Pass a negated sin table to rotate back (the backward).
func ApplyRope(x []float32, rows, ld, col0, nHeads, d int, cos, sin []float32) {
	if rows == 0 {
		return
	}
	vmath.Rope(x[col0:], rows, ld, nHeads, d, cos, sin)
}

// SiluMul writes act = silu(gate)·up for gu [rows, 2·inter] holding the
// fused gate (columns [0, inter)) and up (columns [inter, 2·inter)) products
// (vectorized: vmath.SwiGLU).
func SiluMul(act, gu []float32, rows, inter int) {
	vmath.SwiGLU(act, nil, gu, rows, inter)
}

// Expf is a float32 exp accurate to about 1 ulp for the softmax and SiLU:
// math.Exp through float64 costs several times more and exp dominates the
// attention softmax at long contexts. It returns 0 below -103 and +Inf above 88.7.
func Expf(x float32) float32 {
	const (
		log2e = 1.4426950408889634
		ln2   = 0.6931471805599453
	)
	if x != x {
		return x
	}
	if x < -103 {
		return 0
	}
	if x > 88.72284 {
		return float32(math.Inf(1))
	}
	xd := float64(x)
	k := math.Floor(xd*log2e + 0.5)
	r := xd - k*ln2 // |r| ≤ ln2/2: a degree-7 Taylor polynomial is exact to ~5e-9
	p := 1 + r*(1+r*(1.0/2+r*(1.0/6+r*(1.0/24+r*(1.0/120+r*(1.0/720+r*(1.0/5040)))))))
	// k ∈ [-149, 128]: 2^k is a normal float64 built from its exponent bits.
	return float32(p * math.Float64frombits(uint64(int64(k)+1023)<<52))
}

// softmaxRow turns s[:n] into probabilities in place (sum in float64).
func softmaxRow(s []float32) {
	sum := vmath.ExpShift(s, vmath.Max(s))
	inv := float32(1 / sum)
	for i := range s {
		s[i] *= inv
	}
}

// AttnDims describes grouped-query attention over a fused qkv matrix whose
// rows are [H q heads | KV k heads | KV v heads], each D wide.
type AttnDims struct {
	H, KV, D int
}

// QKVDim returns the fused row width (H + 2·KV)·D.
func (a AttnDims) QKVDim() int { return (a.H + 2*a.KV) * a.D }

// CausalAttention computes one sequence's causal attention. The sequence is
// L rows of qkv (row stride QKVDim, q and k already rotated); out receives
// L rows of [H·D] (row stride ldOut). probs, [H, L, L], receives each head's
// softmax probabilities (upper triangle zero); it may be a reused scratch
// buffer when the caller does not keep them. Scores are one GEMM per head.
func CausalAttention(out []float32, ldOut int, qkv []float32, L int, a AttnDims, probs []float32) {
	for h := 0; h < a.H; h++ {
		CausalAttentionHead(out, ldOut, qkv, L, a, h, probs[h*L*L:(h+1)*L*L])
	}
}

// CausalAttentionHead is CausalAttention for head h alone, with probs its
// [L, L] block; heads are independent, so they can run concurrently. It is
// team.AttentionHead from row 0: queries in blocks of attnBlockRows rows,
// each scoring only the keys it can see.
func CausalAttentionHead(out []float32, ldOut int, qkv []float32, L int, a AttnDims, h int, probs []float32) {
	team.AttentionHead(out, ldOut, qkv, L, a.H, a.KV, a.D, h, 0, probs)
}

// attnBlockRows is team.AttentionHead's query block (its C code's
// ATTN_BLOCK_ROWS), for tests that cross it.
const attnBlockRows = 128
