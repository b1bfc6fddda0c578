package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/signal-p2p/signal/protocol"
)

// createRun records a run for account under its quotas and opens its
// session on a node. A run that could not be placed anywhere is refused
// before it is recorded; one whose session fails to open is recorded as
// failed.
func (c *Coordinator) createRun(ctx context.Context, account string, req *protocol.CreateRunRequest) (protocol.Run, error) {
	spec, model, err := c.validateCreateRun(req)
	if err != nil {
		return protocol.Run{}, err
	}
	if _, err := c.place(model, nil); err != nil {
		return protocol.Run{}, retryAfter(c.withOpenRuns(err, account), c.cfg.RetryAfter)
	}
	spec.RunID = "run_" + newID(8)
	rec := RunRecord{
		Run: protocol.Run{ID: spec.RunID, Name: req.Name, BaseModel: spec.BaseModel, LoRARank: spec.LoRARank,
			LoRAAlpha: spec.LoRAAlpha, TargetModules: spec.TargetModules, Status: protocol.RunStarting,
			CheckpointEvery: spec.CheckpointEvery, CreatedAt: now()},
		Owner: account, Seed: spec.Seed, LRSchedule: spec.LRSchedule, LastActive: now(),
	}
	if _, err := c.propose(ctx, cmdCreateRunLimited, createRunLimitedCmd{Run: rec, MaxActive: c.cfg.MaxRunsPerAccount, MinAvailable: c.cfg.MinRunBalance}); err != nil {
		if errors.Is(err, ErrTooManyRuns) {
			err = retryAfter(err, c.cfg.RetryAfter)
		}
		return protocol.Run{}, err
	}
	run, err := c.openSession(ctx, spec, model, nil, false, map[string]bool{})
	if err != nil {
		// The run exists; record why it has no session.
		_, _ = c.propose(context.WithoutCancel(ctx), cmdUpdateRun, RunUpdate{RunID: spec.RunID, Status: protocol.RunFailed, Time: now()})
		return protocol.Run{}, err
	}
	return run.Run, nil
}

// withOpenRuns adds to a full network's refusal how many runs account
// holds: freeing one of its own is what the caller can do about it.
func (c *Coordinator) withOpenRuns(err error, account string) error {
	var open int
	c.fsm.read(func(s *State) {
		for _, r := range s.RunsOf(account) {
			if isActive(r.Run.Status) {
				open++
			}
		}
	})
	if open == 0 {
		return err
	}
	return &protocol.UserError{Msg: fmt.Sprintf("%s; you hold %d open runs (DELETE /v1/runs/{id} frees one)", protocol.UserMessage(err), open), Err: err}
}

// endRun closes rec's session on its node and records the run ended.
func (c *Coordinator) endRun(ctx context.Context, rec *RunRecord) (protocol.Run, error) {
	if rec.Run.Status == protocol.RunEnded {
		return rec.Run, nil
	}
	if rec.Run.Node != "" && rec.Run.Status != protocol.RunFailed {
		resp, err := c.nodesBackend().Do(ctx, rec.Run.Node, protocol.SessionRequest{RequestID: rec.Run.ID + "/close", RunID: rec.Run.ID, Call: protocol.CallClose})
		// A lost node has no session left to free; the run ends anyway.
		if err != nil && !errors.Is(err, ErrNodeLost) {
			return protocol.Run{}, fmt.Errorf("close run %s on %s: %w", rec.Run.ID, rec.Run.Node, err)
		}
		if err == nil && resp.Error != nil && resp.Error.Code != protocol.CodeNotFound {
			return protocol.Run{}, nodeError(resp.Error)
		}
	}
	v, err := c.propose(ctx, cmdUpdateRun, RunUpdate{RunID: rec.Run.ID, Status: protocol.RunEnded, Time: now()})
	if err != nil {
		return protocol.Run{}, err
	}
	return v.(*RunRecord).Run, nil
}

// loadState restores one of the caller's checkpoints into rec on its node
// and records the step it left the run at.
func (c *Coordinator) loadState(cl *call, rec *RunRecord, req protocol.LoadStateRequest) (protocol.Run, error) {
	if req.Checkpoint == "" {
		return protocol.Run{}, protocol.UserErrorf(ErrInvalidRequest, "field checkpoint: required (an id, URI or CID)")
	}
	var cp protocol.Checkpoint
	var src *RunRecord
	var ok bool
	c.fsm.read(func(s *State) { cp, src, ok = s.OwnedCheckpoint(cl.account, req.Checkpoint) })
	if !ok {
		return protocol.Run{}, protocol.UserErrorf(ErrNotFound, "field checkpoint: %q is not a checkpoint of your runs (GET /v1/runs/{id} lists them by id)", req.Checkpoint)
	}
	if src.Run.BaseModel != rec.Run.BaseModel || src.Run.LoRARank != rec.Run.LoRARank || !slices.Equal(src.Run.TargetModules, rec.Run.TargetModules) {
		return protocol.Run{}, fmt.Errorf("field checkpoint: %s holds a %s adapter of rank %d on %v, run %s is %s rank %d on %v; create a run with the checkpoint's settings to load it: %w",
			cp.ID, src.Run.BaseModel, src.Run.LoRARank, src.Run.TargetModules, rec.Run.ID, rec.Run.BaseModel, rec.Run.LoRARank, rec.Run.TargetModules, ErrInvalidRequest)
	}
	// The node gets the recorded reference, never the caller's string.
	req.Checkpoint = cp.URI
	if req.Checkpoint == "" {
		req.Checkpoint = cp.ID
	}
	body, _ := json.Marshal(req)
	ctx := cl.r.Context()
	// The run's state is replaced: its audit trail no longer leads to it.
	c.auditor.forget(rec.Run.ID)
	resp, err := c.doRun(ctx, cl, rec, protocol.CallLoadState, body)
	if err != nil {
		return protocol.Run{}, err
	}
	var out struct {
		Step *int `json:"step"`
	}
	_ = json.Unmarshal(resp.Body, &out)
	v, err := c.propose(ctx, cmdUpdateRun, RunUpdate{RunID: rec.Run.ID, Step: out.Step, Time: now()})
	if err != nil {
		return protocol.Run{}, err
	}
	return v.(*RunRecord).Run, nil
}
