package coordinator

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/signal-p2p/signal/protocol"
)

// maxPipelineCalls bounds one pipeline.
const maxPipelineCalls = 8

// pipelineCalls are the calls a pipeline may hold: the billed session
// calls, each run through its own route's handler.
var pipelineCalls = map[string]protocol.Call{
	"forward": protocol.CallForward, "forward_backward": protocol.CallForwardBackward,
	"optim_step": protocol.CallOptimStep, "sample": protocol.CallSample, "save_state": protocol.CallSaveState,
}

// handlePipeline is POST /v1/runs/{id}/pipeline: a run's calls in order,
// in one round trip. Each runs exactly as its own route runs it (quote,
// hold, node, charge) under an idempotency key of its own, derived from the
// request's Idempotency-Key: a retry after a failure (or a lost answer)
// is answered from the records for the calls that ran and runs the rest.
// The first call that fails stops the pipeline; its error names it.
func (c *Coordinator) handlePipeline(cl *call) (any, error) {
	var req protocol.PipelineRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	if n := len(req.Calls); n == 0 || n > maxPipelineCalls {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "calls has %d calls: give 1 to %d", n, maxPipelineCalls)
	}
	for i, pc := range req.Calls {
		if _, ok := pipelineCalls[pc.Call]; !ok {
			return nil, protocol.UserErrorf(ErrInvalidRequest, "calls[%d].call %q is not a pipeline call: use forward, forward_backward, optim_step, sample or save_state", i, pc.Call)
		}
	}
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	key := cl.r.Header.Get(idempotencyHeader)
	if key == "" {
		key = newID(16)
	} else if len(key) > maxIdempotencyKeyLen {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "the Idempotency-Key header is longer than %d characters: use a shorter key", maxIdempotencyKeyLen)
	}
	out := protocol.PipelineResponse{Results: make([]json.RawMessage, 0, len(req.Calls))}
	for i, pc := range req.Calls {
		body := pc.Body
		if len(body) == 0 {
			body = json.RawMessage(`{}`)
		}
		path := "/v1/runs/" + rec.Run.ID + "/" + pc.Call
		ans, err := c.internalCall(cl.r.Context(), cl.account, fmt.Sprintf("pipeline:%s:%d", key, i), http.MethodPost, path, rec.Run.ID, body, c.billed(pipelineCalls[pc.Call]))
		if err != nil {
			return nil, pipelineErr(i, pc.Call, err)
		}
		out.Results = append(out.Results, ans)
	}
	return out, nil
}

// pipelineErr names the failed call in the user's sentence, keeping its
// sentinel (and so its status) and its Retry-After.
func pipelineErr(i int, name string, err error) error {
	var re *retryError
	wrapped := fmt.Errorf("calls[%d] (%s): %w", i, name, err)
	var ue *protocol.UserError
	if errors.As(err, &ue) {
		wrapped = &protocol.UserError{Msg: fmt.Sprintf("calls[%d] (%s): %s", i, name, ue.Msg), Err: err}
	}
	if errors.As(err, &re) {
		return retryAfter(wrapped, re.after)
	}
	return wrapped
}
