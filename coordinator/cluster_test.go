package coordinator

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/signal-p2p/signal/protocol"
)

// mintAccount creates an account with credits through the leader.
func mintAccount(t *testing.T, leader *Coordinator, acct string, credits int64) {
	t.Helper()
	if _, err := leader.propose(context.Background(), cmdCreateKey, createKeyCmd{Key: KeyRecord{Hash: "hash-" + acct, Account: acct}, Credits: credits}); err != nil {
		t.Fatal(err)
	}
}

func balanceOn(c *Coordinator, acct string) int64 {
	var b int64
	c.State(func(s *State) { b = s.Balance(acct) })
	return b
}

func TestClusterForwardingAndJoinThroughFollower(t *testing.T) {
	fnet := newFakeNet("nodeA")
	var cs []*Coordinator
	for i := 0; i < 3; i++ {
		cfg := testConfig(t, fmt.Sprintf("c%d", i))
		cfg.Backend = fnet.backend()
		if i == 0 {
			cfg.Bootstrap = true
		} else {
			cfg.Join = cs[i-1].URL() // c2 joins through c1, a follower
		}
		cs = append(cs, mustStart(t, cfg))
		if i == 0 {
			waitFor(t, 10*time.Second, "leader", cs[0].IsLeader)
		}
	}
	waitFor(t, 15*time.Second, "3 voters", func() bool {
		f := cs[0].raft.GetConfiguration()
		return f.Error() == nil && len(f.Configuration().Servers) == 3
	})
	for _, c := range cs {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := c.WaitLeader(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	follower := cs[2]
	if follower.IsLeader() {
		t.Fatal("c2 should be a follower")
	}
	// Writes and reads through followers reach the leader.
	key, _ := createKey(t, follower.URL(), 5000)
	joinNodes(t, cs[1], "op", "nodeA") // AdmitNode on a follower asks the leader
	waitFor(t, 5*time.Second, "node joined everywhere", func() bool { return cs[2].IsJoined("nodeA") })
	r := do(t, "POST", cs[1].URL()+"/v1/runs", key, map[string]any{"base_model": "tiny"})
	mustStatus(t, r, 201)
	var run protocol.Run
	r.decode(t, &run)
	r = do(t, "POST", follower.URL()+"/v1/runs/"+run.ID+"/forward_backward", key, fbBody(5))
	mustStatus(t, r, 200)
	var a protocol.Account
	do(t, "GET", cs[1].URL()+"/v1/account", key, nil).decode(t, &a)
	if a.BalanceMicroCredits != 4995 {
		t.Fatalf("balance through a follower %d, want 4995", a.BalanceMicroCredits)
	}
	// Cluster status lists every member with its HTTP address.
	var st ClusterStatus
	do(t, "GET", follower.URL()+"/v1/cluster", testAdmin, nil).decode(t, &st)
	if len(st.Members) != 3 || st.LeaderID != "c0" {
		t.Fatalf("cluster status %+v", st)
	}
}

// chargeClient retries one logical charge (one idempotency key) against
// whichever member leads until it is acknowledged.
func chargeUntilAcked(ctx context.Context, cs []*Coordinator, acct string, amount int64, key string) (ChargeResult, error) {
	for {
		if l := leaderOf(cs); l != nil {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			res, err := l.charge(cctx, acct, amount, key)
			cancel()
			if err == nil || errors.Is(err, ErrInsufficientBalance) {
				return res, err
			}
		}
		select {
		case <-ctx.Done():
			return ChargeResult{}, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func readUntilDone(ctx context.Context, cs []*Coordinator, acct string) (int64, error) {
	for {
		if l := leaderOf(cs); l != nil && l.raft.VerifyLeader().Error() == nil {
			return balanceOn(l, acct), nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ledgerIn/Out are porcupine's operation records for one account.
type ledgerIn struct {
	charge bool
	amount int64
}
type ledgerOut struct {
	ok      bool
	balance int64
}

var ledgerModel = porcupine.Model{
	Init: func() any { return int64(0) },
	Step: func(state, input, output any) (bool, any) {
		bal, in, out := state.(int64), input.(ledgerIn), output.(ledgerOut)
		if !in.charge {
			return out.balance == bal, bal
		}
		if in.amount > bal {
			return !out.ok, bal
		}
		return out.ok && out.balance == bal-in.amount, bal - in.amount
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(ledgerIn), output.(ledgerOut)
		if in.charge {
			return fmt.Sprintf("charge(%d) -> ok=%v bal=%d", in.amount, out.ok, out.balance)
		}
		return fmt.Sprintf("read() -> %d", out.balance)
	},
}

// TestClusterLeaderKilledMidStream kills the leader while clients charge
// one account: a new leader must serve within seconds, every acknowledged
// charge must be applied exactly once, and the history of charges and
// reads must be linearizable (porcupine).
func TestClusterLeaderKilledMidStream(t *testing.T) {
	cs := startCluster(t, 3, nil)
	const acct, initial = "acct-ha", 1_000_000
	mintAccount(t, leaderOf(cs), acct, initial)
	waitFor(t, 5*time.Second, "mint replicated", func() bool { return balanceOn(cs[1], acct) == initial && balanceOn(cs[2], acct) == initial })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	var mu sync.Mutex
	var ops []porcupine.Operation
	var acked atomic.Int64
	var stop atomic.Bool
	var wg sync.WaitGroup
	for cl := 0; cl < 8; cl++ {
		wg.Add(1)
		go func(cl int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(cl)))
			for i := 0; !stop.Load(); i++ {
				call := time.Since(start).Nanoseconds()
				var op porcupine.Operation
				if rng.Intn(4) == 0 {
					bal, err := readUntilDone(ctx, cs, acct)
					if err != nil {
						t.Errorf("read never served: %v", err)
						return
					}
					op = porcupine.Operation{ClientId: cl, Input: ledgerIn{}, Output: ledgerOut{balance: bal}}
				} else {
					amt := int64(1 + rng.Intn(100))
					res, err := chargeUntilAcked(ctx, cs, acct, amt, fmt.Sprintf("c%d-%d", cl, i))
					if err != nil && !errors.Is(err, ErrInsufficientBalance) {
						t.Errorf("charge never acknowledged: %v", err)
						return
					}
					if err == nil {
						acked.Add(amt)
					}
					op = porcupine.Operation{ClientId: cl, Input: ledgerIn{charge: true, amount: amt}, Output: ledgerOut{ok: err == nil, balance: res.Balance}}
				}
				op.Call, op.Return = call, time.Since(start).Nanoseconds()
				mu.Lock()
				ops = append(ops, op)
				mu.Unlock()
			}
		}(cl)
	}
	time.Sleep(700 * time.Millisecond)
	old := leaderOf(cs)
	killed := time.Now()
	if err := old.Stop(); err != nil {
		t.Logf("stop leader: %v", err)
	}
	var survivors []*Coordinator
	for _, c := range cs {
		if c != old {
			survivors = append(survivors, c)
		}
	}
	waitFor(t, 10*time.Second, "new leader", func() bool { return leaderOf(survivors) != nil })
	t.Logf("new leader %s after %v", leaderOf(survivors).ID(), time.Since(killed).Round(time.Millisecond))
	time.Sleep(700 * time.Millisecond)
	stop.Store(true)
	wg.Wait()

	l := leaderOf(survivors)
	if got, want := balanceOn(l, acct), initial-acked.Load(); got != want {
		t.Fatalf("balance %d, want %d: an acknowledged charge was lost or doubled", got, want)
	}
	for _, c := range survivors {
		waitFor(t, 5*time.Second, "followers caught up", func() bool { return balanceOn(c, acct) == initial-acked.Load() })
		c.State(func(s *State) {
			if err := s.Ledger().Check(); err != nil {
				t.Error(err)
			}
		})
	}
	// The mint happened before any client operation: the model starts there.
	model := ledgerModel
	model.Init = func() any { return int64(initial) }
	res := porcupine.CheckOperationsTimeout(model, ops, 20*time.Second)
	if res == porcupine.Illegal {
		t.Fatalf("history of %d operations is not linearizable", len(ops))
	}
	t.Logf("%d operations, %d micro-credits acknowledged, porcupine: %v", len(ops), acked.Load(), res)
}

func TestClusterPartitionedFollowerCatchesUp(t *testing.T) {
	cs := startCluster(t, 3, nil)
	l := leaderOf(cs)
	const acct = "acct-p"
	mintAccount(t, l, acct, 100_000)
	waitFor(t, 5*time.Second, "mint replicated", func() bool { return balanceOn(cs[0], acct)+balanceOn(cs[1], acct)+balanceOn(cs[2], acct) == 300_000 })
	var f *Coordinator
	for _, c := range cs {
		if c != l {
			f = c
			break
		}
	}
	f.stream.setPartitioned(true)
	ctx := context.Background()
	for i := 0; i < 50; i++ {
		if _, err := l.charge(ctx, acct, 10, ""); err != nil {
			t.Fatalf("charge %d with one follower partitioned: %v", i, err)
		}
	}
	if got := balanceOn(f, acct); got != 100_000 {
		t.Fatalf("partitioned follower saw charges: balance %d", got)
	}
	f.stream.setPartitioned(false)
	waitFor(t, 15*time.Second, "healed follower catches up", func() bool { return balanceOn(f, acct) == 100_000-500 })
}

func TestClusterSnapshotInstallAndRestartFromDisk(t *testing.T) {
	cs := startCluster(t, 3, func(c *Config) { c.SnapshotThreshold = 64 })
	l := leaderOf(cs)
	const acct = "acct-s"
	mintAccount(t, l, acct, 1_000_000)
	ctx := context.Background()
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				if _, err := l.charge(ctx, acct, 1, fmt.Sprintf("s%d-%d", g, i)); err != nil {
					t.Error(err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	if err := l.Snapshot(); err != nil {
		t.Fatal(err)
	}
	want := int64(1_000_000 - 200)
	// A new member joins after the snapshot: it is brought up by snapshot install.
	cfg := testConfig(t, "c3")
	cfg.Join = cs[1].URL()
	late := mustStart(t, cfg)
	waitFor(t, 15*time.Second, "late member restored", func() bool { return balanceOn(late, acct) == want })

	// Restart every member from its data dir on the same raft address.
	var cfgs []Config
	for _, c := range append(cs, late) {
		cc := c.cfg
		cc.RaftAddr = c.RaftAddr()
		cc.Join, cc.Bootstrap = "", false
		cfgs = append(cfgs, cc)
		if err := c.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	var again []*Coordinator
	for _, cc := range cfgs {
		again = append(again, mustStart(t, cc))
	}
	waitFor(t, 15*time.Second, "leader after restart", func() bool { return leaderOf(again) != nil })
	for _, c := range again {
		waitFor(t, 10*time.Second, "state after restart", func() bool { return balanceOn(c, acct) == want })
	}
	// Idempotency records survived: a retried charge is not applied again.
	res, err := leaderOf(again).charge(ctx, acct, 1, "s0-0")
	if err != nil || !res.Replayed || balanceOn(leaderOf(again), acct) != want {
		t.Fatalf("retry after restart: %+v %v", res, err)
	}
}
