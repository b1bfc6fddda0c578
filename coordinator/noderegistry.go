package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/hashicorp/raft"
	"github.com/signal-p2p/signal/coordinator/p2p"
	"github.com/signal-p2p/signal/protocol"
)

// NodeRegistry adapts a Coordinator to what its libp2p host needs: join
// verification and drain reports. It exists because the host's package
// must not import this one; the adapter translates errors between them.
type NodeRegistry struct{ c *Coordinator }

// NodeRegistry returns the adapter to hand to p2p.New.
func (c *Coordinator) NodeRegistry() NodeRegistry { return NodeRegistry{c} }

var (
	_ p2p.Registry      = NodeRegistry{}
	_ p2p.DrainRecorder = NodeRegistry{}
)

// AdmitNode verifies a join token through raft. A refused token wraps
// p2p.ErrInvalidJoinToken so the node stops retrying; anything else is
// taken by the host as temporary.
func (r NodeRegistry) AdmitNode(ctx context.Context, peerID, joinToken string) (string, error) {
	op, err := r.c.AdmitNode(ctx, peerID, joinToken)
	if errors.Is(err, ErrUnauthorized) {
		return "", fmt.Errorf("%w: %w", p2p.ErrInvalidJoinToken, err)
	}
	return op, err
}

// IsJoined reports whether peerID has proven a join token.
func (r NodeRegistry) IsJoined(peerID string) bool { return r.c.IsJoined(peerID) }

// RecordDrained records the checkpoints a gracefully stopping node saved.
func (r NodeRegistry) RecordDrained(ctx context.Context, peerID string, cps []protocol.Checkpoint) (int, error) {
	return r.c.RecordDrained(ctx, peerID, cps)
}

// A node's join goes: p2p host → NodeRegistry.AdmitNode → AdmitNode, which
// on a follower asks the leader (askLeaderToAdmit → the leader's
// handleForwardedAdmission) and on the leader checks the token
// (admitOnLeader); a peer not yet in the node table is then registered
// through raft (cmdRegisterNode → State.RegisterNode).

// AdmitNode says whether peerID proved joinToken, recording it through
// raft when it is new, and returns the operator account its earnings go
// to. A bad token wraps ErrUnauthorized.
func (c *Coordinator) AdmitNode(ctx context.Context, peerID, joinToken string) (string, error) {
	if c.raft.State() == raft.Leader {
		return c.admitOnLeader(ctx, peerID, joinToken)
	}
	return c.askLeaderToAdmit(ctx, peerID, joinToken)
}

// askLeaderToAdmit forwards a join to the leader, which alone checks the
// rate limit and writes the log.
func (c *Coordinator) askLeaderToAdmit(ctx context.Context, peerID, joinToken string) (string, error) {
	url, err := c.leaderURL()
	if err != nil {
		return "", err
	}
	body, _ := json.Marshal(admissionRequest{PeerID: peerID, JoinToken: joinToken})
	var out admissionResponse
	if err := c.postAdmin(ctx, url+"/v1/cluster/register_node", body, &out); err != nil {
		return "", err
	}
	return out.Operator, nil
}

// admitOnLeader checks joinToken against the leader's replica and
// registers peerID through raft when it is new under it.
func (c *Coordinator) admitOnLeader(ctx context.Context, peerID, joinToken string) (string, error) {
	if peerID == "" {
		return "", fmt.Errorf("admit node: peer id required: %w", ErrInvalidRequest)
	}
	if joinToken == "" {
		// A missing token is a refused token: the node must stop, not retry.
		return "", fmt.Errorf("admit node %s: no join token: %w", peerID, ErrUnauthorized)
	}
	// The leader's replica is current (it ran a barrier before serving):
	// a join it can answer from state writes no raft entry, so a flood of
	// bogus or repeated joins costs the log nothing (issue 13, item 13).
	hash := hashSecret(joinToken)
	var tok JoinTokenRecord
	var known bool
	var node NodeRecord
	var joined bool
	c.fsm.read(func(s *State) {
		tok, known = s.JoinToken(hash)
		node, joined = s.Node(peerID)
	})
	if !known {
		return "", fmt.Errorf("admit node %s: unknown join token: %w", peerID, ErrUnauthorized)
	}
	if joined && node.Operator == tok.Operator {
		return node.Operator, nil
	}
	// New peers under one token are rate limited: a leaked token must not
	// let its holder grow the node table at raft speed.
	if ok, wait := c.joinLimits.allow("token:" + hash); !ok {
		return "", retryAfter(fmt.Errorf("admit node %s: joins with this token over %d/s: %w", peerID, joinsPerSecond, ErrRateLimited), wait)
	}
	v, err := c.propose(ctx, cmdRegisterNode, registerNodeCmd{PeerID: peerID, TokenHash: hash, Time: now()})
	if err != nil {
		return "", err
	}
	op, _ := v.(string)
	c.log.Info("node joined", "category", "security", "peer_id", peerID, "operator", op)
	return op, nil
}

// IsJoined reports whether peerID proved a join token (any member answers
// from its own replica).
func (c *Coordinator) IsJoined(peerID string) bool {
	var ok bool
	c.fsm.read(func(s *State) { _, ok = s.Node(peerID) })
	return ok
}

// admissionRequest is the body of POST /v1/cluster/register_node: a
// follower's askLeaderToAdmit. The path keeps its name so members of
// different versions still reach each other during an upgrade.
type admissionRequest struct {
	PeerID    string `json:"peer_id"`
	JoinToken string `json:"join_token"`
}

type admissionResponse struct {
	Operator string `json:"operator"`
}
