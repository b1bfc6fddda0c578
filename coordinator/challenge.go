package coordinator

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/signal-p2p/signal/audit"
	"github.com/signal-p2p/signal/protocol"
)

// Capacity challenges: a node's advert (GPUs, memory, session limits) is
// its own claim, so the leader measures what a node does. When a node is
// first seen and every ChallengeInterval after, it gets a challenge: a
// training step (forward_backward) on a random-weight model the node
// generates from a seed the leader picks (protocol.RandomModel: the same
// bytes on every node, and nothing a node could have computed before the
// seed was drawn), with an adapter and tokens from the same seed, in a
// session of its own.
// The leader times it (its clock: tokens per second, network included)
// and gives the same challenge to a node of another operator: outputs that
// disagree beyond the audit tolerances are a failed audit (refund,
// quarantine), as a spot-check's are. Placement orders nodes by measured
// throughput, not by what they advertise.

// defaultChallengeInterval is how often a node is measured again.
const defaultChallengeInterval = 10 * time.Minute

// challengeSeqs and challengeLen shape a challenge: 2 × 64 tokens.
const (
	challengeSeqs = 2
	challengeLen  = 64
)

// challengeModel is the challenge's model for seed: Llama-shaped, 5.3M
// weights (10 MB in bf16), a few seconds of a small CPU's time to
// generate and step, a moment of a GPU's.
func challengeModel(seed uint64) protocol.RandomModel {
	return protocol.RandomModel{Seed: int64(seed >> 1), HiddenSize: 256, IntermediateSize: 688, Layers: 4, Heads: 4, KVHeads: 2,
		VocabSize: 4096, Context: 256}
}

// challengeModelName names the challenge's model in records.
func challengeModelName(m protocol.RandomModel) string {
	return fmt.Sprintf("random-%dx%d", m.HiddenSize, m.Layers)
}

// measureCmd records what was measured of a node: its throughput (a
// challenge: TokensPerSec > 0), or the memory a session open showed it
// has (MemoryProven: it held a model that large) or lacks (MemoryCeiling:
// it could not hold one that large).
type measureCmd struct {
	PeerID       string  `json:"peer_id"`
	Model        string  `json:"model"`
	TokensPerSec float64 `json:"tokens_per_sec"`
	// Verified says another operator's node reproduced the outputs.
	Verified      bool   `json:"verified"`
	MemoryProven  int64  `json:"memory_proven,omitempty"`
	MemoryCeiling int64  `json:"memory_ceiling,omitempty"`
	Time          string `json:"time"`
}

// RecordMeasure stores what was measured of a node.
func (s *State) RecordMeasure(c measureCmd) {
	rec := s.nodeAudits[c.PeerID]
	rec.PeerID = c.PeerID
	if c.TokensPerSec > 0 {
		rec.TokensPerSec, rec.MeasuredModel, rec.MeasuredAt, rec.MeasureVerified = c.TokensPerSec, c.Model, c.Time, c.Verified
	}
	if c.MemoryProven > rec.MemoryProven {
		rec.MemoryProven = c.MemoryProven
		if rec.MemoryCeiling > 0 && rec.MemoryCeiling <= rec.MemoryProven {
			rec.MemoryCeiling, rec.MemoryCeilingAt = 0, ""
		}
	}
	if c.MemoryCeiling > 0 {
		rec.MemoryCeiling, rec.MemoryCeilingAt = c.MemoryCeiling, c.Time
	}
	s.nodeAudits[c.PeerID] = rec
}

func (c *Coordinator) challengeInterval() time.Duration {
	if c.cfg.ChallengeInterval > 0 {
		return c.cfg.ChallengeInterval
	}
	return defaultChallengeInterval
}

// challengeLoop measures nodes while this member leads: one challenge at
// a time, the node measured longest ago (or never) first.
func (c *Coordinator) challengeLoop(ctx context.Context) {
	if c.cfg.ChallengeInterval < 0 {
		return
	}
	interval := c.challengeInterval()
	// tried holds when a node's last challenge could not run (a full node,
	// an engine that cannot open a generated model): it is not tried again
	// before a quarter interval.
	tried := map[string]time.Time{}
	every(ctx, min(interval/4, 2*time.Second), func() {
		n, ok := c.dueForChallenge(interval, func(peer string) bool { return time.Since(tried[peer]) < interval/4 })
		if !ok {
			return
		}
		if err := c.challenge(ctx, n); err != nil && ctx.Err() == nil {
			tried[n.PeerID] = time.Now()
			c.log.Info("challenge not run", "category", "audit", "node", n.PeerID, "err", err)
		}
	})
}

// dueForChallenge picks the live, joined, unquarantined node with an
// engine and a free session whose measurement is oldest, if it is older
// than interval (and waiting does not hold it back).
func (c *Coordinator) dueForChallenge(interval time.Duration, waiting func(peer string) bool) (protocol.Node, bool) {
	nodes := c.nodesBackend().Nodes()
	var best protocol.Node
	var bestAt time.Time
	found := false
	c.fsm.read(func(s *State) {
		for _, n := range nodes {
			if _, joined := s.Node(n.PeerID); !joined || s.Quarantined(n.PeerID) || len(n.Backends) == 0 || waiting(n.PeerID) {
				continue
			}
			if n.MaxSessions > 0 && n.Sessions >= n.MaxSessions {
				continue // a user's runs come first; measured when a slot frees
			}
			at, measured := recordTime(s.nodeAudits[n.PeerID].MeasuredAt)
			if measured && time.Since(at) < interval {
				continue
			}
			if !found || !measured || at.Before(bestAt) {
				best, bestAt, found = n, at, true
				if !measured {
					bestAt = time.Time{}
				}
			}
		}
	})
	return best, found
}

// challengeBody is a challenge's batch: tokens from the seed (ids every
// vocabulary has), every position weighted.
func challengeBody(seed uint64) protocol.ForwardBackwardRequest {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	var req protocol.ForwardBackwardRequest
	for range challengeSeqs {
		ids := make([]int, challengeLen+1)
		for j := range ids {
			ids[j] = 3 + r.IntN(253)
		}
		d := protocol.Datum{ModelInput: protocol.ModelInput{Tokens: ids[:challengeLen]}}
		d.LossFnInputs.TargetTokens = ids[1:]
		for range challengeLen {
			d.LossFnInputs.Weights = append(d.LossFnInputs.Weights, 1)
		}
		req.Data = append(req.Data, d)
	}
	return req
}

// runChallenge runs one challenge on node in a session of its own and
// returns its answer and how long the training step took.
func (c *Coordinator) runChallenge(ctx context.Context, node string, seed uint64) (protocol.ForwardBackwardResponse, time.Duration, error) {
	var out protocol.ForwardBackwardResponse
	runID := "challenge_" + newID(6)
	model := challengeModel(seed)
	spec := protocol.SessionSpec{RunID: runID, BaseModel: challengeModelName(model), RandomModel: &model,
		LoRARank: 4, LoRAAlpha: 8, TargetModules: allModules, Seed: int64(seed >> 1)}
	do := func(call protocol.Call, v any) (protocol.SessionResponse, error) {
		body, err := json.Marshal(v)
		if err != nil {
			return protocol.SessionResponse{}, err
		}
		resp, err := c.nodesBackend().Do(ctx, node, protocol.SessionRequest{RequestID: runID + "/" + string(call), RunID: runID, Call: call, Body: body})
		if err == nil && resp.Error != nil {
			err = nodeError(resp.Error)
		}
		return resp, err
	}
	if _, err := do(protocol.CallInit, spec); err != nil {
		return out, 0, fmt.Errorf("open the challenge's session: %w", err)
	}
	defer func() { _, _ = do(protocol.CallClose, struct{}{}) }()
	start := time.Now()
	resp, err := do(protocol.CallForwardBackward, challengeBody(seed))
	took := time.Since(start)
	if err != nil {
		return out, took, fmt.Errorf("the challenge's forward_backward: %w", err)
	}
	if err := json.Unmarshal(resp.Body, &out); err != nil {
		return out, took, fmt.Errorf("the challenge's answer: %v: %w", err, ErrBadNodeAnswer)
	}
	return out, took, nil
}

// challenge measures node and checks its outputs against a node of
// another operator.
func (c *Coordinator) challenge(ctx context.Context, n protocol.Node) error {
	seed := rand.Uint64()
	claimed, took, err := c.runChallenge(ctx, n.PeerID, seed)
	if err != nil {
		return err
	}
	var operator string
	c.fsm.read(func(s *State) { rec, _ := s.Node(n.PeerID); operator = rec.Operator })
	tps := float64(challengeSeqs*challengeLen) / max(took.Seconds(), 1e-6)
	// Another operator's node runs the same challenge. A disagreement is
	// confirmed by a node of a third operator where one is live (as an
	// audit's is): one lying validator cannot get an honest node
	// quarantined when a third opinion exists.
	verified := false
	var dissent *protocol.Node
	var dissentCheck audit.Check
	for _, v := range c.validatorsWhere(n.PeerID, map[string]bool{operator: true}, func(protocol.Node) bool { return true }) {
		if dissent != nil && v.Operator == dissent.Operator {
			continue
		}
		replay, _, err := c.runChallenge(ctx, v.PeerID, seed)
		if err != nil {
			continue // another validator, or none: the measure stands unverified
		}
		check := audit.CompareForward(claimed, replay, true, audit.DefaultTolerances())
		if check.Passed {
			if dissent != nil {
				c.log.Warn("a second validator overturned a challenge's disagreement", "category", "audit", "node", n.PeerID, "first", dissent.PeerID, "second", v.PeerID)
			}
			verified, dissent = true, nil
			break
		}
		if dissent != nil {
			dissent, dissentCheck = &v, check // confirmed
			break
		}
		dissent, dissentCheck = &v, check
	}
	if dissent != nil {
		dissentCheck.Reason = "capacity challenge: " + dissentCheck.Reason
		c.auditor.record(ctx, auditJob{id: "chal_" + newID(8), run: RunRecord{Run: protocol.Run{ID: "challenge"}}, node: n.PeerID, call: "challenge"},
			dissent.PeerID, dissentCheck, dissent.Operator, 0, "")
		return nil
	}
	name := challengeModelName(challengeModel(seed))
	_, err = c.propose(ctx, cmdMeasure, measureCmd{PeerID: n.PeerID, Model: name, TokensPerSec: tps, Verified: verified, Time: now()})
	if err == nil {
		c.log.Info("node measured", "category", "audit", "node", n.PeerID, "model", name, "tokens_per_sec", tps, "verified", verified)
	}
	return err
}
