package coordinator

import (
	"context"
	"testing"
	"time"

	"github.com/signal-p2p/signal/coordinator/p2p"
)

// TestMemberAssembly: a member with a node network runs its p2p host as
// the coordinator's backend from the start; one without lists no nodes.
func TestMemberAssembly(t *testing.T) {
	cfg := testConfig(t, "m0")
	cfg.Bootstrap = true
	pcfg := p2p.DefaultConfig()
	pcfg.ListenAddrs = []string{"/ip4/127.0.0.1/tcp/0"}
	m, err := NewMember(cfg, &pcfg)
	if err != nil {
		t.Fatal(err)
	}
	if m.coord.nodesBackend() != Backend(m.host) {
		t.Fatalf("backend %T, want the member's p2p host", m.coord.nodesBackend())
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Stop() })
	if len(m.P2PAddrs()) == 0 {
		t.Fatal("no p2p address to bootstrap to")
	}
	waitFor(t, 10*time.Second, "leader", m.Coordinator().IsLeader)

	bare := testConfig(t, "m1")
	bare.Bootstrap = true
	alone, err := NewMember(bare, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := alone.coord.nodesBackend().(noBackend); !ok || alone.P2PAddrs() != nil {
		t.Fatalf("member without a node network: backend %T, p2p %v", alone.coord.nodesBackend(), alone.P2PAddrs())
	}
}
