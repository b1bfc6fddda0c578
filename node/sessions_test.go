package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/nodetest"
	"github.com/signal-p2p/signal/protocol"
)

func newManager(max int) (*node.Manager, *nodetest.Engine) {
	eng := &nodetest.Engine{}
	return node.NewManager(node.ManagerConfig{MaxSessions: max, IdemEntries: 8, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, eng), eng
}

func req(id, run string, call protocol.Call, body any) protocol.SessionRequest {
	b, _ := json.Marshal(body)
	return protocol.SessionRequest{RequestID: id, RunID: run, Call: call, Body: b}
}

func initRun(t *testing.T, m *node.Manager, run string) {
	t.Helper()
	if r := m.Handle(context.Background(), req("init-"+run, run, protocol.CallInit, protocol.SessionSpec{BaseModel: "tiny", LoRARank: 4})); r.Error != nil {
		t.Fatalf("init %s: %+v", run, r.Error)
	}
}

func TestConcurrentRepeatsExecuteOnce(t *testing.T) {
	m, eng := newManager(2)
	initRun(t, m, "a")
	fb := req("same", "a", protocol.CallForwardBackward, protocol.ForwardBackwardRequest{Data: []protocol.Datum{{ModelInput: protocol.ModelInput{Tokens: []int{1, 2, 3}}}}})
	var wg sync.WaitGroup
	bodies := make([]string, 16)
	for i := range bodies {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := m.Handle(context.Background(), fb)
			bodies[i] = string(r.Body)
		}()
	}
	wg.Wait()
	if n := eng.Calls(protocol.CallForwardBackward); n != 1 {
		t.Fatalf("executed %d times, want 1", n)
	}
	for _, b := range bodies {
		if b != bodies[0] || b == "" {
			t.Fatalf("repeats answered differently: %q vs %q", b, bodies[0])
		}
	}
	// The cache is bounded: after more than IdemEntries other calls the
	// first id is forgotten and would run again.
	for i := 0; i < 10; i++ {
		m.Handle(context.Background(), req(fmt.Sprint("fill-", i), "a", protocol.CallOptimStep, protocol.OptimStepRequest{}))
	}
	m.Handle(context.Background(), fb)
	if n := eng.Calls(protocol.CallForwardBackward); n != 2 {
		t.Fatalf("after eviction executed %d times, want 2", n)
	}
}

func TestSessionLimitsAndConflicts(t *testing.T) {
	m, _ := newManager(1)
	initRun(t, m, "a")
	// Same spec again (a retried init with a new id): fine.
	if r := m.Handle(context.Background(), req("again", "a", protocol.CallInit, protocol.SessionSpec{BaseModel: "tiny", LoRARank: 4})); r.Error != nil {
		t.Fatalf("re-init with the same spec: %+v", r.Error)
	}
	cases := []struct {
		name string
		r    protocol.SessionRequest
		code string
	}{
		{"full", req("b", "b", protocol.CallInit, protocol.SessionSpec{BaseModel: "tiny"}), protocol.CodeUnavailable},
		{"other spec", req("c", "a", protocol.CallInit, protocol.SessionSpec{BaseModel: "tiny", LoRARank: 64}), protocol.CodeConflict},
		{"run id mismatch", req("d", "a", protocol.CallInit, protocol.SessionSpec{RunID: "z", BaseModel: "tiny"}), protocol.CodeInvalidRequest},
		{"no model", req("e", "q", protocol.CallInit, protocol.SessionSpec{}), protocol.CodeInvalidRequest},
		{"bad body", protocol.SessionRequest{RequestID: "f", RunID: "a", Call: protocol.CallSaveState, Body: []byte(`{"mode":1}`)}, protocol.CodeInvalidRequest},
		{"unknown field", protocol.SessionRequest{RequestID: "g", RunID: "a", Call: protocol.CallSaveState, Body: []byte(`{"mood":"full"}`)}, protocol.CodeInvalidRequest},
		{"unknown run", req("h", "nope", protocol.CallSample, protocol.SampleRequest{}), protocol.CodeNotFound},
		{"no storage", req("i", "a", protocol.CallSaveState, protocol.SaveStateRequest{}), protocol.CodeInternal},
		{"bad call", protocol.SessionRequest{RequestID: "j", RunID: "a", Call: "explode"}, protocol.CodeInvalidRequest},
		{"no request id", protocol.SessionRequest{RunID: "a", Call: protocol.CallClose}, protocol.CodeInvalidRequest},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := m.Handle(context.Background(), c.r)
			if r.Error == nil || r.Error.Code != c.code {
				t.Fatalf("error = %+v, want code %s", r.Error, c.code)
			}
		})
	}
	// An unavailable answer is not cached: once a slot frees, the same id succeeds.
	m.Handle(context.Background(), req("close-a", "a", protocol.CallClose, struct{}{}))
	if r := m.Handle(context.Background(), req("b", "b", protocol.CallInit, protocol.SessionSpec{BaseModel: "tiny"})); r.Error != nil {
		t.Fatalf("retry after a slot freed: %+v", r.Error)
	}
}

func TestDrainRefusesNewCalls(t *testing.T) {
	m, eng := newManager(4)
	initRun(t, m, "a")
	initRun(t, m, "b")
	m.Drain(context.Background())
	if eng.OpenSessions() != 0 {
		t.Fatalf("%d sessions open after Drain", eng.OpenSessions())
	}
	r := m.Handle(context.Background(), req("late", "c", protocol.CallInit, protocol.SessionSpec{BaseModel: "tiny"}))
	if r.Error == nil || r.Error.Code != protocol.CodeUnavailable {
		t.Fatalf("call after Drain = %+v", r.Error)
	}
}
