package trainer

import (
	"context"
	"math"
	"runtime"
	"sync"
)

// trainPass is one call's packed batch and, for backward, the activations it
// keeps: per layer the residual input, the rotated q,k,v, the attention
// output and its log-sum-exp, the mid-block residual, the gate/up product and
// every LoRA's u = x·Aᵀ. The normalised inputs and the SwiGLU output are
// recomputed in backward from these (element-wise, cheaper than keeping them).
// Every buffer comes from an arena that the model's training pool recycles,
// so a steady stream of calls allocates nothing.
type trainPass struct {
	m    *Model
	cfg  Config
	lora *LoRA
	ar   *trainArena

	rows    int     // tokens of the whole batch
	seqOff  []int   // sequence i is rows seqOff[i]..seqOff[i+1]
	pos     []int32 // position of each row inside its sequence
	tokens  []int32
	targets []int32
	cos     []float32 // [maxSeq, D/2]
	sin     []float32
	maxSeq  int

	xIn, qkv, att, h1, gu [][]float32
	lse, rinv1, rinv2     [][]float32
	// preQK, rinvQ, rinvK: Qwen3's q/k heads before their norm, and each
	// head's 1/rms, for the norm's backward (nil for other families).
	preQK, rinvQ, rinvK [][]float32
	u                   [][NumModules][]float32

	xOut, rinvF, xf []float32 // last residual, its inverse RMS, final norm output
	logp            []float32
	scratch         []*attnScratch
}

// trainArena hands out float32 buffers for one call from one block and
// takes them all back at once. A call that outgrows the block gets fresh
// memory; reset then resizes the block to the peak so that the next call of
// that size allocates nothing.
type trainArena struct {
	block []float32
	off   int
	extra int // floats handed out beyond the block since the last reset
	peak  int
}

// dirty returns n float32s with unspecified contents.
func (a *trainArena) dirty(n int) []float32 {
	if a.off+n <= len(a.block) {
		s := a.block[a.off : a.off+n : a.off+n]
		a.off += n
		return s
	}
	a.extra += n
	return make([]float32, n)
}

// zeroed returns n zeroed float32s.
func (a *trainArena) zeroed(n int) []float32 {
	s := a.dirty(n)
	clear(s)
	return s
}

// reset takes every buffer back.
func (a *trainArena) reset() {
	if used := a.off + a.extra; a.extra > 0 {
		a.peak = max(a.peak, used)
		a.block = make([]float32, a.peak)
	}
	a.off, a.extra = 0, 0
}

// bytes is the memory the arena holds between calls.
func (a *trainArena) bytes() int64 { return int64(len(a.block)) * 4 }

// trainArenas recycles the training arenas of each model: one per call in
// flight, kept across calls (unlike a sync.Pool, which a GC would empty and
// make the next step reallocate hundreds of megabytes). Sessions hold a
// reference on their model's entry; when the last one closes, the arenas go.
var trainArenas = struct {
	sync.Mutex
	free map[*Model][]*trainArena
	refs map[*Model]int
}{free: map[*Model][]*trainArena{}, refs: map[*Model]int{}}

func getTrainArena(m *Model) *trainArena {
	trainArenas.Lock()
	defer trainArenas.Unlock()
	l := trainArenas.free[m]
	if len(l) == 0 {
		return &trainArena{}
	}
	a := l[len(l)-1]
	trainArenas.free[m] = l[:len(l)-1]
	return a
}

func putTrainArena(m *Model, a *trainArena) {
	a.reset()
	trainArenas.Lock()
	trainArenas.free[m] = append(trainArenas.free[m], a)
	trainArenas.Unlock()
}

// holdTrainArenas and dropTrainArenas count the sessions using m's arenas.
func holdTrainArenas(m *Model) {
	trainArenas.Lock()
	trainArenas.refs[m]++
	trainArenas.Unlock()
}

func dropTrainArenas(m *Model) {
	trainArenas.Lock()
	defer trainArenas.Unlock()
	if trainArenas.refs[m]--; trainArenas.refs[m] <= 0 {
		delete(trainArenas.refs, m)
		delete(trainArenas.free, m)
	}
}

// releaseTrainArenas drops a model's cached arenas (a benchmark wants a
// clean measure, or the model is going away).
func releaseTrainArenas(m *Model) {
	trainArenas.Lock()
	delete(trainArenas.free, m)
	trainArenas.Unlock()
}

// newTrainPass packs data (already validated) into one batch.
func newTrainPass(m *Model, lora *LoRA, data []Datum, ar *trainArena) *trainPass {
	c := m.cfg
	p := &trainPass{m: m, cfg: c, lora: lora, ar: ar}
	p.seqOff = make([]int, len(data)+1)
	for i, d := range data {
		p.seqOff[i+1] = p.seqOff[i] + len(d.Tokens)
		p.maxSeq = max(p.maxSeq, len(d.Tokens))
	}
	p.rows = p.seqOff[len(data)]
	p.pos = make([]int32, p.rows)
	p.tokens = make([]int32, p.rows)
	p.targets = make([]int32, p.rows)
	for i, d := range data {
		o := p.seqOff[i]
		for j := range d.Tokens {
			p.pos[o+j] = int32(j)
			p.tokens[o+j] = int32(d.Tokens[j])
			p.targets[o+j] = int32(d.TargetTokens[j])
		}
	}
	half := c.HeadDim / 2
	p.cos, p.sin = ar.dirty(p.maxSeq*half), ar.dirty(p.maxSeq*half)
	for ps := 0; ps < p.maxSeq; ps++ {
		for i, f := range m.InvFreq {
			// Hugging Face multiplies position by frequency in f32.
			a := float64(float32(ps) * f)
			p.cos[ps*half+i], p.sin[ps*half+i] = float32(math.Cos(a)), float32(math.Sin(a))
		}
	}
	for w := 0; w < runtime.GOMAXPROCS(0); w++ {
		p.scratch = append(p.scratch, &attnScratch{s: ar.dirty(p.maxSeq * p.maxSeq), dp: ar.dirty(p.maxSeq * p.maxSeq)})
	}
	return p
}

func (p *trainPass) attnShape() attnShape {
	c := p.cfg
	return attnShape{nHeads: c.NumAttentionHeads, nKV: c.NumKeyValueHeads, d: c.HeadDim,
		scale: float32(1 / math.Sqrt(float64(c.HeadDim)))}
}

// loraForward adds s·(x·Aᵀ)·Bᵀ of layer l's module mod to y (columns from
// off, row stride ldy) and returns u = x·Aᵀ, or nil when mod is not adapted.
func (p *trainPass) loraForward(l int, mod Module, x []float32, ldx int, y []float32, ldy, off int) []float32 {
	if p.lora == nil {
		return nil
	}
	pr := p.lora.Layers[l][mod]
	if pr == nil {
		return nil
	}
	r, T := p.lora.Rank, p.rows
	u := p.ar.dirty(T * r)
	pgemm(false, true, T, r, pr.In, 1, x, ldx, pr.A, pr.In, 0, u, r)
	pgemm(false, true, T, pr.Out, r, p.lora.Scale(), u, r, pr.B, r, 1, y[off:], ldy)
	return u
}

// forward runs the model over the batch, keeping what backward needs, and
// leaves the final normalised hidden states in p.xf.
func (p *trainPass) forward(ctx context.Context) error {
	c := p.cfg
	T, H, Q, I := p.rows, c.HiddenSize, c.QKVDim(), c.IntermediateSize
	AD := c.NumAttentionHeads * c.HeadDim
	L := c.NumHiddenLayers
	eps := float32(c.RMSNormEps)
	sh := p.attnShape()
	ar := p.ar
	p.xIn, p.qkv, p.att, p.h1, p.gu = make([][]float32, L), make([][]float32, L), make([][]float32, L), make([][]float32, L), make([][]float32, L)
	p.lse, p.rinv1, p.rinv2 = make([][]float32, L), make([][]float32, L), make([][]float32, L)
	p.preQK, p.rinvQ, p.rinvK = make([][]float32, L), make([][]float32, L), make([][]float32, L)
	p.u = make([][NumModules][]float32, L)

	x := ar.dirty(T * H)
	for r, t := range p.tokens {
		copy(x[r*H:(r+1)*H], p.m.Embed[int(t)*H:(int(t)+1)*H])
	}
	xn := ar.dirty(T * H)  // normalised input, reused by every layer
	act := ar.dirty(T * I) // SwiGLU output, reused by every layer
	for l := 0; l < L; l++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		ly := &p.m.Layers[l]
		p.xIn[l] = x
		p.rinv1[l] = ar.dirty(T)
		rmsNormForward(xn, x, ly.AttnNorm, p.rinv1[l], T, H, eps)
		qkv := ar.dirty(T * Q)
		project(qkv, Q, xn, H, ly.WQKV, ly.pQKV, T, H, Q, 0)
		addBias(qkv, T, Q, ly.BQKV)
		p.u[l][ModQ] = p.loraForward(l, ModQ, xn, H, qkv, Q, 0)
		p.u[l][ModK] = p.loraForward(l, ModK, xn, H, qkv, Q, AD)
		p.u[l][ModV] = p.loraForward(l, ModV, xn, H, qkv, Q, AD+c.NumKeyValueHeads*c.HeadDim)
		if ly.QNorm != nil {
			qk := (c.NumAttentionHeads + c.NumKeyValueHeads) * c.HeadDim
			pre := ar.dirty(T * qk)
			for r := 0; r < T; r++ {
				copy(pre[r*qk:(r+1)*qk], qkv[r*Q:r*Q+qk])
			}
			p.preQK[l], p.rinvQ[l], p.rinvK[l] = pre, ar.dirty(T*c.NumAttentionHeads), ar.dirty(T*c.NumKeyValueHeads)
			headNorm(qkv, T, Q, c.NumAttentionHeads, c.NumKeyValueHeads, c.HeadDim, ly.QNorm, ly.KNorm, eps, p.rinvQ[l], p.rinvK[l])
		}
		ropeApply(qkv, T, Q, 0, c.NumAttentionHeads+c.NumKeyValueHeads, c.HeadDim, p.pos, p.cos, p.sin, 1)
		p.qkv[l] = qkv
		att := ar.dirty(T * AD)
		p.lse[l] = ar.dirty(c.NumAttentionHeads * T)
		attnForward(att, p.lse[l], qkv, p.seqOff, sh, p.scratch)
		p.att[l] = att
		h1 := ar.dirty(T * H)
		copy(h1, x)
		project(h1, H, att, AD, ly.WO, ly.pO, T, AD, H, 1)
		p.u[l][ModO] = p.loraForward(l, ModO, att, AD, h1, H, 0)
		p.h1[l] = h1
		p.rinv2[l] = ar.dirty(T)
		rmsNormForward(xn, h1, ly.MLPNorm, p.rinv2[l], T, H, eps)
		gu := ar.dirty(T * 2 * I)
		project(gu, 2*I, xn, H, ly.WGateUp, ly.pGateUp, T, H, 2*I, 0)
		p.u[l][ModGate] = p.loraForward(l, ModGate, xn, H, gu, 2*I, 0)
		p.u[l][ModUp] = p.loraForward(l, ModUp, xn, H, gu, 2*I, I)
		p.gu[l] = gu
		swigluForward(act, gu, T, I)
		next := ar.dirty(T * H)
		copy(next, h1)
		project(next, H, act, I, ly.WDown, ly.pDown, T, I, H, 1)
		p.u[l][ModDown] = p.loraForward(l, ModDown, act, I, next, H, 0)
		x = next
	}
	p.xOut = x
	p.rinvF = ar.dirty(T)
	p.xf = ar.dirty(T * H)
	rmsNormForward(p.xf, x, p.m.Norm, p.rinvF, T, H, eps)
	return nil
}

// head runs the LM head fused with the loss: it fills p.logp and, when dxf is
// not nil, the gradient of the loss sum w.r.t. the final normalised hidden
// states. lossAt(row, logp) returns d loss / d logp of that row.
func (p *trainPass) head(dxf []float32, lossAt func(row int, logp float64) float64) {
	c := p.cfg
	p.logp = p.ar.dirty(p.rows)
	logits := p.ar.dirty(min(lmHeadRows(c.VocabSize), p.rows) * c.VocabSize)
	lmHeadLoss(dxf, p.xf, p.m.LMHead, p.m.pHead, p.rows, c.HiddenSize, c.VocabSize, p.targets, p.logp, lossAt, logits)
}

// loraBack adds the gradients of layer l's module mod (input x with row
// stride ldx, output gradient dy from column off with stride ldy) to grads
// and its input gradient to dx.
func (p *trainPass) loraBack(grads *LoRA, l int, mod Module, dx []float32, x []float32, ldx int, dy []float32, ldy, off int, dyB []float32) {
	if p.lora == nil || p.lora.Layers[l][mod] == nil {
		return
	}
	pr, g := p.lora.Layers[l][mod], grads.Layers[l][mod]
	loraBackward(dx, ldx, dy[off:], ldy, x, ldx, p.u[l][mod], pr.A, pr.B, g.A, g.B,
		p.rows, pr.In, pr.Out, p.lora.Rank, p.lora.Scale(), dyB)
}

// backward propagates dxf (the gradient at the final norm's output) down
// the stack and adds every LoRA gradient into grads (shaped like p.lora).
// No base weight gets a gradient: each projection's backward is one GEMM for
// the input gradient plus LoRA's rank-r products.
func (p *trainPass) backward(ctx context.Context, dxf []float32, grads *LoRA) error {
	c := p.cfg
	T, H, Q, I := p.rows, c.HiddenSize, c.QKVDim(), c.IntermediateSize
	AD := c.NumAttentionHeads * c.HeadDim
	eps := float32(c.RMSNormEps)
	sh := p.attnShape()
	ar := p.ar
	dres := ar.zeroed(T * H) // gradient at the residual stream
	rmsNormBackward(dres, dxf, p.xOut, p.m.Norm, p.rinvF, T, H)
	xn := ar.dirty(T * H)
	dxn := ar.dirty(T * H)
	act := ar.dirty(T * I)
	dact := ar.dirty(T * I)
	sg := ar.dirty(T * I)
	dgu := ar.dirty(T * 2 * I)
	datt := ar.dirty(T * AD)
	dqkv := ar.dirty(T * Q)
	dkvHead := ar.dirty(2 * c.NumAttentionHeads * T * c.HeadDim)
	r := 1
	if p.lora != nil {
		r = p.lora.Rank
	}
	dyB := ar.dirty(T * r)
	dhead := ar.dirty(c.HeadDim) // headNormBackward's one head
	for l := c.NumHiddenLayers - 1; l >= 0; l-- {
		if err := ctx.Err(); err != nil {
			return err
		}
		ly := &p.m.Layers[l]
		// MLP: next = h1 + down(swiglu(gate/up(norm(h1)))).
		swigluRecompute(act, sg, p.gu[l], T, I)
		pgemm(false, false, T, I, H, 1, dres, H, ly.WDown, I, 0, dact, I)
		p.loraBack(grads, l, ModDown, dact, act, I, dres, H, 0, dyB)
		swigluBackward(dgu, dact, p.gu[l], sg, T, I)
		rmsNormForward(xn, p.h1[l], ly.MLPNorm, p.rinv2[l], T, H, eps)
		pgemm(false, false, T, H, 2*I, 1, dgu, 2*I, ly.WGateUp, H, 0, dxn, H)
		p.loraBack(grads, l, ModGate, dxn, xn, H, dgu, 2*I, 0, dyB)
		p.loraBack(grads, l, ModUp, dxn, xn, H, dgu, 2*I, I, dyB)
		rmsNormBackward(dres, dxn, p.h1[l], ly.MLPNorm, p.rinv2[l], T, H)
		// Attention: h1 = x + o(attn(rope(qkv(norm(x))))).
		pgemm(false, false, T, AD, H, 1, dres, H, ly.WO, AD, 0, datt, AD)
		p.loraBack(grads, l, ModO, datt, p.att[l], AD, dres, H, 0, dyB)
		attnBackward(dqkv, datt, p.att[l], p.lse[l], p.qkv[l], p.seqOff, sh, p.scratch, dkvHead)
		ropeApply(dqkv, T, Q, 0, c.NumAttentionHeads+c.NumKeyValueHeads, c.HeadDim, p.pos, p.cos, p.sin, -1)
		if ly.QNorm != nil {
			headNormBackward(dqkv, T, Q, c.NumAttentionHeads, c.NumKeyValueHeads, c.HeadDim, ly.QNorm, ly.KNorm,
				p.preQK[l], p.rinvQ[l], p.rinvK[l], dhead)
		}
		rmsNormForward(xn, p.xIn[l], ly.AttnNorm, p.rinv1[l], T, H, eps)
		pgemm(false, false, T, H, Q, 1, dqkv, Q, ly.WQKV, H, 0, dxn, H)
		p.loraBack(grads, l, ModQ, dxn, xn, H, dqkv, Q, 0, dyB)
		p.loraBack(grads, l, ModK, dxn, xn, H, dqkv, Q, AD, dyB)
		p.loraBack(grads, l, ModV, dxn, xn, H, dqkv, Q, AD+c.NumKeyValueHeads*c.HeadDim, dyB)
		rmsNormBackward(dres, dxn, p.xIn[l], ly.AttnNorm, p.rinv1[l], T, H)
	}
	return nil
}
