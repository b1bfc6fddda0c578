package trainer

import "sync"

// arena hands out float32 buffers for one call and takes them all back at
// once with reset. After the first call of a given size it allocates
// nothing: reset folds the chunks it had to add into one big enough chunk.
type arena struct {
	chunks [][]float32
	cur    int // index of the chunk being filled
	off    int // next free element of chunks[cur]
	total  int // elements handed out since the last reset
	peak   int
}

// alloc returns n zeroed float32s valid until the next reset.
func (a *arena) alloc(n int) []float32 {
	s := a.allocDirty(n)
	clear(s)
	return s
}

// allocDirty returns n float32s with unspecified contents (for outputs that
// are fully overwritten, such as a GEMM with beta 0).
func (a *arena) allocDirty(n int) []float32 {
	a.total += n
	for a.cur < len(a.chunks) {
		c := a.chunks[a.cur]
		if a.off+n <= len(c) {
			s := c[a.off : a.off+n : a.off+n]
			a.off += n
			return s
		}
		a.cur++
		a.off = 0
	}
	size := max(n, 1<<16)
	if len(a.chunks) > 0 {
		size = max(n, a.total)
	}
	a.chunks = append(a.chunks, make([]float32, size))
	a.cur = len(a.chunks) - 1
	a.off = n
	return a.chunks[a.cur][:n:n]
}

// reset takes back every buffer. When the call needed more than one chunk,
// the chunks are replaced by one of the peak size so the next call fits.
func (a *arena) reset() {
	a.peak = max(a.peak, a.total)
	if len(a.chunks) > 1 {
		a.chunks = [][]float32{make([]float32, a.peak)}
	}
	a.cur, a.off, a.total = 0, 0, 0
}

// arenaPool recycles arenas between calls; each call owns one arena.
type arenaPool struct{ p sync.Pool }

func (p *arenaPool) get() *arena {
	if a, ok := p.p.Get().(*arena); ok {
		return a
	}
	return &arena{}
}

func (p *arenaPool) put(a *arena) {
	a.reset()
	p.p.Put(a)
}
