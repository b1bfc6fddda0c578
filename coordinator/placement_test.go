package coordinator

import (
	"errors"
	"strings"
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
		assigned map[string]int
		measured map[string]float64
	}{
		{"least loaded", []protocol.Node{node("a", func(n *protocol.Node) { n.Sessions = 2 }), node("b", func(n *protocol.Node) { n.Sessions = 1 })}, all, "b", nil, nil},
		{"model loaded first", []protocol.Node{node("a", func(n *protocol.Node) { n.Sessions = 3; n.Models = []string{"tiny"} }), node("b", nil)}, all, "a", nil, nil},
		{"no backend skipped", []protocol.Node{node("a", func(n *protocol.Node) { n.Backends = nil; n.Models = []string{"tiny"} }), node("b", func(n *protocol.Node) { n.Sessions = 3 })}, all, "b", nil, nil},
		{"only nodes without a backend", []protocol.Node{node("a", func(n *protocol.Node) { n.Backends = nil })}, all, "", nil, nil},
		{"full", []protocol.Node{node("a", func(n *protocol.Node) { n.Sessions = 4 })}, all, "", nil, nil},
		{"too little memory", []protocol.Node{node("a", func(n *protocol.Node) { n.CPU.MemoryTotal = 1 << 20 })}, all, "", nil, nil},
		// The node's own figure for the model (its engine keeps BF16 as
		// BF16) decides, not the coordinator's estimate, either way.
		{"node's figure fits", []protocol.Node{node("a", func(n *protocol.Node) {
			n.CPU.MemoryTotal = 600 << 20
			n.ModelMemory = map[string]int64{"tiny": 512 << 20}
		})}, all, "a", nil, nil},
		{"node's figure too big", []protocol.Node{node("a", func(n *protocol.Node) { n.ModelMemory = map[string]int64{"tiny": 16 << 30} })}, all, "", nil, nil},
		{"served but too big by its own figure", []protocol.Node{node("a", func(n *protocol.Node) {
			n.Models = []string{"tiny"}
			n.ModelMemory = map[string]int64{"tiny": 16 << 30}
		})}, all, "", nil, nil},
		{"other model's figure ignored", []protocol.Node{node("a", func(n *protocol.Node) {
			n.CPU.MemoryTotal = 600 << 20
			n.ModelMemory = map[string]int64{"other": 512 << 20}
		})}, all, "", nil, nil},
		{"excluded", []protocol.Node{node("a", nil), node("b", nil)}, func(id string) bool { return id != "a" }, "b", nil, nil},
		// Runs placed since the last advert count: a looks empty but holds 2.
		{"registry runs count", []protocol.Node{node("a", nil), node("b", func(n *protocol.Node) { n.Sessions = 1 })}, all, "b", map[string]int{"a": 2}, nil},
		{"registry full", []protocol.Node{node("a", nil)}, all, "", map[string]int{"a": 4}, nil},
		// A claim of many slots does not make a node look emptier (issue 13).
		{"claimed slots do not win", []protocol.Node{node("a", func(n *protocol.Node) { n.Sessions = 2; n.MaxSessions = 256 }), node("b", func(n *protocol.Node) { n.Sessions = 1 })}, all, "b", nil, nil},
		{"advert above registry", []protocol.Node{node("a", func(n *protocol.Node) { n.Sessions = 3 }), node("b", nil)}, all, "b", map[string]int{"a": 1, "b": 2}, nil},
		// Measured throughput, not the advert: b is 4× faster than a,
		// so it takes a second run before a takes its first.
		{"measured throughput", []protocol.Node{node("a", nil), node("b", func(n *protocol.Node) { n.Sessions = 1 })}, all, "b", nil, map[string]float64{"a": 100, "b": 400}},
		{"an advertised GPU does not count", []protocol.Node{
			node("liar", func(n *protocol.Node) {
				n.GPUs = []protocol.GPU{{Name: "NVIDIA H200", MemoryTotal: 141 << 30, MemoryFree: 140 << 30}}
			}),
			node("b", nil)}, all, "b", nil, map[string]float64{"liar": 50, "b": 500}},
		// Not yet measured counts as the slowest measured.
		{"unmeasured as the slowest", []protocol.Node{node("a", nil), node("b", nil), node("c", func(n *protocol.Node) { n.Sessions = 1 })}, all, "c", nil, map[string]float64{"b": 100, "c": 400}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := placeOn(c.nodes, model, c.assigned, c.measured, c.eligible)
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

// TestPlaceOnSaysWhatIsFull: a refusal names what is missing.
func TestPlaceOnSaysWhatIsFull(t *testing.T) {
	nodes := []protocol.Node{
		{PeerID: "a", CPU: protocol.CPU{MemoryTotal: 8 << 30}, MaxSessions: 2, Sessions: 2, Backends: []string{"native"}},
		{PeerID: "b", CPU: protocol.CPU{MemoryTotal: 1 << 20}, MaxSessions: 2, Backends: []string{"native"}},
		{PeerID: "c", CPU: protocol.CPU{MemoryTotal: 8 << 30}, MaxSessions: 2},
	}
	_, err := placeOn(nodes, ModelSpec{Name: "tiny", MemoryBytes: 1 << 30}, nil, nil, func(string) bool { return true })
	for _, want := range []string{"1 full (2/2 sessions busy)", "1 without the 1073741824 bytes", "1 with no engine running"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not say %q", err, want)
		}
	}
}
