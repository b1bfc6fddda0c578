package trainer

import (
	"math"
	"runtime"
	"sync"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/packed"
	"github.com/signal-p2p/signal/trainer/vmath"
)

// The training kernels: the forward pieces that must keep what backward needs
// (RMSNorm's inverse RMS, attention's log-sum-exp), and the backward of each
// layer piece. They work on packed batches: every sequence of a call is a run
// of rows in one [tokens, width] row-major matrix, and seqOff[i]..seqOff[i+1]
// are sequence i's rows. The base weights are frozen, so no kernel ever forms
// a weight gradient; only activations' gradients and LoRA's A and B.

// trainParallel splits [0, n) into contiguous ranges run on up to GOMAXPROCS
// goroutines and waits for them. Used for element-wise and attention work
// while BLAS is idle, never around a BLAS-threaded GEMM.
func trainParallel(n int, fn func(lo, hi int)) {
	w := runtime.GOMAXPROCS(0)
	if w > n {
		w = n
	}
	if w <= 1 {
		if n > 0 {
			fn(0, n)
		}
		return
	}
	var wg sync.WaitGroup
	for i := 0; i < w; i++ {
		lo, hi := i*n/w, (i+1)*n/w
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(lo, hi)
		}()
	}
	wg.Wait()
}

// rmsNormForward writes y = x·rinv·w row by row and keeps rinv (one per row),
// the only thing backward needs besides x. x and y are [rows, h].
func rmsNormForward(y, x, w, rinv []float32, rows, h int, eps float32) {
	trainParallel(rows, func(lo, hi int) { rmsNormForwardRows(y, x, w, rinv, lo, hi, h, eps) })
}

func rmsNormForwardRows(y, x, w, rinv []float32, lo, hi, h int, eps float32) {
	for r := lo; r < hi; r++ {
		xr := x[r*h : (r+1)*h]
		var ss float64
		for _, v := range xr {
			ss += float64(v) * float64(v)
		}
		ri := float32(1 / math.Sqrt(ss/float64(h)+float64(eps)))
		rinv[r] = ri
		yr := y[r*h : (r+1)*h]
		for i, v := range xr {
			yr[i] = v * ri * w[i]
		}
	}
}

// rmsNormBackward adds to dx the gradient through y = x·rinv·w (w frozen):
// dx = rinv·(g − x·rinv²·mean(g·x)) with g = dy·w.
func rmsNormBackward(dx, dy, x, w, rinv []float32, rows, h int) {
	trainParallel(rows, func(lo, hi int) { rmsNormBackwardRows(dx, dy, x, w, rinv, lo, hi, h) })
}

func rmsNormBackwardRows(dx, dy, x, w, rinv []float32, lo, hi, h int) {
	for r := lo; r < hi; r++ {
		xr, dyr, dxr := x[r*h:(r+1)*h], dy[r*h:(r+1)*h], dx[r*h:(r+1)*h]
		var dot float64
		for i := range xr {
			dot += float64(dyr[i]*w[i]) * float64(xr[i])
		}
		ri := rinv[r]
		c := float32(dot/float64(h)) * ri * ri * ri
		for i := range xr {
			dxr[i] += dyr[i]*w[i]*ri - xr[i]*c
		}
	}
}

// ropeApply rotates, in place, heads [0, nHeads) of width d stored from
// column off of each row of x (row stride ld), in Hugging Face's rotate-half
// layout: pairs (i, i+d/2) turn by position·freq[i]. cos and sin are
// [positions, d/2] tables; pos[r] is row r's position. sign +1 is the
// forward rotation; -1 turns back, which is its backward (a rotation's
// transpose is its inverse).
func ropeApply(x []float32, rows, ld, off, nHeads, d int, pos []int32, cos, sin []float32, sign float32) {
	trainParallel(rows, func(lo, hi int) { ropeRows(x, lo, hi, ld, off, nHeads, d, pos, cos, sin, sign) })
}

func ropeRows(x []float32, lo, hi, ld, off, nHeads, d int, pos []int32, cos, sin []float32, sign float32) {
	half := d / 2
	for r := lo; r < hi; r++ {
		p := int(pos[r])
		cr, sr := cos[p*half:(p+1)*half], sin[p*half:(p+1)*half]
		for h := 0; h < nHeads; h++ {
			v := x[r*ld+off+h*d : r*ld+off+(h+1)*d]
			for i := 0; i < half; i++ {
				a, b := v[i], v[i+half]
				c, s := cr[i], sign*sr[i]
				v[i] = a*c - b*s
				v[i+half] = b*c + a*s
			}
		}
	}
}

// sigmoid is σ(x) = 1/(1+e^−x), through expNeg of −|x|.
func sigmoid(x float32) float32 {
	if x >= 0 {
		return 1 / (1 + expNeg(-x))
	}
	e := expNeg(x)
	return e / (1 + e)
}

// silu is x·σ(x).
func silu(x float32) float32 { return x * sigmoid(x) }

// swigluForward writes h = silu(gate)·up; gu is [rows, 2·inter] with gate in
// columns [0, inter) and up in [inter, 2·inter), the fused gate/up product.
func swigluForward(h, gu []float32, rows, inter int) {
	trainParallel(rows, func(lo, hi int) { swigluForwardRows(h, gu, lo, hi, inter) })
}

func swigluForwardRows(h, gu []float32, lo, hi, inter int) {
	vmath.SwiGLU(h[lo*inter:hi*inter], nil, gu[lo*2*inter:hi*2*inter], hi-lo, inter)
}

// swigluRecompute rebuilds h = silu(gate)·up for backward and keeps
// sg = σ(gate) [rows, inter] so that swigluBackward needs no exponential.
func swigluRecompute(h, sg, gu []float32, rows, inter int) {
	trainParallel(rows, func(lo, hi int) {
		vmath.SwiGLU(h[lo*inter:hi*inter], sg[lo*inter:hi*inter], gu[lo*2*inter:hi*2*inter], hi-lo, inter)
	})
}

// swigluBackward writes dgu (same layout as gu) from dh and sg = σ(gate):
// d gate = dh·up·σ(g)(1 + g(1 − σ(g))), d up = dh·silu(g).
func swigluBackward(dgu, dh, gu, sg []float32, rows, inter int) {
	trainParallel(rows, func(lo, hi int) { swigluBackwardRows(dgu, dh, gu, sg, lo, hi, inter) })
}

func swigluBackwardRows(dgu, dh, gu, sgAll []float32, lo, hi, inter int) {
	for r := lo; r < hi; r++ {
		o := r * 2 * inter
		g, u := gu[o:o+inter], gu[o+inter:o+2*inter]
		dg, du := dgu[o:o+inter], dgu[o+inter:o+2*inter]
		dhr, sgr := dh[r*inter:(r+1)*inter], sgAll[r*inter:(r+1)*inter]
		for i := range dhr {
			sg := sgr[i]
			du[i] = dhr[i] * g[i] * sg
			dg[i] = dhr[i] * u[i] * sg * (1 + g[i]*(1-sg))
		}
	}
}

// attnShape describes grouped-query attention over a fused qkv matrix
// [tokens, (nHeads + 2·nKV)·d]: q heads first, then k heads, then v heads.
type attnShape struct {
	nHeads, nKV, d int
	scale          float32
}

func (a attnShape) qkvDim() int { return (a.nHeads + 2*a.nKV) * a.d }

// attnScratch is one worker's [n, n] score buffers for the longest sequence.
type attnScratch struct{ s, dp []float32 }

func newAttnScratch(maxSeq int) *attnScratch {
	return &attnScratch{s: make([]float32, maxSeq*maxSeq), dp: make([]float32, maxSeq*maxSeq)}
}

// attnForward computes causal attention out [tokens, nHeads·d] from the
// (already rotated) fused qkv, per sequence and head with GEMMs, and keeps
// each row's log-sum-exp of scores lse [nHeads, tokens] for backward. The
// (sequence, head) jobs run on one goroutine per scratch.
func attnForward(out, lse, qkv []float32, seqOff []int, sh attnShape, scratch []*attnScratch) {
	ld, d := sh.qkvDim(), sh.d
	group := sh.nHeads / sh.nKV
	tokens := seqOff[len(seqOff)-1]
	nSeq := len(seqOff) - 1
	jobs := nSeq * sh.nHeads
	workers := min(len(scratch), jobs)
	// The pass runs OpenBLAS single-threaded (singleThreadBLAS): each job's
	// small GEMMs run on its own goroutine.
	trainParallelWorkers(jobs, workers, func(worker, job int) {
		sq, h := job/sh.nHeads, job%sh.nHeads
		st, n := seqOff[sq], seqOff[sq+1]-seqOff[sq]
		g := h / group
		q := qkv[st*ld+h*d:]
		k := qkv[st*ld+(sh.nHeads+g)*d:]
		v := qkv[st*ld+(sh.nHeads+sh.nKV+g)*d:]
		s := scratch[worker].s[:n*n]
		blas.Sgemm(false, true, n, n, d, sh.scale, q, ld, k, ld, 0, s, n)
		vmath.CausalSoftmax(s, n, n, lse[h*tokens+st:], 1)
		blas.Sgemm(false, false, n, d, n, 1, s, n, v, ld, 0, out[st*sh.nHeads*d+h*d:], sh.nHeads*d)
	})
}

// attnBackward writes the gradient of attention into dqkv (q, k and v parts,
// before the RoPE backward), from dout [tokens, nHeads·d], recomputing the
// probabilities from q, k and the kept lse rather than storing them:
// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P⊙(dP − rowsum(dO⊙O)), dQ = scale·dS·K,
// dK = scale·dSᵀ·Q. Each (sequence, head) job writes its dK and dV into
// dkvHead [2, nHeads, tokens, d] scratch; the heads of a KV group are summed
// afterwards, so jobs need no locks.
func attnBackward(dqkv, dout, out, lse, qkv []float32, seqOff []int, sh attnShape, scratch []*attnScratch, dkvHead []float32) {
	ld, d := sh.qkvDim(), sh.d
	od := sh.nHeads * d
	group := sh.nHeads / sh.nKV
	tokens := seqOff[len(seqOff)-1]
	nSeq := len(seqOff) - 1
	jobs := nSeq * sh.nHeads
	workers := min(len(scratch), jobs)
	dkH, dvH := dkvHead[:sh.nHeads*tokens*d], dkvHead[sh.nHeads*tokens*d:2*sh.nHeads*tokens*d]
	// The pass runs OpenBLAS single-threaded (singleThreadBLAS): each job's
	// small GEMMs run on its own goroutine.
	trainParallelWorkers(jobs, workers, func(worker, job int) {
		sq, h := job/sh.nHeads, job%sh.nHeads
		st, n := seqOff[sq], seqOff[sq+1]-seqOff[sq]
		g := h / group
		k := qkv[st*ld+(sh.nHeads+g)*d:]
		v := qkv[st*ld+(sh.nHeads+sh.nKV+g)*d:]
		dk := dkH[(h*tokens+st)*d:]
		dv := dvH[(h*tokens+st)*d:]
		s, dp := scratch[worker].s[:n*n], scratch[worker].dp[:n*n]
		q := qkv[st*ld+h*d:]
		dq := dqkv[st*ld+h*d:]
		do := dout[st*od+h*d:]
		o := out[st*od+h*d:]
		blas.Sgemm(false, true, n, n, d, sh.scale, q, ld, k, ld, 0, s, n)
		vmath.CausalExp(s, n, n, lse[h*tokens+st:], 1)
		blas.Sgemm(true, false, n, d, n, 1, s, n, do, od, 0, dv, d)
		blas.Sgemm(false, true, n, n, d, 1, do, od, v, ld, 0, dp, n)
		for i := 0; i < n; i++ {
			var di float32
			for c := 0; c < d; c++ {
				di += do[i*od+c] * o[i*od+c]
			}
			pr, dpr := s[i*n:(i+1)*n], dp[i*n:(i+1)*n]
			for j := 0; j <= i; j++ {
				pr[j] *= dpr[j] - di
			}
		}
		blas.Sgemm(false, false, n, d, n, sh.scale, s, n, k, ld, 0, dq, ld)
		blas.Sgemm(true, false, n, d, n, sh.scale, s, n, q, ld, 0, dk, d)
	})
	// Sum each KV group's heads into the k and v columns of dqkv.
	trainParallel(tokens, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			for g := 0; g < sh.nKV; g++ {
				dk := dqkv[r*ld+(sh.nHeads+g)*d : r*ld+(sh.nHeads+g+1)*d]
				dv := dqkv[r*ld+(sh.nHeads+sh.nKV+g)*d : r*ld+(sh.nHeads+sh.nKV+g+1)*d]
				clear(dk)
				clear(dv)
				for h := g * group; h < (g+1)*group; h++ {
					hk := dkH[(h*tokens+r)*d : (h*tokens+r+1)*d]
					hv := dvH[(h*tokens+r)*d : (h*tokens+r+1)*d]
					for c := range dk {
						dk[c] += hk[c]
						dv[c] += hv[c]
					}
				}
			}
		}
	})
}

// trainParallelWorkers runs fn(worker, job) for every job on `workers`
// goroutines pulling jobs in order; worker indexes a per-worker scratch.
func trainParallelWorkers(jobs, workers int, fn func(worker, job int)) {
	if workers > jobs {
		workers = jobs
	}
	if workers <= 1 {
		for j := 0; j < jobs; j++ {
			fn(0, j)
		}
		return
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	next := 0
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				j := next
				next++
				mu.Unlock()
				if j >= jobs {
					return
				}
				fn(w, j)
			}
		}()
	}
	wg.Wait()
}

// loraBackward adds the gradients of y += s·(x·Aᵀ)·Bᵀ, given dy (row stride
// ldy, starting at its first column) and the forward's u = x·Aᵀ [rows, r]:
// dB += s·dyᵀ·u, dA += s·(dy·B)ᵀ·x, dx += s·(dy·B)·A. The base product's
// dx += dy·W is the caller's (one GEMM over a fused weight). dyB is
// [rows, r] scratch.
func loraBackward(dx []float32, ldx int, dy []float32, ldy int, x []float32, ldxIn int, u []float32,
	a, b, da, db []float32, rows, in, out, r int, s float32, dyB []float32) {
	pgemm(false, false, rows, r, out, 1, dy, ldy, b, r, 0, dyB, r)
	pgemm(true, false, out, r, rows, s, dy, ldy, u, r, 1, db, r)
	pgemm(true, false, r, in, rows, s, dyB, r, x, ldxIn, 1, da, in)
	pgemm(false, false, rows, in, r, s, dyB, r, a, in, 1, dx, ldx)
}

// The LM head runs in row chunks: logits for a chunk of tokens at a time
// ([chunk, vocab] floats) instead of [tokens, vocab]. Taller chunks make
// taller GEMMs: on the 135M shape a 64-row chunk's head GEMM ran at about
// 60% of the rate of a 256-row one, and the head is a fifth of a step's
// FLOPs. lmHeadRows picks up to maxLMHeadChunk rows within lmHeadBytes of
// scratch (256 rows, 48 MiB, at a 49k vocabulary; 130 rows at 128k), never
// fewer than lmHeadChunk.
const (
	lmHeadChunk    = 64
	maxLMHeadChunk = 256
	lmHeadBytes    = 64 << 20
)

// lmHeadRows is the chunk height for a vocabulary.
func lmHeadRows(vocab int) int {
	return min(maxLMHeadChunk, max(lmHeadChunk, lmHeadBytes/(4*max(1, vocab))))
}

// lmHeadLoss runs the LM head over x [rows, h] (the final norm's output)
// against w [vocab, h] (packed as pw when not nil) in row chunks, fused
// with log-softmax, the loss and its gradient: per row it computes logp of the target, asks lossAt(row,
// logp) for the loss term's derivative g = d loss / d logp (rows in order,
// one goroutine), and, when dx is not nil, sets dx = dz·W with
// dz = g·(onehot(target) − softmax). logits is [chunk, vocab] scratch
// (chunk ≤ maxLMHeadChunk rows; lmHeadRows picks it). It writes logp[row]
// for every row.
func lmHeadLoss(dx, x, w []float32, pw *packed.Weights, rows, h, vocab int, targets []int32, logp []float32,
	lossAt func(row int, logp float64) float64, logits []float32) {
	var lse [maxLMHeadChunk]float64
	var grad [maxLMHeadChunk]float64
	chunk := min(maxLMHeadChunk, len(logits)/vocab)
	for c0 := 0; c0 < rows; c0 += chunk {
		c := min(chunk, rows-c0)
		z := logits[:c*vocab]
		project(z, vocab, x[c0*h:], h, w, pw, c, h, vocab, 0)
		// Per row: exponentials in place (one exp per logit, reused for the
		// gradient), the log-sum-exp in float64.
		trainParallel(c, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				zr := z[i*vocab : (i+1)*vocab]
				t := int(targets[c0+i])
				m := vmath.Max(zr)
				zt := zr[t]
				sum := vmath.ExpShift(zr, m)
				lse[i] = math.Log(sum)
				logp[c0+i] = float32(float64(zt-m) - lse[i])
			}
		})
		any := false
		for i := 0; i < c; i++ {
			grad[i] = lossAt(c0+i, float64(logp[c0+i]))
			if grad[i] != 0 {
				any = true
			}
		}
		if dx == nil {
			continue
		}
		if !any {
			clear(dx[c0*h : (c0+c)*h])
			continue
		}
		// dz_j = g·(δ_jt − p_j) with p_j = e_j / sum, over the exponentials.
		trainParallel(c, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				zr := z[i*vocab : (i+1)*vocab]
				f := float32(-grad[i] * math.Exp(-lse[i]))
				for j := range zr {
					zr[j] *= f
				}
				zr[targets[c0+i]] += float32(grad[i])
			}
		})
		pgemm(false, false, c, h, vocab, 1, z, vocab, w, h, 0, dx[c0*h:], h)
	}
}
