package protocol

// NodeAudits is what the network has checked of a node's work: GET
// /v1/nodes shows it beside the node's advert, and an operator's GET
// /v1/account for each of its nodes. The coordinator fills it from its
// replicated records; whatever a node's own advert says here is replaced.
type NodeAudits struct {
	Passed int64 `json:"passed"`
	Failed int64 `json:"failed"`
	// Validated counts the audits the node ran as a validator of other
	// operators' nodes.
	Validated int64 `json:"validated,omitempty"`
	// Quarantined is set by a failed audit: the node is given no runs,
	// and its runs move to other nodes.
	Quarantined      bool   `json:"quarantined,omitempty"`
	QuarantineReason string `json:"quarantine_reason,omitempty"`
	// LiftedAt and LiftReason are an admin's last lift of a quarantine.
	LiftedAt   string `json:"lifted_at,omitempty"`
	LiftReason string `json:"lift_reason,omitempty"`
	LastPassed string `json:"last_passed,omitempty"`
	// MeasuredTokensPerSec is the node's training throughput as the
	// network measured it (a capacity challenge on MeasuredModel, at
	// MeasuredAt), whatever its advert claims; MeasureVerified says a node
	// of another operator reproduced the challenge's outputs.
	MeasuredTokensPerSec float64 `json:"measured_tokens_per_sec,omitempty"`
	MeasuredModel        string  `json:"measured_model,omitempty"`
	MeasuredAt           string  `json:"measured_at,omitempty"`
	MeasureVerified      bool    `json:"measure_verified,omitempty"`
	// MemoryProvenBytes is the largest model a session on the node held;
	// MemoryCeilingBytes the smallest it could not (out of memory), which
	// keeps models that large off it for an hour whatever it advertises.
	MemoryProvenBytes  int64 `json:"memory_proven_bytes,omitempty"`
	MemoryCeilingBytes int64 `json:"memory_ceiling_bytes,omitempty"`
	// HeldMicroCredits is the operator's share of the node's charges that
	// the network still holds; VerifiedMicroCredits the part of it passed
	// audits cover, paid to the operator once the escrow window after the
	// pass has gone by. A failed audit pays all of it back to the users.
	HeldMicroCredits     MicroCredits `json:"held_micro_credits"`
	VerifiedMicroCredits MicroCredits `json:"verified_micro_credits"`
	// RefundedMicroCredits is what the node's failed audits paid back.
	RefundedMicroCredits MicroCredits `json:"refunded_micro_credits,omitempty"`
	// Recent are the node's latest audits, oldest first.
	Recent []Audit `json:"recent,omitempty"`
}

// Audit is one spot-check of a node's call: a validator of another
// operator replayed it from the run's committed state.
type Audit struct {
	ID        string `json:"id"`
	RunID     string `json:"run_id"`
	Call      string `json:"call"`
	Validator string `json:"validator"`
	// PreState is the checkpoint the node committed for the audit, which
	// the validator's replay resumed from.
	PreState string `json:"pre_state,omitempty"`
	Passed   bool   `json:"passed"`
	Reason   string `json:"reason,omitempty"`
	// Margin is the largest difference found as a fraction of its
	// tolerance (below 1 passes).
	Margin float64 `json:"margin"`
	Time   string  `json:"time"`
}

// OperatorEarnings is a node operator's part of GET /v1/account: what its
// nodes earned that the network still holds, and what audits decided.
type OperatorEarnings struct {
	HeldMicroCredits     MicroCredits `json:"held_micro_credits"`
	VerifiedMicroCredits MicroCredits `json:"verified_micro_credits"`
	// EarnedMicroCredits is what reached the account's balance, lifetime.
	EarnedMicroCredits   MicroCredits   `json:"earned_micro_credits"`
	RefundedMicroCredits MicroCredits   `json:"refunded_micro_credits,omitempty"`
	Nodes                []OperatorNode `json:"nodes"`
}

// OperatorNode is one of an operator's nodes and its audits.
type OperatorNode struct {
	PeerID string     `json:"peer_id"`
	Audits NodeAudits `json:"audits"`
}
