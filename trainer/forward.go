package trainer

import (
	"context"
	"fmt"

	"github.com/signal-p2p/signal/trainer/team"
)

// pass is one run of the decoder over a packed batch: every sequence of a
// call stacked as rows of one [rows, width] matrix, sequence i in rows
// seqOff[i]..seqOff[i+1], so that each projection is one product over all
// of them. A training step, a prefill and each decode step are all a pass
// through the one forward; they differ only in what the pass keeps and
// where attention finds its keys (see DESIGN.md, "One forward"):
//
//   - keep (training): every block's activations that the backward needs
//     get their own buffers, kept in layers;
//   - kv (sampling): each row's rotated key and value are stored in the
//     cache, and with decode each sequence is one new row that attends to
//     its cached keys instead of to the rows of the batch;
//   - lastRows (sampling's prefill): the last block runs o_proj and the MLP
//     on each sequence's last row alone, as llama.cpp does.
//
// Every buffer comes from the call's arena.
type pass struct {
	m    *Model
	lora *LoRA
	ar   *arena

	rows     int
	seqOff   []int // len = sequences + 1
	pos      []int // position of each row in its sequence
	tokens   []int
	cos, sin []float32 // [rows, D/2] rotary tables of each row's position

	keep     bool
	lastRows bool
	decode   bool
	kv       *kvCache
	slots    []int // cache slot of each sequence

	// The activations of a pass that keeps nothing, reused by every block;
	// with keep, every block gets fresh buffers (layers) and only xn and act
	// (which the backward recomputes) are shared.
	xn, act []float32
	blk     blockActs
	scratch []float32 // per-thread attention scratch (team.Attention's, AttentionBackward's, DecodeAttention's)
	aStack  []float32 // a loraGroup's A matrices stacked (stackA), with an adapter

	layers []blockActs // with keep: each block's activations
	xOut   []float32   // [outRows, hidden] residual stream entering the final norm
	rinvF  []float32   // its 1/rms (with keep)
	out    []float32   // [outRows, hidden] the final norm's output: the LM head's input
	// outRows is rows, or one row per sequence with lastRows.
	outRows int
}

// blockActs are one decoder block's activations (T = the pass's rows).
type blockActs struct {
	x     []float32 // [T, hidden] residual stream entering the block
	rinv1 []float32 // [T] 1/rms of x (input_layernorm)
	qkv   []float32 // [T, QKVDim] fused q|k|v, q and k rotated
	// preQK holds Qwen3's q and k heads before their norm [T, (H+KV)·D],
	// rinvQ and rinvK each head's 1/rms (nil for other families).
	preQK, rinvQ, rinvK []float32
	att                 []float32 // [T, H·D] attention output: the input of o_proj
	lse                 []float32 // [H, T] log-sum-exp of each row's attention scores
	h                   []float32 // [T, hidden] residual stream after attention
	rinv2               []float32 // [T] 1/rms of h (post_attention_layernorm)
	gu                  []float32 // [T, 2·I] fused gate|up output before the activation
	// u[mod] is x·Aᵀ [T, rank] for each module the LoRA adapts, row stride
	// ldu[mod]: the modules of a loraGroup share one [T, n·rank] buffer, a
	// column block each, filled by one product.
	u   [NumModules][]float32
	ldu [NumModules]int
}

// loraGroup is some of a layer's modules, with the columns of the output
// each writes (see loraGroups).
type loraGroup struct {
	mods [maxLoRAGroup]Module
	offs [maxLoRAGroup]int
	n    int
}

// maxLoRAGroup is the largest group's size.
const maxLoRAGroup = 3

// loraGroups are each layer's modules by input: the modules of a group read
// the same activations, so their A products run as one product over the
// input (x read once: these thin products are bound by reading x), with the
// group's A matrices stacked. The q|k|v and gate|up groups write column
// blocks of one fused output: offs are filled in per model by the callers.
var (
	groupQKV    = loraGroup{mods: [maxLoRAGroup]Module{ModQ, ModK, ModV}, n: 3}
	groupO      = loraGroup{mods: [maxLoRAGroup]Module{ModO}, n: 1}
	groupGateUp = loraGroup{mods: [maxLoRAGroup]Module{ModGate, ModUp}, n: 2}
	groupDown   = loraGroup{mods: [maxLoRAGroup]Module{ModDown}, n: 1}
	loraGroups  = []loraGroup{groupQKV, groupO, groupGateUp, groupDown}
)

// at returns g with its modules' output columns.
func (g loraGroup) at(offs ...int) loraGroup {
	copy(g.offs[:], offs)
	return g
}

// targeted is the modules of g that the pass's adapter adapts in layer l,
// with their columns (a value: passes allocate nothing per step).
func (p *pass) targeted(l int, g loraGroup) loraGroup {
	var out loraGroup
	for i := range g.n {
		if p.lora != nil && p.lora.Layers[l][g.mods[i]] != nil {
			out.mods[out.n], out.offs[out.n] = g.mods[i], g.offs[i]
			out.n++
		}
	}
	return out
}

// stackA returns the A matrices of g's modules (layer l) stacked as one
// [n·rank, in] matrix: the adapter's own A for one module, else a copy in
// the pass's scratch.
func (p *pass) stackA(l int, g loraGroup) []float32 {
	if g.n == 1 {
		return p.lora.Layers[l][g.mods[0]].A
	}
	n := 0
	for _, mod := range g.mods[:g.n] {
		n += copy(p.aStack[n:], p.lora.Layers[l][mod].A)
	}
	return p.aStack[:n]
}

// newPass lays out a pass over sequences of the given lengths, sized for
// maxRows rows and sequences up to maxSeq long, with the buffers every
// pass needs taken from ar. The caller fills tokens (and, for a decode
// pass, positions and slots per step).
func newPass(m *Model, lora *LoRA, ar *arena, lens []int, maxRows, maxSeq int, keep bool) *pass {
	c := m.cfg
	p := &pass{m: m, lora: lora, ar: ar, keep: keep}
	p.seqOff = make([]int, len(lens)+1)
	for i, n := range lens {
		p.seqOff[i+1] = p.seqOff[i] + n
	}
	p.rows = p.seqOff[len(lens)]
	p.pos = make([]int, maxRows)
	for s := range lens {
		for r := p.seqOff[s]; r < p.seqOff[s+1]; r++ {
			p.pos[r] = r - p.seqOff[s]
		}
	}
	p.tokens = make([]int, maxRows)
	T, hid, half := maxRows, c.HiddenSize, c.HeadDim/2
	p.cos, p.sin = ar.dirty(T*half), ar.dirty(T*half)
	p.xn, p.act = ar.dirty(T*hid), ar.dirty(T*c.IntermediateSize)
	p.out = ar.dirty(T * hid)
	need := maxSeq * maxSeq // the forward's [L, L] scores
	if keep {
		need *= 2 // the backward's scores and their gradient
		p.layers = make([]blockActs, c.NumHiddenLayers)
		p.rinvF = ar.dirty(T)
	} else {
		p.blk = p.newBlock(0, T)
	}
	p.scratch = ar.dirty(m.team.Threads() * need)
	if lora != nil {
		p.aStack = ar.dirty(maxLoRAGroup * lora.Rank * c.HiddenSize) // the groups of several read hidden
	}
	return p
}

// newBlock takes block l's buffers for T rows from the arena: with keep,
// every activation the backward needs; otherwise the ones that every block
// reuses (see pass).
func (p *pass) newBlock(l, T int) blockActs {
	c, ar := p.m.cfg, p.ar
	nq, nkv, D := c.NumAttentionHeads, c.NumKeyValueHeads, c.HeadDim
	b := blockActs{
		qkv: ar.dirty(T * c.QKVDim()), att: ar.dirty(T * nq * D),
		gu: ar.dirty(T * 2 * c.IntermediateSize),
	}
	if p.keep {
		b.rinv1, b.rinv2 = ar.dirty(T), ar.dirty(T)
		b.h, b.lse = ar.dirty(T*c.HiddenSize), ar.dirty(nq*T)
		if c.QKNorm() {
			b.preQK, b.rinvQ, b.rinvK = ar.dirty(T*(nq+nkv)*D), ar.dirty(T*nq), ar.dirty(T*nkv)
		}
	} else {
		b.x = ar.dirty(T * c.HiddenSize)
		b.h = b.x // attention and the MLP add into the residual stream in place
	}
	if p.lora == nil {
		return b
	}
	r := p.lora.Rank
	var shared []float32 // without keep, one buffer serves every group
	for _, grp := range loraGroups {
		g := p.targeted(l, grp)
		if g.n == 0 {
			continue
		}
		w := g.n * r
		buf := shared
		if p.keep {
			buf = ar.dirty(T * w)
		} else if buf == nil {
			shared = ar.dirty(T * maxLoRAGroup * r)
			buf = shared
		}
		for j, mod := range g.mods[:g.n] {
			b.u[mod], b.ldu[mod] = buf[j*r:], w
		}
	}
	return b
}

// forward runs the decoder over the pass's rows and leaves the final
// normed hidden states in p.out (p.outRows rows). Token ids must be
// validated by the caller (ValidateTokens, validateData), and the caller
// holds AcquireSingleThreadBLAS (the team's jobs call OpenBLAS).
func (p *pass) forward(ctx context.Context) error {
	m, c, tm := p.m, p.m.cfg, p.m.team
	T, hid, inter := p.rows, c.HiddenSize, c.IntermediateSize
	nq, nkv, D := c.NumAttentionHeads, c.NumKeyValueHeads, c.HeadDim
	qkvd, ad := c.QKVDim(), nq*D
	eps := float32(c.RMSNormEps)
	half := D / 2
	cos, sin := p.cos[:T*half], p.sin[:T*half]
	RopeTables(cos, sin, p.pos[:T], m.InvFreq)

	x := p.blk.x // the residual stream, updated in place unless kept
	if p.keep {
		x = p.ar.dirty(T * hid)
	}
	for r, t := range p.tokens[:T] {
		m.embed.row(x[r*hid:(r+1)*hid], t)
	}
	xn, act := p.xn[:T*hid], p.act[:T*inter]
	rows := T // rows the block computes after attention (see lastRows)
	for l := range m.Layers {
		if err := ctx.Err(); err != nil {
			return err
		}
		w := &m.Layers[l]
		a := &p.blk
		if p.keep {
			p.layers[l] = p.newBlock(l, T)
			a = &p.layers[l]
			a.x = x
			copy(a.h, x) // h = x + o_proj(...) keeps x
		}

		// Attention block: h = x + o_proj(attn(rope(qkv(norm(x))))).
		tm.RMSNorm(xn, a.rinv1, x, w.AttnNorm, T, hid, eps)
		qkv := a.qkv[:T*qkvd]
		project(tm, qkv, qkvd, xn, hid, &w.qkv, T, 0)
		addBias(qkv, T, qkvd, w.BQKV)
		p.addLoRA(a, l, groupQKV.at(0, ad, ad+nkv*D), xn, hid, qkv, qkvd, T)
		if a.preQK != nil {
			qk := (nq + nkv) * D
			for r := 0; r < T; r++ {
				copy(a.preQK[r*qk:(r+1)*qk], qkv[r*qkvd:r*qkvd+qk])
			}
		}
		headNorm(tm, qkv, T, qkvd, nq, nkv, D, w.QNorm, w.KNorm, eps, a.rinvQ, a.rinvK)
		tm.Rope(qkv, T, qkvd, nq+nkv, D, cos, sin)
		rows = p.attention(l, a)
		project(tm, a.h, hid, a.att, ad, &w.o, rows, 1)
		p.addLoRA(a, l, groupO, a.att, ad, a.h, hid, rows)

		// MLP block: x' = h + down(silu(gate(norm(h)))·up(norm(h))).
		tm.RMSNorm(xn, a.rinv2, a.h, w.MLPNorm, rows, hid, eps)
		project(tm, a.gu, 2*inter, xn, hid, &w.gateUp, rows, 0)
		p.addLoRA(a, l, groupGateUp.at(0, inter), xn, hid, a.gu, 2*inter, rows)
		tm.SwiGLU(act, nil, a.gu, rows, inter)
		next := a.h
		if p.keep {
			next = p.ar.dirty(T * hid)
			copy(next, a.h)
		}
		project(tm, next, hid, act, inter, &w.down, rows, 1)
		p.addLoRA(a, l, groupDown, act, inter, next, hid, rows)
		x = next
	}
	p.outRows = rows
	p.xOut = x[:rows*hid]
	var rinv []float32
	if p.keep {
		rinv = p.rinvF[:rows]
	}
	tm.RMSNorm(p.out[:rows*hid], rinv, p.xOut, m.Norm, rows, hid, eps)
	return nil
}

// attention runs block l's attention from a.qkv into a.att, storing keys
// and values in the cache first when the pass has one, and returns the
// rows the rest of the block runs on.
func (p *pass) attention(l int, a *blockActs) (rows int) {
	c, tm := p.m.cfg, p.m.team
	nq, nkv, D := c.NumAttentionHeads, c.NumKeyValueHeads, c.HeadDim
	qkvd, ad := c.QKVDim(), nq*D
	seqs := len(p.seqOff) - 1
	if p.kv != nil {
		for s := 0; s < seqs; s++ {
			r0 := p.seqOff[s]
			p.kv.store(p.slots[s], l, p.pos[r0], a.qkv[r0*qkvd:], qkvd, p.seqOff[s+1]-r0)
		}
	}
	switch {
	case p.decode:
		tm.DecodeAttention(a.att, a.qkv, nq, nkv, D, p.kv.k, p.kv.v, p.slots, p.pos[:p.rows], c.NumHiddenLayers, l, p.kv.maxLen, p.scratch)
	case p.lastRows && l == c.NumHiddenLayers-1:
		// Only each sequence's last row goes on (every row's key and value
		// is cached already): its attention against the whole sequence,
		// and its residual row gathered to row s.
		for s := 0; s < seqs; s++ {
			r0, L := p.seqOff[s], p.seqOff[s+1]-p.seqOff[s]
			for h := 0; h < nq; h++ {
				team.AttentionHead(a.att[s*ad:], ad, a.qkv[r0*qkvd:(r0+L)*qkvd], L, nq, nkv, D, h, L-1, p.scratch[:L])
			}
			hid := c.HiddenSize
			copy(a.h[s*hid:(s+1)*hid], a.h[(r0+L-1)*hid:(r0+L)*hid]) // s ≤ r0+L−1, and later rows lie further on
		}
		return seqs
	default:
		tm.Attention(a.att, ad, a.qkv[:p.rows*qkvd], p.seqOff, nq, nkv, D, p.scratch, a.lse)
	}
	return p.rows
}

// addLoRA adds s·(x·Aᵀ)·Bᵀ of each module of grp (layer l) that the pass's
// adapter adapts into its columns of y (row stride ldy), keeping u = x·Aᵀ
// in a.u for the backward. The group's A products are one product over x
// (see loraGroups).
func (p *pass) addLoRA(a *blockActs, l int, grp loraGroup, x []float32, ldx int, y []float32, ldy, rows int) {
	g := p.targeted(l, grp)
	if g.n == 0 {
		return
	}
	r, tm, in := p.lora.Rank, p.m.team, p.lora.Layers[l][g.mods[0]].In
	w := g.n * r
	u := a.u[g.mods[0]]
	tm.Gemm(false, true, rows, w, in, 1, x, ldx, p.stackA(l, g), in, 0, u, w)
	for j, mod := range g.mods[:g.n] {
		pr := p.lora.Layers[l][mod]
		tm.Gemm(false, true, rows, pr.Out, r, p.lora.Scale(), u[j*r:], w, pr.B, r, 1, y[g.offs[j]:], ldy)
	}
}

// ValidateTokens checks ids against the vocabulary and the context length.
func (m *Model) ValidateTokens(tokens []int, what string) error {
	if len(tokens) == 0 {
		return fmt.Errorf("%w: %s is empty", ErrInvalidInput, what)
	}
	if len(tokens) > m.cfg.MaxPositionEmbeddings {
		return fmt.Errorf("%w: %s has %d tokens, more than the model's context of %d", ErrInvalidInput, what, len(tokens), m.cfg.MaxPositionEmbeddings)
	}
	for i, t := range tokens {
		if t < 0 || t >= m.cfg.VocabSize {
			return fmt.Errorf("%w: %s token %d is id %d, outside the vocabulary [0, %d)", ErrInvalidInput, what, i, t, m.cfg.VocabSize)
		}
	}
	return nil
}

// headLogits writes logits [rows, vocab] = hidden·LMHeadᵀ for hidden
// [rows, hidden]; the caller holds AcquireSingleThreadBLAS.
func (m *Model) headLogits(logits, hidden []float32, rows int) {
	c := m.cfg
	project(m.team, logits, c.VocabSize, hidden, c.HiddenSize, m.lmHead(), rows, 0)
}

// Logits returns the logits [len(tokens), vocab] of one sequence, row i
// predicting token i+1, with lora applied when non-nil.
func (m *Model) Logits(ctx context.Context, tokens []int, lora *LoRA) ([]float32, error) {
	if err := m.ValidateTokens(tokens, "tokens"); err != nil {
		return nil, err
	}
	if err := m.checkLoRA(lora); err != nil {
		return nil, err
	}
	defer singleThreadBLAS()()
	ar := m.arenas.get()
	defer m.arenas.put(ar)
	T := len(tokens)
	p := newPass(m, lora, ar, []int{T}, T, T, false)
	copy(p.tokens, tokens)
	if err := p.forward(ctx); err != nil {
		return nil, err
	}
	logits := make([]float32, T*m.cfg.VocabSize)
	m.headLogits(logits, p.out, T)
	return logits, nil
}

// checkLoRA verifies an adapter fits this model's shapes.
func (m *Model) checkLoRA(l *LoRA) error {
	if l == nil {
		return nil
	}
	if len(l.Layers) != m.cfg.NumHiddenLayers {
		return fmt.Errorf("%w: adapter has %d layers, model has %d", ErrInvalidInput, len(l.Layers), m.cfg.NumHiddenLayers)
	}
	for i := range l.Layers {
		for mod, p := range l.Layers[i] {
			if p == nil {
				continue
			}
			in, out := m.cfg.Dims(Module(mod))
			if p.In != in || p.Out != out || len(p.A) != l.Rank*in || len(p.B) != out*l.Rank {
				return fmt.Errorf("%w: adapter layer %d %s is [%d→%d], model needs [%d→%d]", ErrInvalidInput, i, Module(mod), p.In, p.Out, in, out)
			}
		}
	}
	return nil
}
