package coordinator

import (
	"context"

	"github.com/signal-p2p/signal/protocol"
)

// Backend reaches the node network.
type Backend interface {
	// Nodes lists live nodes (soft state from adverts), for placement and GET /v1/nodes.
	Nodes() []protocol.Node
	// Do sends one session call to the node that serves runID. Errors wrapping
	// ErrNodeLost mean the node is gone (→ 503 + Retry-After and the run moves).
	Do(ctx context.Context, nodePeerID string, req protocol.SessionRequest) (protocol.SessionResponse, error)
}

// noBackend is the Backend of a coordinator started without a node network:
// it lists no nodes, so every placement fails with ErrNoCapacity (503).
type noBackend struct{}

func (noBackend) Nodes() []protocol.Node { return nil }

func (noBackend) Do(context.Context, string, protocol.SessionRequest) (protocol.SessionResponse, error) {
	return protocol.SessionResponse{}, ErrNodeLost
}
