package trainer

import (
	"fmt"
	"math"
	"slices"

	"github.com/signal-p2p/signal/trainer/gumbel"
	"github.com/signal-p2p/signal/trainer/vmath"
)

// SamplingParams configure Sample. Use DefaultSamplingParams and override.
type SamplingParams struct {
	MaxTokens   int     // tokens to generate per sample, > 0
	Temperature float32 // 0 = greedy; otherwise logits are divided by it
	TopK        int     // keep the K most likely tokens; ≤ 0 = off
	TopP        float32 // keep the smallest set of tokens whose mass reaches TopP, in (0, 1]; 1 = off
	Stop        []string
	StopTokens  []int // besides the model's and tokenizer's EOS ids
	Seed        int64 // same seed, same prompts and params → same samples
}

// DefaultSamplingParams returns temperature 1, no top-k, top-p 1, 16 tokens.
func DefaultSamplingParams() SamplingParams {
	return SamplingParams{MaxTokens: 16, Temperature: 1, TopP: 1}
}

// Sample is one generated continuation. Tokens include the stop token that
// ended it, if any; Text is the decoded tokens (special tokens skipped) cut
// before the first stop string. Logprobs[i] is log p(Tokens[i]) under the
// model's unmodified distribution (temperature 1, no top-k/top-p), the same
// quantity a forward pass computes, so it can serve as the sampling logprob
// of importance-sampling and PPO losses.
type Sample struct {
	Tokens     []int
	Text       string
	Logprobs   []float32
	StopReason string // "length" or "stop"
}

// Stop reasons.
const (
	StopLength = "length"
	StopStop   = "stop"
)

// Validate reports the first bad parameter.
func (p SamplingParams) Validate(vocab int) error {
	if p.MaxTokens <= 0 {
		return fmt.Errorf("%w: max_tokens %d must be positive", ErrInvalidInput, p.MaxTokens)
	}
	if !(p.Temperature >= 0) || math.IsInf(float64(p.Temperature), 0) {
		return fmt.Errorf("%w: temperature %v must be finite and ≥ 0", ErrInvalidInput, p.Temperature)
	}
	if !(p.TopP > 0 && p.TopP <= 1) {
		return fmt.Errorf("%w: top_p %v must be in (0, 1]", ErrInvalidInput, p.TopP)
	}
	for i, s := range p.Stop {
		if s == "" {
			return fmt.Errorf("%w: stop string %d is empty", ErrInvalidInput, i)
		}
	}
	for _, t := range p.StopTokens {
		if t < 0 || t >= vocab {
			return fmt.Errorf("%w: stop token %d outside the vocabulary [0, %d)", ErrInvalidInput, t, vocab)
		}
	}
	return nil
}

// tokenPicker chooses tokens from a row of logits. Its scratch is sized
// for the vocabulary once, so picking allocates nothing.
type tokenPicker struct {
	idx   []int32
	probs []float64
}

func newTokenPicker(vocab int) *tokenPicker {
	return &tokenPicker{idx: make([]int32, vocab), probs: make([]float64, vocab)}
}

// logSumExp returns log Σ exp(logits) accumulated in float64 (vectorized:
// with a 128k vocabulary the scalar loop was a third of a tiny model's
// decode step).
func logSumExp(logits []float32) float64 {
	m := vmath.Max(logits)
	return float64(m) + math.Log(vmath.SumExpShift(logits, m))
}

// pick chooses a token from logits under p and returns it with its logprob
// under the unmodified distribution. key is the position's noise stream
// (gumbel.Key).
func (tp *tokenPicker) pick(logits []float32, p *SamplingParams, key uint64) (int, float32) {
	tok := tp.choose(logits, p, key)
	return tok, float32(float64(logits[tok]) - logSumExp(logits))
}

// choose draws by the Gumbel-max trick (package gumbel): among the tokens
// top-k and top-p keep, the argmax of logit/T + Noise(key, token), a draw
// from the softmax at temperature T that the PyTorch worker and the
// auditor reproduce from the same seed.
func (tp *tokenPicker) choose(logits []float32, p *SamplingParams, key uint64) int {
	V := len(logits)
	if p.Temperature == 0 || p.TopK == 1 {
		best := 0
		for i, v := range logits {
			if v > logits[best] {
				best = i
			}
		}
		return best
	}
	idx := tp.idx[:V]
	for i := range idx {
		idx[i] = int32(i)
	}
	k := V
	if p.TopK > 0 && p.TopK < V {
		k = p.TopK
		selectTop(idx, logits, k)
	}
	cand := idx[:k]
	mx := logits[cand[0]]
	for _, i := range cand {
		mx = max(mx, logits[i])
	}
	invT := 1 / float64(p.Temperature)
	if p.TopP < 1 {
		// Probabilities over the candidates at the temperature,
		// unnormalised.
		var total float64
		for _, i := range cand {
			e := math.Exp((float64(logits[i]) - float64(mx)) * invT)
			tp.probs[i] = e
			total += e
		}
		// Nucleus: the smallest prefix, by decreasing probability, whose
		// mass reaches TopP. Sort only as many candidates as needed,
		// growing the sorted prefix 4× at a time.
		need := float64(p.TopP) * total
		n := min(64, len(cand))
		for {
			if n < len(cand) {
				selectTop(cand, logits, n)
			}
			head := cand[:n]
			slices.SortFunc(head, func(a, b int32) int {
				switch {
				case logits[a] > logits[b]:
					return -1
				case logits[a] < logits[b]:
					return 1
				}
				return int(a - b)
			})
			var cum float64
			cut := -1
			for j, i := range head {
				cum += tp.probs[i]
				if cum >= need {
					cut = j + 1
					break
				}
			}
			if cut > 0 {
				cand = head[:cut]
				break
			}
			if n == len(cand) { // rounding: keep everything
				break
			}
			n = min(4*n, len(cand))
		}
	}
	// Start from the most likely candidate, so that few others can
	// overtake it and get their noise computed (gumbel.MayOvertake).
	best := int(cand[0])
	for _, i := range cand {
		if logits[i] > logits[best] {
			best = int(i)
		}
	}
	bestScore := float64(logits[best])*invT + gumbel.Noise(key, best)
	for _, i := range cand {
		score := float64(logits[i]) * invT
		if int(i) == best || !gumbel.MayOvertake(key, int(i), score-bestScore) {
			continue
		}
		if s := score + gumbel.Noise(key, int(i)); s > bestScore || s == bestScore && int(i) < best {
			best, bestScore = int(i), s
		}
	}
	return best
}

// selectTop reorders idx so that idx[:k] are the k entries with the largest
// key (in no particular order), by quickselect.
func selectTop(idx []int32, key []float32, k int) {
	lo, hi := 0, len(idx)-1
	for lo < hi {
		// median of three as pivot
		a, b, c := key[idx[lo]], key[idx[(lo+hi)/2]], key[idx[hi]]
		pivot := max(min(a, b), min(max(a, b), c))
		i, j := lo, hi
		for i <= j {
			for key[idx[i]] > pivot {
				i++
			}
			for key[idx[j]] < pivot {
				j--
			}
			if i <= j {
				idx[i], idx[j] = idx[j], idx[i]
				i++
				j--
			}
		}
		switch {
		case k-1 <= j:
			hi = j
		case k-1 >= i:
			lo = i
		default:
			return
		}
	}
}
