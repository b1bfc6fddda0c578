package coordinator

import (
	"fmt"
	"math"

	"github.com/signal-p2p/signal/protocol"
)

// estimateCost validates a billed call's body and returns the most it can
// cost at the model's prices, for the balance check before any work.
func estimateCost(callName protocol.Call, body []byte, m ModelSpec) (int64, error) {
	switch callName {
	case protocol.CallForwardBackward, protocol.CallForward:
		var req protocol.ForwardBackwardRequest
		if err := decodeJSON(body, &req, false); err != nil {
			return 0, err
		}
		tokens, err := validateForward(&req, m)
		if err != nil {
			return 0, err
		}
		price := m.Prices.TrainPer1K
		if callName == protocol.CallForward {
			price = m.Prices.PrefillPer1K
		}
		return perThousand(tokens, price), nil
	case protocol.CallOptimStep:
		var req protocol.OptimStepRequest
		if err := decodeJSON(body, &req, true); err != nil {
			return 0, err
		}
		return 0, validateAdam(req.AdamParams)
	case protocol.CallSample:
		var req protocol.SampleRequest
		if err := decodeJSON(body, &req, false); err != nil {
			return 0, err
		}
		return validateSample(&req, m)
	case protocol.CallSaveState:
		var req protocol.SaveStateRequest
		if err := decodeJSON(body, &req, true); err != nil {
			return 0, err
		}
		if req.Mode != "" && req.Mode != "adapter" && req.Mode != "full" {
			return 0, fmt.Errorf("field mode: %q is not adapter or full: %w", req.Mode, ErrInvalidRequest)
		}
		if len(req.Name) > maxNameLen {
			return 0, fmt.Errorf("field name: longer than %d characters: %w", maxNameLen, ErrInvalidRequest)
		}
		return 0, nil
	}
	return 0, fmt.Errorf("call %s is not billed: %w", callName, ErrInvalidRequest)
}

func finite(f float64) bool { return !math.IsNaN(f) && !math.IsInf(f, 0) }

// validateForward checks a forward(_backward) body and returns its token
// count (for text examples, an upper bound: bytes + 2 special tokens).
func validateForward(req *protocol.ForwardBackwardRequest, m ModelSpec) (int64, error) {
	if (len(req.Data) == 0) == (len(req.Examples) == 0) {
		return 0, fmt.Errorf("fields data and examples: exactly one must be a non-empty list: %w", ErrInvalidRequest)
	}
	if n := len(req.Data) + len(req.Examples); n > maxBatchItems {
		return 0, fmt.Errorf("fields data/examples: %d items, at most %d: %w", n, maxBatchItems, ErrInvalidRequest)
	}
	switch req.LossFn {
	case "", "cross_entropy", "importance_sampling", "ppo":
	default:
		return 0, fmt.Errorf("field loss_fn: %q is not cross_entropy, importance_sampling or ppo: %w", req.LossFn, ErrInvalidRequest)
	}
	rl := req.LossFn == "importance_sampling" || req.LossFn == "ppo"
	for k, v := range req.LossFnConfig {
		if !finite(v) {
			return 0, fmt.Errorf("field loss_fn_config.%s: not a finite number: %w", k, ErrInvalidRequest)
		}
	}
	var tokens int64
	for i, d := range req.Data {
		n := len(d.ModelInput.Tokens)
		if n == 0 {
			return 0, fmt.Errorf("field data[%d].model_input.tokens: empty: %w", i, ErrInvalidRequest)
		}
		if n > m.ContextLength {
			return 0, fmt.Errorf("field data[%d].model_input.tokens: %d tokens, model %s allows %d: %w", i, n, m.Name, m.ContextLength, ErrInvalidRequest)
		}
		in := d.LossFnInputs
		if len(in.TargetTokens) != n || len(in.Weights) != n {
			return 0, fmt.Errorf("field data[%d].loss_fn_inputs: target_tokens (%d) and weights (%d) must have %d entries like model_input.tokens: %w", i, len(in.TargetTokens), len(in.Weights), n, ErrInvalidRequest)
		}
		if rl && (len(in.Logprobs) != n || len(in.Advantages) != n) {
			return 0, fmt.Errorf("field data[%d].loss_fn_inputs: loss_fn %s needs logprobs and advantages with %d entries: %w", i, req.LossFn, n, ErrInvalidRequest)
		}
		for j, t := range d.ModelInput.Tokens {
			if t < 0 {
				return 0, fmt.Errorf("field data[%d].model_input.tokens[%d]: %d is negative: %w", i, j, t, ErrInvalidRequest)
			}
		}
		for j, t := range in.TargetTokens {
			if t < 0 {
				return 0, fmt.Errorf("field data[%d].loss_fn_inputs.target_tokens[%d]: %d is negative: %w", i, j, t, ErrInvalidRequest)
			}
		}
		for j, w := range in.Weights {
			if !finite(w) {
				return 0, fmt.Errorf("field data[%d].loss_fn_inputs.weights[%d]: not finite: %w", i, j, ErrInvalidRequest)
			}
		}
		for j := range in.Logprobs {
			if !finite(in.Logprobs[j]) {
				return 0, fmt.Errorf("field data[%d].loss_fn_inputs.logprobs[%d]: not finite: %w", i, j, ErrInvalidRequest)
			}
		}
		for j := range in.Advantages {
			if !finite(in.Advantages[j]) {
				return 0, fmt.Errorf("field data[%d].loss_fn_inputs.advantages[%d]: not finite: %w", i, j, ErrInvalidRequest)
			}
		}
		tokens += int64(n)
	}
	for i, e := range req.Examples {
		text := e.Text != ""
		pair := e.Prompt != "" || e.Completion != ""
		if text == pair {
			return 0, fmt.Errorf("field examples[%d]: set either text, or prompt and completion: %w", i, ErrInvalidRequest)
		}
		if pair && e.Completion == "" {
			return 0, fmt.Errorf("field examples[%d].completion: required with prompt: %w", i, ErrInvalidRequest)
		}
		tokens += int64(len(e.Text)+len(e.Prompt)+len(e.Completion)) + 2
	}
	return tokens, nil
}

func validateAdam(p *protocol.AdamParams) error {
	if p == nil {
		return nil
	}
	check := func(name string, v *float64, ok func(float64) bool, rng string) error {
		if v != nil && !(finite(*v) && ok(*v)) {
			return fmt.Errorf("field adam_params.%s: %v out of range %s: %w", name, *v, rng, ErrInvalidRequest)
		}
		return nil
	}
	for _, err := range []error{
		check("learning_rate", p.LearningRate, func(v float64) bool { return v >= 0 && v <= 10 }, "[0, 10]"),
		check("beta1", p.Beta1, func(v float64) bool { return v >= 0 && v < 1 }, "[0, 1)"),
		check("beta2", p.Beta2, func(v float64) bool { return v >= 0 && v < 1 }, "[0, 1)"),
		check("eps", p.Eps, func(v float64) bool { return v > 0 && v <= 1 }, "(0, 1]"),
		check("weight_decay", p.WeightDecay, func(v float64) bool { return v >= 0 && v <= 1 }, "[0, 1]"),
		check("grad_clip_norm", p.GradClipNorm, func(v float64) bool { return v >= 0 }, "[0, +inf)"),
	} {
		if err != nil {
			return err
		}
	}
	return nil
}

func validateSample(req *protocol.SampleRequest, m ModelSpec) (int64, error) {
	if len(req.Prompts) == 0 || len(req.Prompts) > maxPrompts {
		return 0, fmt.Errorf("field prompts: %d prompts, want 1..%d: %w", len(req.Prompts), maxPrompts, ErrInvalidRequest)
	}
	n := 1
	if req.NumSamples != nil {
		n = *req.NumSamples
	}
	if n < 1 || n > maxNumSamples {
		return 0, fmt.Errorf("field num_samples: %d out of range 1..%d: %w", n, maxNumSamples, ErrInvalidRequest)
	}
	sp := req.SamplingParams
	if sp.MaxTokens < 1 || sp.MaxTokens > m.ContextLength {
		return 0, fmt.Errorf("field sampling_params.max_tokens: %d out of range 1..%d: %w", sp.MaxTokens, m.ContextLength, ErrInvalidRequest)
	}
	if sp.Temperature != nil && !(finite(*sp.Temperature) && *sp.Temperature >= 0 && *sp.Temperature <= 100) {
		return 0, fmt.Errorf("field sampling_params.temperature: %v out of range [0, 100]: %w", *sp.Temperature, ErrInvalidRequest)
	}
	if sp.TopK != nil && *sp.TopK < -1 {
		return 0, fmt.Errorf("field sampling_params.top_k: %d, want -1 (off) or a positive count: %w", *sp.TopK, ErrInvalidRequest)
	}
	if sp.TopP != nil && !(finite(*sp.TopP) && *sp.TopP > 0 && *sp.TopP <= 1) {
		return 0, fmt.Errorf("field sampling_params.top_p: %v out of range (0, 1]: %w", *sp.TopP, ErrInvalidRequest)
	}
	if len(sp.Stop) > 16 {
		return 0, fmt.Errorf("field sampling_params.stop: %d strings, at most 16: %w", len(sp.Stop), ErrInvalidRequest)
	}
	var prefill int64
	for i, p := range req.Prompts {
		if (len(p.Tokens) == 0) == (p.Text == "") {
			return 0, fmt.Errorf("field prompts[%d]: set exactly one of tokens and text: %w", i, ErrInvalidRequest)
		}
		if len(p.Tokens) > m.ContextLength {
			return 0, fmt.Errorf("field prompts[%d].tokens: %d tokens, model %s allows %d: %w", i, len(p.Tokens), m.Name, m.ContextLength, ErrInvalidRequest)
		}
		for j, t := range p.Tokens {
			if t < 0 {
				return 0, fmt.Errorf("field prompts[%d].tokens[%d]: %d is negative: %w", i, j, t, ErrInvalidRequest)
			}
		}
		prefill += int64(len(p.Tokens)+len(p.Text)+2) * int64(n)
	}
	sampled := int64(len(req.Prompts)) * int64(n) * int64(sp.MaxTokens)
	return satAdd(perThousand(prefill, m.Prices.PrefillPer1K), perThousand(sampled, m.Prices.SamplePer1K)), nil
}
