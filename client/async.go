package client

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"

	"github.com/signal-p2p/signal/protocol"
)

// Future is a call's answer to come: Wait blocks for it.
type Future[T any] struct {
	done chan struct{}
	v    T
	err  error
}

// Wait returns the call's answer, or ctx's error if ctx ends first (the
// call goes on).
func (f *Future[T]) Wait(ctx context.Context) (T, error) {
	select {
	case <-f.done:
		return f.v, f.err
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}

// Done is closed once the answer is in.
func (f *Future[T]) Done() <-chan struct{} { return f.done }

// async runs fn after every call this run submitted before it, and
// returns its future at once: a run's submitted calls run one at a time in
// submission order, as the run itself does on its node.
func async[T any](r *Run, ctx context.Context, fn func(context.Context) (T, error)) *Future[T] {
	f := &Future[T]{done: make(chan struct{})}
	r.qmu.Lock()
	prev := r.tail
	r.tail = f.done
	r.qmu.Unlock()
	go func() {
		defer close(f.done)
		if prev != nil {
			select {
			case <-prev:
			case <-ctx.Done():
				f.err = ctx.Err()
				return
			}
		}
		f.v, f.err = fn(ctx)
	}()
	return f
}

// ForwardBackwardAsync submits a ForwardBackward and returns at once.
func (r *Run) ForwardBackwardAsync(ctx context.Context, req protocol.ForwardBackwardRequest) *Future[*protocol.ForwardBackwardResponse] {
	return async(r, ctx, func(ctx context.Context) (*protocol.ForwardBackwardResponse, error) {
		return r.ForwardBackward(ctx, req)
	})
}

// OptimStepAsync submits an OptimStep and returns at once.
func (r *Run) OptimStepAsync(ctx context.Context, req protocol.OptimStepRequest) *Future[*protocol.OptimStepResponse] {
	return async(r, ctx, func(ctx context.Context) (*protocol.OptimStepResponse, error) { return r.OptimStep(ctx, req) })
}

// SampleAsync submits a Sample and returns at once.
func (r *Run) SampleAsync(ctx context.Context, req protocol.SampleRequest) *Future[*protocol.SampleResponse] {
	return async(r, ctx, func(ctx context.Context) (*protocol.SampleResponse, error) { return r.Sample(ctx, req) })
}

// StepResult is one training step's two answers.
type StepResult struct {
	ForwardBackward *protocol.ForwardBackwardResponse
	OptimStep       *protocol.OptimStepResponse
}

// TrainStepAsync submits a TrainStep and returns at once: a loop can
// prepare its next batch while this step runs.
func (r *Run) TrainStepAsync(ctx context.Context, fb protocol.ForwardBackwardRequest, opt protocol.OptimStepRequest) *Future[StepResult] {
	return async(r, ctx, func(ctx context.Context) (StepResult, error) {
		f, o, err := r.TrainStep(ctx, fb, opt)
		return StepResult{f, o}, err
	})
}

// Pipeline sends calls for the run to make in order, in one round trip
// (POST /v1/runs/{id}/pipeline), and returns each call's answer. A retry
// (the client's, on a lost answer) is answered for the calls that ran and
// runs the rest; the first failure stops it and names the call.
func (r *Run) Pipeline(ctx context.Context, calls []protocol.PipelineCall) ([]json.RawMessage, error) {
	if len(calls) == 0 {
		return nil, fmt.Errorf("%w: calls is empty", ErrInvalidArgument)
	}
	var out protocol.PipelineResponse
	if err := r.post(ctx, "/pipeline", protocol.PipelineRequest{Calls: calls}, &out); err != nil {
		return nil, err
	}
	if len(out.Results) != len(calls) {
		return nil, fmt.Errorf("pipeline of %d calls answered %d results", len(calls), len(out.Results))
	}
	return out.Results, nil
}

// TrainStep is one training step, forward_backward then optim_step, in one
// round trip.
func (r *Run) TrainStep(ctx context.Context, fb protocol.ForwardBackwardRequest, opt protocol.OptimStepRequest) (*protocol.ForwardBackwardResponse, *protocol.OptimStepResponse, error) {
	if err := checkBatch(fb); err != nil {
		return nil, nil, err
	}
	fbBody, err := json.Marshal(fb)
	if err != nil {
		return nil, nil, err
	}
	optBody, err := json.Marshal(opt)
	if err != nil {
		return nil, nil, err
	}
	res, err := r.Pipeline(ctx, []protocol.PipelineCall{{Call: "forward_backward", Body: fbBody}, {Call: "optim_step", Body: optBody}})
	if err != nil {
		return nil, nil, err
	}
	var f protocol.ForwardBackwardResponse
	var o protocol.OptimStepResponse
	if err := json.Unmarshal(res[0], &f); err != nil {
		return nil, nil, fmt.Errorf("forward_backward answer: %w", err)
	}
	if err := json.Unmarshal(res[1], &o); err != nil {
		return nil, nil, fmt.Errorf("optim_step answer: %w", err)
	}
	r.addSpent(&f.Billed)
	r.addSpent(&o.Billed)
	r.mu.Lock()
	r.info.Step = o.Step
	r.mu.Unlock()
	return &f, &o, nil
}

// runQueue is the Run's part for async: the done channel of the last call
// submitted.
type runQueue struct {
	qmu  sync.Mutex
	tail chan struct{}
}
