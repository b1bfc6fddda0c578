package protocol

import (
	"errors"
	"fmt"
)

// JoinProtocolID is the libp2p protocol on which a node proves its join
// token to a coordinator, once per connection.
const JoinProtocolID = "/signal/join/1"

// CapacityTopic is the GossipSub topic nodes publish capacity adverts on
// (frames of MsgAdvert carrying a Node).
const CapacityTopic = "/signal/capacity/1"

// JoinRequest is what a node sends on a join stream.
type JoinRequest struct {
	JoinToken string `json:"join_token"`
}

// JoinResponse answers a JoinRequest: the operator account the node's
// earnings go to, or an error (code unauthorized for a bad token).
type JoinResponse struct {
	Operator string     `json:"operator,omitempty"`
	Error    *ErrorBody `json:"error,omitempty"`
}

// maxJoinTokenBytes bounds a join token on the wire.
const maxJoinTokenBytes = 1024

// Validate checks the token's presence and size.
func (r *JoinRequest) Validate() error {
	if r.JoinToken == "" {
		return errors.New("join_token: missing")
	}
	if len(r.JoinToken) > maxJoinTokenBytes {
		return fmt.Errorf("join_token: %d bytes, limit %d", len(r.JoinToken), maxJoinTokenBytes)
	}
	return nil
}

// SessionState is a node's answer to init, load_state and close: where the
// run's session stands on the node.
type SessionState struct {
	RunID   string `json:"run_id"`
	Step    int    `json:"step"`
	Backend string `json:"backend,omitempty"`
	// ResumedFromStep is set when init restored SessionSpec.ResumeFrom.
	ResumedFromStep *int `json:"resumed_from_step,omitempty"`
	Closed          bool `json:"closed,omitempty"`
}

// DrainedProtocolID is the libp2p protocol on which a node that stops
// gracefully tells a coordinator the checkpoints it saved while draining
// (one MsgDrainReport, answered by one MsgDrainAck). A direct stream, not
// GossipSub: a last message published while the host closes may be lost.
const DrainedProtocolID = "/signal/drained/1"

// maxDrainCheckpoints bounds a drain report (a node's open sessions).
const maxDrainCheckpoints = 1024

// DrainReport lists the full checkpoints a node saved at shutdown, one per
// open session, so that the runs resume from them on another node.
type DrainReport struct {
	PeerID      string       `json:"peer_id"`
	Checkpoints []Checkpoint `json:"checkpoints"`
}

// Validate checks the fields a coordinator needs to record the report.
func (r *DrainReport) Validate() error {
	if r.PeerID == "" || len(r.PeerID) > maxIDBytes {
		return fmt.Errorf("peer_id: must be 1..%d bytes, got %d", maxIDBytes, len(r.PeerID))
	}
	if len(r.Checkpoints) > maxDrainCheckpoints {
		return fmt.Errorf("checkpoints: %d, limit %d", len(r.Checkpoints), maxDrainCheckpoints)
	}
	for i, cp := range r.Checkpoints {
		switch {
		case cp.RunID == "" || len(cp.RunID) > maxIDBytes:
			return fmt.Errorf("checkpoints[%d].run_id: must be 1..%d bytes, got %d", i, maxIDBytes, len(cp.RunID))
		case cp.ID == "":
			return fmt.Errorf("checkpoints[%d].id: missing", i)
		case cp.URI == "":
			return fmt.Errorf("checkpoints[%d].uri: missing", i)
		case cp.Step < 0:
			return fmt.Errorf("checkpoints[%d].step: %d, must be ≥ 0", i, cp.Step)
		}
	}
	return nil
}

// DrainAck answers a DrainReport: how many checkpoints were recorded, and
// an error when the report was refused as a whole. Checkpoints the
// coordinator declined one by one (the run moved on, or has a newer step)
// are not an error.
type DrainAck struct {
	Recorded int        `json:"recorded"`
	Error    *ErrorBody `json:"error,omitempty"`
}
