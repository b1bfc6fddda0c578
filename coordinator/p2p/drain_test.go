package p2p_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"

	"github.com/signal-p2p/signal/coordinator/p2p"
	"github.com/signal-p2p/signal/protocol"
)

// drainRegistry is a fakeRegistry that also records drain reports.
type drainRegistry struct {
	*fakeRegistry
	mu      sync.Mutex
	reports map[string][]protocol.Checkpoint // by reporting peer
}

var _ p2p.DrainRecorder = (*drainRegistry)(nil)

func (r *drainRegistry) RecordDrained(_ context.Context, peerID string, cps []protocol.Checkpoint) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reports[peerID] = append(r.reports[peerID], cps...)
	return len(cps), nil
}

func (r *drainRegistry) got(peerID string) []protocol.Checkpoint {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]protocol.Checkpoint(nil), r.reports[peerID]...)
}

// TestGracefulStopReportsDrainCheckpoints: a node stopped gracefully three
// steps past its last automatic checkpoint tells the coordinator the full
// checkpoint it saved while draining, before it leaves; another node
// resumes the run from exactly that step.
func TestGracefulStopReportsDrainCheckpoints(t *testing.T) {
	reg := &drainRegistry{fakeRegistry: newRegistry(), reports: map[string][]protocol.Checkpoint{}}
	m := startMovingRun(t, reg, "run-d", 4, 7)
	a, b, c, spec, auto := m.a, m.b, m.c, m.spec, m.auto
	if auto == nil || auto.Step != 4 {
		t.Fatalf("last automatic checkpoint = %+v, want step 4", auto)
	}
	if err := a.Stop(); err != nil {
		t.Fatal(err)
	}
	got := reg.got(a.PeerID())
	if len(got) != 1 || got[0].RunID != "run-d" || got[0].Step != 7 || got[0].Mode != "full" || got[0].URI == "" || got[0].ID == auto.ID {
		t.Fatalf("drain report = %+v, want one full checkpoint of run-d at step 7", got)
	}

	spec.ResumeFrom = &got[0]
	c.node = b.PeerID()
	var st protocol.SessionState
	c.ok(protocol.CallInit, spec, &st)
	if st.ResumedFromStep == nil || *st.ResumedFromStep != 7 || st.Step != 7 {
		t.Fatalf("resumed state = %+v, want resumed from step 7", st)
	}
}

// TestDrainReportRefused: a report from a peer that has not joined, or
// about another peer, is answered with an error and not recorded.
func TestDrainReportRefused(t *testing.T) {
	reg := &drainRegistry{fakeRegistry: newRegistry(), reports: map[string][]protocol.Checkpoint{}}
	coord := startCoordinator(t, reg)
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	ai, err := peer.AddrInfoFromString(coord.Addrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.Connect(ctx, *ai); err != nil {
		t.Fatal(err)
	}
	send := func(rep protocol.DrainReport) protocol.DrainAck {
		t.Helper()
		s, err := h.NewStream(ctx, ai.ID, libp2pproto.ID(protocol.DrainedProtocolID))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if err := protocol.WriteFrame(s, protocol.MsgDrainReport, rep); err != nil {
			t.Fatal(err)
		}
		var ack protocol.DrainAck
		if err := protocol.ReadMessage(s, protocol.MsgDrainAck, 1<<20, &ack); err != nil {
			t.Fatal(err)
		}
		return ack
	}
	cp := protocol.Checkpoint{ID: "ck", RunID: "run-x", Step: 3, Mode: "full", URI: "file:///ck"}
	me := h.ID().String()

	if ack := send(protocol.DrainReport{PeerID: me, Checkpoints: []protocol.Checkpoint{cp}}); ack.Error == nil || ack.Error.Code != protocol.CodeUnauthorized {
		t.Fatalf("report from an un-joined peer: ack %+v, want unauthorized", ack)
	}
	if _, err := reg.AdmitNode(ctx, me, "good-token"); err != nil {
		t.Fatal(err)
	}
	if ack := send(protocol.DrainReport{PeerID: "12D3KooWsomeoneelse", Checkpoints: []protocol.Checkpoint{cp}}); ack.Error == nil || ack.Error.Code != protocol.CodeInvalidRequest {
		t.Fatalf("report about another peer: ack %+v, want invalid_request", ack)
	}
	if n := len(reg.got(me)) + len(reg.got("12D3KooWsomeoneelse")); n != 0 {
		t.Fatalf("%d checkpoints recorded from refused reports", n)
	}
	if ack := send(protocol.DrainReport{PeerID: me, Checkpoints: []protocol.Checkpoint{cp}}); ack.Error != nil || ack.Recorded != 1 {
		t.Fatalf("report from a joined peer: ack %+v, want 1 recorded", ack)
	}
}
