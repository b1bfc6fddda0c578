package trainer

import (
	"math"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/packed"
)

// A training pass runs OpenBLAS single-threaded and splits each large GEMM
// across goroutines itself. With OpenBLAS's own pool, its worker threads
// spin (sched_yield) for a while after every GEMM, stealing the cores from
// the element-wise and attention goroutines that run between GEMMs: on two
// cores a profile showed ~20% of the step in the scheduler. One pool — Go's
// — for everything avoids that.

// pgemmMinFlops is the product size below which splitting does not pay
// (goroutine hand-off and smaller panels cost more than they save).
const pgemmMinFlops = 1 << 21

// pgemmChunksPerThread: a split product is cut into this many chunks per
// thread, claimed one at a time, so that the caller takes a helper's chunk
// when the helper goroutine is slow to start. Each chunk re-packs the shared
// operand: more chunks per thread measured slower (see chunksPerThread).
const pgemmChunksPerThread = 1

// pgemm is blas.Sgemm split over up to GOMAXPROCS goroutines (the caller
// and helpers) by chunks of C's rows (when m is large) or columns, each a
// single-threaded sgemm.
func pgemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int,
	b []float32, ldb int, beta float32, c []float32, ldc int) {
	w := runtime.GOMAXPROCS(0)
	if w <= 1 || m*n*k < pgemmMinFlops {
		blas.Sgemm(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
		return
	}
	byRows := m >= n || m >= 64*w
	dim := n
	if byRows {
		dim = m
	}
	chunks := min(pgemmChunksPerThread*w, (dim+15)/16)
	size := (dim + chunks - 1) / chunks
	if !byRows {
		size = (size + 7) &^ 7 // 8-aligned column blocks
	}
	chunks = (dim + size - 1) / size
	if chunks < 2 {
		blas.Sgemm(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
		return
	}
	var next atomic.Int32
	run := func() {
		for {
			i := int(next.Add(1)) - 1
			if i >= chunks {
				return
			}
			lo, hi := i*size, min(dim, (i+1)*size)
			if byRows {
				aOff := lo * lda // rows of op(A) are rows of A
				if transA {
					aOff = lo // ... or columns of A
				}
				blas.Sgemm(transA, transB, hi-lo, n, k, alpha, a[aOff:], lda, b, ldb, beta, c[lo*ldc:], ldc)
			} else {
				bOff := lo // columns of op(B) are columns of B
				if transB {
					bOff = lo * ldb // ... or rows of B
				}
				blas.Sgemm(transA, transB, m, hi-lo, k, alpha, a, lda, b[bOff:], ldb, beta, c[lo:], ldc)
			}
		}
	}
	var wg sync.WaitGroup
	helpers := min(w, chunks) - 1
	wg.Add(helpers)
	for i := 0; i < helpers; i++ {
		go func() {
			defer wg.Done()
			run()
		}()
	}
	run()
	wg.Wait()
}

// project is y = x·Wᵀ + beta·y for one of the model's projections (W
// [out, in], x [rows, in]): on the packed kernel when the model has W
// packed (pw, see Model.packWeights), its panels split over up to
// GOMAXPROCS goroutines, otherwise pgemm.
func project(y []float32, ldy int, x []float32, ldx int, w []float32, pw *packed.Weights, rows, in, out int, beta float32) {
	if pw == nil {
		pgemm(false, true, rows, out, in, 1, x, ldx, w, in, beta, y, ldy)
		return
	}
	per := pw.PanelChunk(runtime.GOMAXPROCS(0))
	if per >= out || rows*in*out < pgemmMinFlops {
		pw.Mul(y, ldy, x, ldx, rows, beta)
		return
	}
	var wg sync.WaitGroup
	for n0 := per; n0 < out; n0 += per {
		wg.Add(1)
		go func(n0 int) {
			defer wg.Done()
			pw.MulCols(y, ldy, x, ldx, rows, n0, min(out, n0+per), beta)
		}(n0)
	}
	pw.MulCols(y, ldy, x, ldx, rows, 0, min(out, per), beta)
	wg.Wait()
}

// singleThreadBLAS is AcquireSingleThreadBLAS for a training pass, returning
// the matching release. Training and sampling share that one process-wide
// counter: with two, a sampler and a training pass that overlap would each
// save the other's "1" and the last to finish could leave OpenBLAS at one
// thread for good.
func singleThreadBLAS() (restore func()) {
	AcquireSingleThreadBLAS()
	return ReleaseSingleThreadBLAS
}

// expNeg is a float32 exp for x ≤ 0, the softmax and log-softmax case
// (arguments are logits minus their maximum): Cody-Waite reduction to
// |r| ≤ ln2/2 and Cephes' expf polynomial, in float32 throughout, within
// 2 ulp of exp. It is the LM head's innermost operation (vocab exps per
// token), where the float64 path of Expf costs about twice as much. Below
// -87.3, where exp underflows float32's normal range, it returns 0.
func expNeg(x float32) float32 {
	if x > 0 {
		return Expf(x)
	}
	if x < -87.3 {
		return 0
	}
	k := int32(x*1.44269504088896341 - 0.5) // round to nearest for x ≤ 0
	kf := float32(k)
	r := x - kf*0.693359375 - kf*-2.12194440e-4
	p := float32(1.9875691500e-4)
	p = p*r + 1.3981999507e-3
	p = p*r + 8.3334519073e-3
	p = p*r + 4.1665795894e-2
	p = p*r + 1.6666665459e-1
	p = p*r + 5.0000001201e-1
	p = p*r*r + r + 1
	return p * math.Float32frombits(uint32(k+127)<<23)
}
