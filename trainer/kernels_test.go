package trainer

import (
	"context"
	"math"
	"math/rand"
	"sync"
	"testing"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/packed"
	"github.com/signal-p2p/signal/trainer/team"
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

// linearStartY is the y both sides of TestProjectPackedMatchesSgemm start from.
func linearStartY(n int) []float32 {
	y := make([]float32, n)
	for i := range y {
		y[i] = float32(i % 3)
	}
	return y
}

// TestProjectPackedMatchesSgemm: a projection on packed weights, shared
// out in panel chunks on a team and alone, agrees with OpenBLAS's product
// (also shared out) to f32 rounding, with beta 0 and 1, for a decode row,
// a few rows and a prefill's worth.
func TestProjectPackedMatchesSgemm(t *testing.T) {
	if !packed.Available() {
		t.Skip("no AVX-512F: projections always run on OpenBLAS here")
	}
	tm, err := team.New(2)
	if err != nil {
		t.Fatal(err)
	}
	defer tm.Close()
	AcquireSingleThreadBLAS()
	defer ReleaseSingleThreadBLAS()
	rng := rand.New(rand.NewSource(21))
	for _, sh := range [][3]int{{1, 576, 1000}, {3, 300, 2050}, {130, 576, 963}} {
		rows, in, out := sh[0], sh[1], sh[2]
		x, w := make([]float32, rows*in), make([]float32, out*in)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		for i := range w {
			w[i] = float32(rng.NormFloat64())
		}
		pw := packed.Pack(w, out, in)
		for _, shared := range []*team.Team{tm, nil} {
			for _, beta := range []float32{0, 1} {
				want, got := linearStartY(rows*out), linearStartY(rows*out)
				project(shared, want, out, x, in, &base{out: out, in: in, f32: w}, rows, beta)
				project(shared, got, out, x, in, &base{out: out, in: in, p: pw}, rows, beta)
				for i := range want {
					// Its sums run in another order: agree to the f32 rounding
					// of an in-term dot product of N(0,1) products (error
					// grows like √in) plus rounding of the result; a wrong
					// panel or beta is off by O(1).
					if d := float64(want[i] - got[i]); math.Abs(d) > 1e-5*(math.Sqrt(float64(in))+math.Abs(float64(want[i]))) {
						t.Fatalf("%v beta %v team %v: element %d = %v, sgemm gives %v", sh, beta, shared != nil, i, got[i], want[i])
					}
				}
			}
		}
		pw.Free()
	}
}
