package trainer

import (
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/signal-p2p/signal/trainer/tokenizer"
)

// bruteStop is the definition the scanner must match: the first stop string
// in the full decode of tokens, or -1.
func bruteStop(tk textCodec, tokens []int, stops []string) int {
	text := tk.Decode(tokens, true)
	cut := -1
	for _, s := range stops {
		if i := strings.Index(text, s); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	return cut
}

// TestStopScannerMatchesFullDecode: on random token streams (byte-fallback
// and byte-level pieces, special tokens, multi-byte characters split across
// tokens) with stop strings cut from the text they decode to, the
// incremental scanner reports a stop at the same token, with the same cut,
// as decoding the whole continuation at every token.
func TestStopScannerMatchesFullDecode(t *testing.T) {
	for _, name := range []string{"sentencepiece-bpe", "byte-level-bpe"} {
		t.Run(name, func(t *testing.T) {
			tk, err := tokenizer.Load(filepath.Join("tokenizer", "testdata", name))
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(7, uint64(len(name))))
			texts := []string{"Once upon a time, there was a 🐉 dragon.\n\nThe end ", "naïve café — 東京 x=1; y = [2, 3]\r\n", "   spaces   and\ttabs "}
			V := tk.VocabSize()
			hits := 0
			for trial := 0; trial < 60; trial++ {
				// Half the streams are real text's tokens (long stop strings
				// spanning several tokens), half random ids.
				var tokens []int
				if trial%2 == 0 {
					tokens = tk.Encode(texts[trial/2%len(texts)]+texts[(trial/2+1)%len(texts)], false)
				} else {
					tokens = make([]int, 40)
					for i := range tokens {
						tokens[i] = rng.IntN(V)
					}
				}
				full := tk.Decode(tokens, true)
				if full == "" {
					continue
				}
				// A stop string: a run of whole characters from the second half.
				runes := []rune(full)
				start := len(runes)/2 + rng.IntN(max(1, len(runes)/2))
				start = min(start, len(runes)-1)
				n := 1 + rng.IntN(min(8, len(runes)-start))
				stop := string(runes[start : start+n])
				if stop == string(utf8.RuneError) {
					continue
				}
				stops := []string{stop, "\x00never"}
				sc := newStopScanner(tk, stops)
				for k := 1; k <= len(tokens); k++ {
					want := bruteStop(tk, tokens[:k], stops)
					got := sc.scan(tokens[:k])
					if got != want {
						t.Fatalf("trial %d: tokens %v, stop %q: after %d tokens scanner says %d, full decode %d (text %q)",
							trial, tokens[:k], stop, k, got, want, tk.Decode(tokens[:k], true))
					}
					if got >= 0 {
						hits++
						break
					}
				}
			}
			if hits < 20 {
				t.Errorf("only %d of the streams hit their stop string: the test checks too little", hits)
			}
		})
	}
}

// countingCodec counts the tokens decoded, to show the scan is incremental.
type countingCodec struct {
	textCodec
	decoded int
}

func (c *countingCodec) Decode(ids []int, skipSpecial bool) string {
	c.decoded += len(ids)
	return c.textCodec.Decode(ids, skipSpecial)
}

// TestStopScannerIsIncremental: scanning a 2,000-token continuation decodes
// a bounded number of tokens per step, not the whole prefix each time.
func TestStopScannerIsIncremental(t *testing.T) {
	tk, err := tokenizer.Load(filepath.Join("tokenizer", "testdata", "byte-level-bpe"))
	if err != nil {
		t.Fatal(err)
	}
	tokens := tk.Encode(strings.Repeat("The quick brown fox jumps over the lazy dog. ", 200), false)
	cc := &countingCodec{textCodec: tk}
	sc := newStopScanner(cc, []string{"STOP HERE"})
	for k := 1; k <= len(tokens); k++ {
		if cut := sc.scan(tokens[:k]); cut >= 0 {
			t.Fatalf("stop found at %d in text without it", cut)
		}
	}
	if per := float64(cc.decoded) / float64(len(tokens)); per > 8 {
		t.Errorf("decoded %.1f tokens per step over %d tokens; want a bounded window", per, len(tokens))
	}
}
