package tokenizer

import (
	"encoding/json"
	"fmt"
	"hash/maphash"
	"strings"
	"sync"
	"unicode/utf8"
)

// bpeModel is a BPE vocabulary with its merge ranks. Symbols are token ids;
// a merge is looked up by the ids of its two halves.
type bpeModel struct {
	vocab  map[string]int32 // model vocabulary plus added tokens
	tokens []string         // id → content; "" where unassigned
	set    []bool           // id is assigned

	merges       map[uint64]bpeMerge // left id<<32 | right id → merge
	unk          int32               // -1: no unknown token
	byteFallback bool
	ignoreMerges bool
	fuseUnk      bool
	byteIDs      [256]int32 // id of "<0xNN>", -1 when absent

	// byteLevel maps each pre-token's bytes to GPT-2's printable stand-ins
	// before BPE: the ByteLevel pre-tokenizer's last step, done here so the
	// word cache is keyed by raw text and a hit allocates nothing.
	byteLevel bool

	cache wordCache
}

type bpeMerge struct {
	rank int32
	id   int32 // id of the merged token
}

// maxTokenID bounds ids read from files: the id→token table is sized by the
// largest id, so a stray huge id must not allocate gigabytes. The largest
// real vocabularies are a few hundred thousand tokens.
const maxTokenID = 1 << 22

func mergeKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// bpeJSON holds the model fields besides vocab and merges.
type bpeJSON struct {
	Type                    string   `json:"type"`
	UnkToken                *string  `json:"unk_token"`
	Dropout                 *float64 `json:"dropout"`
	ContinuingSubwordPrefix *string  `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string  `json:"end_of_word_suffix"`
	FuseUnk                 bool     `json:"fuse_unk"`
	ByteFallback            bool     `json:"byte_fallback"`
	IgnoreMerges            bool     `json:"ignore_merges"`
}

func parseModel(sm scannedModel) (*bpeModel, error) {
	if !sm.seen {
		return nil, fmt.Errorf("%w: no model", ErrInvalidInput)
	}
	var j bpeJSON
	if err := json.Unmarshal(sm.fields, &j); err != nil {
		return nil, fmt.Errorf("%w: model: %w", ErrInvalidInput, err)
	}
	if j.Type == "" && sm.merges != nil {
		j.Type = "BPE" // files older than the "type" field
	}
	if j.Type != "BPE" {
		return nil, fmt.Errorf("%w: model type %q (only BPE is supported)", ErrUnsupported, j.Type)
	}
	if j.Dropout != nil && *j.Dropout != 0 {
		return nil, fmt.Errorf("%w: model dropout %v", ErrUnsupported, *j.Dropout)
	}
	if j.ContinuingSubwordPrefix != nil && *j.ContinuingSubwordPrefix != "" {
		return nil, fmt.Errorf("%w: model continuing_subword_prefix %q", ErrUnsupported, *j.ContinuingSubwordPrefix)
	}
	if j.EndOfWordSuffix != nil && *j.EndOfWordSuffix != "" {
		return nil, fmt.Errorf("%w: model end_of_word_suffix %q", ErrUnsupported, *j.EndOfWordSuffix)
	}
	if len(sm.vocab) == 0 {
		return nil, fmt.Errorf("%w: model vocab is empty", ErrInvalidInput)
	}
	m := &bpeModel{
		vocab:        sm.vocab,
		tokens:       make([]string, sm.maxID+1),
		set:          make([]bool, sm.maxID+1),
		unk:          -1,
		byteFallback: j.ByteFallback,
		ignoreMerges: j.IgnoreMerges,
		fuseUnk:      j.FuseUnk,
	}
	for s, id := range sm.vocab {
		m.tokens[id] = s
		m.set[id] = true
	}
	if j.UnkToken != nil {
		id, ok := m.vocab[*j.UnkToken]
		if !ok {
			return nil, fmt.Errorf("%w: model unk_token %q is not in the vocabulary", ErrInvalidInput, *j.UnkToken)
		}
		m.unk = id
	}
	for b := range m.byteIDs {
		m.byteIDs[b] = -1
		if id, ok := m.vocab[fmt.Sprintf("<0x%02X>", b)]; ok {
			m.byteIDs[b] = id
		}
	}
	m.merges = make(map[uint64]bpeMerge, len(sm.merges))
	var buf []byte
	for i, p := range sm.merges {
		a, okA := m.vocab[p[0]]
		b, okB := m.vocab[p[1]]
		buf = append(append(buf[:0], p[0]...), p[1]...)
		c, okC := m.vocab[string(buf)]
		if !okA || !okB || !okC {
			return nil, fmt.Errorf("%w: model merges[%d] %q + %q: token not in the vocabulary", ErrInvalidInput, i, p[0], p[1])
		}
		// A repeated pair keeps its last rank, as the reference's map does.
		m.merges[mergeKey(a, b)] = bpeMerge{rank: int32(i), id: c}
	}
	return m, nil
}

func (m *bpeModel) setToken(s string, id int32) {
	for int(id) >= len(m.tokens) {
		m.tokens = append(m.tokens, "")
		m.set = append(m.set, false)
	}
	m.tokens[id] = s
	m.set[id] = true
	m.vocab[s] = id
}

func (m *bpeModel) assigned(id int32) bool { return m.set[id] }

// encode appends the ids of the pre-tokens to dst.
func (m *bpeModel) encode(words []string, dst []int) []int {
	lastUnk := false
	var buf []byte
	for _, w := range words {
		if w == "" {
			continue
		}
		mapped := w
		if m.byteLevel {
			buf = appendByteLevel(buf[:0], w)
		}
		if m.ignoreMerges {
			var id int32
			var ok bool
			if m.byteLevel {
				id, ok = m.vocab[string(buf)]
			} else {
				id, ok = m.vocab[w]
			}
			if ok {
				dst = append(dst, int(id))
				lastUnk = id == m.unk
				continue
			}
		}
		ids, ok := m.cache.get(w)
		if !ok {
			if m.byteLevel {
				mapped = string(buf)
			}
			ids = m.bpe(mapped)
			if len(w) <= maxCachedWordBytes {
				m.cache.put(w, ids)
			}
		}
		for _, id := range ids {
			isUnk := id == m.unk
			if isUnk && lastUnk && m.fuseUnk {
				continue
			}
			dst = append(dst, int(id))
			lastUnk = isUnk
		}
	}
	return dst
}

// bpe splits one pre-token into ids: characters are merged by rank, lowest
// first and leftmost among equals, with a heap, so a long word costs
// O(n log n). Characters outside the vocabulary become byte tokens when the
// model has byte fallback, else the unknown token.
func (m *bpeModel) bpe(w string) []int32 {
	n := utf8.RuneCountInString(w)
	syms := make([]bpeSymbol, 0, n)
	for i, r := range w {
		end := i + utf8.RuneLen(r)
		if r == utf8.RuneError && !strings.HasPrefix(w[i:], "\uFFFD") {
			end = i + 1
		}
		id, ok := m.vocab[w[i:end]]
		if !ok {
			id = -1
		}
		k := len(syms)
		syms = append(syms, bpeSymbol{id: id, start: int32(i), end: int32(end), prev: int32(k - 1), next: int32(k + 1)})
	}
	syms[len(syms)-1].next = -1

	if len(syms) > 1 {
		h := mergeHeap{items: make([]heapItem, 0, len(syms))}
		for k := 0; k+1 < len(syms); k++ {
			if mg, ok := m.pairMerge(syms[k].id, syms[k+1].id); ok {
				h.push(heapItem{rank: mg.rank, pos: int32(k)})
			}
		}
		for h.len() > 0 {
			it := h.pop()
			s := &syms[it.pos]
			if s.dead || s.next < 0 {
				continue
			}
			nx := &syms[s.next]
			mg, ok := m.pairMerge(s.id, nx.id)
			if !ok || mg.rank != it.rank {
				continue // stale: a neighbour merged since this was pushed
			}
			s.id = mg.id
			s.end = nx.end
			nx.dead = true
			s.next = nx.next
			if s.next >= 0 {
				syms[s.next].prev = it.pos
				if mg2, ok := m.pairMerge(s.id, syms[s.next].id); ok {
					h.push(heapItem{rank: mg2.rank, pos: it.pos})
				}
			}
			if s.prev >= 0 {
				if mg2, ok := m.pairMerge(syms[s.prev].id, s.id); ok {
					h.push(heapItem{rank: mg2.rank, pos: s.prev})
				}
			}
		}
	}

	out := make([]int32, 0, len(syms))
	for k := 0; k >= 0 && k < len(syms); k = int(syms[k].next) {
		s := syms[k]
		if s.id >= 0 {
			out = append(out, s.id)
			continue
		}
		out = m.fallback(w[s.start:s.end], out)
	}
	return out
}

// fallback appends the ids for a character missing from the vocabulary.
func (m *bpeModel) fallback(s string, out []int32) []int32 {
	if m.byteFallback {
		ok := true
		for i := 0; i < len(s); i++ {
			if m.byteIDs[s[i]] < 0 {
				ok = false
				break
			}
		}
		if ok {
			for i := 0; i < len(s); i++ {
				out = append(out, m.byteIDs[s[i]])
			}
			return out
		}
	}
	if m.unk >= 0 {
		out = append(out, m.unk)
	}
	// Without an unknown token the character is dropped (the reference would
	// emit a null id); byte-level vocabularies cover every byte, so it does
	// not happen with them.
	return out
}

func (m *bpeModel) pairMerge(a, b int32) (bpeMerge, bool) {
	if a < 0 || b < 0 {
		return bpeMerge{}, false
	}
	mg, ok := m.merges[mergeKey(a, b)]
	return mg, ok
}

type bpeSymbol struct {
	id         int32
	start, end int32 // byte range in the word
	prev, next int32 // linked list of live symbols; -1 at the ends
	dead       bool
}

// heapItem is a candidate merge of the symbol at pos with its successor.
// Ties on rank go to the leftmost pair, as in the reference.
type heapItem struct {
	rank, pos int32
}

func (a heapItem) less(b heapItem) bool {
	return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos)
}

// mergeHeap is a binary min-heap; hand-rolled to avoid container/heap's
// interface calls in the hottest loop of encoding.
type mergeHeap struct{ items []heapItem }

func (h *mergeHeap) len() int { return len(h.items) }

func (h *mergeHeap) push(it heapItem) {
	h.items = append(h.items, it)
	i := len(h.items) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !h.items[i].less(h.items[p]) {
			break
		}
		h.items[i], h.items[p] = h.items[p], h.items[i]
		i = p
	}
}

func (h *mergeHeap) pop() heapItem {
	top := h.items[0]
	last := len(h.items) - 1
	h.items[0] = h.items[last]
	h.items = h.items[:last]
	i := 0
	for {
		l := 2*i + 1
		if l >= last {
			break
		}
		c := l
		if r := l + 1; r < last && h.items[r].less(h.items[l]) {
			c = r
		}
		if !h.items[c].less(h.items[i]) {
			break
		}
		h.items[i], h.items[c] = h.items[c], h.items[i]
		i = c
	}
	return top
}

// Cache limits: words longer than maxCachedWordBytes rarely repeat; each
// shard is emptied when it reaches wordCacheShardSize entries, which bounds
// memory without the bookkeeping of an LRU.
const (
	maxCachedWordBytes = 256
	wordCacheShards    = 16
	wordCacheShardSize = 1 << 12
)

// wordCache maps a pre-token to its ids; safe for concurrent use, since one
// Tokenizer serves many sessions.
type wordCache struct {
	once   sync.Once
	seed   maphash.Seed
	shards [wordCacheShards]struct {
		mu sync.Mutex
		m  map[string][]int32
	}
}

func (c *wordCache) shard(w string) int {
	c.once.Do(func() { c.seed = maphash.MakeSeed() })
	return int(maphash.String(c.seed, w) % wordCacheShards)
}

func (c *wordCache) get(w string) ([]int32, bool) {
	s := &c.shards[c.shard(w)]
	s.mu.Lock()
	ids, ok := s.m[w]
	s.mu.Unlock()
	return ids, ok
}

func (c *wordCache) put(w string, ids []int32) {
	s := &c.shards[c.shard(w)]
	s.mu.Lock()
	if s.m == nil || len(s.m) >= wordCacheShardSize {
		s.m = make(map[string][]int32, 64)
	}
	s.m[strings.Clone(w)] = ids
	s.mu.Unlock()
}

// reset empties the cache (for benchmarks of cold encoding).
func (c *wordCache) reset() {
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		s.m = nil
		s.mu.Unlock()
	}
}
