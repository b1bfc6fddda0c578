package trainer

import (
	"context"
	"errors"
	"fmt"
	"math"
	"reflect"
	"testing"

	"github.com/signal-p2p/signal/trainer/gumbel"
)

func greedyParams(n int) SamplingParams {
	p := DefaultSamplingParams()
	p.Temperature, p.MaxTokens = 0, n
	return p
}

// logSoftmaxAt returns log p(tok) from a logits row.
func logSoftmaxAt(row []float32, tok int) float64 {
	return float64(row[tok]) - logSumExp(row)
}

// The KV-cache decode must give the logprobs a full forward pass gives for
// the same sequence: this checks cache layout, positions and batching.
func TestSampleLogprobsMatchFullForward(t *testing.T) {
	for _, name := range tinyModels {
		t.Run(name, func(t *testing.T) {
			m := mustLoad(t, name)
			lora := mustAdapter(t, m, name)
			V := m.Config().VocabSize
			prompts := [][]int{testTokens(5, V, 4), testTokens(2, V, 5), testTokens(9, V, 6)}
			p := DefaultSamplingParams()
			p.MaxTokens, p.Seed = 12, 42
			got, err := m.Sample(context.Background(), prompts, 2, p, lora)
			if err != nil {
				t.Fatal(err)
			}
			for pi, pr := range prompts {
				for si, s := range got[pi] {
					full := append(append([]int{}, pr...), s.Tokens...)
					logits, err := m.Logits(context.Background(), full, lora)
					if err != nil {
						t.Fatal(err)
					}
					for j, tok := range s.Tokens {
						row := logits[(len(pr)+j-1)*V : (len(pr)+j)*V]
						want := logSoftmaxAt(row, tok)
						if d := math.Abs(want - float64(s.Logprobs[j])); d > 1e-4 {
							t.Errorf("prompt %d sample %d token %d: logprob %v, full forward %v", pi, si, j, s.Logprobs[j], want)
						}
					}
				}
			}
		})
	}
}

func TestSampleDeterministicAndBatchIndependent(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	V := m.Config().VocabSize
	prompts := [][]int{testTokens(4, V, 7), testTokens(8, V, 8)}
	p := DefaultSamplingParams()
	p.MaxTokens, p.Seed, p.TopK, p.TopP = 10, 5, 50, 0.9
	a, err := m.Sample(context.Background(), prompts, 3, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := m.Sample(context.Background(), prompts, 3, p, nil)
	if !reflect.DeepEqual(a, b) {
		t.Error("same seed gave different samples")
	}
	if reflect.DeepEqual(a[0][0].Tokens, a[0][1].Tokens) && reflect.DeepEqual(a[0][1].Tokens, a[0][2].Tokens) {
		t.Error("three samples of one prompt are identical at temperature 1")
	}
	p.Seed = 6
	c, _ := m.Sample(context.Background(), prompts, 3, p, nil)
	if reflect.DeepEqual(a, c) {
		t.Error("different seeds gave the same samples")
	}
	// Greedy continuations do not depend on what else is in the batch.
	g := greedyParams(8)
	both, _ := m.Sample(context.Background(), prompts, 1, g, nil)
	one, _ := m.Sample(context.Background(), prompts[1:], 1, g, nil)
	if !reflect.DeepEqual(both[1][0].Tokens, one[0][0].Tokens) {
		t.Errorf("batched %v, alone %v", both[1][0].Tokens, one[0][0].Tokens)
	}
	// top-k 1 is greedy.
	k1 := p
	k1.TopK, k1.MaxTokens = 1, 8
	gk, _ := m.Sample(context.Background(), prompts, 1, k1, nil)
	if !reflect.DeepEqual(gk[0][0].Tokens, both[0][0].Tokens) {
		t.Errorf("top-k 1 %v, greedy %v", gk[0][0].Tokens, both[0][0].Tokens)
	}
}

func TestSampleStopTokensAndLength(t *testing.T) {
	m := mustLoad(t, "tiny-bl")
	V := m.Config().VocabSize
	prompt := [][]int{testTokens(6, V, 9)}
	full, err := m.Sample(context.Background(), prompt, 1, greedyParams(8), nil)
	if err != nil {
		t.Fatal(err)
	}
	s := full[0][0]
	if s.StopReason != StopLength || len(s.Tokens) != 8 || len(s.Logprobs) != 8 {
		t.Fatalf("got %d tokens, reason %q", len(s.Tokens), s.StopReason)
	}
	p := greedyParams(8)
	p.StopTokens = []int{s.Tokens[3]}
	stopped, _ := m.Sample(context.Background(), prompt, 1, p, nil)
	st := stopped[0][0]
	first := 0
	for first < 8 && s.Tokens[first] != s.Tokens[3] {
		first++
	}
	if st.StopReason != StopStop || len(st.Tokens) != first+1 {
		t.Errorf("stop token %d: got %v (%s), want the first %d of %v", s.Tokens[3], st.Tokens, st.StopReason, first+1, s.Tokens)
	}
}

func TestSampleBadInput(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	V := m.Config().VocabSize
	ok := [][]int{{1, 2, 3}}
	good := DefaultSamplingParams()
	cases := map[string]struct {
		prompts [][]int
		n       int
		mod     func(*SamplingParams)
	}{
		"max_tokens 0":     {ok, 1, func(p *SamplingParams) { p.MaxTokens = 0 }},
		"max_tokens -1":    {ok, 1, func(p *SamplingParams) { p.MaxTokens = -1 }},
		"top_p 0":          {ok, 1, func(p *SamplingParams) { p.TopP = 0 }},
		"top_p 1.5":        {ok, 1, func(p *SamplingParams) { p.TopP = 1.5 }},
		"top_p NaN":        {ok, 1, func(p *SamplingParams) { p.TopP = float32(math.NaN()) }},
		"temperature -1":   {ok, 1, func(p *SamplingParams) { p.Temperature = -1 }},
		"token >= vocab":   {[][]int{{1, V}}, 1, func(*SamplingParams) {}},
		"negative token":   {[][]int{{-1}}, 1, func(*SamplingParams) {}},
		"empty prompt":     {[][]int{{}}, 1, func(*SamplingParams) {}},
		"no prompts":       {nil, 1, func(*SamplingParams) {}},
		"num_samples 0":    {ok, 0, func(*SamplingParams) {}},
		"over context":     {[][]int{make([]int, 513)}, 1, func(*SamplingParams) {}},
		"prompt+max > ctx": {[][]int{make([]int, 500)}, 1, func(p *SamplingParams) { p.MaxTokens = 20 }},
		"stop token range": {ok, 1, func(p *SamplingParams) { p.StopTokens = []int{V} }},
		"stop w/o tokenizer": {ok, 1, func(p *SamplingParams) {
			p.Stop = []string{"x"}
			if m.codec() != nil {
				p.Stop = []string{""}
			}
		}},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			p := good
			c.mod(&p)
			_, err := m.Sample(context.Background(), c.prompts, c.n, p, nil)
			if !errors.Is(err, ErrInvalidInput) {
				t.Errorf("err = %v, want ErrInvalidInput", err)
			}
		})
	}
	if _, err := m.Logits(context.Background(), []int{V + 5}, nil); !errors.Is(err, ErrInvalidInput) {
		t.Errorf("Logits with bad id: err = %v", err)
	}
	other := mustLoad(t, "tiny-bl")
	if _, err := m.Logits(context.Background(), []int{1}, mustAdapter(t, other, "tiny-bl")); !errors.Is(err, ErrInvalidInput) {
		t.Errorf("adapter of another model: err = %v", err)
	}
}

func TestFreshLoRALeavesLogitsUnchanged(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	l, err := NewLoRA(m, 8, 16, nil, 3)
	if err != nil {
		t.Fatal(err)
	}
	toks := testTokens(7, m.Config().VocabSize, 10)
	base, _ := m.Logits(context.Background(), toks, nil)
	with, _ := m.Logits(context.Background(), toks, l)
	for i := range base {
		if base[i] != with[i] {
			t.Fatalf("logit %d: %v with a zero-B adapter, %v without", i, with[i], base[i])
		}
	}
}

func TestTokenPicker(t *testing.T) {
	logits := []float32{0, 3, 1, 2.5, -1, 2.9}
	tp := newTokenPicker(len(logits))
	counts := map[int]int{}
	p := SamplingParams{Temperature: 1, TopK: 3, TopP: 1}
	for i := 0; i < 2000; i++ {
		tok, lp := tp.pick(logits, &p, gumbel.Key(1, 0, 0, i))
		counts[tok]++
		if want := logSoftmaxAt(logits, tok); math.Abs(float64(lp)-want) > 1e-6 {
			t.Fatalf("logprob %v, want %v", lp, want)
		}
	}
	for tok := range counts {
		if tok != 1 && tok != 3 && tok != 5 {
			t.Errorf("top-k 3 sampled token %d", tok)
		}
	}
	// top-p 0.5: p(1) ≈ 0.38, p(5) ≈ 0.34 → the nucleus is {1, 5}.
	counts = map[int]int{}
	p = SamplingParams{Temperature: 1, TopP: 0.5}
	for i := 0; i < 2000; i++ {
		tok, _ := tp.pick(logits, &p, gumbel.Key(2, 0, 0, i))
		counts[tok]++
	}
	if len(counts) != 2 || counts[1] == 0 || counts[5] == 0 {
		t.Errorf("top-p 0.5 sampled %v, want only tokens 1 and 5", counts)
	}
	idx := []int32{0, 1, 2, 3, 4, 5}
	selectTop(idx, logits, 2)
	if !(idx[0] == 1 && idx[1] == 5 || idx[0] == 5 && idx[1] == 1) {
		t.Errorf("selectTop 2 = %v", idx[:2])
	}
}

func TestDecodeStepAllocatesNothing(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	lora := mustAdapter(t, m, "tiny-sp")
	c := m.Config()
	ar := m.arenas.get()
	defer m.arenas.put(ar)
	cache := newKVCache(ar, 2, c.NumHiddenLayers, c.NumAttentionHeads, c.NumKeyValueHeads, 64, c.HeadDim)
	dec := newDecodePass(m, lora, ar, cache, 2)
	slots, toks := []int{0, 1}, []int{5, 6}
	tp := newTokenPicker(c.VocabSize)
	p := SamplingParams{Temperature: 0.8, TopK: 40, TopP: 1}
	ctx := context.Background()
	allocs := testing.AllocsPerRun(20, func() {
		logits, err := dec.step(ctx, slots, toks)
		if err != nil {
			t.Fatal(err)
		}
		tp.pick(logits[:c.VocabSize], &p, gumbel.Key(1, 0, 0, 0))
	})
	if allocs != 0 {
		t.Errorf("decode step + pick allocated %v times", allocs)
	}
}

// Many sessions share one Model: concurrent calls must neither race nor
// change each other's results.
func TestConcurrentSampling(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	lora := mustAdapter(t, m, "tiny-sp")
	V := m.Config().VocabSize
	prompts := [][]int{testTokens(6, V, 11), testTokens(9, V, 12)}
	p := DefaultSamplingParams()
	p.MaxTokens, p.Seed = 6, 3
	want, err := m.Sample(context.Background(), prompts, 2, p, lora)
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 4)
	for g := 0; g < 4; g++ {
		go func(g int) {
			var l *LoRA
			if g%2 == 0 {
				l = lora
			}
			got, err := m.Sample(context.Background(), prompts, 2, p, l)
			if err == nil && l != nil && !reflect.DeepEqual(got, want) {
				err = errors.New("concurrent sample differs from the sequential one")
			}
			errs <- err
		}(g)
	}
	for g := 0; g < 4; g++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// BenchmarkChooseWarm times one warm draw (temperature 1, no top-k/top-p)
// over a 49,152- and a 151,936-token vocabulary: the Gumbel noise is one
// hash and two logs per token.
func BenchmarkChooseWarm(b *testing.B) {
	for _, v := range []int{49152, 151936} {
		b.Run(fmt.Sprint(v), func(b *testing.B) {
			logits := make([]float32, v)
			for i := range logits {
				logits[i] = float32(math.Sin(float64(i)))
			}
			tp := newTokenPicker(v)
			p := SamplingParams{Temperature: 1, TopP: 1}
			for i := 0; b.Loop(); i++ {
				tp.choose(logits, &p, gumbel.Key(1, 0, 0, i))
			}
		})
	}
}
