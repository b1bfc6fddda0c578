package coordinator

import (
	"fmt"
	"sort"

	"github.com/signal-p2p/signal/ledger"
	"github.com/signal-p2p/signal/protocol"
)

// The rules of escrowed earnings and audit verdicts, in State: which
// nodes are quarantined, what a verdict does to the ledger, what is
// released. The leader's auditor (audit.go) decides the verdicts; these
// rules only record them, so every member applies them alike.

// maxAuditsPerNode bounds the recent audits kept per node.
const maxAuditsPerNode = 20

// NodeAuditRecord is a node's audit history as the state keeps it.
// Records are replaced, never changed in place.
type NodeAuditRecord struct {
	PeerID string `json:"peer_id"`
	Passed int64  `json:"passed"`
	Failed int64  `json:"failed"`
	// Validated counts the audits the node ran as validator; Disputed
	// those of its failure verdicts a second validator overturned.
	Validated  int64  `json:"validated,omitempty"`
	Disputed   int64  `json:"disputed,omitempty"`
	LastPassed string `json:"last_passed,omitempty"`
	// Quarantined is set by a failed audit and cleared only by an admin
	// (LiftQuarantine): the node is given no runs and its runs move, and
	// its operator's new nodes are refused while it lasts.
	Quarantined      bool   `json:"quarantined,omitempty"`
	QuarantineReason string `json:"quarantine_reason,omitempty"`
	// Lifted records the last lift: when, and the admin's reason.
	LiftedAt   string `json:"lifted_at,omitempty"`
	LiftReason string `json:"lift_reason,omitempty"`
	// TokensPerSec is the node's throughput measured by its last capacity
	// challenge (challenge.go) on MeasuredModel at MeasuredAt;
	// MeasureVerified says another operator's node reproduced its outputs.
	TokensPerSec    float64 `json:"tokens_per_sec,omitempty"`
	MeasuredModel   string  `json:"measured_model,omitempty"`
	MeasuredAt      string  `json:"measured_at,omitempty"`
	MeasureVerified bool    `json:"measure_verified,omitempty"`
	// MemoryProven is the largest model (bytes) a session opened on the
	// node held; MemoryCeiling, set at MemoryCeilingAt, the smallest it
	// could not (it answered out of memory): placement gives it no model
	// that large for memoryCeilingTTL, whatever its advert says.
	MemoryProven    int64  `json:"memory_proven,omitempty"`
	MemoryCeiling   int64  `json:"memory_ceiling,omitempty"`
	MemoryCeilingAt string `json:"memory_ceiling_at,omitempty"`
	// Refunded is what the node's failed audits paid back to users.
	Refunded int64            `json:"refunded,omitempty"`
	Recent   []protocol.Audit `json:"recent,omitempty"`
}

// auditResultCmd is one audit's verdict (cmdAuditResult).
type auditResultCmd struct {
	// Audit is the verdict as the node's history shows it; its Time is
	// the leader's clock, At the same instant in Unix milliseconds (a
	// pass stamps the tranche it verifies with it).
	Audit protocol.Audit `json:"audit"`
	Node  string         `json:"node"`
	At    int64          `json:"at"`
	// ValidatorOperator is paid ValidatorPay micro-credits by the network
	// (its fee account, as far as it holds them) for the replay: held in
	// the validator's escrow, like any earnings.
	ValidatorOperator string `json:"validator_operator,omitempty"`
	ValidatorPay      int64  `json:"validator_pay,omitempty"`
	// Disputed names a validator whose failure verdict a second
	// validator, of a third operator, overturned.
	Disputed string `json:"disputed,omitempty"`
}

// releaseEscrowCmd releases nodes' tranches verified at or before Cutoff
// (Unix milliseconds: the leader's clock less the escrow window).
type releaseEscrowCmd struct {
	Cutoff int64    `json:"cutoff"`
	Nodes  []string `json:"nodes"`
}

// AuditOutcome is what recording a verdict did.
type AuditOutcome struct {
	// Verified is the held amount a pass verified.
	Verified int64 `json:"verified,omitempty"`
	// Refunds are what a failure paid back, by payer.
	Refunds []ledger.Share `json:"refunds,omitempty"`
	// ValidatorPaid is what the network paid the validator.
	ValidatorPaid int64 `json:"validator_paid,omitempty"`
}

// chargeLedger moves a charge's money: the operator's share into the
// serving node's escrow when the charge names its node, straight to the
// operator otherwise (entries written before escrow; a network that does
// not audit).
func (s *State) chargeLedger(c chargeCmd, operator string, split ledger.Split) error {
	if c.Node == "" || operator == "" {
		return s.ledger.Charge(c.Account, operator, s.feeAccount, split)
	}
	at, _ := recordTime(c.Time)
	return s.ledger.ChargeEscrowed(c.Account, c.Node, operator, s.feeAccount, split, at.UnixMilli())
}

// Quarantined reports whether a failed audit quarantined the node.
func (s *State) Quarantined(peerID string) bool { return s.nodeAudits[peerID].Quarantined }

// liftQuarantineCmd is an admin's lift of a node's quarantine.
type liftQuarantineCmd struct {
	PeerID string `json:"peer_id"`
	Reason string `json:"reason"`
	Time   string `json:"time"`
}

// LiftQuarantine ends a node's quarantine: it may take runs again, and its
// operator's new nodes may join. Its failed audits stay in its history;
// what they forfeited stays with the users it was paid back to.
func (s *State) LiftQuarantine(c liftQuarantineCmd) (NodeAuditRecord, error) {
	rec, ok := s.nodeAudits[c.PeerID]
	if !ok || !rec.Quarantined {
		return rec, protocol.UserErrorf(ErrConflict, "node %s is not quarantined: nothing to lift", c.PeerID)
	}
	rec.Quarantined, rec.QuarantineReason = false, ""
	rec.LiftedAt, rec.LiftReason = c.Time, c.Reason
	s.nodeAudits[c.PeerID] = rec
	return rec, nil
}

// quarantinedOf returns a quarantined node of operator, if it has one.
func (s *State) quarantinedOf(operator string) (string, bool) {
	for _, id := range sortedKeys(s.nodes) {
		if s.nodes[id].Operator == operator && s.Quarantined(id) {
			return id, true
		}
	}
	return "", false
}

// RecordAudit applies a verdict: a pass verifies what the node earned
// since its last one, a failure forfeits everything it holds back to the
// payers and quarantines it. The validator's replay is paid either way.
func (s *State) RecordAudit(c auditResultCmd) (AuditOutcome, error) {
	a := c.Audit
	// An empty validator is the leader's own verdict (a node that would
	// not commit its state for audits).
	if c.Node == "" || a.ID == "" || a.Validator == c.Node {
		return AuditOutcome{}, fmt.Errorf("audit result: node %q, id %q, validator %q: %w", c.Node, a.ID, a.Validator, ErrInvalidRequest)
	}
	rec := s.nodeAudits[c.Node]
	for _, old := range rec.Recent {
		if old.ID == a.ID {
			return AuditOutcome{}, nil // recorded already (a proposal retried)
		}
	}
	rec.PeerID = c.Node
	delete(s.pendingAudits, a.ID) // its verdict is in
	var out AuditOutcome
	if a.Passed {
		verified, err := s.ledger.PassAudit(c.Node, c.At)
		if err != nil {
			return AuditOutcome{}, err
		}
		out.Verified = verified
		rec.Passed++
		rec.LastPassed = a.Time
	} else {
		refunds, err := s.ledger.ForfeitEscrow(c.Node)
		if err != nil {
			return AuditOutcome{}, err
		}
		out.Refunds = refunds
		for _, r := range refunds {
			rec.Refunded = ledger.SaturatingAdd(rec.Refunded, r.Amount)
		}
		rec.Failed++
		if !rec.Quarantined {
			rec.Quarantined = true
			rec.QuarantineReason = fmt.Sprintf("audit %s of %s on run %s failed: %s", a.ID, a.Call, a.RunID, a.Reason)
		}
	}
	recent := make([]protocol.Audit, 0, len(rec.Recent)+1)
	recent = append(append(recent, rec.Recent...), a)
	if len(recent) > maxAuditsPerNode {
		recent = recent[len(recent)-maxAuditsPerNode:]
	}
	rec.Recent = recent
	s.nodeAudits[c.Node] = rec

	var v NodeAuditRecord
	if a.Validator != "" {
		v = s.nodeAudits[a.Validator]
		v.PeerID = a.Validator
		v.Validated++
		s.nodeAudits[a.Validator] = v
	}
	if c.Disputed != "" && c.Disputed != c.Node {
		d := s.nodeAudits[c.Disputed]
		d.PeerID = c.Disputed
		d.Disputed++
		s.nodeAudits[c.Disputed] = d
	}
	if pay := min(c.ValidatorPay, s.ledger.Balance(s.feeAccount)); pay > 0 && a.Validator != "" && c.ValidatorOperator != "" && !v.Quarantined {
		err := s.ledger.ChargeEscrowed(s.feeAccount, a.Validator, c.ValidatorOperator, s.feeAccount, ledger.Split{Total: pay, Operator: pay}, c.At)
		if err == nil {
			out.ValidatorPaid = pay
		}
	}
	return out, nil
}

// ReleaseEscrow pays each node's operator the tranches verified at or
// before cutoff; it returns the total released. A quarantined node's
// escrow was forfeited, and what it earned since is never released.
func (s *State) ReleaseEscrow(c releaseEscrowCmd) (int64, error) {
	var total int64
	for _, n := range c.Nodes {
		if s.Quarantined(n) {
			continue
		}
		r, err := s.ledger.ReleaseEscrow(n, c.Cutoff)
		if err != nil {
			return total, err
		}
		total += r
	}
	return total, nil
}

// ReleasableNodes lists the nodes holding a tranche verified at or before
// cutoff, sorted.
func (s *State) ReleasableNodes(cutoff int64) []string {
	var out []string
	for _, e := range s.ledger.Escrows() {
		if len(e.Verified) > 0 && e.Verified[0].PassedAt <= cutoff && !s.Quarantined(e.Node) {
			out = append(out, e.Node)
		}
	}
	return out
}

// UnauditedSince is when the node's oldest earnings not yet covered by a
// passed audit were charged (Unix milliseconds); ok is false when it has
// none.
func (s *State) UnauditedSince(peerID string) (int64, bool) { return s.ledger.OpenSince(peerID) }

// NodeAuditView is a node's audits and held earnings as the API shows
// them; nil for a node never audited that holds nothing.
func (s *State) NodeAuditView(peerID string) *protocol.NodeAudits {
	rec, audited := s.nodeAudits[peerID]
	e, held := s.ledger.Escrow(peerID)
	if !audited && !held {
		return nil
	}
	return &protocol.NodeAudits{
		Passed: rec.Passed, Failed: rec.Failed, Validated: rec.Validated, Quarantined: rec.Quarantined, LastPassed: rec.LastPassed,
		QuarantineReason: rec.QuarantineReason, LiftedAt: rec.LiftedAt, LiftReason: rec.LiftReason,
		MeasuredTokensPerSec: rec.TokensPerSec, MeasuredModel: rec.MeasuredModel, MeasuredAt: rec.MeasuredAt, MeasureVerified: rec.MeasureVerified,
		MemoryProvenBytes: rec.MemoryProven, MemoryCeilingBytes: rec.MemoryCeiling,
		HeldMicroCredits: e.Held(), VerifiedMicroCredits: e.VerifiedAmount(), RefundedMicroCredits: rec.Refunded,
		Recent: append([]protocol.Audit(nil), rec.Recent...),
	}
}

// OperatorView is an operator account's earnings: its nodes (joined
// under its join tokens, or holding earnings for it) with their audits
// and held shares; nil for an account no node earns for.
func (s *State) OperatorView(account string) *protocol.OperatorEarnings {
	peers := map[string]bool{}
	for id, n := range s.nodes {
		if n.Operator == account {
			peers[id] = true
		}
	}
	for _, e := range s.ledger.Escrows() {
		if e.Operator == account {
			peers[e.Node] = true
		}
	}
	if len(peers) == 0 {
		return nil
	}
	a, _ := s.ledger.Account(account)
	out := &protocol.OperatorEarnings{EarnedMicroCredits: a.Earned, Nodes: []protocol.OperatorNode{}}
	ids := make([]string, 0, len(peers))
	for id := range peers {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		v := s.NodeAuditView(id)
		if v == nil {
			v = &protocol.NodeAudits{}
		}
		v.Recent = nil
		out.HeldMicroCredits += v.HeldMicroCredits
		out.VerifiedMicroCredits += v.VerifiedMicroCredits
		out.RefundedMicroCredits += v.RefundedMicroCredits
		out.Nodes = append(out.Nodes, protocol.OperatorNode{PeerID: id, Audits: *v})
	}
	return out
}
