package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// This file is the one place where the public API's compute calls meet the
// engines: each request body is decoded once (strictly: an unknown field is
// an error), examples, prompts and stop strings are converted with the
// model's tokenizer by trainer's one converter, the engine is called with
// typed values, and its typed results become the API's answer, the Usage
// the coordinator bills and the Figures it keeps in the run record.

// Compute runs a forward_backward, forward, optim_step or sample call on a
// session: decode the body, convert, call the engine, encode the answer.
func Compute(ctx context.Context, sess Session, call protocol.Call, body []byte) (protocol.SessionResponse, error) {
	switch call {
	case protocol.CallForwardBackward, protocol.CallForward:
		return forwardCall(ctx, sess, call, body)
	case protocol.CallOptimStep:
		return optimCall(ctx, sess, body)
	case protocol.CallSample:
		return sampleCall(ctx, sess, body)
	}
	return protocol.SessionResponse{}, protocol.UserErrorf(ErrInvalidRequest, "call %q is not a session call (forward_backward, forward, optim_step, sample, save_state, load_state)", call)
}

func forwardCall(ctx context.Context, sess Session, call protocol.Call, body []byte) (protocol.SessionResponse, error) {
	var req protocol.ForwardBackwardRequest
	if err := decodeBody(body, &req); err != nil {
		return protocol.SessionResponse{}, err
	}
	data, err := toData(req, sess.Tokenizer())
	if err != nil {
		return protocol.SessionResponse{}, err
	}
	loss := Loss{Fn: req.LossFn, Config: req.LossFnConfig, TopK: req.TopKLogprobs}
	if loss.TopK != 0 && (call != protocol.CallForward || loss.TopK < 0 || loss.TopK > trainer.MaxTopK) {
		return protocol.SessionResponse{}, protocol.UserErrorf(ErrInvalidRequest, "top_k_logprobs %d: forward answers 1..%d of them (forward_backward none)", loss.TopK, trainer.MaxTopK)
	}
	var res trainer.ForwardResult
	if call == protocol.CallForwardBackward {
		res, err = sess.ForwardBackward(ctx, data, loss)
	} else {
		res, err = sess.Forward(ctx, data, loss)
	}
	if err != nil {
		return protocol.SessionResponse{}, nameInput(err, len(req.Examples) > 0)
	}
	out := protocol.ForwardBackwardResponse{
		LossSum:  res.LossSum,
		LossMean: lossMean(res),
		Tokens:   int64(res.Tokens),
		Logprobs: make([][]float64, len(res.Logprobs)),
	}
	for i, lp := range res.Logprobs {
		out.Logprobs[i] = f64(lp)
	}
	if k := loss.TopK; k > 0 {
		if len(res.TopIDs) != len(res.Logprobs) || len(res.TopLogprobs) != len(res.Logprobs) {
			return protocol.SessionResponse{}, fmt.Errorf("forward: the engine answered top-%d logprobs for %d of %d datums", k, len(res.TopIDs), len(res.Logprobs))
		}
		for i, ids := range res.TopIDs {
			n := len(res.Logprobs[i])
			if len(ids) != n*k || len(res.TopLogprobs[i]) != n*k {
				return protocol.SessionResponse{}, fmt.Errorf("forward: the engine answered datum %d with %d top-%d ids for %d positions", i, len(ids), k, n)
			}
			t := protocol.TopLogprobs{IDs: make([][]int, n), Logprobs: make([][]float64, n)}
			for pos := range n {
				t.IDs[pos] = make([]int, k)
				for j, id := range ids[pos*k : (pos+1)*k] {
					t.IDs[pos][j] = int(id)
				}
				t.Logprobs[pos] = f64(res.TopLogprobs[i][pos*k : (pos+1)*k])
			}
			out.TopLogprobs = append(out.TopLogprobs, t)
		}
	}
	fig := &protocol.Figures{LossSum: res.LossSum, WeightSum: res.WeightSum, Tokens: int64(res.Tokens)}
	usage := protocol.Usage{PrefillTokens: int64(res.Tokens)}
	if call == protocol.CallForwardBackward {
		g := res.GradNorm
		out.GradNorm, fig.GradNorm = &g, &g
		usage = protocol.Usage{TrainTokens: int64(res.Tokens)}
	}
	return answer(out, usage, fig)
}

// nameInput makes an engine's refusal of a datum name what the user sent:
// data[i] as sent, or examples[i] for the datum converted from examples[i]
// (an example's tokens are not the user's to fix; its text is).
func nameInput(err error, fromExamples bool) error {
	var de *trainer.DatumError
	if !errors.As(err, &de) {
		return err
	}
	msg := fmt.Sprintf("data[%d].%s: %s", de.Index, de.Field, de.Problem)
	if fromExamples {
		msg = fmt.Sprintf("examples[%d]: its tokens are refused (%s: %s)", de.Index, de.Field, de.Problem)
		// An example's tokens are never empty (it encodes to two or
		// more): a refusal of them is of their length.
		if de.Field == "model_input.tokens" {
			msg = fmt.Sprintf("examples[%d] is too long: %s; shorten it or split it into several examples", de.Index, de.Problem)
		}
	}
	return &protocol.UserError{Msg: msg, Err: errors.Join(ErrInvalidRequest, err)}
}

// lossMean is the loss sum over the weight sum, or over the token count
// when no position carries weight: one rule, whatever the engine.
func lossMean(r trainer.ForwardResult) float64 {
	switch {
	case r.WeightSum > 0:
		return r.LossSum / r.WeightSum
	case r.Tokens > 0:
		return r.LossSum / float64(r.Tokens)
	}
	return 0
}

// toData converts a call's data or text examples into the engine's Datums.
func toData(req protocol.ForwardBackwardRequest, tok Tokenizer) ([]trainer.Datum, error) {
	switch {
	case len(req.Data) > 0 && len(req.Examples) > 0:
		return nil, protocol.UserErrorf(ErrInvalidRequest, "data and examples are both set: send one of them")
	case len(req.Examples) > 0:
		exs := make([]trainer.Example, len(req.Examples))
		for i, e := range req.Examples {
			exs[i] = trainer.Example{Text: e.Text, Prompt: e.Prompt, Completion: e.Completion}
		}
		var enc trainer.TextEncoder
		if tok != nil {
			enc = tok
		}
		data, err := trainer.EncodeExamples(enc, exs)
		var ee *trainer.ExampleError
		if errors.As(err, &ee) {
			field := fmt.Sprintf("examples[%d]", ee.Index)
			if ee.Field != "" {
				field += "." + ee.Field
			}
			return nil, &protocol.UserError{Msg: field + ": " + ee.Problem, Err: errors.Join(ErrInvalidRequest, err)}
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
		}
		return data, nil
	case len(req.Data) == 0:
		return nil, protocol.UserErrorf(ErrInvalidRequest, "data is empty: send at least one datum, or examples")
	}
	out := make([]trainer.Datum, len(req.Data))
	for i, d := range req.Data {
		out[i] = trainer.Datum{
			Tokens:       d.ModelInput.Tokens,
			TargetTokens: d.LossFnInputs.TargetTokens,
			Weights:      f32(d.LossFnInputs.Weights),
			Logprobs:     f32(d.LossFnInputs.Logprobs),
			Advantages:   f32(d.LossFnInputs.Advantages),
		}
	}
	return out, nil
}

func optimCall(ctx context.Context, sess Session, body []byte) (protocol.SessionResponse, error) {
	var req protocol.OptimStepRequest
	if err := decodeBody(body, &req); err != nil {
		return protocol.SessionResponse{}, err
	}
	p := trainer.DefaultAdamParams()
	if a := req.AdamParams; a != nil {
		for _, f := range []struct {
			dst *float64
			v   *float64
		}{{&p.LearningRate, a.LearningRate}, {&p.Beta1, a.Beta1}, {&p.Beta2, a.Beta2}, {&p.Eps, a.Eps},
			{&p.WeightDecay, a.WeightDecay}, {&p.GradClipNorm, a.GradClipNorm}} {
			if f.v != nil {
				*f.dst = *f.v
			}
		}
	}
	res, err := sess.OptimStep(ctx, p)
	if err != nil {
		return protocol.SessionResponse{}, err
	}
	g := res.GradNorm
	return answer(protocol.OptimStepResponse{Step: res.Step, LearningRate: res.LearningRate, GradNorm: res.GradNorm},
		protocol.Usage{}, &protocol.Figures{Step: res.Step, LearningRate: res.LearningRate, GradNorm: &g})
}

func sampleCall(ctx context.Context, sess Session, body []byte) (protocol.SessionResponse, error) {
	var req protocol.SampleRequest
	if err := decodeBody(body, &req); err != nil {
		return protocol.SessionResponse{}, err
	}
	prompts, err := toPrompts(req.Prompts, sess.Tokenizer())
	if err != nil {
		return protocol.SessionResponse{}, err
	}
	num := 1
	if req.NumSamples != nil {
		num = *req.NumSamples
	}
	params, err := toSampling(req.SamplingParams)
	if err != nil {
		return protocol.SessionResponse{}, err
	}
	res, err := sess.Sample(ctx, prompts, num, params)
	if err != nil {
		return protocol.SessionResponse{}, err
	}
	var usage protocol.Usage
	for _, p := range prompts {
		usage.PrefillTokens += int64(len(p))
	}
	out := protocol.SampleResponse{Samples: make([][]protocol.Sample, len(res))}
	for i, group := range res {
		out.Samples[i] = make([]protocol.Sample, len(group))
		for j, s := range group {
			out.Samples[i][j] = protocol.Sample{Tokens: s.Tokens, Text: s.Text, Logprobs: f64(s.Logprobs), StopReason: s.StopReason}
			usage.SampledTokens += int64(len(s.Tokens))
		}
	}
	return answer(out, usage, nil)
}

// toPrompts gives each prompt's tokens: as sent, or its text encoded by
// trainer's one prompt converter.
func toPrompts(ps []protocol.Prompt, tok Tokenizer) ([][]int, error) {
	if len(ps) == 0 {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "prompts is empty: send at least one prompt")
	}
	out := make([][]int, len(ps))
	for i, p := range ps {
		switch {
		case len(p.Tokens) > 0 && p.Text != "":
			return nil, protocol.UserErrorf(ErrInvalidRequest, "prompts[%d] has both tokens and text: give one of them", i)
		case len(p.Tokens) > 0:
			out[i] = p.Tokens
		case p.Text == "":
			return nil, protocol.UserErrorf(ErrInvalidRequest, "prompts[%d] is empty: give tokens or text", i)
		case tok == nil:
			return nil, protocol.UserErrorf(ErrInvalidRequest, "prompts[%d].text cannot be read: the model has no tokenizer; send tokens", i)
		default:
			out[i] = trainer.EncodePrompt(tok, p.Text)
		}
	}
	return out, nil
}

// toSampling fills the API's defaults (temperature 1, top_k off, top_p 1).
func toSampling(sp protocol.SamplingParams) (trainer.SamplingParams, error) {
	for i, st := range sp.Stop {
		if st == "" {
			return trainer.SamplingParams{}, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.stop[%d] is an empty string: remove it or give the text to stop at", i)
		}
	}
	p := trainer.SamplingParams{MaxTokens: sp.MaxTokens, Temperature: 1, TopP: 1, Stop: sp.Stop, StopTokens: sp.StopTokens}
	if sp.Temperature != nil {
		p.Temperature = float32(*sp.Temperature)
	}
	if sp.TopK != nil {
		p.TopK = *sp.TopK // ≤ 0 is off, as the API's -1
	}
	if sp.TopP != nil {
		p.TopP = float32(*sp.TopP)
	}
	if sp.Seed != nil {
		p.Seed = *sp.Seed
	}
	return p, nil
}

// answer encodes a compute call's response with its usage and figures.
func answer(v any, usage protocol.Usage, fig *protocol.Figures) (protocol.SessionResponse, error) {
	resp, err := bodyResponse(v, usage, nil)
	resp.Figures = fig
	return resp, err
}

func f32(x []float64) []float32 {
	if x == nil {
		return nil
	}
	out := make([]float32, len(x))
	for i, v := range x {
		out[i] = float32(v)
	}
	return out
}

func f64(x []float32) []float64 {
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = float64(v)
	}
	return out
}
