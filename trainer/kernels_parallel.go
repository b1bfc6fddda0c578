package trainer

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/packed"
)

// The inference forward uses one pool of threads, Go's: OpenBLAS runs
// single-threaded (AcquireSingleThreadBLAS, one process-wide counter shared
// with training) and each large product is cut into column chunks that the
// model's gemmPool workers and the caller claim (gemmTask); per-head
// attention and large element-wise passes run on goroutines between
// products. OpenBLAS's own threads would spin after every GEMM and fight
// those goroutines for the cores.

// minElemsPerWorker keeps the element-wise kernels on the calling goroutine
// unless each worker gets this many elements: below it (a 128-token
// RMSNorm, ~20µs) a split saves less than the goroutine hand-off costs, and
// on a loaded machine every join is a chance to wait for a descheduled
// thread.
const minElemsPerWorker = 1 << 16

// parallelRows runs fn on contiguous row ranges covering [0, rows) of
// width elements each on up to GOMAXPROCS goroutines and waits for all of
// them.
func parallelRows(rows, width int, fn func(lo, hi int)) {
	w := min(runtime.GOMAXPROCS(0), rows*width/minElemsPerWorker, rows)
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
	parallelRows(rows, dim, func(lo, hi int) {
		var rs []float32
		if rstd != nil {
			rs = rstd[lo:hi]
		}
		RMSNorm(out[lo*dim:hi*dim], rs, x[lo*dim:hi*dim], w, hi-lo, dim, eps)
	})
}

func ropePar(x []float32, rows, ld, col0, nHeads, d int, cos, sin []float32) {
	half := d / 2
	parallelRows(rows, nHeads*d, func(lo, hi int) {
		ApplyRope(x[lo*ld:], hi-lo, ld, col0, nHeads, d, cos[lo*half:hi*half], sin[lo*half:hi*half])
	})
}

func siluMulPar(act, gu []float32, rows, inter int) {
	parallelRows(rows, 3*inter, func(lo, hi int) {
		SiluMul(act[lo*inter:hi*inter], gu[lo*2*inter:hi*2*inter], hi-lo, inter)
	})
}

// gemmTask is one Linear product shared by the workers that help with it:
// its output columns are cut into chunks that the caller and the helpers
// claim one at a time until none are left. More chunks than workers keep
// both cores busy when another process takes one for a while: a static
// half-and-half split waits for the slower half. The task is owned by the
// caller (a field of a long-lived struct), so dispatch allocates nothing.
type gemmTask struct {
	y, x, w       []float32
	pw            *packed.Weights // when set, chunks run on it (chunk a multiple of its panel width) instead of w
	ldy, ldx      int
	rows, in, out int
	beta          float32
	chunk, chunks int
	next          atomic.Int32
	wg            sync.WaitGroup
}

// run claims and computes chunks until every one is taken.
func (t *gemmTask) run() {
	for {
		c := int(t.next.Add(1)) - 1
		if c >= t.chunks {
			return
		}
		c0 := c * t.chunk
		c1 := min(t.out, c0+t.chunk)
		if t.pw != nil {
			t.pw.MulCols(t.y, t.ldy, t.x, t.ldx, t.rows, c0, c1, t.beta)
			continue
		}
		Linear(t.y[c0:], t.ldy, t.x, t.ldx, t.w[c0*t.in:], t.rows, t.in, c1-c0, t.beta)
	}
}

// gemmPool runs chunks of Linear products on goroutines that live as long
// as the Model (started by LoadModel, stopped by Close).
type gemmPool struct {
	tasks   chan *gemmTask
	workers int
	wg      sync.WaitGroup
}

func newGemmPool(workers int) *gemmPool {
	p := &gemmPool{tasks: make(chan *gemmTask, 4*workers), workers: workers}
	for i := 0; i < workers; i++ {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			for {
				t, ok := p.next()
				if !ok {
					return
				}
				t.run()
				t.wg.Done()
			}
		}()
	}
	return p
}

// spinFor is how long a worker keeps polling for the next task before it
// parks. A forward hands a product to the workers every few hundred
// microseconds; waking a parked goroutine takes tens (a futex wake, then
// the scheduler), and on two cores the caller finishes its chunk and waits
// for the late helper. Polling yields the P each round (runtime.Gosched),
// so goroutines started meanwhile (attention jobs, row splits) still run.
const spinFor = 200 * time.Microsecond

// next returns the next task, polling for up to spinFor before blocking;
// ok is false once the pool is stopped.
func (p *gemmPool) next() (t *gemmTask, ok bool) {
	start := time.Now()
	for {
		// len of a buffered channel is a plain read: poll it in a tight loop
		// and take the channel's lock only when a task is there.
		for range 64 {
			if len(p.tasks) > 0 {
				select {
				case t, ok = <-p.tasks:
					return t, ok
				default: // another worker took it
				}
			}
		}
		if time.Since(start) > spinFor {
			break
		}
		runtime.Gosched()
	}
	t, ok = <-p.tasks
	return t, ok
}

func (p *gemmPool) stop() {
	close(p.tasks)
	p.wg.Wait()
}

// minParallelMACs is the product size below which splitting a GEMM costs
// more in hand-offs than it gains.
const minParallelMACs = 1 << 17

// Chunking of a split Linear: chunksPerThread chunks per thread, each at
// least minChunkMACs multiply-adds and minChunkCols columns (a multiple of
// 8), so that a chunk's BLAS call stays efficient. One chunk per thread
// measured best on the 135M shape (median of interleaved runs, 2 busy
// cores, noisy): with 2, prefill lost ~15% (every sgemm chunk packs all of
// x again); with 4, decode lost ~10%. Chunks are still claimed, not assigned, so the
// caller takes a helper's chunk when the helper is slow to wake.
const (
	chunksPerThread = 1
	minChunkMACs    = 1 << 18
	minChunkCols    = 64
)

// linear is Linear split by output features across the model's gemmPool
// and the calling goroutine, each chunk a single-threaded BLAS call: the
// caller must hold AcquireSingleThreadBLAS. pw, when not nil, is w packed
// at load (packWeights) and does the product instead of OpenBLAS. t is the
// caller's task (owned by a long-lived struct so that passing it does not
// allocate); one task serves one product at a time.
func (m *Model) linear(t *gemmTask, y []float32, ldy int, x []float32, ldx int, w []float32, pw *packed.Weights, rows, in, out int, beta float32) {
	p := m.gemm
	if p == nil || rows*in*out < minParallelMACs || out < 16*(p.workers+1) {
		linearOne(y, ldy, x, ldx, w, pw, rows, in, out, beta)
		return
	}
	threads := p.workers + 1
	var chunk int
	if pw != nil {
		// Whole panels, spread evenly: the packed kernel has no per-call
		// packing of x to amortize, so chunks need not be large.
		chunk = pw.PanelChunk(chunksPerThread * threads)
	} else {
		chunk = (out + chunksPerThread*threads - 1) / (chunksPerThread * threads)
		chunk = max(chunk, minChunkCols, minChunkMACs/max(1, rows*in))
		chunk = (chunk + 7) &^ 7
	}
	chunks := (out + chunk - 1) / chunk
	if chunks < 2 {
		linearOne(y, ldy, x, ldx, w, pw, rows, in, out, beta)
		return
	}
	t.y, t.x, t.w, t.pw, t.ldy, t.ldx = y, x, w, pw, ldy, ldx
	t.rows, t.in, t.out, t.beta = rows, in, out, beta
	t.chunk, t.chunks = chunk, chunks
	t.next.Store(0)
	helpers := min(p.workers, chunks-1)
	t.wg.Add(helpers)
	for i := 0; i < helpers; i++ {
		p.tasks <- t
	}
	t.run()
	t.wg.Wait()
}

// linearOne is linear's product on the calling goroutine alone.
func linearOne(y []float32, ldy int, x []float32, ldx int, w []float32, pw *packed.Weights, rows, in, out int, beta float32) {
	if pw != nil {
		pw.Mul(y, ldy, x, ldx, rows, beta)
		return
	}
	Linear(y, ldy, x, ldx, w, rows, in, out, beta)
}
