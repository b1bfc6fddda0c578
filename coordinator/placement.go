package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// place picks the node for a run of model among the backend's live nodes:
// joined, not quarantined, not excluded, with an engine backend up, a free session slot and the memory the model
// needs (or the model already loaded); nodes with the model loaded first,
// then the least work per unit of measured throughput (sessions + 1 over
// the tokens/s a capacity challenge measured: an advert's claims do not
// count), then the fewest sessions. It fails with ErrNoCapacity.
//
// Load is the count of sessions, not their share of max_sessions: a node's
// max_sessions is its own claim, and a node claiming a thousand slots must
// not look empty next to honest ones and win every placement.
//
// A node's session count is the larger of its last advert's and the
// registry's active runs placed on it: adverts come every few seconds, so a
// burst of new runs counted from adverts alone would all land on the node
// that looked emptiest, past its session limit.
func (c *Coordinator) place(model ModelSpec, exclude map[string]bool) (protocol.Node, error) {
	var joined map[string]bool
	assigned := map[string]int{}
	measured := map[string]float64{}
	nodes := c.nodesBackend().Nodes()
	c.fsm.read(func(s *State) {
		joined = make(map[string]bool, len(nodes))
		for _, n := range nodes {
			// A node a failed audit quarantined takes no runs; nor does
			// one that could not hold a model this large lately, whatever
			// its advert says.
			if _, ok := s.Node(n.PeerID); ok && !s.Quarantined(n.PeerID) && !tooSmall(s.nodeAudits[n.PeerID], memoryOn(n, model)) {
				joined[n.PeerID] = true
			}
			if tps := s.nodeAudits[n.PeerID].TokensPerSec; tps > 0 {
				measured[n.PeerID] = tps
			}
		}
		for _, r := range s.ActiveRuns() {
			if r.Run.Node != "" {
				assigned[r.Run.Node]++
			}
		}
	})
	return placeOn(nodes, model, assigned, measured, func(id string) bool { return joined[id] && !exclude[id] })
}

// noteMemory records what a session open showed of node's memory: a
// model it could not hold is its ceiling (placement.go's tooSmall), one it
// held raises what it has proven. Adverts are a node's own claims; these
// are what it did.
func (c *Coordinator) noteMemory(ctx context.Context, node protocol.Node, model ModelSpec, err error) {
	need := memoryOn(node, model)
	if need <= 0 || (err != nil && !errors.Is(err, errNodeOutOfMemory)) {
		return
	}
	cmd := measureCmd{PeerID: node.PeerID, Model: model.Name, Time: now()}
	if err != nil {
		cmd.MemoryCeiling = need
		c.log.Warn("node could not hold a model its advert has room for", "category", "placement", "node", node.PeerID, "model", model.Name, "bytes", need)
	} else {
		var proven int64
		c.fsm.read(func(s *State) { proven = s.nodeAudits[node.PeerID].MemoryProven })
		if need <= proven {
			return
		}
		cmd.MemoryProven = need
	}
	if _, err := c.propose(ctx, cmdMeasure, cmd); err != nil {
		c.log.Warn("record a node's memory", "category", "placement", "node", node.PeerID, "err", err)
	}
}

// memoryCeilingTTL is how long a node's failure to hold a model keeps
// models that large off it: its other sessions may end and free memory.
const memoryCeilingTTL = time.Hour

// tooSmall says whether rec's measured memory ceiling rules out a model
// needing need bytes.
func tooSmall(rec NodeAuditRecord, need int64) bool {
	if rec.MemoryCeiling <= 0 || need < rec.MemoryCeiling {
		return false
	}
	at, ok := recordTime(rec.MemoryCeilingAt)
	return ok && time.Since(at) < memoryCeilingTTL
}

// placeOn is the placement rule, without the coordinator (tests drive it).
// assigned counts the registry's active runs per node; measured is the
// nodes' measured tokens/s (a node not yet measured counts as the slowest
// measured one: it has shown nothing).
func placeOn(nodes []protocol.Node, model ModelSpec, assigned map[string]int, measured map[string]float64, eligible func(peerID string) bool) (protocol.Node, error) {
	type cand struct {
		n      protocol.Node
		loaded bool
		load   float64
		work   float64 // (load + 1) / measured throughput
	}
	var cs []cand
	var down, full, small, busy, slots int
	for _, n := range nodes {
		if !eligible(n.PeerID) {
			continue
		}
		// A node advertises no backend while its engine's worker is down:
		// it is alive but would fail every init.
		if len(n.Backends) == 0 {
			down++
			continue
		}
		sessions := max(n.Sessions, assigned[n.PeerID])
		if n.MaxSessions > 0 && sessions >= n.MaxSessions {
			full++
			busy, slots = busy+sessions, slots+n.MaxSessions
			continue
		}
		loaded := slices.Contains(n.Models, model.Name)
		// A node that serves the model from its disk is trusted to fit it,
		// unless its own figure says otherwise.
		_, reported := n.ModelMemory[model.Name]
		if (reported || !loaded) && !fits(n, memoryOn(n, model)) {
			small++
			continue
		}
		cs = append(cs, cand{n: n, loaded: loaded, load: float64(sessions)})
	}
	if len(cs) == 0 {
		// Say what is missing: sessions, memory or a working engine.
		var why []string
		if full > 0 {
			why = append(why, fmt.Sprintf("%d full (%d/%d sessions busy)", full, busy, slots))
		}
		if small > 0 {
			why = append(why, fmt.Sprintf("%d without the %d bytes model %s needs", small, model.MemoryBytes, model.Name))
		}
		if down > 0 {
			why = append(why, fmt.Sprintf("%d with no engine running", down))
		}
		if len(why) == 0 {
			why = append(why, "none live")
		}
		return protocol.Node{}, protocol.UserErrorf(ErrNoCapacity, "no node can take a run of %s now: of %d nodes, %s; retry later", model.Name, len(nodes), strings.Join(why, ", "))
	}
	slowest := 0.0
	for _, c := range cs {
		if t := measured[c.n.PeerID]; t > 0 && (slowest == 0 || t < slowest) {
			slowest = t
		}
	}
	for i := range cs {
		tps := measured[cs[i].n.PeerID]
		if tps <= 0 {
			tps = slowest
		}
		if tps <= 0 {
			tps = 1 // nothing measured yet: the load alone decides
		}
		cs[i].work = (cs[i].load + 1) / tps
	}
	sort.SliceStable(cs, func(i, j int) bool {
		a, b := cs[i], cs[j]
		if a.loaded != b.loaded {
			return a.loaded
		}
		if a.work != b.work {
			return a.work < b.work
		}
		if a.load != b.load {
			return a.load < b.load
		}
		return a.n.PeerID < b.n.PeerID
	})
	return cs[0].n, nil
}

// fits reports whether a node has the memory for a model: free memory on
// one GPU, or total memory on a CPU-only node.
// memoryOn is what model needs on node n: the node's own figure when its
// advert has one (its engine's precision), else the model's estimate.
func memoryOn(n protocol.Node, model ModelSpec) int64 {
	if b, ok := n.ModelMemory[model.Name]; ok && b > 0 {
		return b
	}
	return model.MemoryBytes
}

func fits(n protocol.Node, need int64) bool {
	if need <= 0 {
		return true
	}
	if len(n.GPUs) > 0 {
		for _, g := range n.GPUs {
			if g.MemoryFree >= need {
				return true
			}
		}
		return false
	}
	return n.CPU.MemoryTotal >= need
}

// openSession places spec on a node (not in exclude), sends init and marks
// the run ready there. It tries further nodes when one is lost.
// When moved is set the run restarts at the checkpoint's step (0 without
// one) and records it as resumed_from_step.
func (c *Coordinator) openSession(ctx context.Context, spec protocol.SessionSpec, model ModelSpec, resume *protocol.Checkpoint, moved bool, exclude map[string]bool) (*RunRecord, error) {
	spec.ResumeFrom = resume
	body, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		node, err := c.place(model, exclude)
		if err != nil {
			if lastErr != nil {
				err = &protocol.UserError{Msg: fmt.Sprintf("no node could open a run of %s: %d tried, the last said: %s; retry later",
					spec.BaseModel, len(exclude), protocol.UserMessage(lastErr)), Err: err}
			}
			return nil, retryAfter(err, c.cfg.RetryAfter)
		}
		peer := node.PeerID
		if _, err := c.propose(ctx, cmdUpdateRun, RunUpdate{RunID: spec.RunID, Node: &peer, Time: now()}); err != nil {
			return nil, err
		}
		resp, err := c.nodesBackend().Do(ctx, peer, protocol.SessionRequest{RequestID: spec.RunID + "/init/" + newID(4), RunID: spec.RunID, Call: protocol.CallInit, Body: body})
		if err == nil && resp.Error != nil {
			err = nodeError(resp.Error)
			if !errors.Is(err, ErrUnavailable) {
				return nil, err
			}
		}
		c.noteMemory(ctx, node, model, err)
		if err != nil {
			if errors.Is(err, ErrNodeLost) || errors.Is(err, ErrUnavailable) {
				exclude[peer] = true
				lastErr = err
				continue
			}
			return nil, fmt.Errorf("init run %s on %s: %w", spec.RunID, peer, err)
		}
		u := RunUpdate{RunID: spec.RunID, Status: protocol.RunReady, Time: now()}
		if moved {
			step := 0
			if resume != nil {
				step = resume.Step
			}
			u.Step, u.ResumedFromStep = &step, &step
			u.ExpectStatus = []string{protocol.RunMoving}
		}
		v, err := c.propose(ctx, cmdUpdateRun, u)
		if err != nil {
			return nil, err
		}
		return v.(*RunRecord), nil
	}
	return nil, retryAfter(protocol.UserErrorf(ErrNoCapacity, "no node could open a run of %s: %d tried, the last said: %s; retry later", spec.BaseModel, len(exclude), protocol.UserMessage(lastErr)), c.cfg.RetryAfter)
}
