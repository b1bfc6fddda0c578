package trainer

import "sync"

// arena hands out the float32 buffers of one call — a training pass, a
// Logits call, a sampling call with its KV cache — from one block, and
// takes them all back at once. A call that outgrows the block gets fresh
// memory; reset then grows the block to the peak, so that the next call of
// that size allocates nothing.
type arena struct {
	block []float32
	off   int
	extra int // floats handed out beyond the block since the last reset
	peak  int
}

// dirty returns n float32s with unspecified contents (for outputs that are
// fully overwritten, such as a product with beta 0).
func (a *arena) dirty(n int) []float32 {
	if a.off+n <= len(a.block) {
		s := a.block[a.off : a.off+n : a.off+n]
		a.off += n
		return s
	}
	a.extra += n
	return make([]float32, n)
}

// zeroed returns n zeroed float32s.
func (a *arena) zeroed(n int) []float32 {
	s := a.dirty(n)
	clear(s)
	return s
}

// reset takes every buffer back.
func (a *arena) reset() {
	if used := a.off + a.extra; a.extra > 0 {
		a.peak = max(a.peak, used)
		a.block = make([]float32, a.peak)
	}
	a.off, a.extra = 0, 0
}

// bytes is the memory the arena holds between calls.
func (a *arena) bytes() int64 { return int64(len(a.block)) * 4 }

// arenaPool recycles a model's arenas, one per call in flight. While a
// training session is open its idle arenas are held: a garbage collection
// must not make the next step fault in hundreds of megabytes again (a
// sync.Pool would drop them). With no session open they sit in a
// sync.Pool, so that an idle model gives the memory of its last calls back.
type arenaPool struct {
	mu       sync.Mutex
	held     []*arena
	sessions int
	idle     sync.Pool
}

// get returns an arena for one call; give it back with put.
func (p *arenaPool) get() *arena {
	p.mu.Lock()
	if n := len(p.held); n > 0 {
		a := p.held[n-1]
		p.held = p.held[:n-1]
		p.mu.Unlock()
		return a
	}
	p.mu.Unlock()
	if a, ok := p.idle.Get().(*arena); ok {
		return a
	}
	return &arena{}
}

// put resets a and keeps it for a later call. Buffers from a must not be
// used afterwards.
func (p *arenaPool) put(a *arena) {
	a.reset()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sessions > 0 {
		p.held = append(p.held, a)
		return
	}
	p.idle.Put(a)
}

// hold and drop count the sessions open on the model; when the last one
// closes, the held arenas go.
func (p *arenaPool) hold() {
	p.mu.Lock()
	p.sessions++
	p.mu.Unlock()
}

func (p *arenaPool) drop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sessions--; p.sessions <= 0 {
		p.sessions, p.held = 0, nil
	}
}

// heldBytes returns the size of each held arena (for the benchmarks).
func (p *arenaPool) heldBytes() []int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]int64, len(p.held))
	for i, a := range p.held {
		out[i] = a.bytes()
	}
	return out
}
