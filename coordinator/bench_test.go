package coordinator

import (
	"context"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/signal-p2p/signal/protocol"
)

// BenchmarkCommittedCharges measures charges committed through raft on a
// 3-member loopback cluster (fsync'd logs, production raft timing), with 1
// and 64 concurrent clients, each charge its own command batched by the
// leader, for both log stores. It reports charges/s and p50/p99 latency;
// scripts/bench-coordinator.sh prints them against the anchors.
func BenchmarkCommittedCharges(b *testing.B) {
	for _, store := range []string{LogStoreWAL, LogStoreBolt} {
		for _, clients := range []int{1, 64} {
			b.Run("log="+store+"/clients="+strconv.Itoa(clients), func(b *testing.B) {
				benchCharges(b, store, clients)
			})
		}
	}
}

func benchCharges(b *testing.B, store string, clients int) {
	cs := startCluster(b, 3, func(c *Config) {
		c.LogStore = store
		c.MaxInflightBatches = benchInflight
		// hashicorp/raft's default timing, as `signal coordinator` runs:
		// the tests' fast timing can depose a leader on a loaded machine.
		c.HeartbeatTimeout, c.ElectionTimeout, c.LeaderLeaseTimeout, c.CommitTimeout = 0, 0, 0, 0
	})
	l := leaderOf(cs)
	const acct = "bench"
	if _, err := l.propose(context.Background(), cmdCreateKey, createKeyCmd{Key: KeyRecord{Hash: "h-bench", Account: acct}, Credits: 1 << 50}); err != nil {
		b.Fatal(err)
	}
	lat := make([]time.Duration, b.N)
	var next atomic.Int64
	var wg sync.WaitGroup
	ctx := context.Background()
	b.ResetTimer()
	start := time.Now()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= b.N {
					return
				}
				t0 := time.Now()
				if _, err := l.charge(ctx, acct, 1, "k"+strconv.Itoa(i)); err != nil {
					b.Errorf("charge %d: %v (leader now %v)", i, err, leaderOf(cs) != nil)
					return
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if b.Failed() {
		return
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "charges/s")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50_ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99_ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max_ms")
	if got := balanceOn(l, acct); got != 1<<50-int64(b.N) {
		b.Fatalf("balance %d after %d charges", got, b.N)
	}
}

// benchInflight is how many batches the benchmark's leader keeps committing
// at once (SIGNAL_BENCH_INFLIGHT overrides it).
var benchInflight = func() int {
	if n, err := strconv.Atoi(os.Getenv("SIGNAL_BENCH_INFLIGHT")); err == nil && n > 0 {
		return n
	}
	return DefaultConfig().MaxInflightBatches
}()

// BenchmarkApplyChargeBatch measures what every member's FSM does per
// committed charge: decode a 64-charge batch entry and apply each charge
// (idempotency record, ledger split, account history, billed body). No
// raft, no disk: the CPU cost that the cluster pays three times.
func BenchmarkApplyChargeBatch(b *testing.B) {
	const perBatch = 64
	f := newFSM()
	if err := f.state.CreateKey(KeyRecord{Hash: "h", Account: "bench"}, 1<<50); err != nil {
		b.Fatal(err)
	}
	entries := make([][]byte, 64)
	seq := 0
	for i := range entries {
		cmds := make([]command, perBatch)
		for j := range cmds {
			c, err := newChargeCommand(chargeCmd{Account: "bench", Operator: "op", FeeBPS: 1000, Cost: protocol.Cost{MicroCredits: 1}, Time: now(), RequireAll: true,
				Idem: &IdemTag{Scope: "bench\x00k" + strconv.Itoa(seq), BodyHash: "bench"}})
			if err != nil {
				b.Fatal(err)
			}
			seq++
			cmds[j] = c
		}
		entries[i] = encodeBatch(cmds)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// Past the prepared entries the idempotency keys repeat and charges
		// replay; a fresh state every round keeps every charge a real one.
		if i%len(entries) == 0 && i > 0 {
			b.StopTimer()
			f = newFSM()
			_ = f.state.CreateKey(KeyRecord{Hash: "h", Account: "bench"}, 1<<50)
			b.StartTimer()
		}
		res := f.Apply(&raft.Log{Type: raft.LogCommand, Index: uint64(i + 1), Data: entries[i%len(entries)]})
		if rs := res.([]cmdResult); rs[0].Err != nil || rs[0].Value.(ChargeResult).Replayed {
			b.Fatalf("charge: %+v", rs[0])
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*perBatch), "ns/charge")
}

// BenchmarkSnapshotClone measures FSM.Snapshot's copy of a full state
// (maxIdempotencyKeys idempotency records): it holds the FSM's lock, so
// every charge arriving meanwhile waits for it.
func BenchmarkSnapshotClone(b *testing.B) {
	f := newFSM()
	for i := 0; i < maxIdempotencyKeys; i++ {
		f.state.putIdem(IdemRecord{Scope: "acct\x00k" + strconv.Itoa(i), BodyHash: "b", Status: 200, Body: []byte(`{"balance":1,"cost":{"credits":1}}`)})
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		snap, err := f.Snapshot()
		if err != nil {
			b.Fatal(err)
		}
		if n := len(snap.(*fsmSnapshot).state.idem); n != maxIdempotencyKeys {
			b.Fatalf("clone holds %d records", n)
		}
	}
}
