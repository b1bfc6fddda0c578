package gumbel

import (
	"math"
	"testing"
)

// TestVectors pins the definition: the PyTorch worker's test
// (node/gpu/worker/tests) checks the same values, so a change to either
// side shows as a failure here or there, not as audits failing.
func TestVectors(t *testing.T) {
	for _, tc := range []struct {
		seed                     int64
		prompt, sample, pos, tok int
		want                     float64
	}{
		{0, 0, 0, 0, 0, 0.28498416329078768},
		{7, 1, 2, 3, 4, 0.77861045331700374},
		{-5, 0, 1, 15, 151935, -0.023006976529502583},
	} {
		if got := Noise(Key(tc.seed, tc.prompt, tc.sample, tc.pos), tc.tok); math.Abs(got-tc.want) > 1e-15 {
			t.Errorf("Noise(Key(%d, %d, %d, %d), %d) = %.17g, want %.17g", tc.seed, tc.prompt, tc.sample, tc.pos, tc.tok, got, tc.want)
		}
	}
}

// TestNoiseIsGumbel: over many tokens the noise has the standard Gumbel's
// mean (Euler's γ) and variance (π²/6), and the Gumbel-max pick follows
// the softmax.
func TestNoiseIsGumbel(t *testing.T) {
	const n = 200000
	var sum, sq float64
	key := Key(42, 0, 0, 0)
	for i := range n {
		g := Noise(key, i)
		sum += g
		sq += g * g
	}
	mean := sum / n
	variance := sq/n - mean*mean
	if math.Abs(mean-0.5772156649) > 0.01 || math.Abs(variance-math.Pi*math.Pi/6) > 0.03 {
		t.Fatalf("mean %.4f variance %.4f, want 0.5772 and 1.6449", mean, variance)
	}
	logp := []float64{math.Log(0.6), math.Log(0.3), math.Log(0.1)}
	counts := make([]int, 3)
	const draws = 60000
	for d := range draws {
		k := Key(9, 0, 0, d)
		best, bestScore := 0, math.Inf(-1)
		for tok, lp := range logp {
			if s := lp + Noise(k, tok); s > bestScore {
				best, bestScore = tok, s
			}
		}
		counts[best]++
	}
	for tok, lp := range logp {
		if got := float64(counts[tok]) / draws; math.Abs(got-math.Exp(lp)) > 0.01 {
			t.Fatalf("token %d drawn %.4f of the time, want %.2f", tok, got, math.Exp(lp))
		}
	}
}

// TestMayOvertakeNeverRulesOutAWinner: over many keys and score gaps, a
// token ruled out never has noise that would have overtaken, and few
// tokens pass.
func TestMayOvertakeNeverRulesOutAWinner(t *testing.T) {
	passed, total := 0, 0
	for k := range 2000 {
		key := Key(int64(k), 0, 0, 0)
		for tok := range 200 {
			x := -0.05 * float64(tok) * float64(k%40)
			total++
			if MayOvertake(key, tok, x) {
				passed++
				continue
			}
			if Noise(key, tok) > -x {
				t.Fatalf("key %d token %d, gap %v: ruled out, but its noise %v overtakes", k, tok, x, Noise(key, tok))
			}
		}
	}
	if passed*4 > total {
		t.Fatalf("%d of %d passed: the test rules out too little", passed, total)
	}
}
