package trainer

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/packed"
)

// The inference forward shares its parallel work between the caller and
// the model's helpers. With packed weights the helpers are a team of POSIX
// threads (package team, which explains why not goroutines) and the team
// runs the products, attention and SwiGLU; the element-wise passes left
// (RMSNorm, RoPE) run on the caller. Otherwise the helpers are the
// goroutines of a workPool, which runs column chunks of the products
// (gemmTask), per-head attention and row splits of the element-wise passes
// (jobsTask). Either way OpenBLAS runs single-threaded
// (AcquireSingleThreadBLAS, one process-wide counter shared with
// training): its own threads would spin after every GEMM and fight the
// helpers for the cores, as would goroutines started per pass.

// minElemsPerWorker keeps the element-wise kernels on the calling goroutine
// unless each worker gets this many elements: below it a split saves less
// than the hand-off costs, and on a loaded machine every join is a chance
// to wait for a descheduled thread.
const minElemsPerWorker = 1 << 16

// parallel runs fn(worker, job) for jobs [0, n) on the calling goroutine
// and the model's pool, each job once. worker is 0 on the caller and
// 1..m.threads()-1 on the pool's workers: an index into per-worker scratch,
// never used by two jobs at once. t is the caller's task, as for linear.
// Jobs that call BLAS need the caller to hold AcquireSingleThreadBLAS.
func (m *Model) parallel(t *jobsTask, n int, fn func(worker, job int)) {
	p := m.gemm
	if p == nil || n < 2 {
		for j := 0; j < n; j++ {
			fn(0, j)
		}
		return
	}
	t.fn, t.n = fn, n
	t.next.Store(0)
	p.share(t, min(p.workers, n-1))
	t.fn = nil
}

// parallelRows runs fn on contiguous row ranges covering [0, rows), rows of
// width elements each, split across the pool when each part gets at least
// minElemsPerWorker elements.
func (m *Model) parallelRows(t *jobsTask, rows, width int, fn func(lo, hi int)) {
	w := min(m.threads(), rows*width/minElemsPerWorker, rows)
	if w <= 1 {
		fn(0, rows)
		return
	}
	m.parallel(t, w, func(_, j int) { fn(j*rows/w, (j+1)*rows/w) })
}

// threads is how many threads share the model's parallel work: the team's
// or the pool's, and the caller.
func (m *Model) threads() int {
	switch {
	case m.team != nil:
		return m.team.Threads()
	case m.gemm != nil:
		return m.gemm.workers + 1
	}
	return 1
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
func (m *Model) rmsNormPar(t *jobsTask, out, rstd, x, w []float32, rows, dim int, eps float32) {
	m.parallelRows(t, rows, dim, func(lo, hi int) {
		var rs []float32
		if rstd != nil {
			rs = rstd[lo:hi]
		}
		RMSNorm(out[lo*dim:hi*dim], rs, x[lo*dim:hi*dim], w, hi-lo, dim, eps)
	})
}

func (m *Model) ropePar(t *jobsTask, x []float32, rows, ld, col0, nHeads, d int, cos, sin []float32) {
	half := d / 2
	m.parallelRows(t, rows, nHeads*d, func(lo, hi int) {
		ApplyRope(x[lo*ld:], hi-lo, ld, col0, nHeads, d, cos[lo*half:hi*half], sin[lo*half:hi*half])
	})
}

func (m *Model) siluMulPar(t *jobsTask, act, gu []float32, rows, inter int) {
	if m.team != nil && rows*3*inter >= 2*minElemsPerWorker {
		m.team.SwiGLU(act, gu, rows, inter)
		return
	}
	m.parallelRows(t, rows, 3*inter, func(lo, hi int) {
		SiluMul(act[lo*inter:hi*inter], gu[lo*2*inter:hi*2*inter], hi-lo, inter)
	})
}

// poolTask is work that the caller and the pool's workers share: run
// claims pieces of it until none are left; the caller waits for its
// helpers on group.
type poolTask interface {
	run(worker int)
	group() *sync.WaitGroup
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

func (t *gemmTask) run(int) {
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

func (t *gemmTask) group() *sync.WaitGroup { return &t.wg }

// jobsTask is n independent jobs (Model.parallel), claimed in order.
type jobsTask struct {
	fn   func(worker, job int)
	n    int
	next atomic.Int32
	wg   sync.WaitGroup
}

func (t *jobsTask) run(worker int) {
	for {
		j := int(t.next.Add(1)) - 1
		if j >= t.n {
			return
		}
		t.fn(worker, j)
	}
}

func (t *jobsTask) group() *sync.WaitGroup { return &t.wg }

// workPool runs shared tasks on goroutines that live as long as the Model
// (started by LoadModel, stopped by Close).
type workPool struct {
	tasks   chan poolTask
	workers int
	wg      sync.WaitGroup
}

func newWorkPool(workers int) *workPool {
	p := &workPool{tasks: make(chan poolTask, 4*workers), workers: workers}
	for i := 0; i < workers; i++ {
		p.wg.Add(1)
		go func(worker int) {
			defer p.wg.Done()
			for {
				t, ok := p.next()
				if !ok {
					return
				}
				t.run(worker)
				t.group().Done()
			}
		}(i + 1)
	}
	return p
}

// share offers t to helpers of the pool's workers, runs it on the caller
// (worker 0) and returns once every helper is done with it.
func (p *workPool) share(t poolTask, helpers int) {
	t.group().Add(helpers)
	for i := 0; i < helpers; i++ {
		p.tasks <- t
	}
	t.run(0)
	t.group().Wait()
}

// spinFor is how long a worker keeps polling for the next task before it
// parks. A forward hands work to the workers every few hundred
// microseconds; waking a parked goroutine takes tens (a futex wake, then
// the scheduler), and on two cores the caller finishes its part and waits
// for the late helper. Polling yields the P each round (runtime.Gosched),
// so other goroutines still run.
const spinFor = 200 * time.Microsecond

// next returns the next task, polling for up to spinFor before blocking;
// ok is false once the pool is stopped.
func (p *workPool) next() (t poolTask, ok bool) {
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

func (p *workPool) stop() {
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

// linear is Linear split by output features across the model's workPool
// and the calling goroutine, each chunk a single-threaded BLAS call: the
// caller must hold AcquireSingleThreadBLAS. pw, when not nil, is w packed
// at load (packWeights) and does the product instead of OpenBLAS. t is the
// caller's task (owned by a long-lived struct so that passing it does not
// allocate); one task serves one product at a time.
func (m *Model) linear(t *gemmTask, y []float32, ldy int, x []float32, ldx int, w []float32, pw *packed.Weights, rows, in, out int, beta float32) {
	if pw != nil && m.team != nil && rows*in*out >= minParallelMACs {
		m.team.Mul(pw, y, ldy, x, ldx, rows, beta)
		return
	}
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
	p.share(t, min(p.workers, chunks-1))
}

// linearOne is linear's product on the calling goroutine alone.
func linearOne(y []float32, ldy int, x []float32, ldx int, w []float32, pw *packed.Weights, rows, in, out int, beta float32) {
	if pw != nil {
		pw.Mul(y, ldy, x, ldx, rows, beta)
		return
	}
	Linear(y, ldy, x, ldx, w, rows, in, out, beta)
}
