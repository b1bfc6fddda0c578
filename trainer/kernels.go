package trainer

import (
	"math"
	"sync"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/team"
)

// The engine's kernels are package team's tasks (products, attention, the
// element-wise kernels of package vmath), which run on the model's team:
// its one parallel runner, shared by the forward, the backward and the
// LM head. What is left here is the glue they need. Every matrix is
// row-major float32; "packed" means all sequences of a call stacked as the
// rows of one [tokens, width] matrix.

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

// headNorm applies Qwen3's per-head RMSNorm in place to the q heads
// (columns 0..H·D) and the k heads (the next KV·D) of each of rows rows of
// qkv (stride ld), saving each head's 1/rms in rinvQ [rows·H] and rinvK
// [rows·KV] when they are not nil. Without norms it does nothing. A row's
// heads are adjacent: one [heads, d] matrix each for q and k.
func headNorm(tm *team.Team, qkv []float32, rows, ld, nq, nkv, d int, wq, wk []float32, eps float32, rinvQ, rinvK []float32) {
	if wq == nil {
		return
	}
	for r := 0; r < rows; r++ {
		q, k := qkv[r*ld:r*ld+nq*d], qkv[r*ld+nq*d:r*ld+(nq+nkv)*d]
		var rq, rk []float32
		if rinvQ != nil {
			rq, rk = rinvQ[r*nq:(r+1)*nq], rinvK[r*nkv:(r+1)*nkv]
		}
		tm.RMSNorm(q, rq, q, wq, nq, d, eps)
		tm.RMSNorm(k, rk, k, wk, nkv, d, eps)
	}
}

// headNormBackward replaces, in each of rows rows of dqkv (stride ld), the
// gradient with respect to the normed q and k heads with the gradient with
// respect to the heads before headNorm; pre holds those heads
// ([rows, (nq+nkv)·d]) and rinvQ/rinvK their 1/rms. tmp is (nq+nkv)·d
// floats.
func headNormBackward(tm *team.Team, dqkv []float32, rows, ld, nq, nkv, d int, wq, wk, pre, rinvQ, rinvK, tmp []float32) {
	qk := (nq + nkv) * d
	for r := 0; r < rows; r++ {
		dy, x := dqkv[r*ld:r*ld+qk], pre[r*qk:(r+1)*qk]
		clear(tmp)
		tm.RMSNormBackward(tmp[:nq*d], dy[:nq*d], x[:nq*d], wq, rinvQ[r*nq:(r+1)*nq], nq, d)
		tm.RMSNormBackward(tmp[nq*d:], dy[nq*d:], x[nq*d:], wk, rinvK[r*nkv:(r+1)*nkv], nkv, d)
		copy(dy, tmp)
	}
}

// addBias adds a per-column bias to each of rows rows of y (row stride ld);
// a nil bias adds nothing.
func addBias(y []float32, rows, ld int, bias []float32) {
	if bias == nil {
		return
	}
	for r := 0; r < rows; r++ {
		row := y[r*ld : r*ld+len(bias)]
		for j, b := range bias {
			row[j] += b
		}
	}
}

// singleBLAS counts the callers that need OpenBLAS at one thread. The
// team's jobs call OpenBLAS on every thread, and OpenBLAS's own threads
// would spin after every call and fight the team for the cores. Its thread
// count is process-wide, so concurrent calls must not each save and
// restore it: the last restore would win, possibly leaving it at 1.
var singleBLAS struct {
	sync.Mutex
	users int
	saved int
}

// AcquireSingleThreadBLAS sets OpenBLAS to one thread until the matching
// ReleaseSingleThreadBLAS; calls nest and may come from many goroutines.
// Every pass holds it while it runs.
func AcquireSingleThreadBLAS() {
	singleBLAS.Lock()
	defer singleBLAS.Unlock()
	if singleBLAS.users == 0 {
		singleBLAS.saved = blas.Threads()
		blas.SetThreads(1)
	}
	singleBLAS.users++
}

// ReleaseSingleThreadBLAS undoes one AcquireSingleThreadBLAS; the last one
// restores the thread count the first found.
func ReleaseSingleThreadBLAS() {
	singleBLAS.Lock()
	defer singleBLAS.Unlock()
	singleBLAS.users--
	if singleBLAS.users == 0 {
		blas.SetThreads(singleBLAS.saved)
	}
}

// singleThreadBLAS is AcquireSingleThreadBLAS returning the matching
// release, for a defer.
func singleThreadBLAS() (release func()) {
	AcquireSingleThreadBLAS()
	return ReleaseSingleThreadBLAS
}
