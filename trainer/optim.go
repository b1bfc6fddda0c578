package trainer

import (
	"fmt"
	"math"
)

// AdamParams configure one OptimStep: AdamW as PyTorch's torch.optim.AdamW
// computes it (decoupled weight decay, bias-corrected moments, eps added to
// sqrt(v̂)). LearningRate 0 means "take it from the session's schedule", or
// DefaultLearningRate when the session has none. GradClipNorm > 0 scales the
// gradients so that their global L2 norm is at most GradClipNorm, as
// torch.nn.utils.clip_grad_norm_ does; 0 turns clipping off.
type AdamParams struct {
	LearningRate float64
	Beta1        float64
	Beta2        float64
	Eps          float64
	WeightDecay  float64
	GradClipNorm float64
}

// DefaultLearningRate is the rate of an OptimStep that names none in a
// session without a schedule.
const DefaultLearningRate = 1e-4

// DefaultAdamParams returns the public API's defaults: beta1 0.9, beta2 0.95,
// eps 1e-12, no weight decay, no clipping, learning rate from the schedule.
func DefaultAdamParams() AdamParams {
	return AdamParams{Beta1: 0.9, Beta2: 0.95, Eps: 1e-12}
}

// Validate reports the first field that is out of range.
func (p AdamParams) Validate() error {
	finite := func(x float64) bool { return !math.IsNaN(x) && !math.IsInf(x, 0) }
	switch {
	case !finite(p.LearningRate) || p.LearningRate < 0:
		return fmt.Errorf("%w: learning_rate %v: want a finite value >= 0", ErrInvalidInput, p.LearningRate)
	case !finite(p.Beta1) || p.Beta1 < 0 || p.Beta1 >= 1:
		return fmt.Errorf("%w: beta1 %v: want within [0, 1)", ErrInvalidInput, p.Beta1)
	case !finite(p.Beta2) || p.Beta2 < 0 || p.Beta2 >= 1:
		return fmt.Errorf("%w: beta2 %v: want within [0, 1)", ErrInvalidInput, p.Beta2)
	case !finite(p.Eps) || p.Eps < 0:
		return fmt.Errorf("%w: eps %v: want a finite value >= 0", ErrInvalidInput, p.Eps)
	case !finite(p.WeightDecay) || p.WeightDecay < 0:
		return fmt.Errorf("%w: weight_decay %v: want a finite value >= 0", ErrInvalidInput, p.WeightDecay)
	case !finite(p.GradClipNorm) || p.GradClipNorm < 0:
		return fmt.Errorf("%w: grad_clip_norm %v: want a finite value >= 0 (0 = off)", ErrInvalidInput, p.GradClipNorm)
	}
	return nil
}

// globalNorm is the L2 norm of all gradients together, accumulated in
// float64 so that millions of small squares do not lose their tail.
func globalNorm(grads [][]float32) float64 {
	var s float64
	for _, g := range grads {
		for _, x := range g {
			s += float64(x) * float64(x)
		}
	}
	return math.Sqrt(s)
}

// clipCoef is the factor clip_grad_norm_ multiplies gradients by: min(1,
// maxNorm/(norm+1e-6)). 1 means "leave them".
func clipCoef(norm, maxNorm float64) float32 {
	if maxNorm <= 0 {
		return 1
	}
	c := maxNorm / (norm + 1e-6)
	if c >= 1 {
		return 1
	}
	return float32(c)
}

// adamwUpdate applies one AdamW step (step counted from 1) to p with gradient
// g scaled by gscale, updating the moments m and v in place. The arithmetic
// follows torch.optim.AdamW's single-tensor path operation by operation in
// float32, so that the two agree to rounding.
func adamwUpdate(p, g, m, v []float32, gscale float32, lr, beta1, beta2, eps, wd float64, step int) {
	decay := float32(1 - lr*wd)
	b1, b2 := float32(beta1), float32(beta2)
	c1, c2 := float32(1-beta1), float32(1-beta2)
	bc1 := 1 - math.Pow(beta1, float64(step))
	bc2sqrt := float32(math.Sqrt(1 - math.Pow(beta2, float64(step))))
	stepSize := float32(lr / bc1)
	e := float32(eps)
	for i := range p {
		gi := g[i] * gscale
		if wd != 0 {
			p[i] *= decay
		}
		m[i] = m[i]*b1 + gi*c1
		v[i] = v[i]*b2 + gi*gi*c2
		denom := float32(math.Sqrt(float64(v[i])))/bc2sqrt + e
		p[i] -= stepSize * (m[i] / denom)
	}
}
