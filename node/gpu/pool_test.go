package gpu

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/protocol"
)

func TestPoolSpreadsSessionsOverWorkers(t *testing.T) {
	py := pythonWithTorch(t)
	models := mustModelsDir(t)
	var cfgs []Config
	for range 2 {
		c := DefaultConfig()
		c.Python, c.Threads, c.ModelsDir = py, 1, models
		cfgs = append(cfgs, c)
	}
	p, err := NewPool(cfgs)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		_ = p.Stop()
		t.Fatal(err)
	}
	defer func() {
		if err := p.Stop(); err != nil {
			t.Error(err)
		}
	}()
	if p.Backend() != BackendCPUTorch || len(p.Models()) != 1 || p.Models()[0] != "tiny-sp" {
		t.Fatalf("backend %q models %v", p.Backend(), p.Models())
	}
	var ss []node.Session
	for _, run := range []string{"a", "b", "c"} {
		s, err := p.Open(ctx, spec(run))
		if err != nil {
			t.Fatal(err)
		}
		ss = append(ss, s)
	}
	e0, e1 := p.Engines()[0], p.Engines()[1]
	if e0.OpenSessions() != 2 || e1.OpenSessions() != 1 {
		t.Fatalf("sessions per worker %d/%d, want 2/1", e0.OpenSessions(), e1.OpenSessions())
	}
	// Each session works on its own worker.
	for _, s := range ss {
		mustDo(t, s, protocol.CallForwardBackward, protocol.ForwardBackwardRequest{Data: agreementData()}, nil)
	}
	for _, s := range ss {
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if e0.OpenSessions()+e1.OpenSessions() != 0 {
		t.Fatalf("sessions left open: %d/%d", e0.OpenSessions(), e1.OpenSessions())
	}
	if _, err := NewPool(nil); !errors.Is(err, node.ErrInvalidRequest) {
		t.Fatalf("empty pool: %v", err)
	}
}
