package trainer

import (
	"context"
	"math"
	"math/rand"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/packed"
)

func TestSingleThreadBLASNests(t *testing.T) {
	blas.SetThreads(2)
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 50; j++ {
				AcquireSingleThreadBLAS()
				if n := blas.Threads(); n != 1 {
					t.Errorf("inside: %d threads", n)
				}
				ReleaseSingleThreadBLAS()
			}
		}()
	}
	wg.Wait()
	if n := blas.Threads(); n != 2 {
		t.Errorf("after concurrent use: %d threads, want 2 restored", n)
	}
}

// TestSingleThreadBLASOneCounter: a training pass (singleThreadBLAS) and a
// sampler (AcquireSingleThreadBLAS) that overlap, in the order that broke two
// separate counters (sampler in, trainer in, sampler out, trainer out),
// keep OpenBLAS at one thread while either runs and restore it after.
func TestSingleThreadBLASOneCounter(t *testing.T) {
	blas.SetThreads(2)
	AcquireSingleThreadBLAS()
	release := singleThreadBLAS()
	ReleaseSingleThreadBLAS()
	if n := blas.Threads(); n != 1 {
		t.Errorf("training pass still running: %d threads, want 1", n)
	}
	release()
	if n := blas.Threads(); n != 2 {
		t.Fatalf("after both: %d threads, want 2 restored", n)
	}

	// The same with the real entry points racing on one model.
	m := mustLoad(t, "tiny-sp")
	V := m.Config().VocabSize
	s := mustSession(t, m, SessionConfig{Rank: 2, Seed: 1})
	data := randomData(rand.New(rand.NewSource(1)), V, 6, 2)
	p := DefaultSamplingParams()
	p.MaxTokens = 4
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 4; g++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, err := m.Sample(context.Background(), [][]int{testTokens(5, V, g)}, 1, p, nil)
			errs <- err
		}()
		go func() {
			defer wg.Done()
			_, err := s.Forward(context.Background(), data, LossCrossEntropy, nil)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := blas.Threads(); n != 2 {
		t.Errorf("after concurrent sampling and training: %d threads, want 2 restored", n)
	}
}

func TestParallelRowsCoversAll(t *testing.T) {
	m := &Model{gemm: newWorkPool(3)}
	defer m.gemm.stop()
	var task jobsTask
	for _, rows := range []int{0, 1, 7, 8, 17, 100} {
		seen := make([]int, rows)
		var mu sync.Mutex
		parts := 0
		m.parallelRows(&task, rows, minElemsPerWorker, func(lo, hi int) {
			mu.Lock()
			defer mu.Unlock()
			parts++
			for i := lo; i < hi; i++ {
				seen[i]++
			}
		})
		if want := min(rows, 4); rows > 0 && parts != want {
			t.Errorf("rows %d: %d parts, want %d", rows, parts, want)
		}
		for i, n := range seen {
			if n != 1 {
				t.Fatalf("rows %d: row %d visited %d times", rows, i, n)
			}
		}
	}
}

// TestParallelWorkerIndexes: every job runs once, on a worker index below
// threads() that no other job holds at the same time (per-worker scratch
// relies on it), and the pool's workers take part: each round's first job
// waits until a job finishes on another worker, so a round cannot end on
// one goroutine.
func TestParallelWorkerIndexes(t *testing.T) {
	m := &Model{gemm: newWorkPool(3)}
	defer m.gemm.stop()
	var task jobsTask
	threads := m.threads()
	busy := make([]atomic.Bool, threads)
	doneBy := make([]atomic.Int32, threads)
	ran := make([]atomic.Int32, 200)
	for round := 0; round < 20; round++ {
		for i := range ran {
			ran[i].Store(0)
		}
		for i := range doneBy {
			doneBy[i].Store(0)
		}
		var first atomic.Bool
		m.parallel(&task, len(ran), func(worker, job int) {
			if worker < 0 || worker >= threads {
				t.Errorf("worker %d of %d", worker, threads)
				return
			}
			if busy[worker].Swap(true) {
				t.Errorf("worker %d runs two jobs at once", worker)
			}
			if first.CompareAndSwap(false, true) {
				deadline := time.Now().Add(10 * time.Second)
				for others := int32(0); others == 0; {
					if time.Now().After(deadline) {
						t.Errorf("round %d: no other worker finished a job in 10 s", round)
						break
					}
					runtime.Gosched()
					for w := range doneBy {
						if w != worker {
							others += doneBy[w].Load()
						}
					}
				}
			}
			ran[job].Add(1)
			busy[worker].Store(false)
			doneBy[worker].Add(1)
		})
		for i := range ran {
			if n := ran[i].Load(); n != 1 {
				t.Fatalf("round %d: job %d ran %d times", round, i, n)
			}
		}
	}
}

// TestLinearChunksMatchOneCall: a Linear split into claimable column chunks
// across the pool (sgemv, blocked-sgemv and sgemm paths, widths that are
// not a multiple of the chunk) gives what one BLAS call gives, with beta 0
// and 1; so does the packed kernel's split (whole panels per chunk) where
// the CPU runs it.
func TestLinearChunksMatchOneCall(t *testing.T) {
	m := &Model{gemm: newWorkPool(3)}
	defer m.gemm.stop()
	AcquireSingleThreadBLAS()
	defer ReleaseSingleThreadBLAS()
	rng := rand.New(rand.NewSource(9))
	var task gemmTask
	for _, sh := range [][3]int{{1, 576, 1000}, {3, 300, 2050}, {130, 576, 963}, {64, 1536, 576}} {
		rows, in, out := sh[0], sh[1], sh[2]
		task.chunks = 0
		x, w := make([]float32, rows*in), make([]float32, out*in)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		for i := range w {
			w[i] = float32(rng.NormFloat64())
		}
		for _, beta := range []float32{0, 1} {
			want, got := linearStartY(rows*out), linearStartY(rows*out)
			Linear(want, out, x, in, w, rows, in, out, beta)
			m.linear(&task, got, out, x, in, w, nil, rows, in, out, beta)
			for i := range want {
				if d := want[i] - got[i]; d > 1e-4 || d < -1e-4 {
					t.Fatalf("%v beta %v: element %d = %v, one call gives %v", sh, beta, i, got[i], want[i])
				}
			}
			if task.chunks < 2 {
				t.Errorf("%v: not split (%d chunks); the test checks nothing", sh, task.chunks)
			}
			if !packed.Available() {
				continue
			}
			task.chunks = 0
			copy(got, linearStartY(rows*out))
			m.linear(&task, got, out, x, in, w, packed.Pack(w, out, in), rows, in, out, beta)
			for i := range want {
				// Its sums run in another order: agree to the f32 rounding
				// of an in-term dot product of N(0,1) products (error
				// grows like √in) plus rounding of the result; a wrong
				// panel or beta is off by O(1).
				if d := float64(want[i] - got[i]); math.Abs(d) > 1e-5*(math.Sqrt(float64(in))+math.Abs(float64(want[i]))) {
					t.Fatalf("%v beta %v packed: element %d = %v, one call gives %v", sh, beta, i, got[i], want[i])
				}
			}
			if task.chunks < 2 {
				t.Errorf("%v packed: not split (%d chunks); the test checks nothing", sh, task.chunks)
			}
		}
	}
}

// linearStartY is the y both sides of TestLinearChunksMatchOneCall start from.
func linearStartY(n int) []float32 {
	y := make([]float32, n)
	for i := range y {
		y[i] = float32(i % 3)
	}
	return y
}

// TestProjectPackedSplitMatchesSgemm: the training forward's product on
// packed weights, cut into panel chunks over goroutines, agrees with
// OpenBLAS's (pgemm) to f32 rounding, with beta 0 and 1.
func TestProjectPackedSplitMatchesSgemm(t *testing.T) {
	if !packed.Available() {
		t.Skip("no AVX-512F: project always takes pgemm here")
	}
	rows, in, out := 64, 128, 300
	rng := rand.New(rand.NewSource(21))
	x, w := make([]float32, rows*in), make([]float32, out*in)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	for i := range w {
		w[i] = float32(rng.NormFloat64())
	}
	pw := packed.Pack(w, out, in)
	if rows*in*out < pgemmMinFlops || pw.PanelChunk(runtime.GOMAXPROCS(0)) >= out {
		t.Skip("the product would not be split here (one CPU)")
	}
	for _, beta := range []float32{0, 1} {
		want, got := linearStartY(rows*out), linearStartY(rows*out)
		project(want, out, x, in, w, nil, rows, in, out, beta)
		project(got, out, x, in, w, pw, rows, in, out, beta)
		for i := range want {
			if d := float64(want[i] - got[i]); math.Abs(d) > 1e-5*(math.Sqrt(float64(in))+math.Abs(float64(want[i]))) {
				t.Fatalf("beta %v: element %d = %v, pgemm gives %v", beta, i, got[i], want[i])
			}
		}
	}
}
