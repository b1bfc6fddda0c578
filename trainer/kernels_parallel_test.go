package trainer

import (
	"sync"
	"testing"

	"github.com/signal-p2p/signal/trainer/blas"
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

func TestParallelRowsCoversAll(t *testing.T) {
	for _, rows := range []int{0, 1, 7, 8, 17, 100} {
		seen := make([]int, rows)
		var mu sync.Mutex
		parallelRows(rows, func(lo, hi int) {
			mu.Lock()
			defer mu.Unlock()
			for i := lo; i < hi; i++ {
				seen[i]++
			}
		})
		for i, n := range seen {
			if n != 1 {
				t.Fatalf("rows %d: row %d visited %d times", rows, i, n)
			}
		}
	}
}
