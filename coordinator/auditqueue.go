package coordinator

import (
	"encoding/json"
	"sort"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// Pending audits are raft records: once the node committed the state an
// audited call ran on, the audit is owed, whichever member leads when a
// validator gets to it. A leader that dies between the commit and the
// verdict used to lose the audit with its memory (and the node its
// check); now the next leader's auditor resumes it (resumeAudits). A
// verdict (cmdAuditResult) or an inconclusive end removes the record.

// maxPendingAudits bounds the records: past it the oldest are dropped
// (an audit, not money, is lost: the node's earnings stay held).
const maxPendingAudits = 256

// PendingAudit is an audited call awaiting its replay: what the validator
// needs, as auditJob holds it.
type PendingAudit struct {
	ID       string              `json:"id"`
	RunID    string              `json:"run_id"`
	Node     string              `json:"node"`
	Operator string              `json:"operator"`
	Call     protocol.Call       `json:"call"`
	Body     json.RawMessage     `json:"body"`
	Answer   json.RawMessage     `json:"answer"`
	Cost     int64               `json:"cost"`
	Pre      protocol.Checkpoint `json:"pre"`
	// Post and Trail are an optim_step audit's (audittrail.go).
	Post  *protocol.Checkpoint `json:"post,omitempty"`
	Trail []TrailCall          `json:"trail,omitempty"`
	Time  string               `json:"time"`
}

// auditQueueCmd puts a pending audit or drops ended ones.
type auditQueueCmd struct {
	Put  *PendingAudit `json:"put,omitempty"`
	Drop []string      `json:"drop,omitempty"`
}

// ApplyAuditQueue applies an auditQueueCmd.
func (s *State) ApplyAuditQueue(c auditQueueCmd) {
	if p := c.Put; p != nil && p.ID != "" {
		s.pendingAudits[p.ID] = *p
		for len(s.pendingAudits) > maxPendingAudits {
			oldest := ""
			for id, a := range s.pendingAudits {
				if oldest == "" || a.Time < s.pendingAudits[oldest].Time || (a.Time == s.pendingAudits[oldest].Time && id < oldest) {
					oldest = id
				}
			}
			delete(s.pendingAudits, oldest)
		}
	}
	for _, id := range c.Drop {
		delete(s.pendingAudits, id)
	}
}

// PendingAudits lists the pending audits, oldest first.
func (s *State) PendingAudits() []PendingAudit {
	out := make([]PendingAudit, 0, len(s.pendingAudits))
	for _, a := range s.pendingAudits {
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Time != out[j].Time {
			return out[i].Time < out[j].Time
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// pending is job as a record.
func (j auditJob) pending() PendingAudit {
	return PendingAudit{ID: j.id, RunID: j.run.Run.ID, Node: j.node, Operator: j.operator, Call: j.call, Body: j.body,
		Answer: j.answer, Cost: j.cost, Pre: j.pre, Post: j.post, Trail: j.trail, Time: time.Now().UTC().Format(time.RFC3339Nano)}
}

// resumeAudits queues the pending audits this member's auditor does not
// hold: on a new leader, the ones its predecessor committed and did not
// finish; later, the ones a full queue left waiting. The leader's escrow
// loop runs it as it starts and on each of its ticks.
func (c *Coordinator) resumeAudits() {
	var pending []PendingAudit
	runs := map[string]RunRecord{}
	c.fsm.read(func(s *State) {
		pending = s.PendingAudits()
		for _, p := range pending {
			if r, ok := s.Run(p.RunID); ok {
				runs[p.RunID] = *r
			}
		}
	})
	for _, p := range pending {
		run, ok := runs[p.RunID]
		model, err := c.models.get(run.Run.BaseModel)
		if !ok || err != nil {
			c.auditor.drop(p.ID) // its run or model is gone: nothing to replay
			continue
		}
		c.auditor.enqueue(auditJob{id: p.ID, run: run, model: model, node: p.Node, operator: p.Operator, call: p.Call,
			body: p.Body, answer: p.Answer, cost: p.Cost, pre: p.Pre, post: p.Post, trail: p.Trail})
	}
}
