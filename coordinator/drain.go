package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/hashicorp/raft"

	"github.com/signal-p2p/signal/protocol"
)

// RecordDrained records, through raft, the checkpoints a gracefully
// stopping node saved while draining, so that failover resumes its runs
// from them rather than from their last automatic checkpoint. Each is
// recorded only while its run is still assigned to peerID (ready or
// moving) and is not older than the run's recorded step; the others are
// skipped and counted out. On a follower it asks the leader.
func (c *Coordinator) RecordDrained(ctx context.Context, peerID string, cps []protocol.Checkpoint) (int, error) {
	if c.raft.State() == raft.Leader {
		return c.recordDrained(ctx, peerID, cps)
	}
	url, err := c.leaderURL()
	if err != nil {
		return 0, err
	}
	body, err := json.Marshal(recordDrainedRequest{PeerID: peerID, Checkpoints: cps})
	if err != nil {
		return 0, fmt.Errorf("record drained: %w", err)
	}
	var out recordDrainedResponse
	if err := c.postAdmin(ctx, url+"/v1/cluster/record_drained", body, &out); err != nil {
		return 0, err
	}
	return out.Recorded, nil
}

func (c *Coordinator) recordDrained(ctx context.Context, peerID string, cps []protocol.Checkpoint) (int, error) {
	if peerID == "" {
		return 0, fmt.Errorf("record drained: peer id required: %w", ErrInvalidRequest)
	}
	if !c.IsJoined(peerID) {
		return 0, fmt.Errorf("record drained: node %s has not joined: %w", peerID, ErrUnauthorized)
	}
	rep := protocol.DrainReport{PeerID: peerID, Checkpoints: cps}
	if err := rep.Validate(); err != nil {
		return 0, fmt.Errorf("record drained: %w: %w", err, ErrInvalidRequest)
	}
	log := c.log.With("category", "infrastructure", "node", peerID)
	recorded := 0
	for i := range cps {
		cp := cps[i]
		// A draining node is a stranger too: its checkpoint must be of this
		// run, at the run's step, inside the network's store.
		var rec *RunRecord
		var ok bool
		c.fsm.read(func(s *State) { rec, ok = s.Run(cp.RunID) })
		if !ok {
			log.Info("drain checkpoint skipped", "run", cp.RunID, "reason", "unknown run")
			continue
		}
		if err := c.checkCheckpoint(rec.Run, cp, rec.Run.Step, ""); err != nil {
			log.Warn("drain checkpoint refused", "category", "security", "run", cp.RunID, "err", err)
			continue
		}
		cp.CreatedAt, cp.Node = now(), peerID
		// The run's own record (ExpectNode, CheckpointIfNewer) decides
		// inside the raft apply, so a move or a newer call racing the
		// report cannot be overwritten.
		_, err := c.propose(ctx, cmdUpdateRun, RunUpdate{
			RunID: cp.RunID, Checkpoint: &cp, ExpectNode: peerID, CheckpointIfNewer: true,
			ExpectStatus: []string{protocol.RunReady, protocol.RunMoving}, Time: now(),
		})
		switch {
		case err == nil:
			recorded++
			log.Info("drain checkpoint recorded", "run", cp.RunID, "step", cp.Step, "checkpoint", cp.ID)
		case errors.Is(err, ErrConflict), errors.Is(err, ErrNotFound):
			log.Info("drain checkpoint skipped", "run", cp.RunID, "step", cp.Step, "reason", err)
		default:
			return recorded, fmt.Errorf("record drain checkpoint of run %s: %w", cp.RunID, err)
		}
	}
	return recorded, nil
}

func (c *Coordinator) handleRecordDrained(cl *call) (any, error) {
	var req recordDrainedRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	n, err := c.recordDrained(cl.r.Context(), req.PeerID, req.Checkpoints)
	if err != nil {
		return nil, err
	}
	return recordDrainedResponse{Recorded: n}, nil
}

type recordDrainedRequest struct {
	PeerID      string                `json:"peer_id"`
	Checkpoints []protocol.Checkpoint `json:"checkpoints"`
}

type recordDrainedResponse struct {
	Recorded int `json:"recorded"`
}
