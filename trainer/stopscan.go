package trainer

import (
	"sort"
	"strings"
	"unicode/utf8"
)

// firstStop is the byte offset of the first stop string in text, or -1:
// the one definition of where a sample's text ends, for every engine.
func firstStop(text string, stops []string) int {
	cut := -1
	for _, s := range stops {
		if i := strings.Index(text, s); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	return cut
}

// TextDecoder turns token ids back into text (trainer/tokenizer's Tokenizer is one).
type TextDecoder interface {
	Decode(ids []int, skipSpecial bool) string
}

// CutAtStop finishes a sample that an engine generated without seeing the
// text (the PyTorch worker stops on token ids and on stop strings it can
// see in token bytes): it decodes the text and cuts it at the first stop
// string the way the native engine's incremental scanner does. Tokens keep
// the one that completed the stop string, the text ends before it. That
// token is found by binary search over prefix decodes (whether a prefix's
// text holds a stop string changes once, from no to yes), so a long sample
// costs O(n log n) decodes' worth, not one decode per token.
func CutAtStop(dec TextDecoder, smp *Sample, stops []string) {
	text := dec.Decode(smp.Tokens, true)
	if len(stops) == 0 || firstStop(text, stops) < 0 {
		smp.Text = text
		return
	}
	k := sort.Search(len(smp.Tokens), func(k int) bool { return firstStop(dec.Decode(smp.Tokens[:k+1], true), stops) >= 0 }) + 1
	cut := -1
	if k <= len(smp.Tokens) {
		prefix := dec.Decode(smp.Tokens[:k], true)
		if cut = firstStop(prefix, stops); cut >= 0 {
			text = prefix
		}
	}
	if cut < 0 { // a decoder whose prefixes disagree: cut the full text
		k, cut = len(smp.Tokens), firstStop(text, stops)
	}
	smp.Tokens = smp.Tokens[:k]
	smp.Logprobs = smp.Logprobs[:k]
	smp.Text = text[:cut]
	smp.StopReason = StopStop
}

// stopScanner finds stop strings in a growing continuation without decoding
// the whole continuation at every token (which made sampling quadratic in
// max_tokens). It keeps the text of the tokens already settled and decodes
// only the few tokens since the last settled point, after the chunk settled
// before them as context, the way incremental detokenizers do: a decoder's
// start-of-text rules (a SentencePiece leading space, a Strip decoder) then
// apply to the context in both decodes and cancel out.
//
// Only the region a new stop string could touch is searched: the unsettled
// tail and the last max(len(stop))−1 bytes before it. A hit is confirmed on
// the full decode (once per sequence), so the cut reported is the one a full
// decode gives.
type stopScanner struct {
	codec   textCodec
	stops   []string
	maxStop int    // longest stop string, bytes
	settled []byte // text of tokens[:read]
	prefix  int    // tokens[prefix:read] is the context the tail is decoded after
	read    int
	ctxText string // decode of tokens[prefix:read], cached until the offsets move
}

func newStopScanner(codec textCodec, stops []string) *stopScanner {
	sc := &stopScanner{codec: codec, stops: stops}
	for _, s := range stops {
		sc.maxStop = max(sc.maxStop, len(s))
	}
	return sc
}

// scan looks for a stop string once tokens (the whole continuation so far,
// the last one new) have been decoded. It returns the byte offset of the
// first stop string in the full decoded text, or -1.
func (sc *stopScanner) scan(tokens []int) int {
	full := sc.codec.Decode(tokens[sc.prefix:], true)
	if !strings.HasPrefix(full, sc.ctxText) {
		// The context's text changed with what followed (a decoder that
		// is not concatenative here): settle everything from a full decode.
		sc.resync(tokens)
		return sc.find(tokens)
	}
	tail := full[len(sc.ctxText):]
	from := max(0, len(sc.settled)-sc.maxStop+1)
	view := string(sc.settled[from:]) + tail
	hit := false
	for _, s := range sc.stops {
		if strings.Contains(view, s) {
			hit = true
			break
		}
	}
	// A tail that ends inside a multi-byte character (an incomplete byte
	// sequence shows as U+FFFD) may still change, and an empty one (skipped
	// special tokens) would be no context: settle those later. The settled
	// chunk becomes the next decode's context.
	if r, _ := utf8.DecodeLastRuneInString(tail); r != utf8.RuneError {
		sc.settled = append(sc.settled, tail...)
		sc.prefix, sc.read = sc.read, len(tokens)
		sc.ctxText = sc.codec.Decode(tokens[sc.prefix:sc.read], true)
	}
	if !hit {
		return -1
	}
	return sc.find(tokens)
}

// find returns the first stop string's offset in the full decode, or -1
// when the incremental text claimed a hit the full text does not have.
func (sc *stopScanner) find(tokens []int) int {
	return firstStop(sc.codec.Decode(tokens, true), sc.stops)
}

// resync settles all of tokens from a full decode.
func (sc *stopScanner) resync(tokens []int) {
	sc.settled = append(sc.settled[:0], sc.codec.Decode(tokens, true)...)
	sc.prefix, sc.read = max(0, len(tokens)-8), len(tokens)
	sc.ctxText = sc.codec.Decode(tokens[sc.prefix:sc.read], true)
}
