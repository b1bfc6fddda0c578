package coordinator

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// idleLoop runs on the leader: a ready run with no billed call for
// IdleRunTTL holds a session slot for nothing, so it is saved (a full
// checkpoint, which load_state on a new run resumes) and ended.
func (c *Coordinator) idleLoop(ctx context.Context) {
	period := min(max(c.cfg.IdleRunTTL/4, 10*time.Millisecond), time.Minute)
	every(ctx, period, func() {
		var idle []*RunRecord
		cutoff := time.Now().Add(-c.cfg.IdleRunTTL)
		c.fsm.read(func(s *State) {
			for _, r := range s.ActiveRuns() {
				if last, ok := recordTime(r.LastActive); ok && r.Run.Status == protocol.RunReady && last.Before(cutoff) {
					idle = append(idle, r)
				}
			}
		})
		for _, r := range idle {
			if err := c.closeIdle(ctx, r.Run.ID); err != nil {
				c.log.Warn("close idle run", "category", "infrastructure", "run", r.Run.ID, "err", err)
			}
		}
	})
}

// closeIdle saves and ends one idle run, in the run's turn so no call of
// the user's runs beside it.
func (c *Coordinator) closeIdle(ctx context.Context, runID string) error {
	done, err := c.gates.acquire(ctx, runID)
	if err != nil {
		return err
	}
	defer done()
	var rec *RunRecord
	var ok bool
	c.fsm.read(func(s *State) { rec, ok = s.Run(runID) })
	if !ok || rec.Run.Status != protocol.RunReady {
		return nil
	}
	if last, dated := recordTime(rec.LastActive); !dated || time.Since(last) < c.cfg.IdleRunTTL {
		return nil // a call came in meanwhile
	}
	body, _ := json.Marshal(protocol.SaveStateRequest{Mode: "full"})
	resp, err := c.nodesBackend().Do(ctx, rec.Run.Node, protocol.SessionRequest{RequestID: runID + "/idle-save/" + newID(4), RunID: runID, Call: protocol.CallSaveState, Body: body})
	if err == nil && resp.Error != nil {
		err = nodeError(resp.Error)
	}
	if err != nil {
		return fmt.Errorf("save before closing: %w", err)
	}
	u, err := c.runUpdateFor(rec.Run, protocol.CallSaveState, resp)
	if err != nil {
		return err
	}
	if _, err := c.propose(ctx, cmdUpdateRun, u); err != nil {
		return err
	}
	if resp, err := c.nodesBackend().Do(ctx, rec.Run.Node, protocol.SessionRequest{RequestID: runID + "/close", RunID: runID, Call: protocol.CallClose}); err == nil && resp.Error != nil {
		c.log.Warn("close idle run's session", "category", "infrastructure", "run", runID, "err", nodeError(resp.Error))
	}
	reason := fmt.Sprintf("closed after %v without a call; saved as checkpoint %s: load_state it on a new run to go on", c.cfg.IdleRunTTL, u.Checkpoint.ID)
	_, err = c.propose(ctx, cmdUpdateRun, RunUpdate{RunID: runID, Status: protocol.RunEnded, Reason: reason, ExpectStatus: []string{protocol.RunReady}, Time: now()})
	if err == nil {
		c.log.Info("idle run saved and ended", "category", "infrastructure", "run", runID, "checkpoint", u.Checkpoint.ID)
	}
	return err
}
