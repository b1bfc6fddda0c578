// Package audit decides whether a node's answer to a compute call is the
// answer the model gives: a validator replays the call from the state the
// node committed before it (or scores the node's samples in one forward)
// and this package compares the two within tolerances that hold across
// engines (the native Go engine, the PyTorch worker) and precisions (f32,
// bf16). It is pure: the coordinator (../coordinator/audit.go) chooses the
// calls, runs the replays and records the verdicts; node/gpu's
// TestAuditTolerances measures the margins honest engines keep.
package audit

import (
	"fmt"
	"math"

	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer/gumbel"
)

// Tolerances say how far a replay may be from the audited answer and pass.
// A figure passes when |claimed − replay| ≤ Abs + Rel·max(|claimed|, |replay|).
type Tolerances struct {
	// LossRel and LossAbs bound loss_sum.
	LossRel, LossAbs float64
	// LogprobRel and LogprobAbs bound each token's logprob.
	LogprobRel, LogprobAbs float64
	// GradNormRel and GradNormAbs bound forward_backward's grad_norm.
	GradNormRel, GradNormAbs float64
	// AdapterRel and AdapterAbs bound the adapter after an optim_step
	// (CompareAdapters): AdapterRel of the replay's own update, plus
	// AdapterAbs per value.
	AdapterRel, AdapterAbs float64
}

// DefaultTolerances are the tolerances the coordinator audits with.
//
// Measured (node/gpu TestAuditTolerances, on the CPU: random Llama of
// signal-tiny's shape, Mistral, Qwen2 and Qwen3 models, a rank-4 adapter
// on q/k/v/o, 4 × 64 tokens, samples of 16 tokens): the native engine
// (f32) and the PyTorch worker in f32 differ by ≤ 2.5e-9 relative in
// loss_sum, 1.8e-8 in grad_norm and 1.9e-6 in a logprob; against the
// worker in bf16 by ≤ 1.2e-5, 1.3e-3 and 4.7e-3. Greedy samples were the
// same tokens in every pair. The tolerances are ~40× the bf16 differences
// in logprob and grad_norm and ~800× in loss_sum: an honest node's largest
// difference is ≤ 0.026 of a tolerance (its margin), which leaves room for
// larger models and GPU kernels; the lies the coordinator's tests plant (a
// loss 10% off, a grad norm made up, sampled tokens not drawn from the
// model) fail by 3-50×.
//
// The adapter after an optim_step (same test: one AdamW step at lr 1e-3
// from one adapter, with each engine's own gradient) differs between the
// f32 engines by 1e-7 of the update and between an f32 and a bf16 engine
// by up to 0.164 of it: Adam's first step is lr·sign(g) elementwise, and
// bf16 rounding flips the sign of the smallest gradients. AdapterRel 0.5
// keeps honest pairs at ≤ 0.33 of the tolerance; a skipped step (1.0 of
// the update) fails by 2×, one at 5× the rate by 8×, one along a made-up
// gradient of the right size (√2) by 2.8×.
//
// Seeded warm samples (temperature 1, 2 prompts × 2 samples × 16 tokens,
// every engine drawing with package gumbel's noise): the f32 engines drew
// the same tokens, the bf16 worker parted from the others at one near-tie
// in 64 tokens, at 0.013 of the logprob tolerance (CompareDrawn); random
// tokens reported with their true logprobs fail the redraw by ~50×.
func DefaultTolerances() Tolerances {
	return Tolerances{
		LossRel: 1e-2, LossAbs: 1e-3,
		LogprobRel: 1e-2, LogprobAbs: 0.1,
		GradNormRel: 5e-2, GradNormAbs: 1e-6,
		AdapterRel: 0.5, AdapterAbs: 1e-7,
	}
}

// Check is one comparison's outcome.
type Check struct {
	// Passed is true when every figure is within its tolerance.
	Passed bool `json:"passed"`
	// Reason names the first figure out of tolerance (empty on a pass).
	Reason string `json:"reason,omitempty"`
	// Margin is the largest difference found, as a fraction of its
	// tolerance: below 1 passes; an honest node's stays far below.
	Margin float64 `json:"margin"`
	// Figures counts the figures compared.
	Figures int `json:"figures"`
}

// checker accumulates one comparison.
type checker struct{ c Check }

func newChecker() *checker { return &checker{c: Check{Passed: true}} }

// near compares one figure; the first failure names it.
func (k *checker) near(what string, claimed, replay, rel, abs float64) {
	k.c.Figures++
	bound := abs + rel*math.Max(math.Abs(claimed), math.Abs(replay))
	diff := math.Abs(claimed - replay)
	if math.IsNaN(diff) || math.IsInf(diff, 0) {
		k.fail(fmt.Sprintf("%s: claimed %v, replay %v", what, claimed, replay))
		return
	}
	if bound > 0 {
		k.c.Margin = math.Max(k.c.Margin, diff/bound)
	}
	if diff > bound {
		k.fail(fmt.Sprintf("%s: claimed %.6g, replay %.6g (|Δ| %.3g > %.3g)", what, claimed, replay, diff, bound))
	}
}

func (k *checker) fail(reason string) {
	if k.c.Passed {
		k.c.Passed, k.c.Reason = false, reason
	}
}

// CompareForward compares a forward or forward_backward answer (grad:
// forward_backward, whose grad_norm is compared too) with the validator's
// replay of the same request from the same state: loss_sum, the token
// count and every token's logprob.
func CompareForward(claimed, replay protocol.ForwardBackwardResponse, grad bool, tol Tolerances) Check {
	k := newChecker()
	if claimed.Tokens != replay.Tokens {
		k.fail(fmt.Sprintf("tokens: claimed %d, replay %d", claimed.Tokens, replay.Tokens))
	}
	k.near("loss_sum", claimed.LossSum, replay.LossSum, tol.LossRel, tol.LossAbs)
	k.logprobs("logprobs", claimed.Logprobs, replay.Logprobs, tol)
	if grad {
		switch {
		case claimed.GradNorm == nil || replay.GradNorm == nil:
			k.fail("grad_norm: missing")
		default:
			k.near("grad_norm", *claimed.GradNorm, *replay.GradNorm, tol.GradNormRel, tol.GradNormAbs)
		}
	}
	return k.c
}

func (k *checker) logprobs(what string, claimed, replay [][]float64, tol Tolerances) {
	if len(claimed) != len(replay) {
		k.fail(fmt.Sprintf("%s: claimed %d sequences, replay %d", what, len(claimed), len(replay)))
		return
	}
	for i := range claimed {
		if len(claimed[i]) != len(replay[i]) {
			k.fail(fmt.Sprintf("%s[%d]: claimed %d tokens, replay %d", what, i, len(claimed[i]), len(replay[i])))
			return
		}
		for j := range claimed[i] {
			k.near(fmt.Sprintf("%s[%d][%d]", what, i, j), claimed[i][j], replay[i][j], tol.LogprobRel, tol.LogprobAbs)
		}
	}
}

// CheckSampleShape refuses an answer that is not shaped like the request
// asked: one group per prompt, num_samples samples each, one logprob per
// token, at most max_tokens tokens. Scoring assumes the shape.
func CheckSampleShape(req protocol.SampleRequest, claimed protocol.SampleResponse) Check {
	k := newChecker()
	num := 1
	if req.NumSamples != nil {
		num = *req.NumSamples
	}
	if len(claimed.Samples) != len(req.Prompts) {
		k.fail(fmt.Sprintf("samples: %d groups for %d prompts", len(claimed.Samples), len(req.Prompts)))
		return k.c
	}
	for i, g := range claimed.Samples {
		if len(g) != num {
			k.fail(fmt.Sprintf("samples[%d]: %d samples, num_samples %d", i, len(g), num))
			return k.c
		}
		for j, s := range g {
			if len(s.Tokens) != len(s.Logprobs) || len(s.Tokens) > req.SamplingParams.MaxTokens {
				k.fail(fmt.Sprintf("samples[%d][%d]: %d tokens, %d logprobs, max_tokens %d", i, j, len(s.Tokens), len(s.Logprobs), req.SamplingParams.MaxTokens))
				return k.c
			}
		}
	}
	return k.c
}

// ScoreRequest is the forward that scores samples: one datum per sample,
// its prompt and its tokens, whose logprobs at the sample's positions are
// what the model gives the tokens the node returned. prompts are the
// request's prompts as token ids. Samples without tokens are left out.
func ScoreRequest(prompts [][]int, claimed protocol.SampleResponse) protocol.ForwardBackwardRequest {
	var req protocol.ForwardBackwardRequest
	for i, g := range claimed.Samples {
		for _, s := range g {
			if len(s.Tokens) == 0 {
				continue
			}
			seq := append(append([]int(nil), prompts[i]...), s.Tokens...)
			d := protocol.Datum{ModelInput: protocol.ModelInput{Tokens: seq[:len(seq)-1]}}
			d.LossFnInputs.TargetTokens = seq[1:]
			d.LossFnInputs.Weights = make([]float64, len(seq)-1)
			for p := len(prompts[i]) - 1; p < len(seq)-1; p++ {
				d.LossFnInputs.Weights[p] = 1
			}
			req.Data = append(req.Data, d)
		}
	}
	return req
}

// sampleScores picks out each sample's scored logprobs from the scoring
// forward's answer, in ScoreRequest's order (nil for a sample without tokens).
func sampleScores(prompts [][]int, claimed protocol.SampleResponse, scored protocol.ForwardBackwardResponse) ([][][]float64, error) {
	out := make([][][]float64, len(claimed.Samples))
	next := 0
	for i, g := range claimed.Samples {
		out[i] = make([][]float64, len(g))
		for j, s := range g {
			if len(s.Tokens) == 0 {
				continue
			}
			if next >= len(scored.Logprobs) {
				return nil, fmt.Errorf("scoring answer: %d sequences, more samples", len(scored.Logprobs))
			}
			lp := scored.Logprobs[next]
			next++
			from := len(prompts[i]) - 1
			if len(lp) != from+len(s.Tokens) {
				return nil, fmt.Errorf("scoring answer: sequence %d has %d logprobs, want %d", next-1, len(lp), from+len(s.Tokens))
			}
			out[i][j] = lp[from:]
		}
	}
	if next != len(scored.Logprobs) {
		return nil, fmt.Errorf("scoring answer: %d sequences for %d samples", len(scored.Logprobs), next)
	}
	return out, nil
}

// CompareScores compares the logprobs the node reported for its samples
// with the validator's scoring forward (ScoreRequest's answer): a token
// the model did not give that logprob — a sample not drawn from it —
// fails.
func CompareScores(prompts [][]int, claimed protocol.SampleResponse, scored protocol.ForwardBackwardResponse, tol Tolerances) Check {
	k := newChecker()
	scores, err := sampleScores(prompts, claimed, scored)
	if err != nil {
		k.fail(err.Error())
		return k.c
	}
	for i, g := range claimed.Samples {
		for j, s := range g {
			for t := range s.Tokens {
				k.near(fmt.Sprintf("samples[%d][%d].logprobs[%d]", i, j, t), s.Logprobs[t], scores[i][j][t], tol.LogprobRel, tol.LogprobAbs)
			}
		}
	}
	return k.c
}

// CompareDrawn compares samples the node drew with the validator's own
// draws of the same request: greedy ones (temperature 0 or top_k 1), or
// seeded warm ones, which every engine draws by the Gumbel-max trick with
// the noise of package gumbel, so that the same logprobs give the same
// tokens. Two engines may break a near-tie differently and then continue
// differently, so at the first token where they part the node's token
// must score about as high as the validator's — its logprob (over the
// temperature, plus its noise when seeded) within the logprob tolerance
// of the validator's token's, both as the validator's model scores them;
// the rest of that sample is left to CompareScores. A token the draw
// would not have picked fails: a sample made up, drawn from another
// distribution or with other noise.
func CompareDrawn(prompts [][]int, p protocol.SamplingParams, claimed, own protocol.SampleResponse, scored protocol.ForwardBackwardResponse, tol Tolerances) Check {
	k := newChecker()
	if !Redrawable(p) {
		k.fail("samples: neither greedy nor seeded, so not redrawn")
		return k.c
	}
	scores, err := sampleScores(prompts, claimed, scored)
	if err != nil {
		k.fail(err.Error())
		return k.c
	}
	if len(own.Samples) != len(claimed.Samples) {
		k.fail(fmt.Sprintf("drawn samples: claimed %d groups, validator %d", len(claimed.Samples), len(own.Samples)))
		return k.c
	}
	// score is what the draw maximises, up to a constant per position.
	invT, seeded := 1.0, !Greedy(p)
	if seeded && p.Temperature != nil {
		invT = 1 / *p.Temperature
	}
	score := func(i, j, t, tok int, lp float64) float64 {
		if !seeded {
			return lp
		}
		return lp*invT + gumbel.Noise(gumbel.Key(*p.Seed, i, j, t), tok)
	}
	for i, g := range claimed.Samples {
		if len(own.Samples[i]) != len(g) {
			k.fail(fmt.Sprintf("drawn samples[%d]: claimed %d, validator %d", i, len(g), len(own.Samples[i])))
			return k.c
		}
		for j, s := range g {
			o := own.Samples[i][j]
			for t := 0; t < len(s.Tokens) && t < len(o.Tokens) && t < len(o.Logprobs); t++ {
				k.c.Figures++
				if s.Tokens[t] == o.Tokens[t] {
					continue
				}
				// Parted: the validator's pick against the node's, both
				// as the validator's model scores them.
				mine, theirs := scores[i][j][t], float64(o.Logprobs[t])
				bound := (tol.LogprobAbs + tol.LogprobRel*math.Max(math.Abs(mine), math.Abs(theirs))) * invT
				k.near1(fmt.Sprintf("drawn samples[%d][%d] token %d (claimed %d, validator %d): score", i, j, t, s.Tokens[t], o.Tokens[t]),
					math.Abs(score(i, j, t, s.Tokens[t], mine)-score(i, j, t, o.Tokens[t], theirs)), bound)
				break
			}
		}
	}
	return k.c
}

// Redrawable says whether a validator's own draw of a sample request must
// give the node's tokens (up to near-ties): greedy or seeded requests.
func Redrawable(p protocol.SamplingParams) bool {
	return Greedy(p) || p.Seed != nil
}

// Greedy reports whether a sample request's params make it greedy.
func Greedy(p protocol.SamplingParams) bool {
	return (p.Temperature != nil && *p.Temperature == 0) || (p.TopK != nil && *p.TopK == 1)
}
