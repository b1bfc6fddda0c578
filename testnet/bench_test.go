package testnet

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/nodetest"
	"github.com/signal-p2p/signal/protocol"
)

// Benchmarks for scripts/bench-node.sh (issue 6's network figures). On a
// shared machine the figures are noisy; the script prints them, it judges
// nothing.

// benchEngine is node/nodetest's fake engine serving the default model's
// name: session calls cost next to nothing, so what a call through the
// testnet costs beyond the engine is the network path.
const benchEngine = "bench-noop"

func init() {
	RegisterEngine(benchEngine, func(string, map[string]string) (node.Engine, error) {
		return &nodetest.Engine{ModelNames: []string{DefaultModelName}}, nil
	})
}

func noopDatum() protocol.Datum {
	const n = 8
	toks, w := make([]int, n), make([]float64, n)
	for i := range toks {
		toks[i], w[i] = i+1, 1
	}
	return protocol.Datum{ModelInput: protocol.ModelInput{Tokens: toks}, LossFnInputs: protocol.LossFnInputs{TargetTokens: toks, Weights: w}}
}

func quantiles(lat []time.Duration) (p50, p99 float64) {
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) }
	return q(0.50), q(0.99)
}

// leaderURL is the URL of the testnet's raft leader, so that the measured
// path has no follower-to-leader forwarding hop.
func leaderURL(ctx context.Context, tb testing.TB, info Info) string {
	tb.Helper()
	for _, u := range info.Coordinators {
		c, err := client.New(u, "")
		if err != nil {
			tb.Fatal(err)
		}
		if h, err := c.Health(ctx); err == nil && h.Leader {
			return u
		}
	}
	tb.Fatal("no leader among", info.Coordinators)
	return ""
}

// BenchmarkNetworkPath: a no-op-sized forward_backward (8 tokens, fake
// engine) through client → coordinator leader (HTTP, auth, raft-committed
// charge) → node (libp2p) → back, against the same call on the node's
// session manager in-process; b.N calls each. With 1 coordinator the charge
// commits on the leader's disk alone, with 3 it also waits for a follower.
func BenchmarkNetworkPath(b *testing.B) {
	for _, n := range []int{1, 3} {
		b.Run(fmt.Sprintf("coordinators=%d", n), func(b *testing.B) { benchNetworkPath(b, n) })
	}
}

func benchNetworkPath(b *testing.B, coordinators int) {
	body, _ := json.Marshal(protocol.ForwardBackwardRequest{Data: []protocol.Datum{noopDatum()}})

	mgr := node.NewManager(node.ManagerConfig{MaxSessions: 1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, &nodetest.Engine{ModelNames: []string{DefaultModelName}})
	spec, _ := json.Marshal(protocol.SessionSpec{RunID: "r", BaseModel: DefaultModelName})
	if r := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: "init", RunID: "r", Call: protocol.CallInit, Body: spec}); r.Error != nil {
		b.Fatal(r.Error)
	}
	inproc := make([]time.Duration, 0, b.N)
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		r := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: fmt.Sprint(i), RunID: "r", Call: protocol.CallForwardBackward, Body: body})
		inproc = append(inproc, time.Since(t0))
		if r.Error != nil {
			b.Fatal(r.Error)
		}
	}

	tn := startTestnet(b, func(c *Config) { c.Coordinators, c.Nodes, c.Engine = coordinators, 1, benchEngine })
	ctx := context.Background()
	c, err := client.New(leaderURL(ctx, b, tn.Info()), tn.Info().APIKey)
	if err != nil {
		b.Fatal(err)
	}
	run, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: DefaultModelName})
	if err != nil {
		b.Fatal(err)
	}
	req := protocol.ForwardBackwardRequest{Data: []protocol.Datum{noopDatum()}}
	for range 20 { // warm connections and pools
		if _, err := run.ForwardBackward(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
	netw := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		_, err := run.ForwardBackward(ctx, req)
		netw = append(netw, time.Since(t0))
		if err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	i50, i99 := quantiles(inproc)
	n50, n99 := quantiles(netw)
	b.ReportMetric(i50, "inproc-p50-µs")
	b.ReportMetric(i99, "inproc-p99-µs")
	b.ReportMetric(n50, "net-p50-µs")
	b.ReportMetric(n99, "net-p99-µs")
	b.ReportMetric((n50-i50)/1000, "added-p50-ms")
}

// BenchmarkNodeDeathToServing: on a testnet with the default timing (3
// coordinators, 2 nodes; coordinator NodeLostAfter, p2p NodeTTL and node
// advert interval as shipped), train a run to its automatic checkpoint,
// kill its node without draining, and time until the run is ready on the
// other node (s-to-moved) and until a forward_backward succeeds
// (s-to-serving), sent with the Go SDK's default retries (which honour
// Retry-After) either at the moment of the kill ("calling": the failed
// call reports the node lost) or once the run has moved ("idle": the
// coordinator notices by itself).
func BenchmarkNodeDeathToServing(b *testing.B) {
	for _, calling := range []bool{true, false} {
		name := map[bool]string{true: "calling", false: "idle"}[calling]
		b.Run(name, func(b *testing.B) {
			var moved, serving time.Duration
			for i := 0; i < b.N; i++ {
				m, s := nodeDeathOnce(b, calling)
				moved += m
				serving += s
			}
			b.ReportMetric(moved.Seconds()/float64(b.N), "s-to-moved")
			b.ReportMetric(serving.Seconds()/float64(b.N), "s-to-serving")
		})
	}
}

func nodeDeathOnce(b *testing.B, calling bool) (moved, serving time.Duration) {
	b.StopTimer()
	defer b.StartTimer()
	tn := startTestnet(b, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.New(leaderURL(ctx, b, tn.Info()), tn.Info().APIKey)
	if err != nil {
		b.Fatal(err)
	}
	rank, every := 8, 2
	r, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: DefaultModelName, LoRARank: &rank, CheckpointEvery: &every})
	if err != nil {
		b.Fatal(err)
	}
	batch := protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{{Text: "The cat sat on the mat."}}}
	for range every {
		if _, err := r.ForwardBackward(ctx, batch); err != nil {
			b.Fatal(err)
		}
		if _, err := r.OptimStep(ctx, protocol.OptimStepRequest{}); err != nil {
			b.Fatal(err)
		}
	}
	if err := r.Refresh(ctx); err != nil {
		b.Fatal(err)
	}
	before := r.Info()
	if len(before.Checkpoints) == 0 {
		b.Fatalf("no automatic checkpoint after %d steps", every)
	}
	victim := tn.NodeIndex(before.Node)
	if victim < 0 {
		b.Fatalf("run on unknown node %s", before.Node)
	}

	movedCh := make(chan time.Duration, 1)
	watch, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	killed := time.Now()
	if err := tn.KillNode(victim); err != nil {
		b.Fatal(err)
	}
	go func() {
		w := c.NewRunHandle(r.ID())
		for watch.Err() == nil {
			if err := w.Refresh(watch); err == nil {
				if in := w.Info(); in.Status == protocol.RunReady && in.Node != before.Node {
					movedCh <- time.Since(killed)
					return
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
		movedCh <- -1
	}()
	if !calling {
		if moved = <-movedCh; moved < 0 {
			b.Fatal("run never seen ready on another node")
		}
	}
	if _, err := r.ForwardBackward(ctx, batch); err != nil {
		b.Fatalf("forward_backward after the kill: %v", err)
	}
	serving = time.Since(killed)
	if calling {
		if moved = <-movedCh; moved < 0 {
			b.Fatal("run never seen ready on another node")
		}
	}
	b.Logf("node killed: run moved after %.2fs, serving after %.2fs", moved.Seconds(), serving.Seconds())
	return moved, serving
}
