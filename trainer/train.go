package trainer

import (
	"context"
	"math"

	"github.com/signal-p2p/signal/trainer/team"
)

// A training pass is the one forward with keep set: per block it keeps the
// residual input, the rotated q, k, v, the attention output and its
// log-sum-exp, the mid-block residual, the gate/up product and every
// LoRA's u = x·Aᵀ. The backward recomputes the normalised inputs and the
// SwiGLU output from these (element-wise, cheaper than keeping them) and
// the attention probabilities from q, k and the log-sum-exp.

// trainHead is what a training pass's LM head needs besides the pass.
type trainHead struct {
	targets []int32
	logp    []float32 // per row, the log-probability of its target
	// lse and coef are one chunk's log-sum-exps and loss derivatives.
	lse, coef [maxLMHeadChunk]float64
	// topK > 0 asks each row's topK most likely tokens: their ids and
	// log-probabilities, most likely first, topK per row in topIDs/topLPs.
	topK   int
	topIDs []int32
	topLPs []float32
}

// trainPass is a pass that keeps its activations, with the LM head's
// targets.
type trainPass struct {
	*pass
	trainHead
}

// newTrainPass packs data (already validated) into one batch.
func newTrainPass(m *Model, lora *LoRA, data []Datum, ar *arena) *trainPass {
	lens := make([]int, len(data))
	rows, maxSeq := 0, 0
	for i, d := range data {
		lens[i] = len(d.Tokens)
		rows += lens[i]
		maxSeq = max(maxSeq, lens[i])
	}
	p := &trainPass{pass: newPass(m, lora, ar, lens, rows, maxSeq, true)}
	p.targets = make([]int32, rows)
	for i, d := range data {
		o := p.seqOff[i]
		copy(p.tokens[o:], d.Tokens)
		for j, t := range d.TargetTokens {
			p.targets[o+j] = int32(t)
		}
	}
	return p
}

// head runs the LM head fused with the loss: it fills p.logp and, when dxf is
// not nil, the gradient of the loss sum w.r.t. the final normalised hidden
// states. lossAt(row, logp) returns d loss / d logp of that row.
func (p *trainPass) head(dxf []float32, lossAt func(row int, logp float64) float64) {
	c := p.m.cfg
	p.logp = p.ar.dirty(p.rows)
	logits := p.ar.dirty(min(lmHeadRows(c.VocabSize), p.rows) * c.VocabSize)
	lmHeadLoss(p.m.team, dxf, p.out, p.m.lmHead(), p.rows, c.HiddenSize, c.VocabSize, p.targets, p.logp, lossAt,
		logits, &p.trainHead)
}

// loraBack adds the gradients of the modules of grp (layer l) that the
// adapter adapts — input x with row stride ldx, output gradients dy at the
// group's columns with stride ldy — to grads and their input gradient to
// dx. dyB and dA are scratch of [rows, maxLoRAGroup·rank] and
// [maxLoRAGroup·rank, hidden].
func (p *trainPass) loraBack(grads *LoRA, l int, grp loraGroup, dx []float32, x []float32, ldx int, dy []float32, ldy int, dyB, dA []float32) {
	g := p.targeted(l, grp)
	if g.n == 0 {
		return
	}
	var ms [maxLoRAGroup]loraMember
	for j, mod := range g.mods[:g.n] {
		pr, gr := p.lora.Layers[l][mod], grads.Layers[l][mod]
		ms[j] = loraMember{a: pr.A, b: pr.B, da: gr.A, db: gr.B, out: pr.Out, off: g.offs[j], u: p.layers[l].u[mod]}
	}
	in := p.lora.Layers[l][g.mods[0]].In
	loraBackward(p.m.team, dx, ldx, x, ldx, dy, ldy, ms[:g.n], p.layers[l].ldu[g.mods[0]], p.rows, in, p.lora.Rank,
		p.lora.Scale(), dyB, p.stackA(l, g), dA)
}

// backward propagates dxf (the gradient at the final norm's output) down
// the stack and adds every LoRA gradient into grads (shaped like p.lora).
// No base weight gets a gradient: each projection's backward is one GEMM for
// the input gradient plus LoRA's rank-r products.
func (p *trainPass) backward(ctx context.Context, dxf []float32, grads *LoRA) error {
	m, c, tm := p.m, p.m.cfg, p.m.team
	T, H, Q, I := p.rows, c.HiddenSize, c.QKVDim(), c.IntermediateSize
	nq, nkv, D := c.NumAttentionHeads, c.NumKeyValueHeads, c.HeadDim
	AD := nq * D
	eps := float32(c.RMSNormEps)
	ar := p.ar
	dres := ar.zeroed(T * H) // gradient at the residual stream
	tm.RMSNormBackward(dres, dxf, p.xOut, m.Norm, p.rinvF, T, H)
	xn, act := p.xn[:T*H], p.act[:T*I]
	dxn := ar.dirty(T * H)
	dact := ar.dirty(T * I)
	sg := ar.dirty(T * I)
	dgu := ar.dirty(T * 2 * I)
	datt := ar.dirty(T * AD)
	dqkv := ar.dirty(T * Q)
	dkv := ar.dirty(2 * nq * T * D)
	// RoPE's backward turns each row back by its angle: the same cosines,
	// negated sines.
	sinBack := ar.dirty(len(p.sin))
	for i, s := range p.sin[:T*D/2] {
		sinBack[i] = -s
	}
	r := 1
	if p.lora != nil {
		r = p.lora.Rank
	}
	dyB := ar.dirty(T * maxLoRAGroup * r)
	dA := ar.dirty(maxLoRAGroup * r * H)
	dhead := ar.dirty((nq + nkv) * D) // headNormBackward's one row
	for l := c.NumHiddenLayers - 1; l >= 0; l-- {
		if err := ctx.Err(); err != nil {
			return err
		}
		ly, a := &m.Layers[l], &p.layers[l]
		// MLP: next = h + down(swiglu(gate/up(norm(h)))).
		tm.SwiGLU(act, sg, a.gu, T, I)
		projectBack(tm, dact, I, dres, H, &ly.down, T, 0)
		p.loraBack(grads, l, groupDown, dact, act, I, dres, H, dyB, dA)
		tm.SwiGLUBackward(dgu, dact, a.gu, sg, T, I)
		tm.RMSNorm(xn, nil, a.h, ly.MLPNorm, T, H, eps)
		projectBack(tm, dxn, H, dgu, 2*I, &ly.gateUp, T, 0)
		p.loraBack(grads, l, groupGateUp.at(0, I), dxn, xn, H, dgu, 2*I, dyB, dA)
		tm.RMSNormBackward(dres, dxn, a.h, ly.MLPNorm, a.rinv2, T, H)
		// Attention: h = x + o(attn(rope(qkv(norm(x))))).
		projectBack(tm, datt, AD, dres, H, &ly.o, T, 0)
		p.loraBack(grads, l, groupO, datt, a.att, AD, dres, H, dyB, dA)
		tm.AttentionBackward(dqkv, datt, a.att, a.lse, a.qkv, p.seqOff, nq, nkv, D, p.scratch, dkv)
		tm.Rope(dqkv, T, Q, nq+nkv, D, p.cos, sinBack)
		if ly.QNorm != nil {
			headNormBackward(tm, dqkv, T, Q, nq, nkv, D, ly.QNorm, ly.KNorm, a.preQK, a.rinvQ, a.rinvK, dhead)
		}
		tm.RMSNorm(xn, nil, a.x, ly.AttnNorm, T, H, eps)
		projectBack(tm, dxn, H, dqkv, Q, &ly.qkv, T, 0)
		p.loraBack(grads, l, groupQKV.at(0, AD, AD+nkv*D), dxn, xn, H, dqkv, Q, dyB, dA)
		tm.RMSNormBackward(dres, dxn, a.x, ly.AttnNorm, a.rinv1, T, H)
	}
	return nil
}

// loraMember is one module of a group that reads the same input: its
// adapter (a [r, in], b [out, r]), their gradients, where its output
// gradient starts in dy, and its u = x·Aᵀ.
type loraMember struct {
	a, b, da, db []float32
	out, off     int
	u            []float32
}

// loraBackward adds the gradients of y_j += s·(x·A_jᵀ)·B_jᵀ for a group of
// modules that read the same x, given dy (row stride ldy; member j's
// columns from its off) and the forward's u_j (row stride ldu):
// dB_j += s·dy_jᵀ·u_j, dA_j += s·(dy_j·B_j)ᵀ·x, dx += Σ_j s·(dy_j·B_j)·A_j.
// The dy_j·B_j land side by side in dyB [rows, n·r], so that dA and dx are
// one product each over the group (x and dx read once), with aStack the
// members' A stacked [n·r, in] and dA [n·r, in] scratch (a lone member's
// dA is added in place). The base product's dx += dy·W is the caller's.
func loraBackward(tm *team.Team, dx []float32, ldx int, x []float32, ldxIn int, dy []float32, ldy int, ms []loraMember, ldu,
	rows, in, r int, s float32, dyB, aStack, dA []float32) {
	w := len(ms) * r
	for j, m := range ms {
		tm.Gemm(false, false, rows, r, m.out, 1, dy[m.off:], ldy, m.b, r, 0, dyB[j*r:], w)
		tm.Gemm(true, false, m.out, r, rows, s, dy[m.off:], ldy, m.u, ldu, 1, m.db, r)
	}
	if len(ms) == 1 {
		tm.Gemm(true, false, r, in, rows, s, dyB, w, x, ldxIn, 1, ms[0].da, in)
	} else {
		tm.Gemm(true, false, w, in, rows, s, dyB, w, x, ldxIn, 0, dA, in)
		for j, m := range ms {
			for i, v := range dA[j*r*in : (j+1)*r*in] {
				m.da[i] += v
			}
		}
	}
	tm.Gemm(false, false, rows, in, w, s, dyB, w, aStack, in, 1, dx, ldx)
}

// The LM head runs in row chunks: logits for a chunk of tokens at a time
// ([chunk, vocab] floats) instead of [tokens, vocab]. Taller chunks make
// taller GEMMs: on the 135M shape a 64-row chunk's head GEMM ran at about
// 60% of the rate of a 256-row one, and the head is a fifth of a step's
// FLOPs. lmHeadRows picks up to maxLMHeadChunk rows within lmHeadBytes of
// scratch (256 rows, 48 MiB, at a 49k vocabulary; 130 rows at 128k), never
// fewer than lmHeadChunk.
const (
	lmHeadChunk    = 64
	maxLMHeadChunk = 256
	lmHeadBytes    = 64 << 20
)

// lmHeadRows is the chunk height for a vocabulary.
func lmHeadRows(vocab int) int {
	return min(maxLMHeadChunk, max(lmHeadChunk, lmHeadBytes/(4*max(1, vocab))))
}

// lmHeadLoss runs the LM head over x [rows, h] (the final norm's output)
// against w [vocab, h] in row chunks, fused
// with log-softmax, the loss and its gradient: per row it computes logp of
// the target, asks lossAt(row, logp) for the loss term's derivative
// g = d loss / d logp (rows in order, one goroutine), and, when dx is not
// nil, sets dx = dz·W with dz = g·(onehot(target) − softmax). logits is
// [chunk, vocab] scratch (chunk ≤ maxLMHeadChunk rows; lmHeadRows picks
// it), th the chunk's log-sum-exps and derivatives. It writes logp[row]
// for every row.
func lmHeadLoss(tm *team.Team, dx, x []float32, w *base, rows, h, vocab int, targets []int32, logp []float32,
	lossAt func(row int, logp float64) float64, logits []float32, th *trainHead) {
	chunk := min(maxLMHeadChunk, len(logits)/vocab)
	for c0 := 0; c0 < rows; c0 += chunk {
		c := min(chunk, rows-c0)
		z := logits[:c*vocab]
		project(tm, z, vocab, x[c0*h:], h, w, c, 0)
		tm.LogSoftmax(z, c, vocab, targets[c0:], logp[c0:], th.lse[:c])
		if k := th.topK; k > 0 {
			for i := 0; i < c; i++ {
				r := c0 + i
				topOf(z[i*vocab:(i+1)*vocab], th.lse[i], th.topIDs[r*k:(r+1)*k], th.topLPs[r*k:(r+1)*k])
			}
		}
		any := false
		for i := 0; i < c; i++ {
			th.coef[i] = lossAt(c0+i, float64(logp[c0+i]))
			any = any || th.coef[i] != 0
		}
		if dx == nil {
			continue
		}
		if !any {
			clear(dx[c0*h : (c0+c)*h])
			continue
		}
		tm.SoftmaxGrad(z, c, vocab, targets[c0:], th.lse[:c], th.coef[:c])
		projectBack(tm, dx[c0*h:], h, z, vocab, w, c, 0)
	}
}

// topOf fills ids and lps with the len(ids) most likely tokens of a row
// that LogSoftmax left as exponentials e = e^(z − max) with lse = log Σ e,
// most likely first (ties: the lower id first), as log-probabilities
// log e − lse. One pass keeping a sorted list: k is small (≤ 20) against
// the vocabulary.
func topOf(z []float32, lse float64, ids []int32, lps []float32) {
	k := len(ids)
	n := 0
	for j, v := range z {
		if n == k && v <= lps[k-1] {
			continue
		}
		i := min(n, k-1)
		for i > 0 && lps[i-1] < v {
			ids[i], lps[i] = ids[i-1], lps[i-1]
			i--
		}
		ids[i], lps[i] = int32(j), v
		n = min(n+1, k)
	}
	for i := range n {
		lps[i] = float32(math.Log(float64(lps[i])) - lse)
	}
}
