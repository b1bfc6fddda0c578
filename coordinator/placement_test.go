package coordinator

import (
	"errors"
	"testing"

	"github.com/signal-p2p/signal/protocol"
)

func TestPlaceOn(t *testing.T) {
	model := ModelSpec{Name: "tiny", MemoryBytes: 1 << 30}
	node := func(id string, mut func(*protocol.Node)) protocol.Node {
		n := protocol.Node{PeerID: id, CPU: protocol.CPU{Cores: 2, MemoryTotal: 8 << 30}, MaxSessions: 4, Backends: []string{"native"}}
		if mut != nil {
			mut(&n)
		}
		return n
	}
	all := func(string) bool { return true }
	for _, c := range []struct {
		name     string
		nodes    []protocol.Node
		eligible func(string) bool
		want     string // "" = ErrNoCapacity
	}{
		{"least loaded", []protocol.Node{node("a", func(n *protocol.Node) { n.Sessions = 2 }), node("b", func(n *protocol.Node) { n.Sessions = 1 })}, all, "b"},
		{"model loaded first", []protocol.Node{node("a", func(n *protocol.Node) { n.Sessions = 3; n.Models = []string{"tiny"} }), node("b", nil)}, all, "a"},
		{"no backend skipped", []protocol.Node{node("a", func(n *protocol.Node) { n.Backends = nil; n.Models = []string{"tiny"} }), node("b", func(n *protocol.Node) { n.Sessions = 3 })}, all, "b"},
		{"only nodes without a backend", []protocol.Node{node("a", func(n *protocol.Node) { n.Backends = nil })}, all, ""},
		{"full", []protocol.Node{node("a", func(n *protocol.Node) { n.Sessions = 4 })}, all, ""},
		{"too little memory", []protocol.Node{node("a", func(n *protocol.Node) { n.CPU.MemoryTotal = 1 << 20 })}, all, ""},
		{"excluded", []protocol.Node{node("a", nil), node("b", nil)}, func(id string) bool { return id != "a" }, "b"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := placeOn(c.nodes, model, c.eligible)
			if c.want == "" {
				if !errors.Is(err, ErrNoCapacity) {
					t.Fatalf("placed on %q (err %v), want ErrNoCapacity", got.PeerID, err)
				}
				return
			}
			if err != nil || got.PeerID != c.want {
				t.Fatalf("placed on %q (err %v), want %q", got.PeerID, err, c.want)
			}
		})
	}
}
