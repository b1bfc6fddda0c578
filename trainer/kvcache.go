package trainer

// kvCache holds rotated keys and values of several sequences ("slots") for
// decoding. Each (slot, layer, kv head) block is [maxLen, D] contiguous, so
// one head's keys are read as one matrix by the decode attention
// (team.DecodeAttention, which computes the same block offsets).
type kvCache struct {
	slots, layers, h, kv, maxLen, d int
	k, v                            []float32
	lens                            []int // tokens cached per slot
}

// newKVCache takes the cache's memory from ar, so that a pooled arena
// serves the next call's cache without a new allocation. Only positions
// below lens are ever read, so the memory need not be zeroed.
func newKVCache(ar *arena, slots, layers, h, kv, maxLen, d int) *kvCache {
	n := slots * layers * kv * maxLen * d
	return &kvCache{
		slots: slots, layers: layers, h: h, kv: kv, maxLen: maxLen, d: d,
		k: ar.dirty(n), v: ar.dirty(n), lens: make([]int, slots),
	}
}

// block returns the offset of (slot, layer, kv head g)'s [maxLen, D] block.
func (c *kvCache) block(slot, layer, g int) int {
	return ((slot*c.layers+layer)*c.kv + g) * c.maxLen * c.d
}

// store copies n rows of keys and values from fused qkv rows (stride ld)
// into slot's layer at positions pos0..pos0+n-1.
func (c *kvCache) store(slot, layer, pos0 int, qkv []float32, ld, n int) {
	d := c.d
	for g := 0; g < c.kv; g++ {
		kb := c.k[c.block(slot, layer, g)+pos0*d:]
		vb := c.v[c.block(slot, layer, g)+pos0*d:]
		kc, vc := (c.h+g)*d, (c.h+c.kv+g)*d
		for r := 0; r < n; r++ {
			copy(kb[r*d:(r+1)*d], qkv[r*ld+kc:r*ld+kc+d])
			copy(vb[r*d:(r+1)*d], qkv[r*ld+vc:r*ld+vc+d])
		}
	}
}

// copySlot duplicates src's cached tokens into dst (several samples of one
// prompt share its prefill).
func (c *kvCache) copySlot(dst, src int) {
	n := c.lens[src] * c.d
	for l := 0; l < c.layers; l++ {
		for g := 0; g < c.kv; g++ {
			s, t := c.block(src, l, g), c.block(dst, l, g)
			copy(c.k[t:t+n], c.k[s:s+n])
			copy(c.v[t:t+n], c.v[s:s+n])
		}
	}
	c.lens[dst] = c.lens[src]
}
