package trainer

import (
	"context"
	"fmt"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/team"
)

// Batch is a packed set of sequences: Tokens holds them back to back and
// sequence i is Tokens[Starts[i]:Starts[i+1]]. Every sequence starts at
// position 0.
type Batch struct {
	Tokens []int
	Starts []int // len = sequences + 1; Starts[0] = 0, last = len(Tokens)
}

// NewBatch packs seqs into a Batch.
func NewBatch(seqs [][]int) Batch {
	b := Batch{Starts: make([]int, 1, len(seqs)+1)}
	for _, s := range seqs {
		b.Tokens = append(b.Tokens, s...)
		b.Starts = append(b.Starts, len(b.Tokens))
	}
	return b
}

// NumSeqs returns the number of sequences.
func (b Batch) NumSeqs() int { return len(b.Starts) - 1 }

// Len returns sequence i's length.
func (b Batch) Len(i int) int { return b.Starts[i+1] - b.Starts[i] }

// LayerActs are one decoder block's activations kept by a forward pass for
// the backward (T = tokens of the batch).
type LayerActs struct {
	X     []float32 // [T, hidden] residual stream entering the block
	RStd1 []float32 // [T] 1/rms of X (input_layernorm)
	XN1   []float32 // [T, hidden] normed X: the input of q, k, v
	QKV   []float32 // [T, QKVDim] fused q|k|v output, q and k rotated
	// Probs holds sequence s's attention probabilities [H, L, L] from
	// ProbOffsets[s] (Activations.ProbOffsets).
	Probs []float32
	Attn  []float32 // [T, H·D] attention output: the input of o_proj
	H     []float32 // [T, hidden] residual stream after attention
	RStd2 []float32 // [T] 1/rms of H (post_attention_layernorm)
	XN2   []float32 // [T, hidden] normed H: the input of gate and up
	GU    []float32 // [T, 2·I] fused gate|up output before the activation
	Act   []float32 // [T, I] silu(gate)·up: the input of down_proj
	// U[mod] is x·Aᵀ [T, rank] for each module the LoRA adapts (nil otherwise).
	U [NumModules][]float32
}

// Activations is what a forward pass with ForwardOptions.Keep leaves for a
// backward pass. All buffers live in the arena passed to Forward.
type Activations struct {
	Batch       Batch
	Cos, Sin    []float32 // [T, D/2] rotary tables of each row's position
	ProbOffsets []int     // per sequence, offset of its [H, L, L] block in LayerActs.Probs
	Layers      []LayerActs
	XF          []float32 // [T, hidden] residual stream entering the final norm
	RStdF       []float32 // [T] 1/rms of XF
	Out         []float32 // [T, hidden] final normed hidden states: the LM head's input
}

// ForwardOptions select what Forward does beyond computing hidden states.
type ForwardOptions struct {
	LoRA *LoRA // applied unmerged on the modules it targets; nil for the base model
	Keep bool  // keep every activation the backward needs (Activations.Layers)
	// LastRows: only each sequence's last row is needed (a prompt's
	// next-token logits). The last block then runs o_proj and the MLP for
	// those rows alone — llama.cpp skips the same work — and Out (and XF,
	// RStdF) hold one row per sequence. Not with Keep.
	LastRows bool
	// kv, when set, receives each sequence's rotated keys and values.
	kv *kvCache
	// kvSlots[i] is the cache slot of sequence i.
	kvSlots []int
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

func (m *Model) attnDims() AttnDims {
	return AttnDims{H: m.cfg.NumAttentionHeads, KV: m.cfg.NumKeyValueHeads, D: m.cfg.HeadDim}
}

// addLoRA adds scale·(x·Aᵀ)·Bᵀ into columns [col0, col0+out) of y (row
// stride ldy) for module mod of layer l; u [rows, rank] receives x·Aᵀ.
func addLoRA(y []float32, ldy, col0 int, x []float32, ldx, rows int, lora *LoRA, l int, mod Module, u []float32) {
	p := lora.Layers[l][mod]
	r := lora.Rank
	blas.Sgemm(false, true, rows, r, p.In, 1, x, ldx, p.A, p.In, 0, u, r)
	blas.Sgemm(false, true, rows, p.Out, r, lora.Scale(), u, r, p.B, r, 1, y[col0:], ldy)
}

// Forward runs the decoder over a packed batch and returns the final normed
// hidden states [T, hidden] (Activations.Out). Token ids must be validated
// by the caller (ValidateTokens). Buffers come from ws; with opt.Keep the
// returned Activations hold every layer's tensors for the backward,
// otherwise only Out is meaningful.
func (m *Model) Forward(ctx context.Context, ws *Arena, b Batch, opt ForwardOptions) (*Activations, error) {
	if opt.LastRows && opt.Keep {
		return nil, fmt.Errorf("%w: Forward with both LastRows and Keep", ErrInvalidInput)
	}
	c := m.cfg
	T, hid, inter := len(b.Tokens), c.HiddenSize, c.IntermediateSize
	ad := m.attnDims()
	qkvd, hd := ad.QKVDim(), ad.H*ad.D
	lora := opt.LoRA
	half := c.HeadDim / 2
	eps := float32(c.RMSNormEps)

	// GEMMs are split across the model's workers, each single-threaded,
	// so OpenBLAS's own threads stay idle instead of spinning beside ours.
	AcquireSingleThreadBLAS()
	defer ReleaseSingleThreadBLAS()
	gt, jt := new(gemmTask), new(jobsTask)

	acts := &Activations{Batch: b}
	acts.Cos, acts.Sin = ws.AllocDirty(T*half), ws.AllocDirty(T*half)
	pos := make([]int, T)
	acts.ProbOffsets = make([]int, b.NumSeqs()+1)
	maxL := 0
	for s := 0; s < b.NumSeqs(); s++ {
		L := b.Len(s)
		for i := 0; i < L; i++ {
			pos[b.Starts[s]+i] = i
		}
		acts.ProbOffsets[s+1] = acts.ProbOffsets[s] + ad.H*L*L
		maxL = max(maxL, L)
	}
	RopeTables(acts.Cos, acts.Sin, pos, m.InvFreq)

	workers := m.threads()
	// x is the residual stream; with Keep each block gets fresh buffers,
	// otherwise one set is reused by every block.
	x := ws.AllocDirty(T * hid)
	for i, t := range b.Tokens {
		copy(x[i*hid:(i+1)*hid], m.Embed[t*hid:(t+1)*hid])
	}
	var la LayerActs
	newBuffers := func() {
		la = LayerActs{
			RStd1: ws.AllocDirty(T), XN1: ws.AllocDirty(T * hid), QKV: ws.AllocDirty(T * qkvd),
			Attn: ws.AllocDirty(T * hd), RStd2: ws.AllocDirty(T), XN2: ws.AllocDirty(T * hid),
			GU: ws.AllocDirty(T * 2 * inter), Act: ws.AllocDirty(T * inter),
		}
		if opt.Keep {
			la.Probs = ws.AllocDirty(acts.ProbOffsets[b.NumSeqs()])
		} else {
			la.Probs = ws.AllocDirty(workers * maxL * maxL) // one [L, L] scratch per worker
		}
		if lora != nil {
			for mod := Module(0); mod < NumModules; mod++ {
				if lora.Targets(mod) {
					la.U[mod] = ws.AllocDirty(T * lora.Rank)
				}
			}
		}
	}
	if opt.Keep {
		acts.Layers = make([]LayerActs, c.NumHiddenLayers)
	} else {
		newBuffers()
	}
	rows := T // rows the block computes after attention (see LastRows)
	for l := range m.Layers {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		w := &m.Layers[l]
		if opt.Keep {
			newBuffers()
			la.X = x
			la.H = ws.AllocDirty(T * hid)
			copy(la.H, x)
		} else {
			la.X, la.H = x, x
		}

		// Attention block: h = x + o_proj(attn(rope(qkv(norm(x))))).
		m.rmsNormPar(jt, la.XN1, la.RStd1, la.X, w.AttnNorm, T, hid, eps)
		m.linear(gt, la.QKV, qkvd, la.XN1, hid, w.WQKV, w.pQKV, T, hid, qkvd, 0)
		addBias(la.QKV, T, qkvd, w.BQKV)
		if lora != nil {
			cols := [3]int{0, hd, hd + ad.KV*ad.D}
			for i, mod := range [3]Module{ModQ, ModK, ModV} {
				if lora.Targets(mod) {
					addLoRA(la.QKV, qkvd, cols[i], la.XN1, hid, T, lora, l, mod, la.U[mod])
				}
			}
		}
		headNorm(la.QKV, T, qkvd, ad.H, ad.KV, ad.D, w.QNorm, w.KNorm, eps, nil, nil)
		m.ropePar(jt, la.QKV, T, qkvd, 0, ad.H+ad.KV, ad.D, acts.Cos, acts.Sin)
		if opt.kv != nil {
			for s := 0; s < b.NumSeqs(); s++ {
				opt.kv.store(opt.kvSlots[s], l, 0, la.QKV[b.Starts[s]*qkvd:], qkvd, b.Len(s))
			}
		}
		if opt.LastRows && l == len(m.Layers)-1 {
			// Only each sequence's last row goes on (every row's keys and
			// values are in the cache already): its attention against the
			// whole sequence, and its residual row gathered to row s.
			rows = b.NumSeqs()
			for s := 0; s < rows; s++ {
				r0, L := b.Starts[s], b.Len(s)
				for h := 0; h < ad.H; h++ {
					team.AttentionHead(la.Attn[s*hd:], hd, la.QKV[r0*qkvd:r0*qkvd+L*qkvd], L, ad.H, ad.KV, ad.D, h, L-1, la.Probs[:L])
				}
				copy(x[s*hid:(s+1)*hid], x[(r0+L-1)*hid:(r0+L)*hid]) // s ≤ r0+L−1, and later rows lie further on
			}
		} else if m.team != nil {
			// One job per (sequence, head), shared out (BLAS single-threaded).
			var off []int
			if opt.Keep {
				off = acts.ProbOffsets
			}
			m.team.Attention(la.Attn, hd, la.QKV, b.Starts, ad.H, ad.KV, ad.D, la.Probs, off, maxL*maxL)
		} else {
			m.attention(jt, &la, acts, b, opt.Keep, maxL)
		}
		m.linear(gt, la.H, hid, la.Attn, hd, w.WO, w.pO, rows, hd, hid, 1)
		if lora != nil && lora.Targets(ModO) {
			addLoRA(la.H, hid, 0, la.Attn, hd, rows, lora, l, ModO, la.U[ModO])
		}

		// MLP block: x' = h + down(silu(gate(norm(h)))·up(norm(h))).
		m.rmsNormPar(jt, la.XN2, la.RStd2, la.H, w.MLPNorm, rows, hid, eps)
		m.linear(gt, la.GU, 2*inter, la.XN2, hid, w.WGateUp, w.pGateUp, rows, hid, 2*inter, 0)
		if lora != nil {
			for i, mod := range [2]Module{ModGate, ModUp} {
				if lora.Targets(mod) {
					addLoRA(la.GU, 2*inter, i*inter, la.XN2, hid, rows, lora, l, mod, la.U[mod])
				}
			}
		}
		m.siluMulPar(jt, la.Act, la.GU, rows, inter)
		next := la.H
		if opt.Keep {
			next = ws.AllocDirty(rows * hid)
			copy(next, la.H)
		}
		m.linear(gt, next, hid, la.Act, inter, w.WDown, w.pDown, rows, inter, hid, 1)
		if lora != nil && lora.Targets(ModDown) {
			addLoRA(next, hid, 0, la.Act, inter, rows, lora, l, ModDown, la.U[ModDown])
		}
		if opt.Keep {
			acts.Layers[l] = la
		}
		x = next
	}
	acts.XF = x[:rows*hid]
	acts.RStdF = ws.AllocDirty(rows)
	acts.Out = ws.AllocDirty(rows * hid)
	RMSNorm(acts.Out, acts.RStdF, acts.XF, m.Norm, rows, hid, eps)
	return acts, nil
}

// HeadLogits writes logits [rows, vocab] = hidden·LMHeadᵀ for hidden [rows, hidden].
func (m *Model) HeadLogits(logits, hidden []float32, rows int) {
	AcquireSingleThreadBLAS()
	defer ReleaseSingleThreadBLAS()
	m.headLogits(new(gemmTask), logits, hidden, rows)
}

// headLogits is HeadLogits for callers already holding single-thread BLAS.
func (m *Model) headLogits(gt *gemmTask, logits, hidden []float32, rows int) {
	m.linear(gt, logits, m.cfg.VocabSize, hidden, m.cfg.HiddenSize, m.LMHead, m.pHead, rows, m.cfg.HiddenSize, m.cfg.VocabSize, 0)
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
	ws := m.GetArena()
	defer m.PutArena(ws)
	acts, err := m.Forward(ctx, ws, NewBatch([][]int{tokens}), ForwardOptions{LoRA: lora})
	if err != nil {
		return nil, err
	}
	logits := make([]float32, len(tokens)*m.cfg.VocabSize)
	m.HeadLogits(logits, acts.Out, len(tokens))
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

// attention is the pool's causal attention for one block: one job per
// (sequence, head), with la.Probs per-worker scratch unless keep (then the
// probabilities stay at acts.ProbOffsets for the backward).
func (m *Model) attention(jt *jobsTask, la *LayerActs, acts *Activations, b Batch, keep bool, maxL int) {
	ad := m.attnDims()
	qkvd, hd := ad.QKVDim(), ad.H*ad.D
	m.parallel(jt, b.NumSeqs()*ad.H, func(worker, job int) {
		s, h := job/ad.H, job%ad.H
		r0, L := b.Starts[s], b.Len(s)
		var probs []float32
		if keep {
			probs = la.Probs[acts.ProbOffsets[s]+h*L*L : acts.ProbOffsets[s]+(h+1)*L*L]
		} else {
			probs = la.Probs[worker*maxL*maxL : worker*maxL*maxL+L*L]
		}
		CausalAttentionHead(la.Attn[r0*hd:], hd, la.QKV[r0*qkvd:], L, ad, h, probs)
	})
}
