package trainer

import (
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/signal-p2p/signal/trainer/blas"
)

// The inference forward uses one pool of cores two ways, never both at
// once: OpenBLAS's own threads inside each large GEMM, and Go goroutines for
// element-wise work and per-head attention between GEMMs. While goroutines
// run small GEMMs (attention), OpenBLAS is set to one thread so the two do
// not oversubscribe the cores.

// minRowsPerWorker keeps goroutine start-up (~1µs) small beside the work.
const minRowsPerWorker = 8

// parallelRows runs fn on contiguous row ranges covering [0, rows) on up to
// GOMAXPROCS goroutines and waits for all of them.
func parallelRows(rows int, fn func(lo, hi int)) {
	w := min(runtime.GOMAXPROCS(0), rows/minRowsPerWorker)
	if w <= 1 {
		fn(0, rows)
		return
	}
	var wg sync.WaitGroup
	for i := 1; i < w; i++ {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			fn(lo, hi)
		}(i*rows/w, (i+1)*rows/w)
	}
	fn(0, rows/w)
	wg.Wait()
}

// parallelJobs runs fn(worker, job) for jobs [0, n) on up to workers
// goroutines pulling jobs in order, with OpenBLAS held at one thread;
// worker indexes per-worker scratch.
func parallelJobs(n, workers int, fn func(worker, job int)) {
	workers = min(workers, n)
	if workers <= 1 {
		for j := 0; j < n; j++ {
			fn(0, j)
		}
		return
	}
	AcquireSingleThreadBLAS()
	defer ReleaseSingleThreadBLAS()
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for {
				j := int(next.Add(1) - 1)
				if j >= n {
					return
				}
				fn(w, j)
			}
		}(w)
	}
	wg.Wait()
}

// singleBLAS counts the callers that need OpenBLAS at one thread. OpenBLAS's
// thread count is process-wide, so concurrent calls must not each save and
// restore it: the last restore would win, possibly leaving it at 1.
var singleBLAS struct {
	sync.Mutex
	users int
	saved int
}

// AcquireSingleThreadBLAS sets OpenBLAS to one thread until the matching
// ReleaseSingleThreadBLAS; calls nest and may come from many goroutines.
// Use it around goroutine-parallel work that itself calls BLAS.
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

// rmsNormPar, ropePar and siluMulPar split the element-wise kernels by rows.
func rmsNormPar(out, rstd, x, w []float32, rows, dim int, eps float32) {
	parallelRows(rows, func(lo, hi int) {
		var rs []float32
		if rstd != nil {
			rs = rstd[lo:hi]
		}
		RMSNorm(out[lo*dim:hi*dim], rs, x[lo*dim:hi*dim], w, hi-lo, dim, eps)
	})
}

func ropePar(x []float32, rows, ld, col0, nHeads, d int, cos, sin []float32) {
	half := d / 2
	parallelRows(rows, func(lo, hi int) {
		ApplyRope(x[lo*ld:], hi-lo, ld, col0, nHeads, d, cos[lo*half:hi*half], sin[lo*half:hi*half])
	})
}

func siluMulPar(act, gu []float32, rows, inter int) {
	parallelRows(rows, func(lo, hi int) {
		SiluMul(act[lo*inter:hi*inter], gu[lo*2*inter:hi*2*inter], hi-lo, inter)
	})
}

// linJob is one column block of a Linear product, run by a gemmPool worker.
type linJob struct {
	y, x, w       []float32
	ldy, ldx      int
	rows, in, out int
	beta          float32
	done          *sync.WaitGroup
}

// gemmPool runs column blocks of Linear products on goroutines that live as
// long as the Model (started by LoadModel, stopped by Close). Jobs are plain
// structs sent over a buffered channel, so dispatching allocates nothing and
// the decode loop stays allocation-free.
type gemmPool struct {
	jobs    chan linJob
	workers int
	wg      sync.WaitGroup
}

func newGemmPool(workers int) *gemmPool {
	p := &gemmPool{jobs: make(chan linJob, 4*workers), workers: workers}
	for i := 0; i < workers; i++ {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			for j := range p.jobs {
				Linear(j.y, j.ldy, j.x, j.ldx, j.w, j.rows, j.in, j.out, j.beta)
				j.done.Done()
			}
		}()
	}
	return p
}

func (p *gemmPool) stop() {
	close(p.jobs)
	p.wg.Wait()
}

// minParallelMACs is the product size below which splitting a GEMM costs
// more in hand-offs than it gains.
const minParallelMACs = 1 << 17

// linear is Linear split by output features across the model's gemmPool
// and the calling goroutine, each block a single-threaded BLAS call: the
// caller must hold AcquireSingleThreadBLAS. done is the caller's WaitGroup
// (owned by a long-lived struct so that passing it does not allocate).
func (m *Model) linear(done *sync.WaitGroup, y []float32, ldy int, x []float32, ldx int, w []float32, rows, in, out int, beta float32) {
	p := m.gemm
	if p == nil || rows*in*out < minParallelMACs || out < 16*(p.workers+1) {
		Linear(y, ldy, x, ldx, w, rows, in, out, beta)
		return
	}
	parts := p.workers + 1
	bounds := func(i int) int { return (i * out / parts) &^ 7 } // 8-aligned column blocks
	done.Add(parts - 1)
	for i := 1; i < parts; i++ {
		c0, c1 := bounds(i), out
		if i < parts-1 {
			c1 = bounds(i + 1)
		}
		p.jobs <- linJob{y: y[c0:], ldy: ldy, x: x, ldx: ldx, w: w[c0*in:], rows: rows, in: in, out: c1 - c0, beta: beta, done: done}
	}
	Linear(y, ldy, x, ldx, w, rows, in, bounds(1), beta)
	done.Wait()
}
