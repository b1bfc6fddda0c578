package coordinator

import (
	"context"
	"sync"
)

// runGates lets one billed call per run at a time go to its node. A node
// runs a run's calls one after another anyway; queueing them here instead
// means a call whose client hung up while it waited is dropped before any
// node sees it (issue 13, item 5), while one that started runs to its end
// and is billed.
type runGates struct {
	mu sync.Mutex
	m  map[string]*runGate
}

type runGate struct {
	slot  chan struct{}
	users int // holders and waiters; the entry goes when it reaches 0
}

func newRunGates() *runGates { return &runGates{m: map[string]*runGate{}} }

// acquire waits for run's turn, or returns ctx's error if ctx ends first.
func (g *runGates) acquire(ctx context.Context, run string) (release func(), err error) {
	g.mu.Lock()
	e := g.m[run]
	if e == nil {
		e = &runGate{slot: make(chan struct{}, 1)}
		g.m[run] = e
	}
	e.users++
	g.mu.Unlock()
	done := func() {
		g.mu.Lock()
		if e.users--; e.users == 0 {
			delete(g.m, run)
		}
		g.mu.Unlock()
	}
	select {
	case e.slot <- struct{}{}:
		return func() { <-e.slot; done() }, nil
	case <-ctx.Done():
		done()
		return nil, ctx.Err()
	}
}
