package trainer

import (
	"fmt"
	"math"
	"sort"
)

// Datum is one training sequence, as the public API's Datum: the model reads
// Tokens, and position i is scored on predicting TargetTokens[i] (usually
// Tokens shifted left by one). Weights scale the cross-entropy term of each
// position (0 masks it); Logprobs (the sampler's log-probabilities of the
// targets) and Advantages feed the RL losses.
type Datum struct {
	Tokens       []int
	TargetTokens []int
	Weights      []float32
	Logprobs     []float32
	Advantages   []float32
}

// The loss functions a ForwardBackward accepts.
const (
	LossCrossEntropy       = "cross_entropy"
	LossImportanceSampling = "importance_sampling"
	LossPPO                = "ppo"
	// LossCISPO weights the policy gradient by the clipped, stopped
	// importance ratio: -sg(clip(ratio, low, high))·A·logp.
	LossCISPO = "cispo"
	// LossDRO is the policy gradient with a quadratic penalty on the log
	// ratio: -(A·logp - β/2·(logp - logq)²).
	LossDRO = "dro"
)

// DefaultDROBeta is dro's penalty weight when loss_fn_config names none.
const DefaultDROBeta = 0.05

// Default PPO clip thresholds on the probability ratio.
const (
	DefaultClipLow  = 0.8
	DefaultClipHigh = 1.2
)

// lossSpec is a parsed loss function with its configuration.
type lossSpec struct {
	name              string
	clipLow, clipHigh float64
	beta              float64 // dro
}

// parseLoss checks the loss name and its configuration; unknown keys are an
// error so that a typo does not silently train with the defaults.
func parseLoss(name string, cfg map[string]float64) (lossSpec, error) {
	if name == "" {
		name = LossCrossEntropy
	}
	ls := lossSpec{name: name, clipLow: DefaultClipLow, clipHigh: DefaultClipHigh, beta: DefaultDROBeta}
	allowed := map[string]bool{}
	switch name {
	case LossCrossEntropy, LossImportanceSampling:
	case LossPPO, LossCISPO:
		allowed["clip_low_threshold"] = true
		allowed["clip_high_threshold"] = true
	case LossDRO:
		allowed["beta"] = true
	default:
		return ls, fmt.Errorf("%w: loss_fn %q: want %s, %s, %s, %s or %s", ErrInvalidInput, name,
			LossCrossEntropy, LossImportanceSampling, LossPPO, LossCISPO, LossDRO)
	}
	keys := make([]string, 0, len(cfg))
	for k := range cfg {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := cfg[k]
		if !allowed[k] {
			return ls, fmt.Errorf("%w: loss_fn_config.%s: not a setting of loss_fn %q", ErrInvalidInput, k, name)
		}
		if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
			return ls, fmt.Errorf("%w: loss_fn_config.%s %v: want a finite value >= 0", ErrInvalidInput, k, v)
		}
		switch k {
		case "clip_low_threshold":
			ls.clipLow = v
		case "clip_high_threshold":
			ls.clipHigh = v
		case "beta":
			ls.beta = v
		}
	}
	if ls.clipLow > ls.clipHigh {
		return ls, fmt.Errorf("%w: loss_fn_config.clip_low_threshold %v above clip_high_threshold %v",
			ErrInvalidInput, ls.clipLow, ls.clipHigh)
	}
	return ls, nil
}

// needsRL reports whether the loss reads the sampler's logprobs and advantages.
func (ls lossSpec) needsRL() bool { return ls.name != LossCrossEntropy }

// token returns the loss of position i of d given the model's log-probability
// logp of its target, and d loss / d logp. Every loss is a sum of per-position
// terms that depend on that position's logp only, which is what lets the LM
// head compute logits, loss and their gradient chunk by chunk in one pass.
func (ls lossSpec) token(d *Datum, i int, logp float64) (loss, dlogp float64) {
	switch ls.name {
	case LossCrossEntropy:
		w := float64(d.Weights[i])
		return -w * logp, -w
	case LossImportanceSampling:
		adv := float64(d.Advantages[i])
		ratio := math.Exp(logp - float64(d.Logprobs[i]))
		return -ratio * adv, -ratio * adv
	case LossCISPO: // -sg(clip(ratio))·A·logp: the clipped ratio is a constant
		adv := float64(d.Advantages[i])
		ratio := math.Exp(logp - float64(d.Logprobs[i]))
		c := math.Min(math.Max(ratio, ls.clipLow), ls.clipHigh)
		return -c * adv * logp, -c * adv
	case LossDRO: // -(A·logp - β/2·(logp - logq)²)
		adv := float64(d.Advantages[i])
		diff := logp - float64(d.Logprobs[i])
		return -(adv*logp - 0.5*ls.beta*diff*diff), -adv + ls.beta*diff
	default: // ppo: -min(ratio·A, clip(ratio)·A)
		adv := float64(d.Advantages[i])
		ratio := math.Exp(logp - float64(d.Logprobs[i]))
		clipped := math.Min(math.Max(ratio, ls.clipLow), ls.clipHigh)
		unclipped, cl := ratio*adv, clipped*adv
		if unclipped <= cl {
			return -unclipped, -unclipped
		}
		// The clipped term is smaller: it is constant in logp (ratio is
		// outside the band), so no gradient flows.
		return -cl, 0
	}
}

// lossWeight is the denominator of loss_mean contributed by position i:
// its weight when the datum has weights, else 1.
func lossWeight(d *Datum, i int) float64 {
	if len(d.Weights) == 0 {
		return 1
	}
	return float64(d.Weights[i])
}

// DatumError is a datum that validateData refuses. Index is the datum's
// position in the call's data and Field the field below it as the public
// API spells it ("model_input.tokens[3]"); Problem says what is wrong and
// what is allowed. It is an ErrInvalidInput. A caller that built the data
// from something else (text examples) reads Index and Field to name what
// its own user sent.
type DatumError struct {
	Index   int
	Field   string
	Problem string
}

// Error reads "invalid input: data[1].model_input.tokens: empty".
func (e *DatumError) Error() string {
	return fmt.Sprintf("%v: data[%d].%s: %s", ErrInvalidInput, e.Index, e.Field, e.Problem)
}

// Unwrap gives ErrInvalidInput to errors.Is.
func (e *DatumError) Unwrap() error { return ErrInvalidInput }

func datumErr(i int, field, format string, args ...any) error {
	return &DatumError{Index: i, Field: field, Problem: fmt.Sprintf(format, args...)}
}

// validateData checks a call's data before anything is computed, so that a
// rejected call leaves the session as it was. Errors are *DatumError: they
// name the datum index and the field as the public API spells it.
func validateData(data []Datum, ls lossSpec, vocab, maxContext int) error {
	if len(data) == 0 {
		return fmt.Errorf("%w: data: empty, want at least one datum", ErrInvalidInput)
	}
	for di := range data {
		d := &data[di]
		n := len(d.Tokens)
		if n == 0 {
			return datumErr(di, "model_input.tokens", "empty")
		}
		if maxContext > 0 && n > maxContext {
			return datumErr(di, "model_input.tokens", "%d tokens, over the model's context of %d", n, maxContext)
		}
		if len(d.TargetTokens) != n {
			return datumErr(di, "loss_fn_inputs.target_tokens", "length %d, want %d (as model_input.tokens)", len(d.TargetTokens), n)
		}
		for i, t := range d.Tokens {
			if t < 0 || t >= vocab {
				return datumErr(di, fmt.Sprintf("model_input.tokens[%d]", i), "id %d outside the vocabulary [0, %d)", t, vocab)
			}
		}
		for i, t := range d.TargetTokens {
			if t < 0 || t >= vocab {
				return datumErr(di, fmt.Sprintf("loss_fn_inputs.target_tokens[%d]", i), "id %d outside the vocabulary [0, %d)", t, vocab)
			}
		}
		if err := checkFloats(di, "weights", d.Weights, n, !ls.needsRL()); err != nil {
			return err
		}
		if err := checkFloats(di, "logprobs", d.Logprobs, n, ls.needsRL()); err != nil {
			return err
		}
		if err := checkFloats(di, "advantages", d.Advantages, n, ls.needsRL()); err != nil {
			return err
		}
	}
	return nil
}

// checkFloats checks one per-position float field: present (when required)
// with the tokens' length, and finite.
func checkFloats(di int, field string, xs []float32, n int, required bool) error {
	if len(xs) == 0 && !required {
		return nil
	}
	if len(xs) != n {
		return datumErr(di, "loss_fn_inputs."+field, "length %d, want %d (as model_input.tokens)", len(xs), n)
	}
	for i, x := range xs {
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			return datumErr(di, fmt.Sprintf("loss_fn_inputs.%s[%d]", field, i), "%v, want a finite number", x)
		}
	}
	return nil
}
