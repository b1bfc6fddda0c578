package audit

import (
	"math"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer/gumbel"
)

func f(v float64) *float64 { return &v }

func TestCompareForward(t *testing.T) {
	tol := DefaultTolerances()
	base := protocol.ForwardBackwardResponse{LossSum: 20, Tokens: 3, GradNorm: f(2), Logprobs: [][]float64{{-1, -2}, {-3}}}
	tests := []struct {
		name   string
		edit   func(r *protocol.ForwardBackwardResponse)
		grad   bool
		passes bool
		reason string
	}{
		{"same", func(*protocol.ForwardBackwardResponse) {}, true, true, ""},
		{"loss within", func(r *protocol.ForwardBackwardResponse) { r.LossSum = 20.1 }, true, true, ""},
		{"loss off", func(r *protocol.ForwardBackwardResponse) { r.LossSum = 22 }, true, false, "loss_sum"},
		{"logprob within", func(r *protocol.ForwardBackwardResponse) { r.Logprobs = [][]float64{{-1.05, -2}, {-3}} }, true, true, ""},
		{"logprob off", func(r *protocol.ForwardBackwardResponse) { r.Logprobs = [][]float64{{-1, -2}, {-3.5}} }, true, false, "logprobs[1][0]"},
		{"logprob shape", func(r *protocol.ForwardBackwardResponse) { r.Logprobs = [][]float64{{-1, -2}} }, true, false, "sequences"},
		{"tokens", func(r *protocol.ForwardBackwardResponse) { r.Tokens = 4 }, true, false, "tokens"},
		{"grad made up", func(r *protocol.ForwardBackwardResponse) { r.GradNorm = f(1) }, true, false, "grad_norm"},
		{"grad ignored on forward", func(r *protocol.ForwardBackwardResponse) { r.GradNorm = f(1) }, false, true, ""},
		{"grad missing", func(r *protocol.ForwardBackwardResponse) { r.GradNorm = nil }, true, false, "grad_norm: missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			claimed := base
			tt.edit(&claimed)
			c := CompareForward(claimed, base, tt.grad, tol)
			if c.Passed != tt.passes || !strings.Contains(c.Reason, tt.reason) {
				t.Fatalf("check %+v, want passed %v with %q", c, tt.passes, tt.reason)
			}
			if c.Passed && c.Margin >= 1 || !c.Passed && c.Figures == 0 {
				t.Fatalf("check %+v: margin or figures inconsistent", c)
			}
		})
	}
}

// TestScoring lays samples out as a forward scores them, and compares
// logprobs and greedy tokens.
func TestScoring(t *testing.T) {
	tol := DefaultTolerances()
	prompts := [][]int{{1, 5, 6}, {1, 7}}
	two := 2
	req := protocol.SampleRequest{NumSamples: &two, Prompts: []protocol.Prompt{{Tokens: prompts[0]}, {Tokens: prompts[1]}}, SamplingParams: protocol.SamplingParams{MaxTokens: 3}}
	claimed := protocol.SampleResponse{Samples: [][]protocol.Sample{
		{{Tokens: []int{8, 9}, Logprobs: []float64{-1, -2}}, {}},
		{{Tokens: []int{10}, Logprobs: []float64{-0.5}}, {Tokens: []int{11, 12, 13}, Logprobs: []float64{-1, -1, -1}}},
	}}
	if c := CheckSampleShape(req, claimed); !c.Passed {
		t.Fatalf("shape: %+v", c)
	}
	sr := ScoreRequest(prompts, claimed)
	if len(sr.Data) != 3 {
		t.Fatalf("%d scoring data, want 3 (the empty sample left out)", len(sr.Data))
	}
	d := sr.Data[0]
	if got := d.ModelInput.Tokens; len(got) != 4 || got[3] != 8 || d.LossFnInputs.TargetTokens[3] != 9 || d.LossFnInputs.Weights[1] != 0 || d.LossFnInputs.Weights[2] != 1 {
		t.Fatalf("datum %+v", d)
	}
	// The scoring answer: each sequence's logprobs, the samples' at the end.
	scored := protocol.ForwardBackwardResponse{Logprobs: [][]float64{{-9, -9, -1.01, -2}, {-9, -0.52}, {-9, -1, -1, -1.02}}}
	if c := CompareScores(prompts, claimed, scored, tol); !c.Passed {
		t.Fatalf("honest scores: %+v", c)
	}
	scored.Logprobs[2][3] = -4
	if c := CompareScores(prompts, claimed, scored, tol); c.Passed || !strings.Contains(c.Reason, "samples[1][1].logprobs[2]") {
		t.Fatalf("made-up logprob: %+v", c)
	}
	scored.Logprobs[2] = scored.Logprobs[2][:2]
	if c := CompareScores(prompts, claimed, scored, tol); c.Passed {
		t.Fatalf("short scoring answer passed: %+v", c)
	}
	bad := claimed
	bad.Samples = bad.Samples[:1]
	if c := CheckSampleShape(req, bad); c.Passed {
		t.Fatalf("missing group passed: %+v", c)
	}
}

func TestCompareDrawnGreedy(t *testing.T) {
	tol := DefaultTolerances()
	prompts := [][]int{{1, 5}}
	claimed := protocol.SampleResponse{Samples: [][]protocol.Sample{{{Tokens: []int{7, 8, 9}, Logprobs: []float64{-0.1, -0.7, -0.2}}}}}
	scored := protocol.ForwardBackwardResponse{Logprobs: [][]float64{{-9, -0.1, -0.7, -0.2}}}
	own := func(toks []int, lps []float64) protocol.SampleResponse {
		return protocol.SampleResponse{Samples: [][]protocol.Sample{{{Tokens: toks, Logprobs: lps}}}}
	}
	// The same tokens pass; a near-tie broken the other way passes (the
	// node's token nearly as likely as the validator's); a token far less
	// likely than the validator's pick fails.
	for _, tt := range []struct {
		name   string
		own    protocol.SampleResponse
		passes bool
	}{
		{"same", own([]int{7, 8, 9}, []float64{-0.1, -0.7, -0.2}), true},
		{"near tie", own([]int{7, 4, 4}, []float64{-0.1, -0.69, -0.1}), true},
		{"not the argmax", own([]int{7, 4, 4}, []float64{-0.1, -0.05, -0.1}), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			zero := 0.0
			if c := CompareDrawn(prompts, protocol.SamplingParams{Temperature: &zero}, claimed, tt.own, scored, tol); c.Passed != tt.passes {
				t.Fatalf("%+v, want passed %v", c, tt.passes)
			}
		})
	}
	zero, one := 0.0, 1
	if !Greedy(protocol.SamplingParams{Temperature: &zero}) || !Greedy(protocol.SamplingParams{TopK: &one}) || Greedy(protocol.SamplingParams{}) {
		t.Fatal("Greedy")
	}
	if Redrawable(protocol.SamplingParams{}) || CompareDrawn(prompts, protocol.SamplingParams{}, claimed, claimed, scored, tol).Passed {
		t.Fatal("an unseeded warm sample is not redrawable")
	}
}

// TestCompareDrawnSeeded draws seeded warm samples from a made-up model by
// the Gumbel-max trick, as the engines do: the node's draw passes against
// the validator's, a validator whose logprobs differ slightly parts from
// it only at near-ties and still passes, and tokens drawn otherwise (with
// their true logprobs) fail.
func TestCompareDrawnSeeded(t *testing.T) {
	tol := DefaultTolerances()
	const vocab, steps = 50, 12
	seed, temp := int64(99), 0.8
	p := protocol.SamplingParams{MaxTokens: steps, Temperature: &temp, Seed: &seed}
	// The model: a fixed distribution per position (the prefix does not
	// matter to it), logprobs lp[t][v].
	lp := make([][]float64, steps)
	for t := range lp {
		lp[t] = make([]float64, vocab)
		var z float64
		for v := range lp[t] {
			lp[t][v] = 3 * math.Sin(float64(7*t+v*v))
			z += math.Exp(lp[t][v])
		}
		for v := range lp[t] {
			lp[t][v] -= math.Log(z)
		}
	}
	draw := func(shift func(t, v int) float64, pick func(t int) int) protocol.SampleResponse {
		var s protocol.Sample
		for t := range steps {
			best, bestScore := 0, math.Inf(-1)
			for v := range vocab {
				if sc := (lp[t][v]+shift(t, v))/temp + gumbel.Noise(gumbel.Key(seed, 0, 0, t), v); sc > bestScore {
					best, bestScore = v, sc
				}
			}
			if pick != nil {
				best = pick(t)
			}
			s.Tokens = append(s.Tokens, best)
			s.Logprobs = append(s.Logprobs, lp[t][best])
		}
		return protocol.SampleResponse{Samples: [][]protocol.Sample{{s}}}
	}
	prompts := [][]int{{1}}
	scoredBy := func(r protocol.SampleResponse) protocol.ForwardBackwardResponse {
		return protocol.ForwardBackwardResponse{Logprobs: [][]float64{r.Samples[0][0].Logprobs}}
	}
	none := func(int, int) float64 { return 0 }
	node := draw(none, nil)
	if c := CompareDrawn(prompts, p, node, draw(none, nil), scoredBy(node), tol); !c.Passed || c.Margin != 0 {
		t.Fatalf("the same draw: %+v", c)
	}
	// Another engine: logprobs off by up to 0.02.
	other := draw(func(t, v int) float64 { return 0.02 * math.Cos(float64(t*v)) }, nil)
	if c := CompareDrawn(prompts, p, node, other, scoredBy(node), tol); !c.Passed {
		t.Fatalf("a slightly different engine: %+v", c)
	}
	// A liar: tokens it did not draw (the least likely), true logprobs.
	liar := draw(none, func(t int) int {
		worst := 0
		for v := range vocab {
			if lp[t][v] < lp[t][worst] {
				worst = v
			}
		}
		return worst
	})
	if c := CompareDrawn(prompts, p, liar, node, scoredBy(liar), tol); c.Passed || !strings.Contains(c.Reason, "token 0") {
		t.Fatalf("tokens not drawn: %+v", c)
	}
	// A draw with other noise (another seed) is not this request's sample.
	seed++
	otherSeed := draw(none, nil)
	seed--
	if c := CompareDrawn(prompts, p, otherSeed, node, scoredBy(otherSeed), tol); c.Passed {
		t.Fatalf("another seed's draw passed: %+v", c)
	}
	if c := CompareDrawn(prompts, p, draw(none, nil), node, scoredBy(node), tol); !c.Passed {
		t.Fatal("symmetry")
	}
}
