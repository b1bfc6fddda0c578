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
