package coordinator

import (
	"context"
	"math/big"
	"sort"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// storageLoop runs on the leader: every StorageBillInterval it bills the
// checkpoints' storage since the last bill, collects the checkpoints of
// runs ended longer than CheckpointRetention ago, and prunes the records of
// runs ended longer than that plus RunRetention (issue 13, item 11). A
// checkpoint's first hour is billed by the call that wrote it.
func (c *Coordinator) storageLoop(ctx context.Context) {
	every(ctx, c.cfg.StorageBillInterval, func() { c.storageTick(ctx, time.Now()) })
}

func (c *Coordinator) storageTick(ctx context.Context, at time.Time) {
	var runs []*RunRecord
	c.fsm.read(func(s *State) {
		for _, r := range s.runs {
			runs = append(runs, r)
		}
	})
	sort.Slice(runs, func(i, j int) bool { return runs[i].Run.ID < runs[j].Run.ID })
	stamp := at.UTC().Format(time.RFC3339Nano)
	var collected, prune []string
	for _, r := range runs {
		ended, isEnded := recordTime(r.EndedAt)
		switch {
		case isEnded && len(r.Run.Checkpoints) == 0 && at.Sub(ended) > c.cfg.CheckpointRetention+c.cfg.RunRetention:
			prune = append(prune, r.Run.ID)
			continue
		case len(r.Run.Checkpoints) == 0:
			continue
		}
		c.billStorage(ctx, r, at, stamp)
		if isEnded && at.Sub(ended) > c.cfg.CheckpointRetention {
			if _, err := c.propose(ctx, cmdUpdateRun, RunUpdate{RunID: r.Run.ID, DropCheckpoints: true, Time: stamp}); err != nil {
				c.log.Warn("collect checkpoints", "category", "infrastructure", "run", r.Run.ID, "err", err)
				continue
			}
			for _, cp := range r.Run.Checkpoints {
				collected = append(collected, cp.URI)
				for _, f := range cp.Files {
					collected = append(collected, f.URI)
				}
			}
		}
	}
	if len(prune) > 0 {
		if _, err := c.propose(ctx, cmdPruneRuns, pruneRunsCmd{IDs: prune}); err != nil {
			c.log.Warn("prune ended runs", "category", "infrastructure", "err", err)
		}
	}
	c.deleteUnreferenced(ctx, collected)
}

// billStorage charges a run's owner for its checkpoints' bytes from the
// later of each one's first hour and the run's last bill, up to at.
func (c *Coordinator) billStorage(ctx context.Context, r *RunRecord, at time.Time, stamp string) {
	model, err := c.models.get(r.Run.BaseModel)
	if err != nil || model.Prices.StorageMicroCreditsPerGBHour <= 0 {
		return
	}
	billedTo, _ := recordTime(r.StorageBilledTo)
	var credits int64
	for _, cp := range r.Run.Checkpoints {
		created, ok := recordTime(cp.CreatedAt)
		if !ok {
			continue
		}
		from := created.Add(time.Hour)
		if billedTo.After(from) {
			from = billedTo
		}
		if !at.After(from) {
			continue
		}
		credits = satAdd(credits, storageCost(checkpointBytes(cp), model.Prices.StorageMicroCreditsPerGBHour, at.Sub(from)))
	}
	if credits == 0 {
		return
	}
	_, err = c.propose(ctx, cmdCharge, chargeCmd{
		Account: r.Owner, FeeBPS: c.cfg.FeeBasisPoints, Cost: protocol.Cost{MicroCredits: credits},
		RunID: r.Run.ID, Call: "storage", Time: stamp,
		RunUpdate: &RunUpdate{RunID: r.Run.ID, StorageBilledTo: stamp, Time: stamp},
	})
	if err != nil {
		c.log.Warn("bill storage", "category", "billing", "run", r.Run.ID, "err", err)
	}
}

func checkpointBytes(cp protocol.Checkpoint) int64 {
	var n int64
	for _, f := range cp.Files {
		n += max(f.Size, 0)
	}
	return n
}

// storageCost is ceil(bytes × pricePerGBHour × d / (1 GB × 1 h)).
func storageCost(bytes, pricePerGBHour int64, d time.Duration) int64 {
	if bytes <= 0 || pricePerGBHour <= 0 || d <= 0 {
		return 0
	}
	num := new(big.Int).Mul(big.NewInt(bytes), big.NewInt(pricePerGBHour))
	num.Mul(num, big.NewInt(int64(d)))
	den := new(big.Int).Mul(big.NewInt(bytesPerGB), big.NewInt(int64(time.Hour)))
	q, m := new(big.Int).QuoRem(num, den, new(big.Int))
	if m.Sign() > 0 {
		q.Add(q, big.NewInt(1))
	}
	if !q.IsInt64() {
		return 1<<63 - 1
	}
	return q.Int64()
}

// deleteUnreferenced deletes collected URIs that no remaining checkpoint
// names: files are content-addressed, so two runs may share one.
func (c *Coordinator) deleteUnreferenced(ctx context.Context, uris []string) {
	if len(uris) == 0 || c.cfg.DeleteCheckpointFiles == nil {
		return
	}
	live := map[string]bool{}
	c.fsm.read(func(s *State) {
		for _, r := range s.runs {
			for _, cp := range r.Run.Checkpoints {
				live[cp.URI] = true
				for _, f := range cp.Files {
					live[f.URI] = true
				}
			}
		}
	})
	var dead []string
	seen := map[string]bool{}
	for _, u := range uris {
		if u != "" && !live[u] && !seen[u] {
			seen[u] = true
			dead = append(dead, u)
		}
	}
	if len(dead) == 0 {
		return
	}
	if err := c.cfg.DeleteCheckpointFiles(ctx, dead); err != nil {
		c.log.Warn("delete collected checkpoint files", "category", "infrastructure", "files", len(dead), "err", err)
		return
	}
	c.log.Info("collected checkpoint files deleted", "category", "infrastructure", "files", len(dead))
}
