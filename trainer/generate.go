package trainer

import (
	"context"
	"fmt"
	"slices"

	"github.com/signal-p2p/signal/trainer/gumbel"
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
	prompt   int // the prompt's index in the request, and the sample's
	sample   int // among its num_samples: with the position, the noise's key
	tokens   []int
	logprobs []float32
	done     bool
	reason   string
	cut      int          // text length before the first stop string, -1 = none
	stop     *stopScanner // nil without stop strings
}

// key is the noise stream of the sequence's next token.
func (st *seqState) key(seed int64) uint64 {
	return gumbel.Key(seed, st.prompt, st.sample, len(st.tokens))
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
	defer singleThreadBLAS()()
	ar := m.arenas.get()
	defer m.arenas.put(ar)
	cache := newKVCache(ar, nSeq, c.NumHiddenLayers, c.NumAttentionHeads, c.NumKeyValueHeads, maxPrompt+p.MaxTokens, c.HeadDim)

	// Prefill every prompt once, into the slot of its first sample.
	promptLogits, err := m.prefill(ctx, ar, cache, prompts, numSamples, lora)
	if err != nil {
		return err
	}
	V := c.VocabSize
	stopIDs := m.stopTokenSet(p)
	picker := newTokenPicker(V)
	seqs := make([]seqState, nSeq)
	for s := range seqs {
		pi, si := s/numSamples, s%numSamples
		seqs[s] = seqState{
			slot:     s,
			prompt:   first + pi,
			sample:   si,
			tokens:   make([]int, 0, p.MaxTokens),
			logprobs: make([]float32, 0, p.MaxTokens),
			cut:      -1,
		}
		if len(p.Stop) > 0 {
			seqs[s].stop = newStopScanner(m.codec(), p.Stop)
		}
		tok, lp := picker.pick(promptLogits[pi*V:(pi+1)*V], p, seqs[s].key(p.Seed))
		m.accept(&seqs[s], tok, lp, p, stopIDs)
	}

	dec := newDecodePass(m, lora, ar, cache, nSeq)
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
		logits, err := dec.step(ctx, stepSlots, stepTokens)
		if err != nil {
			return err
		}
		for i, s := range active {
			tok, lp := picker.pick(logits[i*V:(i+1)*V], p, seqs[s].key(p.Seed))
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

// prefill runs the prompts through the forward into the cache, each into
// the slot of its first sample, copies that slot to the prompt's other
// samples, and returns the next-token logits [prompts, vocab] of each
// prompt's last row.
func (m *Model) prefill(ctx context.Context, ar *arena, cache *kvCache, prompts [][]int, numSamples int, lora *LoRA) ([]float32, error) {
	lens := make([]int, len(prompts))
	rows, maxLen := 0, 0
	for i, pr := range prompts {
		lens[i] = len(pr)
		rows += len(pr)
		maxLen = max(maxLen, len(pr))
	}
	p := newPass(m, lora, ar, lens, rows, maxLen, false)
	p.kv, p.lastRows = cache, true
	p.slots = make([]int, len(prompts))
	for i, pr := range prompts {
		p.slots[i] = i * numSamples
		copy(p.tokens[p.seqOff[i]:], pr)
	}
	if err := p.forward(ctx); err != nil {
		return nil, err
	}
	logits := ar.dirty(len(prompts) * m.cfg.VocabSize)
	m.headLogits(logits, p.out, len(prompts)) // one row per prompt: its last
	for i, slot := range p.slots {
		cache.lens[slot] = lens[i]
		for j := 1; j < numSamples; j++ {
			cache.copySlot(slot+j, slot)
		}
	}
	return logits, nil
}

// decodePass is a pass of one new row per sequence against a KV cache,
// sized once for the largest batch, so that a step allocates nothing.
type decodePass struct {
	*pass
	logits []float32
}

func newDecodePass(m *Model, lora *LoRA, ar *arena, cache *kvCache, maxRows int) *decodePass {
	c := m.cfg
	lens := make([]int, maxRows)
	for i := range lens {
		lens[i] = 1
	}
	p := newPass(m, lora, ar, lens, maxRows, 1, false)
	p.kv, p.decode = cache, true
	p.scratch = ar.dirty(m.team.Threads() * c.NumAttentionHeads / c.NumKeyValueHeads * cache.maxLen)
	return &decodePass{pass: p, logits: ar.dirty(maxRows * c.VocabSize)}
}

// step feeds tokens[i] to the sequence in cache slot slots[i] and returns
// the next-token logits [len(slots), vocab] (valid until the next step).
func (d *decodePass) step(ctx context.Context, slots, tokens []int) ([]float32, error) {
	B := len(slots)
	d.rows, d.seqOff, d.slots = B, d.seqOff[:B+1], slots
	copy(d.tokens, tokens)
	for i, slot := range slots {
		d.pos[i] = d.kv.lens[slot]
	}
	if err := d.forward(ctx); err != nil {
		return nil, err
	}
	logits := d.logits[:B*d.m.cfg.VocabSize]
	d.m.headLogits(logits, d.out, B)
	for _, slot := range slots {
		d.kv.lens[slot]++
	}
	return logits, nil
}
