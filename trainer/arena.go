package trainer

import "sync"

// Arena hands out float32 buffers for one call and takes them all back at
// once with Reset. After the first call of a given size it allocates
// nothing: Reset folds the chunks it had to add into one big enough chunk.
type Arena struct {
	chunks [][]float32
	cur    int // index of the chunk being filled
	off    int // next free element of chunks[cur]
	total  int // elements handed out since the last reset
	peak   int
}

// Alloc returns n zeroed float32s valid until the next reset.
func (a *Arena) Alloc(n int) []float32 {
	s := a.AllocDirty(n)
	clear(s)
	return s
}

// AllocDirty returns n float32s with unspecified contents (for outputs that
// are fully overwritten, such as a GEMM with beta 0).
func (a *Arena) AllocDirty(n int) []float32 {
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

// Reset takes back every buffer. When the call needed more than one chunk,
// the chunks are replaced by one of the peak size so the next call fits.
func (a *Arena) Reset() {
	a.peak = max(a.peak, a.total)
	if len(a.chunks) > 1 {
		a.chunks = [][]float32{make([]float32, a.peak)}
	}
	a.cur, a.off, a.total = 0, 0, 0
}

// arenaPool recycles arenas between calls; each call owns one Arena.
type arenaPool struct{ p sync.Pool }

func (p *arenaPool) get() *Arena {
	if a, ok := p.p.Get().(*Arena); ok {
		return a
	}
	return &Arena{}
}

func (p *arenaPool) put(a *Arena) {
	a.Reset()
	p.p.Put(a)
}

// GetArena returns a scratch arena for one call; give it back with PutArena.
func (m *Model) GetArena() *Arena { return m.pool.get() }

// PutArena resets a and keeps it for a later call. Buffers from a must not
// be used afterwards.
func (m *Model) PutArena(a *Arena) { m.pool.put(a) }
