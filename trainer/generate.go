package trainer

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/signal-p2p/signal/trainer/blas"
)

// maxBatchSeqs bounds how many sequences decode together, and
// maxKVCacheBytes the KV cache of one group; more prompts are processed in
// successive groups. All samples of a prompt share its prefill, so they
// always decode in one group even past the cache bound.
const (
	maxBatchSeqs    = 32
	maxKVCacheBytes = 256 << 20
)

// Sample generates numSamples continuations of each prompt with lora
// applied (nil for the base model). Prompts are token ids used verbatim.
// Sequences of all prompts decode together, one batched step per token.
// Prompts are prefilled once and their KV cache copied to each sample.
func (m *Model) Sample(ctx context.Context, prompts [][]int, numSamples int, p SamplingParams, lora *LoRA) ([][]Sample, error) {
	if err := p.Validate(m.cfg.VocabSize); err != nil {
		return nil, err
	}
	if len(prompts) == 0 {
		return nil, fmt.Errorf("%w: no prompts", ErrInvalidInput)
	}
	if numSamples <= 0 || numSamples > 1024 {
		return nil, fmt.Errorf("%w: num_samples %d must be in [1, 1024]", ErrInvalidInput, numSamples)
	}
	for i, pr := range prompts {
		if err := m.ValidateTokens(pr, fmt.Sprintf("prompt %d", i)); err != nil {
			return nil, err
		}
		if len(pr)+p.MaxTokens > m.cfg.MaxPositionEmbeddings {
			return nil, fmt.Errorf("%w: prompt %d has %d tokens; with max_tokens %d it exceeds the model's context of %d",
				ErrInvalidInput, i, len(pr), p.MaxTokens, m.cfg.MaxPositionEmbeddings)
		}
	}
	if len(p.Stop) > 0 && m.codec() == nil {
		return nil, fmt.Errorf("%w: stop strings need a tokenizer and model %s has none", ErrInvalidInput, m.dir)
	}
	if err := m.checkLoRA(lora); err != nil {
		return nil, err
	}
	out := make([][]Sample, len(prompts))
	maxLen := p.MaxTokens
	for _, pr := range prompts {
		maxLen = max(maxLen, len(pr)+p.MaxTokens)
	}
	c := m.cfg
	seqBytes := 2 * 4 * c.NumHiddenLayers * c.NumKeyValueHeads * c.HeadDim * maxLen
	seqs := min(maxBatchSeqs, max(1, maxKVCacheBytes/seqBytes))
	per := max(1, seqs/numSamples)
	for lo := 0; lo < len(prompts); lo += per {
		hi := min(lo+per, len(prompts))
		if err := m.sampleGroup(ctx, prompts[lo:hi], lo, numSamples, &p, lora, out[lo:hi]); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// seqState is one sequence being generated.
type seqState struct {
	slot     int
	rng      *rand.Rand
	tokens   []int
	logprobs []float32
	done     bool
	reason   string
	cut      int          // text length before the first stop string, -1 = none
	stop     *stopScanner // nil without stop strings
}

func (m *Model) stopTokenSet(p *SamplingParams) []int {
	ids := slices.Clone(p.StopTokens)
	ids = append(ids, m.cfg.EOSTokenID...)
	if tk := m.codec(); tk != nil {
		ids = append(ids, tk.EOS()...)
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}

func (m *Model) sampleGroup(ctx context.Context, prompts [][]int, first, numSamples int, p *SamplingParams, lora *LoRA, out [][]Sample) error {
	c := m.cfg
	nSeq := len(prompts) * numSamples
	maxPrompt := 0
	for _, pr := range prompts {
		maxPrompt = max(maxPrompt, len(pr))
	}
	AcquireSingleThreadBLAS() // see Forward: our goroutines split the GEMMs
	defer ReleaseSingleThreadBLAS()
	ws := m.GetArena()
	defer m.PutArena(ws)
	cache := newKVCache(ws, nSeq, c.NumHiddenLayers, c.NumAttentionHeads, c.NumKeyValueHeads, maxPrompt+p.MaxTokens, c.HeadDim)

	// Prefill every prompt once, into the slot of its first sample.
	slots := make([]int, len(prompts))
	for i := range prompts {
		slots[i] = i * numSamples
	}
	b := NewBatch(prompts)
	acts, err := m.Forward(ctx, ws, b, ForwardOptions{LoRA: lora, LastRows: true, kv: cache, kvSlots: slots})
	if err != nil {
		return err
	}
	V := c.VocabSize
	for i := range prompts {
		cache.lens[slots[i]] = b.Len(i)
	}
	promptLogits := ws.AllocDirty(len(prompts) * V)
	m.headLogits(new(gemmTask), promptLogits, acts.Out, len(prompts)) // one row per prompt: its last
	for i := range prompts {
		for j := 1; j < numSamples; j++ {
			cache.copySlot(slots[i]+j, slots[i])
		}
	}

	stopIDs := m.stopTokenSet(p)
	picker := newTokenPicker(V)
	seqs := make([]seqState, nSeq)
	for s := range seqs {
		pi, si := s/numSamples, s%numSamples
		seqs[s] = seqState{
			slot:     s,
			rng:      rand.New(rand.NewPCG(uint64(p.Seed), uint64(first+pi)<<32|uint64(si))),
			tokens:   make([]int, 0, p.MaxTokens),
			logprobs: make([]float32, 0, p.MaxTokens),
			cut:      -1,
		}
		if len(p.Stop) > 0 {
			seqs[s].stop = newStopScanner(m.codec(), p.Stop)
		}
		tok, lp := picker.pick(promptLogits[pi*V:(pi+1)*V], p, seqs[s].rng)
		m.accept(&seqs[s], tok, lp, p, stopIDs)
	}

	dec := m.newDecoder(ws, cache, lora, nSeq)
	active := make([]int, 0, nSeq)
	stepSlots := make([]int, 0, nSeq)
	stepTokens := make([]int, 0, nSeq)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		active, stepSlots, stepTokens = active[:0], stepSlots[:0], stepTokens[:0]
		for s := range seqs {
			if !seqs[s].done {
				active = append(active, s)
				stepSlots = append(stepSlots, seqs[s].slot)
				stepTokens = append(stepTokens, seqs[s].tokens[len(seqs[s].tokens)-1])
			}
		}
		if len(active) == 0 {
			break
		}
		logits := dec.step(stepSlots, stepTokens)
		for i, s := range active {
			tok, lp := picker.pick(logits[i*V:(i+1)*V], p, seqs[s].rng)
			m.accept(&seqs[s], tok, lp, p, stopIDs)
		}
	}

	tk := m.codec()
	for pi := range prompts {
		out[pi] = make([]Sample, numSamples)
		for si := 0; si < numSamples; si++ {
			st := &seqs[pi*numSamples+si]
			smp := Sample{Tokens: st.tokens, Logprobs: st.logprobs, StopReason: st.reason}
			if tk != nil {
				smp.Text = tk.Decode(st.tokens, true)
				if st.cut >= 0 && st.cut <= len(smp.Text) {
					smp.Text = smp.Text[:st.cut]
				}
			}
			out[pi][si] = smp
		}
	}
	return nil
}

// accept appends a sampled token and decides whether the sequence stops:
// on a stop token, on a stop string in the decoded text, or at max_tokens.
// Stop strings need the text, so only then is the continuation decoded,
// incrementally (stopScanner).
func (m *Model) accept(st *seqState, tok int, lp float32, p *SamplingParams, stopIDs []int) {
	st.tokens = append(st.tokens, tok)
	st.logprobs = append(st.logprobs, lp)
	if _, ok := slices.BinarySearch(stopIDs, tok); ok {
		st.done, st.reason = true, StopStop
		return
	}
	if st.stop != nil {
		if cut := st.stop.scan(st.tokens); cut >= 0 {
			st.done, st.reason, st.cut = true, StopStop, cut
			return
		}
	}
	if len(st.tokens) >= p.MaxTokens {
		st.done, st.reason = true, StopLength
	}
}

// decoder runs one token per sequence through the model against a KV
// cache. Its buffers are sized for the largest batch once, so a step
// allocates nothing.
type decoder struct {
	m                                                      *Model
	cache                                                  *kvCache
	lora                                                   *LoRA
	x, xn, qkv, attn, gu, act, u, scores, cos, sin, logits []float32
	pos                                                    []int
	gt                                                     gemmTask // for m.linear; a field so passing it does not allocate
}

func (m *Model) newDecoder(ws *Arena, cache *kvCache, lora *LoRA, maxB int) *decoder {
	c := m.cfg
	ad := m.attnDims()
	r := 0
	if lora != nil {
		r = lora.Rank
	}
	return &decoder{
		m: m, cache: cache, lora: lora,
		x: ws.AllocDirty(maxB * c.HiddenSize), xn: ws.AllocDirty(maxB * c.HiddenSize),
		qkv: ws.AllocDirty(maxB * ad.QKVDim()), attn: ws.AllocDirty(maxB * ad.H * ad.D),
		gu: ws.AllocDirty(maxB * 2 * c.IntermediateSize), act: ws.AllocDirty(maxB * c.IntermediateSize),
		u:      ws.AllocDirty(maxB * max(r, 1)),
		scores: ws.AllocDirty(ad.H / ad.KV * cache.maxLen),
		cos:    ws.AllocDirty(maxB * ad.D / 2), sin: ws.AllocDirty(maxB * ad.D / 2),
		logits: ws.AllocDirty(maxB * c.VocabSize),
		pos:    make([]int, maxB),
	}
}

// step feeds tokens[i] to the sequence in cache slot slots[i] and returns
// the next-token logits [len(slots), vocab] (valid until the next step).
func (d *decoder) step(slots, tokens []int) []float32 {
	m, c, cache, lora := d.m, d.m.cfg, d.cache, d.lora
	B, hid, inter := len(slots), c.HiddenSize, c.IntermediateSize
	ad := m.attnDims()
	qkvd, hd, D := ad.QKVDim(), ad.H*ad.D, ad.D
	group := ad.H / ad.KV
	eps := float32(c.RMSNormEps)
	scale := float32(1 / math.Sqrt(float64(D)))
	pos := d.pos[:B]
	for i, t := range tokens {
		pos[i] = cache.lens[slots[i]]
		copy(d.x[i*hid:(i+1)*hid], m.Embed[t*hid:(t+1)*hid])
	}
	RopeTables(d.cos, d.sin, pos, m.InvFreq)
	x, xn, qkv, attn, gu, act := d.x[:B*hid], d.xn[:B*hid], d.qkv[:B*qkvd], d.attn[:B*hd], d.gu[:B*2*inter], d.act[:B*inter]
	for l := range m.Layers {
		w := &m.Layers[l]
		RMSNorm(xn, nil, x, w.AttnNorm, B, hid, eps)
		m.linear(&d.gt, qkv, qkvd, xn, hid, w.WQKV, w.pQKV, B, hid, qkvd, 0)
		addBias(qkv, B, qkvd, w.BQKV)
		if lora != nil {
			cols := [3]int{0, hd, hd + ad.KV*D}
			for i, mod := range [3]Module{ModQ, ModK, ModV} {
				if lora.Targets(mod) {
					addLoRA(qkv, qkvd, cols[i], xn, hid, B, lora, l, mod, d.u)
				}
			}
		}
		headNorm(qkv, B, qkvd, ad.H, ad.KV, D, w.QNorm, w.KNorm, eps, nil, nil)
		ApplyRope(qkv, B, qkvd, 0, ad.H+ad.KV, D, d.cos, d.sin)
		for i, slot := range slots {
			cache.store(slot, l, pos[i], qkv[i*qkvd:], qkvd, 1)
			n := pos[i] + 1
			for g := 0; g < ad.KV; g++ {
				off := cache.block(slot, l, g)
				s := d.scores[:group*n]
				// The group's q heads are adjacent: one [group, D] matrix.
				blas.Sgemm(false, true, group, n, D, scale, qkv[i*qkvd+g*group*D:], D, cache.k[off:], D, 0, s, n)
				for r := 0; r < group; r++ {
					softmaxRow(s[r*n : (r+1)*n])
				}
				blas.Sgemm(false, false, group, D, n, 1, s, n, cache.v[off:], D, 0, attn[i*hd+g*group*D:], D)
			}
		}
		m.linear(&d.gt, x, hid, attn, hd, w.WO, w.pO, B, hd, hid, 1)
		if lora != nil && lora.Targets(ModO) {
			addLoRA(x, hid, 0, attn, hd, B, lora, l, ModO, d.u)
		}
		RMSNorm(xn, nil, x, w.MLPNorm, B, hid, eps)
		m.linear(&d.gt, gu, 2*inter, xn, hid, w.WGateUp, w.pGateUp, B, hid, 2*inter, 0)
		if lora != nil {
			for i, mod := range [2]Module{ModGate, ModUp} {
				if lora.Targets(mod) {
					addLoRA(gu, 2*inter, i*inter, xn, hid, B, lora, l, mod, d.u)
				}
			}
		}
		SiluMul(act, gu, B, inter)
		m.linear(&d.gt, x, hid, act, inter, w.WDown, w.pDown, B, inter, hid, 1)
		if lora != nil && lora.Targets(ModDown) {
			addLoRA(x, hid, 0, act, inter, B, lora, l, ModDown, d.u)
		}
	}
	RMSNorm(xn, nil, x, m.Norm, B, hid, eps)
	logits := d.logits[:B*c.VocabSize]
	m.headLogits(&d.gt, logits, xn, B)
	for _, slot := range slots {
		cache.lens[slot]++
	}
	return logits
}
