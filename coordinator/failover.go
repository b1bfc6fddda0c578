package coordinator

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// failoverLoop runs on the leader: it notices runs whose node left the
// backend's node list (for longer than NodeLostAfter), was reported lost
// by a call or was quarantined by a failed audit, and moves them. It also resumes moves a previous leader left
// half done (runs in status moving).
func (c *Coordinator) failoverLoop(ctx context.Context) {
	period := c.cfg.NodeLostAfter / 10
	if period < 50*time.Millisecond {
		period = 50 * time.Millisecond
	}
	if period > time.Second {
		period = time.Second
	}
	t := time.NewTicker(period)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c.releaseStaleHolds(ctx)
		live := map[string]bool{}
		for _, n := range c.nodesBackend().Nodes() {
			live[n.PeerID] = true
		}
		var runs []*RunRecord
		quarantined := map[string]bool{}
		c.fsm.read(func(s *State) {
			runs = s.ActiveRuns()
			for _, r := range runs {
				if s.Quarantined(r.Run.Node) {
					quarantined[r.Run.Node] = true
				}
			}
		})
		nowT := time.Now()
		c.movingMu.Lock()
		for _, r := range runs {
			id := r.Run.ID
			if c.moving[id] {
				continue
			}
			due := r.Run.Status == protocol.RunMoving
			if !due && r.Run.Status == protocol.RunReady && r.Run.Node != "" {
				m, seen := c.missing[id]
				if seen && m.node != r.Run.Node {
					// The mark is about a node the run has left since (a
					// call to the dead node failed after the move): moving
					// the run off its new, healthy node would be wrong.
					delete(c.missing, id)
					seen = false
				}
				// A node a failed audit quarantined loses its runs now,
				// as if a call had found it lost.
				reported := (seen && m.since.IsZero()) || quarantined[r.Run.Node]
				switch {
				case live[r.Run.Node] && !reported:
					delete(c.missing, id)
				case !seen && !reported:
					c.missing[id] = lostMark{node: r.Run.Node, since: nowT}
				case reported || nowT.Sub(m.since) >= c.cfg.NodeLostAfter:
					due = true
				}
			}
			if !due {
				continue
			}
			c.moving[id] = true
			delete(c.missing, id)
			wg.Add(1)
			go func(r *RunRecord) {
				defer wg.Done()
				c.moveRun(ctx, r)
				c.movingMu.Lock()
				delete(c.moving, r.Run.ID)
				c.movingMu.Unlock()
			}(r)
		}
		c.movingMu.Unlock()
	}
}

// lostMark is why the failover loop suspects a run's node: which node (a
// mark about a node the run has left since is stale and dropped) and since
// when it is missing from the backend's list; a zero since means a call
// found the node lost, so the run moves at the next tick.
type lostMark struct {
	node  string
	since time.Time
}

// moveRun marks a run moving, places it on another node and reopens its
// session from the last checkpoint. On failure the run stays moving and
// the next tick tries again.
func (c *Coordinator) moveRun(ctx context.Context, r *RunRecord) {
	// A retry finds the run assigned to the node its last attempt tried;
	// the node it was lost from is the one to keep away from.
	lost := r.Run.Node
	c.movingMu.Lock()
	if from, ok := c.lostFrom[r.Run.ID]; ok && r.Run.Status == protocol.RunMoving {
		lost = from
	} else {
		c.lostFrom[r.Run.ID] = lost
	}
	c.movingMu.Unlock()
	log := c.log.With("category", "infrastructure", "run", r.Run.ID, "lost_node", lost)
	if r.Run.Status != protocol.RunMoving {
		if _, err := c.propose(ctx, cmdUpdateRun, RunUpdate{RunID: r.Run.ID, Status: protocol.RunMoving, ExpectStatus: []string{protocol.RunReady}, Time: now()}); err != nil {
			log.Warn("mark run moving", "err", err)
			return
		}
	}
	model, err := c.models.get(r.Run.BaseModel)
	if err != nil {
		log.Error("moving run of unknown model", "err", err)
		return
	}
	resume, tried := c.nextResume(r)
	if resume == nil && tried == 0 && len(r.Run.Checkpoints) > 0 {
		// Every checkpoint is a quarantined node's word alone.
		log.Warn("no checkpoint of the run is covered by a passed audit: it starts over from a fresh adapter", "checkpoints", len(r.Run.Checkpoints))
	}
	if resume == nil && tried > 0 {
		// Every checkpoint failed to restore: starting over at step 0 would
		// silently throw the user's training away, so the run fails, saying why.
		reason := fmt.Sprintf("moving off lost node %s: none of the run's %d checkpoints could be restored (last: %s)", lost, tried, c.lastBadCheckpoint(r.Run.ID))
		if _, err := c.propose(ctx, cmdUpdateRun, RunUpdate{RunID: r.Run.ID, Status: protocol.RunFailed, Reason: reason, ExpectStatus: []string{protocol.RunMoving}, Time: now()}); err != nil {
			log.Warn("mark run failed", "err", err)
			return
		}
		c.forgetBadCheckpoints(r.Run.ID)
		c.metrics.moves.WithLabelValues("failed").Inc()
		log.Error("run failed: no checkpoint restores", "reason", reason)
		return
	}
	spec := protocol.SessionSpec{RunID: r.Run.ID, BaseModel: r.Run.BaseModel, LoRARank: r.Run.LoRARank, LoRAAlpha: r.Run.LoRAAlpha,
		TargetModules: r.Run.TargetModules, Seed: r.Seed, CheckpointEvery: r.Run.CheckpointEvery, LRSchedule: r.LRSchedule}
	rec, err := c.openSession(ctx, spec, model, resume, true, map[string]bool{lost: true})
	if err != nil {
		if resume != nil && !errors.Is(err, ErrUnavailable) && !errors.Is(err, ErrNoCapacity) && !errors.Is(err, ErrNodeLost) && ctx.Err() == nil {
			// A node answered, and refused this checkpoint: the next try
			// falls back to the one before it.
			c.markBadCheckpoint(r.Run.ID, resume.ID, err)
		}
		c.metrics.moves.WithLabelValues("retry").Inc()
		log.Warn("run move failed; will retry", "err", err)
		return
	}
	c.forgetBadCheckpoints(r.Run.ID)
	c.metrics.moves.WithLabelValues("moved").Inc()
	log.Info("run moved", "node", rec.Run.Node, "resumed_from_step", rec.Run.Step)
}

// nextResume is the checkpoint a move resumes from: the newest full one,
// then older full ones, then adapter-only ones, skipping those a node
// already refused in this leader's moves. tried counts the skipped; nil
// with tried > 0 means every checkpoint was refused.
func (c *Coordinator) nextResume(r *RunRecord) (*protocol.Checkpoint, int) {
	c.movingMu.Lock()
	bad := c.badCheckpoints[r.Run.ID]
	c.movingMu.Unlock()
	// A checkpoint a quarantined node made after its last passed audit
	// is its word alone: a liar's adapter, or trained on its lies. A move
	// skips those (a node with no passed audit vouches for none of its
	// own), to the newest checkpoint a pass covers or another node made.
	untrusted := map[string]bool{}
	c.fsm.read(func(s *State) {
		for _, cp := range r.Run.Checkpoints {
			if cp.Node == "" || !s.Quarantined(cp.Node) {
				continue
			}
			if last := s.nodeAudits[cp.Node].LastPassed; last == "" || !checkpointBefore(cp.CreatedAt, last) {
				untrusted[cp.ID] = true
			}
		}
	})
	var order []protocol.Checkpoint
	for _, mode := range []string{"full", "adapter"} {
		for i := len(r.Run.Checkpoints) - 1; i >= 0; i-- {
			if cp := r.Run.Checkpoints[i]; cp.Mode == mode && !untrusted[cp.ID] {
				order = append(order, cp)
			}
		}
	}
	tried := 0
	for _, cp := range order {
		if _, refused := bad[cp.ID]; refused {
			tried++
			continue
		}
		return &cp, tried
	}
	return nil, tried
}

func (c *Coordinator) markBadCheckpoint(runID, cpID string, err error) {
	c.movingMu.Lock()
	defer c.movingMu.Unlock()
	if c.badCheckpoints[runID] == nil {
		c.badCheckpoints[runID] = map[string]string{}
	}
	c.badCheckpoints[runID][cpID] = err.Error()
	c.lastBad[runID] = cpID + ": " + err.Error()
}

func (c *Coordinator) lastBadCheckpoint(runID string) string {
	c.movingMu.Lock()
	defer c.movingMu.Unlock()
	return c.lastBad[runID]
}

func (c *Coordinator) forgetBadCheckpoints(runID string) {
	c.movingMu.Lock()
	defer c.movingMu.Unlock()
	delete(c.badCheckpoints, runID)
	delete(c.lastBad, runID)
	delete(c.lostFrom, runID)
}

// releaseStaleHolds frees holds no call will settle: those another member
// placed (its calls cannot commit a charge now that it is not leader) and
// those older than CallTimeout plus a minute (a charge or release that
// failed to commit).
func (c *Coordinator) releaseStaleHolds(ctx context.Context) {
	var stale []string
	cutoff := time.Now().Add(-c.cfg.CallTimeout - time.Minute)
	c.fsm.read(func(s *State) {
		for _, h := range s.holds {
			t, err := time.Parse(time.RFC3339Nano, h.Time)
			if h.Holder != c.cfg.ID || err != nil || t.Before(cutoff) {
				stale = append(stale, h.ID)
			}
		}
	})
	if len(stale) == 0 {
		return
	}
	sort.Strings(stale)
	if _, err := c.propose(ctx, cmdReleaseHolds, releaseHoldsCmd{IDs: stale}); err != nil {
		c.log.Warn("release stale holds", "category", "billing", "holds", len(stale), "err", err)
		return
	}
	c.log.Info("released stale holds", "category", "billing", "holds", len(stale))
}

// markLost asks the failover loop to move a run off node now. node is the
// node the failed call went to: by the time the call fails the run may have
// moved already, and the loop then ignores the mark.
func (c *Coordinator) markLost(runID, node string) {
	c.movingMu.Lock()
	c.missing[runID] = lostMark{node: node}
	c.movingMu.Unlock()
}

// checkpointBefore says whether a checkpoint made at created (RFC 3339)
// predates an audit passed at passed: a time that does not parse is not.
func checkpointBefore(created, passed string) bool {
	a, ok1 := recordTime(created)
	b, ok2 := recordTime(passed)
	return ok1 && ok2 && !a.After(b)
}
