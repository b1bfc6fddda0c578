package trainer

import (
	"errors"
	"math"
	"testing"
)

// TestAdamWMatchesDefinition runs three AdamW steps and compares with the
// textbook formulas evaluated in float64 (PyTorch's AdamW: decoupled decay,
// bias correction, eps outside the square root).
func TestAdamWMatchesDefinition(t *testing.T) {
	p := []float32{0.5, -1.25, 2, 0.001}
	m, v := make([]float32, 4), make([]float32, 4)
	grads := [][]float32{{0.1, -0.2, 0.3, 0}, {-0.05, 0.4, 0.1, 1e-3}, {0.2, 0.2, -0.2, -2}}
	lr, b1, b2, eps, wd := 1e-2, 0.9, 0.95, 1e-8, 0.1
	wp := []float64{0.5, -1.25, 2, 0.001}
	wm, wv := make([]float64, 4), make([]float64, 4)
	for step, g := range grads {
		adamwUpdate(p, g, m, v, 1, lr, b1, b2, eps, wd, step+1)
		for i := range wp {
			gi := float64(g[i])
			wp[i] *= 1 - lr*wd
			wm[i] = b1*wm[i] + (1-b1)*gi
			wv[i] = b2*wv[i] + (1-b2)*gi*gi
			mh := wm[i] / (1 - math.Pow(b1, float64(step+1)))
			vh := wv[i] / (1 - math.Pow(b2, float64(step+1)))
			wp[i] -= lr * mh / (math.Sqrt(vh) + eps)
		}
	}
	for i := range wp {
		if math.Abs(float64(p[i])-wp[i]) > 1e-6 {
			t.Errorf("p[%d] = %v, want %v", i, p[i], wp[i])
		}
	}
}

func TestClipCoefAndGlobalNorm(t *testing.T) {
	n := globalNorm([][]float32{{3}, {4, 0}})
	if n != 5 {
		t.Fatalf("globalNorm = %v, want 5", n)
	}
	if c := clipCoef(n, 0); c != 1 {
		t.Errorf("clip off: coef %v, want 1", c)
	}
	if c := clipCoef(n, 10); c != 1 {
		t.Errorf("norm under the limit: coef %v, want 1", c)
	}
	if c := clipCoef(n, 1); math.Abs(float64(c)-1/(5+1e-6)) > 1e-7 {
		t.Errorf("norm 5 clipped to 1: coef %v, want 1/(5+1e-6)", c)
	}
}

func TestAdamParamsValidate(t *testing.T) {
	if err := DefaultAdamParams().Validate(); err != nil {
		t.Fatalf("defaults rejected: %v", err)
	}
	for _, tc := range []struct {
		field string
		mod   func(*AdamParams)
	}{
		{"learning_rate", func(p *AdamParams) { p.LearningRate = -1 }},
		{"learning_rate", func(p *AdamParams) { p.LearningRate = math.NaN() }},
		{"beta1", func(p *AdamParams) { p.Beta1 = 1 }},
		{"beta2", func(p *AdamParams) { p.Beta2 = -0.1 }},
		{"eps", func(p *AdamParams) { p.Eps = math.Inf(1) }},
		{"weight_decay", func(p *AdamParams) { p.WeightDecay = -1 }},
		{"grad_clip_norm", func(p *AdamParams) { p.GradClipNorm = -1 }},
	} {
		p := DefaultAdamParams()
		tc.mod(&p)
		err := p.Validate()
		if !errors.Is(err, ErrInvalidInput) || !containsStr(err.Error(), tc.field) {
			t.Errorf("%s out of range: error %v, want ErrInvalidInput naming the field", tc.field, err)
		}
	}
}

func containsStr(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

func TestLRSchedule(t *testing.T) {
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-12 }
	c := &LRSchedule{Kind: "constant", PeakLR: 1e-3, WarmupSteps: 4}
	for step, want := range map[int]float64{1: 2.5e-4, 4: 1e-3, 5: 1e-3, 1000: 1e-3} {
		if got := c.At(step); !near(got, want) {
			t.Errorf("constant At(%d) = %v, want %v", step, got, want)
		}
	}
	l := &LRSchedule{Kind: "linear", PeakLR: 1, WarmupSteps: 2, TotalSteps: 12, FinalFraction: 0.1}
	for step, want := range map[int]float64{1: 0.5, 2: 1, 7: 1 - 0.9*0.5, 12: 0.1, 50: 0.1} {
		if got := l.At(step); !near(got, want) {
			t.Errorf("linear At(%d) = %v, want %v", step, got, want)
		}
	}
	cs := &LRSchedule{Kind: "cosine", PeakLR: 2, TotalSteps: 10}
	for step, want := range map[int]float64{5: 1, 10: 0, 11: 0, 0: 2 * 0.5 * (1 + math.Cos(math.Pi*0.1))} {
		if got := cs.At(step); !near(got, want) {
			t.Errorf("cosine At(%d) = %v, want %v", step, got, want)
		}
	}
	for _, bad := range []*LRSchedule{
		{Kind: "step", PeakLR: 1},
		{Kind: "constant", PeakLR: 0},
		{Kind: "linear", PeakLR: 1, WarmupSteps: 5, TotalSteps: 5},
		{Kind: "cosine", PeakLR: 1, TotalSteps: 5, FinalFraction: 2},
		{Kind: "constant", PeakLR: 1, WarmupSteps: -1},
	} {
		if err := bad.Validate(); !errors.Is(err, ErrInvalidInput) {
			t.Errorf("%+v: Validate() = %v, want ErrInvalidInput", *bad, err)
		}
	}
}
