package coordinator

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// failoverLoop runs on the leader: it notices runs whose node left the
// backend's node list (for longer than NodeLostAfter) or was reported lost
// by a call, and moves them. It also resumes moves a previous leader left
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
		c.fsm.read(func(s *State) { runs = s.ActiveRuns() })
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
				reported := seen && m.since.IsZero()
				switch {
				case live[r.Run.Node] && !reported:
					delete(c.missing, id)
				case !seen:
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
	lost := r.Run.Node
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
	resume := lastCheckpoint(r.Run.Checkpoints)
	spec := protocol.SessionSpec{RunID: r.Run.ID, BaseModel: r.Run.BaseModel, LoRARank: r.Run.LoRARank, LoRAAlpha: r.Run.LoRAAlpha,
		TargetModules: r.Run.TargetModules, Seed: r.Seed, CheckpointEvery: r.Run.CheckpointEvery, LRSchedule: r.LRSchedule}
	rec, err := c.openSession(ctx, spec, model, resume, true, map[string]bool{lost: true})
	if err != nil {
		c.metrics.moves.WithLabelValues("retry").Inc()
		log.Warn("run move failed; will retry", "err", err)
		return
	}
	c.metrics.moves.WithLabelValues("moved").Inc()
	log.Info("run moved", "node", rec.Run.Node, "resumed_from_step", rec.Run.Step)
}

// lastCheckpoint is the newest full checkpoint (adapter + optimizer), or
// the newest adapter-only one when there is no full one.
func lastCheckpoint(cps []protocol.Checkpoint) *protocol.Checkpoint {
	for i := len(cps) - 1; i >= 0; i-- {
		if cps[i].Mode == "full" {
			cp := cps[i]
			return &cp
		}
	}
	if len(cps) > 0 {
		cp := cps[len(cps)-1]
		return &cp
	}
	return nil
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
