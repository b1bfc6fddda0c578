package coordinator

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"math"
	"strings"

	"github.com/signal-p2p/signal/protocol"
)

// Request limits named in 400 messages.
const (
	maxNameLen         = 200
	maxCredits         = protocol.MaxMicroCredits // keeps amounts exact in JSON clients that use doubles
	maxLoRARank        = 256
	maxLoRAAlpha       = 4096
	maxCheckpointEvery = 1_000_000
	maxBatchItems      = 4096
	maxPrompts         = 1024
	maxNumSamples      = 64
)

var allModules = []string{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

// quote is what the coordinator knows of a billed call from its request
// alone, before any node sees it: the most usage the call can take, field by
// field, and what that costs (the estimate held against the balance and
// the most the caller is ever charged). A node reports its usage, but it is
// a stranger: settle bills the smaller of its report and the bound, and the
// coordinator's own count where that count is exact.
type quote struct {
	max protocol.Usage
	// exactTrain and exactPrefill say max's token counts are the call's
	// true counts (token Datum): billed as counted, whatever the node says.
	exactTrain, exactPrefill bool
	credits                  int64
	// unseeded is a sample request without a seed: the coordinator gives
	// it one (seedSample).
	unseeded bool
}

// settle is the usage billed for a node's report.
func (q quote) settle(reported protocol.Usage) protocol.Usage {
	u := protocol.Usage{
		TrainTokens:   min(max(reported.TrainTokens, 0), q.max.TrainTokens),
		PrefillTokens: min(max(reported.PrefillTokens, 0), q.max.PrefillTokens),
		SampledTokens: min(max(reported.SampledTokens, 0), q.max.SampledTokens),
		StoredBytes:   min(max(reported.StoredBytes, 0), q.max.StoredBytes),
	}
	if q.exactTrain {
		u.TrainTokens = q.max.TrainTokens
	}
	if q.exactPrefill {
		u.PrefillTokens = q.max.PrefillTokens
	}
	return u
}

// textCounter counts a text's tokens (no special tokens); nil bounds a
// text by its bytes.
type textCounter func(text string) int64

// specialTokensPerText is the slack for BOS and EOS around each text.
const specialTokensPerText = 2

func (count textCounter) bound(texts ...string) int64 {
	joined := ""
	var sum, bytes int64
	for _, t := range texts {
		joined += t
		bytes += int64(len(t))
		if count != nil {
			sum += count(t)
		}
	}
	if count == nil {
		return bytes + specialTokensPerText
	}
	// Encoded apart or together, whichever an engine does, is the longer.
	return max(sum, count(joined)) + specialTokensPerText
}

// checkpointSlackBytes covers what a checkpoint holds beside its tensors:
// adapter_config.json, the trainer state, safetensors headers.
const checkpointSlackBytes = 1 << 20

// checkpointBound is the most a checkpoint of run can store: the adapter's
// f32 tensors (×3 with AdamW's two moments in full mode). Without the
// model's shape it is the model's own size.
func checkpointBound(m ModelSpec, rank int, mode string) int64 {
	if m.AdapterBytesPerRank <= 0 {
		return max(m.MemoryBytes, checkpointSlackBytes)
	}
	n := m.AdapterBytesPerRank * int64(rank)
	if mode == "full" {
		n *= 3
	}
	return n + checkpointSlackBytes
}

// quoteCall validates a billed call's body and quotes it at the model's
// prices for run.
func quoteCall(callName protocol.Call, body []byte, m ModelSpec, run protocol.Run, count textCounter) (quote, error) {
	var q quote
	switch callName {
	case protocol.CallForwardBackward, protocol.CallForward:
		var req protocol.ForwardBackwardRequest
		if err := decodeJSON(body, &req, false); err != nil {
			return q, err
		}
		tokens, err := validateForward(&req, m, count)
		if err != nil {
			return q, err
		}
		if k := req.TopKLogprobs; k != 0 && (callName != protocol.CallForward || k < 0 || k > maxTopKLogprobs) {
			return q, protocol.UserErrorf(ErrInvalidRequest, "top_k_logprobs is %d: forward answers 1 to %d of each position's most likely tokens, forward_backward none; ask forward, or leave it out", k, maxTopKLogprobs)
		}
		exact := len(req.Examples) == 0
		if callName == protocol.CallForward {
			q.max.PrefillTokens, q.exactPrefill = tokens, exact
		} else {
			q.max.TrainTokens, q.exactTrain = tokens, exact
		}
	case protocol.CallOptimStep:
		var req protocol.OptimStepRequest
		if err := decodeJSON(body, &req, true); err != nil {
			return q, err
		}
		if err := validateAdam(req.AdamParams); err != nil {
			return q, err
		}
		if run.CheckpointEvery > 0 {
			// The step may write the automatic full checkpoint.
			q.max.StoredBytes = checkpointBound(m, run.LoRARank, "full")
		}
	case protocol.CallSample:
		var req protocol.SampleRequest
		if err := decodeJSON(body, &req, false); err != nil {
			return q, err
		}
		u, err := validateSample(&req, m, count)
		if err != nil {
			return q, err
		}
		q.max, q.unseeded = u, req.SamplingParams.Seed == nil
	case protocol.CallSaveState:
		var req protocol.SaveStateRequest
		if err := decodeJSON(body, &req, true); err != nil {
			return q, err
		}
		if req.Mode != "" && req.Mode != "adapter" && req.Mode != "full" {
			return q, protocol.UserErrorf(ErrInvalidRequest, "mode %q is not a checkpoint mode: use adapter or full", req.Mode)
		}
		if len(req.Name) > maxNameLen {
			return q, protocol.UserErrorf(ErrInvalidRequest, "name is longer than %d characters: shorten it", maxNameLen)
		}
		q.max.StoredBytes = checkpointBound(m, run.LoRARank, req.Mode)
	default:
		return q, protocol.UserErrorf(ErrInvalidRequest, "call %s is not a billed call", callName)
	}
	q.credits = priceUsage(m.Prices, q.max).MicroCredits
	return q, nil
}

func finite(f float64) bool { return !math.IsNaN(f) && !math.IsInf(f, 0) }

// maxLossInput bounds weights, advantages, logprobs and loss_fn_config
// values: the engines compute in f32, where a weight of 1e30 times a loss
// overflows to Inf and NaN. Real ones are far smaller.
const maxLossInput = 1e6

func bounded(f float64) bool { return finite(f) && math.Abs(f) <= maxLossInput }

// maxTopKLogprobs bounds forward's top_k_logprobs (the engines' bound).
const maxTopKLogprobs = 20

// validateForward checks a forward(_backward) body and returns its token
// count (for text examples, an upper bound: see textCounter.bound).
func validateForward(req *protocol.ForwardBackwardRequest, m ModelSpec, count textCounter) (int64, error) {
	if (len(req.Data) == 0) == (len(req.Examples) == 0) {
		return 0, protocol.UserErrorf(ErrInvalidRequest, "send a batch in exactly one of data (token Datum) and examples (text); this request has %s", batchFields(req))
	}
	if n := len(req.Data) + len(req.Examples); n > maxBatchItems {
		return 0, protocol.UserErrorf(ErrInvalidRequest, "the batch has %d items, over the limit of %d: split it into several calls", n, maxBatchItems)
	}
	switch req.LossFn {
	case "", "cross_entropy", "importance_sampling", "ppo", "cispo", "dro":
	default:
		return 0, protocol.UserErrorf(ErrInvalidRequest, "loss_fn %q is not a loss: use cross_entropy, importance_sampling, ppo, cispo or dro", req.LossFn)
	}
	// The RL losses read logprobs and advantages; weights are optional
	// there (Tinker's RL datums carry none), required by cross_entropy.
	rl := req.LossFn != "" && req.LossFn != "cross_entropy"
	for k, v := range req.LossFnConfig {
		if !bounded(v) {
			return 0, protocol.UserErrorf(ErrInvalidRequest, "loss_fn_config.%s is %v: give a number in [-1e6, 1e6]", k, v)
		}
	}
	var tokens int64
	for i, d := range req.Data {
		n := len(d.ModelInput.Tokens)
		if n == 0 {
			return 0, protocol.UserErrorf(ErrInvalidRequest, "data[%d].model_input.tokens is empty: give at least one token", i)
		}
		if n > m.ContextLength {
			return 0, protocol.UserErrorf(ErrInvalidRequest, "data[%d].model_input.tokens has %d tokens, over the %d model %s allows: shorten it or split it", i, n, m.ContextLength, m.Name)
		}
		in := d.LossFnInputs
		if len(in.TargetTokens) != n || (len(in.Weights) != n && (!rl || len(in.Weights) != 0)) {
			return 0, protocol.UserErrorf(ErrInvalidRequest, "data[%d].loss_fn_inputs has %d target_tokens and %d weights: give %d of each, one per model_input token", i, len(in.TargetTokens), len(in.Weights), n)
		}
		if rl && (len(in.Logprobs) != n || len(in.Advantages) != n) {
			return 0, protocol.UserErrorf(ErrInvalidRequest, "data[%d].loss_fn_inputs lacks logprobs or advantages: loss_fn %s needs %d of each, one per model_input token", i, req.LossFn, n)
		}
		for j, t := range d.ModelInput.Tokens {
			if t < 0 {
				return 0, protocol.UserErrorf(ErrInvalidRequest, "data[%d].model_input.tokens[%d] is %d: token ids are not negative", i, j, t)
			}
		}
		for j, t := range in.TargetTokens {
			if t < 0 {
				return 0, protocol.UserErrorf(ErrInvalidRequest, "data[%d].loss_fn_inputs.target_tokens[%d] is %d: token ids are not negative", i, j, t)
			}
		}
		for _, f := range [...]struct {
			name string
			vs   []float64
		}{{"weights", in.Weights}, {"logprobs", in.Logprobs}, {"advantages", in.Advantages}} {
			for j, v := range f.vs {
				if !bounded(v) {
					return 0, protocol.UserErrorf(ErrInvalidRequest, "data[%d].loss_fn_inputs.%s[%d] is %v: give a number in [-1e6, 1e6]", i, f.name, j, v)
				}
			}
		}
		tokens += int64(n)
	}
	for i, e := range req.Examples {
		text := e.Text != ""
		pair := e.Prompt != "" || e.Completion != ""
		if text == pair {
			return 0, protocol.UserErrorf(ErrInvalidRequest, "examples[%d] %s: give either text, or prompt and completion", i, exampleShape(e))
		}
		if pair && e.Completion == "" {
			return 0, protocol.UserErrorf(ErrInvalidRequest, "examples[%d].completion is empty: a prompt needs a completion to train on", i)
		}
		if e.Text != "" {
			tokens += count.bound(e.Text)
		} else {
			tokens += count.bound(e.Prompt, e.Completion)
		}
	}
	return tokens, nil
}

// batchFields says what a batch that is not exactly one list holds.
func batchFields(req *protocol.ForwardBackwardRequest) string {
	if len(req.Data) > 0 {
		return "both"
	}
	return "neither"
}

// exampleShape says what a text example that is neither form holds.
func exampleShape(e protocol.TextExample) string {
	if e.Text != "" {
		return "has both text and prompt/completion"
	}
	return "is empty"
}

func validateAdam(p *protocol.AdamParams) error {
	if p == nil {
		return nil
	}
	check := func(name string, v *float64, ok func(float64) bool, rng string) error {
		if v != nil && !(finite(*v) && ok(*v)) {
			return protocol.UserErrorf(ErrInvalidRequest, "adam_params.%s %v is out of range: use %s", name, *v, rng)
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

// validateSample checks a sample body and returns the most usage it can take.
func validateSample(req *protocol.SampleRequest, m ModelSpec, count textCounter) (protocol.Usage, error) {
	var u protocol.Usage
	if len(req.Prompts) == 0 || len(req.Prompts) > maxPrompts {
		return u, protocol.UserErrorf(ErrInvalidRequest, "prompts has %d prompts: send 1 to %d", len(req.Prompts), maxPrompts)
	}
	n := 1
	if req.NumSamples != nil {
		n = *req.NumSamples
	}
	if n < 1 || n > maxNumSamples {
		return u, protocol.UserErrorf(ErrInvalidRequest, "num_samples %d is out of range: use 1..%d", n, maxNumSamples)
	}
	sp := req.SamplingParams
	if sp.MaxTokens < 1 || sp.MaxTokens > m.ContextLength {
		return u, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.max_tokens %d is out of range: use 1..%d (the context of %s)", sp.MaxTokens, m.ContextLength, m.Name)
	}
	if sp.Temperature != nil && !(finite(*sp.Temperature) && *sp.Temperature >= 0 && *sp.Temperature <= 100) {
		return u, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.temperature %v is out of range: use [0, 100]", *sp.Temperature)
	}
	if sp.TopK != nil && *sp.TopK < -1 {
		return u, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.top_k %d is out of range: use -1 (off) or a positive count", *sp.TopK)
	}
	if sp.TopP != nil && !(finite(*sp.TopP) && *sp.TopP > 0 && *sp.TopP <= 1) {
		return u, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.top_p %v is out of range: use (0, 1]", *sp.TopP)
	}
	if len(sp.Stop) > 16 {
		return u, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.stop has %d strings: give at most 16", len(sp.Stop))
	}
	if len(sp.StopTokens) > 16 {
		return u, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.stop_tokens has %d ids: give at most 16", len(sp.StopTokens))
	}
	for i, t := range sp.StopTokens {
		if t < 0 {
			return u, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.stop_tokens[%d] is %d: token ids are not negative", i, t)
		}
	}
	var prefill int64
	for i, p := range req.Prompts {
		if (len(p.Tokens) == 0) == (p.Text == "") {
			return u, protocol.UserErrorf(ErrInvalidRequest, "prompts[%d] needs exactly one of tokens and text", i)
		}
		if len(p.Tokens) > m.ContextLength {
			return u, protocol.UserErrorf(ErrInvalidRequest, "prompts[%d].tokens has %d tokens, over the %d model %s allows: shorten it", i, len(p.Tokens), m.ContextLength, m.Name)
		}
		for j, t := range p.Tokens {
			if t < 0 {
				return u, protocol.UserErrorf(ErrInvalidRequest, "prompts[%d].tokens[%d] is %d: token ids are not negative", i, j, t)
			}
		}
		if p.Text != "" {
			prefill += count.bound(p.Text) * int64(n)
		} else {
			prefill += int64(len(p.Tokens)) * int64(n)
		}
	}
	u.PrefillTokens = prefill
	u.SampledTokens = int64(len(req.Prompts)) * int64(n) * int64(sp.MaxTokens)
	return u, nil
}

// validateCreateRun checks a create_run request and fills its defaults.
func (c *Coordinator) validateCreateRun(req *protocol.CreateRunRequest) (protocol.SessionSpec, ModelSpec, error) {
	var spec protocol.SessionSpec
	if req.BaseModel == "" {
		return spec, ModelSpec{}, protocol.UserErrorf(ErrInvalidRequest, "base_model is missing: name a model (GET /v1/models lists them)")
	}
	model, err := c.models.get(req.BaseModel)
	if err != nil {
		return spec, model, err
	}
	spec.BaseModel = model.Name
	spec.LoRARank = 32
	if req.LoRARank != nil {
		spec.LoRARank = *req.LoRARank
	}
	if spec.LoRARank < 1 || spec.LoRARank > maxLoRARank {
		return spec, model, protocol.UserErrorf(ErrInvalidRequest, "lora_rank %d is out of range: use 1..%d", spec.LoRARank, maxLoRARank)
	}
	spec.LoRAAlpha = 32
	if req.LoRAAlpha != nil {
		spec.LoRAAlpha = *req.LoRAAlpha
	}
	if !(spec.LoRAAlpha > 0 && spec.LoRAAlpha <= maxLoRAAlpha) {
		return spec, model, protocol.UserErrorf(ErrInvalidRequest, "lora_alpha %v is out of range: use (0, %d]", spec.LoRAAlpha, maxLoRAAlpha)
	}
	spec.TargetModules = allModules
	if len(req.TargetModules) > 0 {
		valid := map[string]bool{"all-linear": true}
		for _, m := range allModules {
			valid[m] = true
		}
		for _, m := range req.TargetModules {
			if !valid[m] {
				return spec, model, protocol.UserErrorf(ErrInvalidRequest, "target_modules %q is not a module: use %s or all-linear", m, strings.Join(allModules, ", "))
			}
		}
		spec.TargetModules = req.TargetModules
	}
	spec.CheckpointEvery = 10
	if req.CheckpointEvery != nil {
		spec.CheckpointEvery = *req.CheckpointEvery
	}
	if spec.CheckpointEvery < 0 || spec.CheckpointEvery > maxCheckpointEvery {
		return spec, model, protocol.UserErrorf(ErrInvalidRequest, "checkpoint_every %d is out of range: use 0..%d (0: never)", spec.CheckpointEvery, maxCheckpointEvery)
	}
	if req.Seed != nil {
		spec.Seed = *req.Seed
	} else {
		var b [8]byte
		_, _ = rand.Read(b[:])
		spec.Seed = int64(binary.BigEndian.Uint64(b[:]) >> 1)
	}
	if len(req.Name) > maxNameLen {
		return spec, model, protocol.UserErrorf(ErrInvalidRequest, "name is longer than %d characters: shorten it", maxNameLen)
	}
	if s := req.LRSchedule; s != nil {
		switch {
		case s.Kind != "constant" && s.Kind != "linear" && s.Kind != "cosine":
			return spec, model, protocol.UserErrorf(ErrInvalidRequest, "lr_schedule.kind %q is not a schedule: use constant, linear or cosine", s.Kind)
		case !(s.PeakLR > 0 && s.PeakLR <= 10):
			return spec, model, protocol.UserErrorf(ErrInvalidRequest, "lr_schedule.peak_lr %v is out of range: use (0, 10]", s.PeakLR)
		case s.WarmupSteps < 0 || s.TotalSteps < 0:
			return spec, model, protocol.UserErrorf(ErrInvalidRequest, "lr_schedule.warmup_steps and total_steps must not be negative")
		case !(s.FinalFraction >= 0 && s.FinalFraction <= 1):
			return spec, model, protocol.UserErrorf(ErrInvalidRequest, "lr_schedule.final_fraction %v is out of range: use [0, 1]", s.FinalFraction)
		}
		spec.LRSchedule, _ = json.Marshal(s)
	}
	return spec, model, nil
}

// validateCreateKey checks an admin create-key request and returns the
// micro-credits it funds the account with.
func validateCreateKey(req protocol.CreateKeyRequest) (int64, error) {
	amount, err := req.Requested()
	if err != nil {
		return 0, protocol.UserErrorf(ErrInvalidRequest, "%v", err)
	}
	if amount < 0 || amount > maxCredits {
		return 0, protocol.UserErrorf(ErrInvalidRequest, "micro_credits %d is out of range: use 0..%d (%s credits)", amount, int64(maxCredits), protocol.FormatCredits(maxCredits))
	}
	if len(req.Name) > maxNameLen {
		return 0, protocol.UserErrorf(ErrInvalidRequest, "name is longer than %d characters: shorten it", maxNameLen)
	}
	return amount, nil
}

// validateCredit checks an admin credit request and returns the
// micro-credits it adds.
func validateCredit(req protocol.CreditRequest) (int64, error) {
	if req.Account == "" {
		return 0, protocol.UserErrorf(ErrInvalidRequest, "account is missing: name the account to credit")
	}
	amount, err := req.Requested()
	if err != nil {
		return 0, protocol.UserErrorf(ErrInvalidRequest, "%v", err)
	}
	if amount <= 0 || amount > maxCredits {
		return 0, protocol.UserErrorf(ErrInvalidRequest, "micro_credits %d is out of range: use 1..%d (%s credits)", amount, int64(maxCredits), protocol.FormatCredits(maxCredits))
	}
	return amount, nil
}
