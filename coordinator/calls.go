package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/signal-p2p/signal/coordinator/p2p"
	"github.com/signal-p2p/signal/protocol"
)

// runUsable refuses calls on runs that have no ready session.
func runUsable(rec *RunRecord, retry time.Duration) error {
	switch rec.Run.Status {
	case protocol.RunReady:
		return nil
	case protocol.RunStarting, protocol.RunMoving:
		return retryAfter(protocol.UserErrorf(ErrUnavailable, "run %s is %s (its session is opening on a node); retry in a moment", rec.Run.ID, rec.Run.Status), retry)
	default:
		why := ""
		if rec.Run.StatusReason != "" {
			why = " (" + rec.Run.StatusReason + ")"
		}
		return protocol.UserErrorf(ErrConflict, "run %s is %s%s: create a new run, and load_state a checkpoint into it to go on", rec.Run.ID, rec.Run.Status, why)
	}
}

// requestID is the node-side idempotency id: derived from the client's
// Idempotency-Key when there is one, so a retry through a new leader is
// executed once by the node too.
func requestID(cl *call) string {
	if cl.idem != nil {
		h := sha256.Sum256([]byte(cl.idem.Scope + "\x00" + cl.idem.BodyHash))
		return hex.EncodeToString(h[:16])
	}
	return newID(16)
}

// doRun sends one call to the run's node; a lost node starts the run's move
// and answers 503.
func (c *Coordinator) doRun(ctx context.Context, cl *call, rec *RunRecord, callName protocol.Call, body []byte) (protocol.SessionResponse, error) {
	resp, err := c.nodesBackend().Do(ctx, rec.Run.Node, protocol.SessionRequest{RequestID: requestID(cl), RunID: rec.Run.ID, Call: callName, Body: body})
	if err != nil {
		if errors.Is(err, ErrNodeLost) {
			c.markLost(rec.Run.ID, rec.Run.Node)
			return resp, retryAfter(fmt.Errorf("run %s: node %s lost; the run is moving: %w", rec.Run.ID, rec.Run.Node, err), c.cfg.RetryAfter)
		}
		if errors.Is(err, p2p.ErrResponseTooLarge) {
			return resp, protocol.UserErrorf(ErrTooLarge, "the answer to %s is larger than a node may send (%v); send fewer items or tokens per call", callName, err)
		}
		if errors.Is(err, p2p.ErrBadResponse) {
			return resp, fmt.Errorf("run %s call %s: %v: %w", rec.Run.ID, callName, err, ErrBadNodeAnswer)
		}
		return resp, fmt.Errorf("run %s call %s: %w", rec.Run.ID, callName, err)
	}
	if resp.Error != nil {
		return resp, nodeError(resp.Error)
	}
	return resp, nil
}

// billed returns the handler of a billed session call: quote the call from
// its request, hold the quote through raft, run it on the node, and charge
// what the coordinator counts (never above the quote) in one entry that
// also releases the hold.
func (c *Coordinator) billed(callName protocol.Call) handlerFunc {
	return func(cl *call) (any, error) {
		rec, err := c.ownedRun(cl)
		if err != nil {
			return nil, err
		}
		if err := runUsable(rec, c.cfg.RetryAfter); err != nil {
			return nil, err
		}
		model, err := c.models.get(rec.Run.BaseModel)
		if err != nil {
			return nil, err
		}
		q, err := quoteCall(callName, cl.body, model, rec.Run, c.textCounter(model))
		if err != nil {
			return nil, err
		}
		ctx := cl.r.Context()
		// A call quoted at nothing (an optim_step without a checkpoint)
		// holds nothing: no raft entry for it on the call path.
		var hold HoldRecord
		if q.credits > 0 {
			hold = HoldRecord{ID: "hold_" + newID(8), Account: cl.account, Amount: q.credits, Holder: c.cfg.ID, Time: now()}
			if _, err := c.propose(ctx, cmdHold, hold); err != nil {
				return nil, err
			}
		}
		// From here the call is the coordinator's to finish: a client that
		// hangs up does not make work done free, nor leave the hold behind.
		work, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.CallTimeout)
		defer cancel()
		release := func() {
			if hold.ID == "" {
				return
			}
			if _, err := c.propose(work, cmdReleaseHolds, releaseHoldsCmd{IDs: []string{hold.ID}}); err != nil {
				c.log.Warn("release hold", "category", "billing", "hold", hold.ID, "err", err)
			}
		}
		// Wait for the run's earlier calls; a client that leaves meanwhile
		// takes its call with it, before any node sees it.
		done, err := c.gates.acquire(ctx, rec.Run.ID)
		if err != nil {
			release()
			return nil, fmt.Errorf("client gone before the call started: %w", err)
		}
		defer done()
		// The run as the earlier calls left it (step, node, status).
		if rec, err = c.ownedRun(cl); err == nil {
			err = runUsable(rec, c.cfg.RetryAfter)
		}
		if err != nil {
			release()
			return nil, err
		}
		body := cl.body
		if len(body) == 0 {
			body = []byte("{}")
		}
		if q.unseeded {
			if body, err = seedSample(body); err != nil {
				release()
				return nil, err
			}
		}
		// Whether this call is audited is decided now, unpredictably; the
		// node learns it only after answering (audit.go).
		audited := c.auditor.choose(rec, callName, model)
		resp, err := c.doRun(work, cl, rec, callName, body)
		if err != nil {
			release()
			return nil, err
		}
		usage := q.settle(resp.Usage)
		cost := priceUsage(model.Prices, usage)
		cost.MicroCredits = min(cost.MicroCredits, q.credits)
		update, err := c.runUpdateFor(rec.Run, callName, resp)
		if err != nil {
			release()
			return nil, err
		}
		// A stranger's answer that is not a JSON object is refused before
		// anything is charged: after the charge the leader must answer.
		respBody := resp.Body
		if len(respBody) == 0 {
			respBody = json.RawMessage("{}")
		}
		if !isJSONObject(respBody) {
			release()
			return nil, fmt.Errorf("node %s answer is not a JSON object: %w", callName, ErrBadNodeAnswer)
		}
		// The body rides the raft log only when a replay must be answered
		// from it (an Idempotency-Key); the FSM then records the billed answer.
		var recordBody json.RawMessage
		if cl.idem != nil {
			recordBody = respBody
		}
		var operator string
		c.fsm.read(func(s *State) {
			if n, ok := s.Node(rec.Run.Node); ok {
				operator = n.Operator
			}
		})
		// With audits on, the operator's share is held in the node's
		// escrow until audits release it.
		var node string
		if c.cfg.AuditRate > 0 {
			node = rec.Run.Node
		}
		v, err := c.propose(work, cmdCharge, chargeCmd{
			Account: cl.account, Operator: operator, FeeBPS: c.cfg.FeeBasisPoints, Cost: cost,
			RunID: rec.Run.ID, Call: string(callName), Time: now(), Idem: cl.idem, Body: recordBody, RunUpdate: &update,
			HoldID: hold.ID, Node: node,
		})
		if err != nil {
			return nil, err
		}
		res := v.(ChargeResult)
		if !res.Replayed {
			c.metrics.charges.Inc()
			c.metrics.credits.Add(float64(res.Cost.MicroCredits))
		}
		if c.cfg.AuditRate > 0 && !res.Replayed {
			if audited && callName != protocol.CallOptimStep {
				c.auditor.commit(work, rec, model, callName, body, respBody, res.Cost.MicroCredits)
			}
			tc := TrailCall{Call: callName, Body: append(json.RawMessage(nil), body...), Answer: respBody, Cost: res.Cost.MicroCredits}
			c.auditor.follow(work, rec, model, callName, tc, update.Checkpoint, audited)
		}
		if ctx.Err() != nil {
			c.log.Info("call finished and charged after the client left", "category", "billing", "run", rec.Run.ID, "call", callName, "credits", res.Cost.MicroCredits)
		}
		out := res.Body
		if out == nil {
			if out, err = billedBody(respBody, res.Cost, res.Balance, res.PendingBatches); err != nil {
				return nil, err
			}
		}
		return rawResponse{status: res.Status, body: out, replayed: res.Replayed}, nil
	}
}

// seedSample gives a sample request without a seed (quoteCall validated
// it and found none) one from crypto/rand.
// The user asked for a random draw and gets one; every engine draws a
// seeded sample the same way (trainer/gumbel), so a validator can redraw
// it and an audit can tell a sample drawn from the model from tokens made
// up with their true logprobs. The node cannot tell the coordinator's
// seeds from a user's.
func seedSample(body []byte) ([]byte, error) {
	var req, sp map[string]json.RawMessage
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, fmt.Errorf("seed a sample request: %w", err)
	}
	if raw, ok := req["sampling_params"]; ok {
		if err := json.Unmarshal(raw, &sp); err != nil {
			return nil, fmt.Errorf("seed a sample request: %w", err)
		}
	}
	if sp == nil {
		sp = map[string]json.RawMessage{}
	}
	sp["seed"] = json.RawMessage(strconv.FormatInt(randSeed(), 10))
	raw, err := json.Marshal(sp)
	if err != nil {
		return nil, err
	}
	req["sampling_params"] = raw
	return json.Marshal(req)
}

// runUpdateFor extracts what the run record keeps from a call's answer.
// A node is a stranger, so a checkpoint is recorded only from the calls
// that make one (save_state; optim_step's automatic full checkpoint), for
// this run at the step the call leaves it, and inside the network's store:
// anything else is refused (save_state) or dropped (optim_step), never
// written into the run for a later move to fetch.
func (c *Coordinator) runUpdateFor(run protocol.Run, callName protocol.Call, resp protocol.SessionResponse) (RunUpdate, error) {
	u := RunUpdate{RunID: run.ID, Time: now()}
	switch callName {
	case protocol.CallForwardBackward:
		f, err := figures(resp, callName)
		if err != nil {
			return u, err
		}
		w := f.WeightSum
		u.Loss, u.Tokens, u.Weight = &f.LossSum, f.Tokens, &w
	case protocol.CallOptimStep:
		f, err := figures(resp, callName)
		if err != nil {
			return u, err
		}
		grad := 0.0
		if f.GradNorm != nil {
			grad = *f.GradNorm
		}
		u.Optim = &OptimFigures{Step: f.Step, LearningRate: f.LearningRate, GradNorm: grad}
		if cp := resp.Checkpoint; cp != nil {
			if err := c.checkCheckpoint(run, *cp, u.Optim.Step, "full"); err != nil {
				c.log.Warn("node's automatic checkpoint dropped", "category", "security", "run", run.ID, "node", run.Node, "err", err)
			} else {
				stamped := *cp
				stamped.CreatedAt, stamped.Node = u.Time, run.Node
				u.Checkpoint = &stamped
			}
		}
	case protocol.CallSaveState:
		cp := resp.Checkpoint
		if cp == nil {
			return u, fmt.Errorf("node save_state answer: no checkpoint: %w", ErrBadNodeAnswer)
		}
		if err := c.checkCheckpoint(run, *cp, run.Step, ""); err != nil {
			return u, err
		}
		stamped := *cp
		stamped.CreatedAt = u.Time // storage is billed by the coordinator's clock
		stamped.Node = run.Node
		u.Checkpoint = &stamped
	}
	return u, nil
}

// checkCheckpoint says whether a node's checkpoint may be recorded in run:
// its run, step and mode (empty: adapter or full) and every URI inside
// the network's store.
func (c *Coordinator) checkCheckpoint(run protocol.Run, cp protocol.Checkpoint, step int, mode string) error {
	switch {
	case cp.ID == "" || len(cp.ID) > maxNameLen:
		return fmt.Errorf("node checkpoint: id %q: %w", cp.ID, ErrBadNodeAnswer)
	case cp.RunID != run.ID:
		return fmt.Errorf("node checkpoint %s: for run %q, not %s: %w", cp.ID, cp.RunID, run.ID, ErrBadNodeAnswer)
	case cp.Step != step && cp.Step != step+1:
		// step+1: an optim_step that ran beside a save_state.
		return fmt.Errorf("node checkpoint %s: step %d, the run is at %d: %w", cp.ID, cp.Step, step, ErrBadNodeAnswer)
	case mode != "" && cp.Mode != mode, cp.Mode != "adapter" && cp.Mode != "full":
		return fmt.Errorf("node checkpoint %s: mode %q: %w", cp.ID, cp.Mode, ErrBadNodeAnswer)
	}
	uris := []string{cp.URI}
	for _, f := range cp.Files {
		uris = append(uris, f.URI)
	}
	for _, u := range uris {
		if !c.inStore(u) {
			return fmt.Errorf("node checkpoint %s: URI %q is outside the network's store %v: %w", cp.ID, u, c.cfg.CheckpointStores, ErrBadNodeAnswer)
		}
	}
	return nil
}

// inStore says whether uri names an object inside one of the network's
// checkpoint stores. With none configured (a development cluster) only
// plain file and s3 URIs pass: never one that names its own endpoint.
func (c *Coordinator) inStore(uri string) bool {
	if len(c.cfg.CheckpointStores) == 0 {
		u, err := url.Parse(uri)
		return err == nil && (u.Scheme == "file" || u.Scheme == "s3") && u.RawQuery == "" && !strings.Contains(u.Path, "/../")
	}
	for _, prefix := range c.cfg.CheckpointStores {
		if strings.HasPrefix(uri, strings.TrimRight(prefix, "/")+"/") && !strings.Contains(uri[len(prefix):], "..") {
			return true
		}
	}
	return false
}

// figures are a compute answer's typed figures; the coordinator reads
// nothing else of the node's answer. A weight sum that is not a finite,
// non-negative number is a node's lie or bug: it would poison the run's
// mean loss, so the answer is refused.
func figures(resp protocol.SessionResponse, call protocol.Call) (protocol.Figures, error) {
	f := resp.Figures
	if f == nil {
		return protocol.Figures{}, fmt.Errorf("node %s answer: no figures: %w", call, ErrBadNodeAnswer)
	}
	if !(f.WeightSum >= 0) || math.IsInf(f.WeightSum, 0) || math.IsNaN(f.LossSum) || math.IsInf(f.LossSum, 0) || f.Tokens < 0 {
		return protocol.Figures{}, fmt.Errorf("node %s answer: figures %+v: %w", call, *f, ErrBadNodeAnswer)
	}
	return *f, nil
}

// isJSONObject reports whether b is one well-formed JSON object.
func isJSONObject(b []byte) bool {
	b = bytes.TrimLeft(b, " \t\r\n")
	return len(b) > 0 && b[0] == '{' && json.Valid(b)
}
