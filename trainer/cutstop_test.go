package trainer

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/trainer/tokenizer"
)

// cutAtStopLinear is the definition CutAtStop's binary search must match:
// the first prefix whose decode holds a stop string.
func cutAtStopLinear(tok *tokenizer.Tokenizer, smp *Sample, stops []string) {
	for k := 1; k <= len(smp.Tokens); k++ {
		text := tok.Decode(smp.Tokens[:k], true)
		cut := -1
		for _, st := range stops {
			if i := strings.Index(text, st); i >= 0 && (cut < 0 || i < cut) {
				cut = i
			}
		}
		if cut >= 0 {
			smp.Tokens, smp.Logprobs = smp.Tokens[:k], smp.Logprobs[:k]
			smp.Text, smp.StopReason = text[:cut], "stop"
			return
		}
	}
	smp.Text = tok.Decode(smp.Tokens, true)
}

func TestCutAtStopFindsTheFirstCompletingToken(t *testing.T) {
	texts := []string{
		"The cat sat on the mat. Then it sat again!\nAnswer: yes.",
		"def f(x):\n    return x * 2  # double\n\nprint(f(3))",
		"naïve café — 日本語のテキスト 🙂🙂 end",
	}
	for _, name := range []string{"sentencepiece-bpe", "byte-level-bpe"} {
		tok, err := tokenizer.Load("tokenizer/testdata/" + name)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(1, 2))
		checked := 0
		for _, text := range texts {
			ids := tok.Encode(text, false)
			full := tok.Decode(ids, true)
			for trial := 0; trial < 40; trial++ {
				// A stop string cut from the text (or, one time in four, one it lacks).
				runes := []rune(full)
				i := rng.IntN(len(runes) - 3)
				stops := []string{string(runes[i : i+1+rng.IntN(3)])}
				if trial%4 == 0 {
					stops = []string{"\x07absent"}
				}
				if trial%5 == 0 {
					stops = append(stops, string(runes[rng.IntN(len(runes))]))
				}
				lp := make([]float32, len(ids))
				for j := range lp {
					lp[j] = -float32(j)
				}
				got := Sample{Tokens: slices.Clone(ids), Logprobs: slices.Clone(lp), StopReason: "length"}
				want := Sample{Tokens: slices.Clone(ids), Logprobs: slices.Clone(lp), StopReason: "length"}
				CutAtStop(tok, &got, stops)
				cutAtStopLinear(tok, &want, stops)
				if got.Text != want.Text || got.StopReason != want.StopReason || !slices.Equal(got.Tokens, want.Tokens) || !slices.Equal(got.Logprobs, want.Logprobs) {
					t.Fatalf("%s: stops %q in %q: got %+v, want %+v", name, stops, full, got, want)
				}
				checked++
			}
		}
		if checked == 0 {
			t.Fatal("nothing checked")
		}
	}
}
