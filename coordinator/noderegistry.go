package coordinator

import (
	"context"
	"errors"
	"fmt"

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

// RegisterNode verifies a join token through raft. A refused token wraps
// p2p.ErrInvalidJoinToken so the node stops retrying; anything else is
// taken by the host as temporary.
func (r NodeRegistry) RegisterNode(ctx context.Context, peerID, joinToken string) (string, error) {
	op, err := r.c.RegisterNode(ctx, peerID, joinToken)
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
