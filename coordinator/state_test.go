package coordinator

import (
	"bytes"
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/signal-p2p/signal/ledger"
	"github.com/signal-p2p/signal/protocol"
)

func mustState(t *testing.T) *State {
	t.Helper()
	s := NewState()
	if err := s.CreateKey(KeyRecord{Hash: "h1", Account: "alice", CreatedAt: "t0"}, 1000); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateJoinToken(JoinTokenRecord{Hash: "jt", Operator: "op1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RegisterNode("peer1", "jt", "t0"); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateRun(RunRecord{Run: protocol.Run{ID: "r1", Status: protocol.RunReady, Node: "peer1"}, Owner: "alice"}); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestStateChargeRules(t *testing.T) {
	s := mustState(t)
	tag := &IdemTag{Scope: "alice\x00k1", BodyHash: "b1"}
	loss := 6.0
	res, err := s.Charge(chargeCmd{Account: "alice", Operator: "op1", FeeBPS: 1000, Cost: protocol.Cost{MicroCredits: 300}, RunID: "r1", Call: "forward_backward",
		Idem: tag, Body: json.RawMessage(`{"loss_sum":6}`), RunUpdate: &RunUpdate{RunID: "r1", Loss: &loss, Tokens: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Balance != 700 || res.Cost.MicroCredits != 300 || !bytes.Contains(res.Body, []byte(`"balance":700`)) {
		t.Fatalf("charge result %+v %s", res, res.Body)
	}
	if s.Balance("op1") != 270 || s.Balance(DefaultFeeAccount) != 30 {
		t.Fatalf("split: op1 %d fee %d", s.Balance("op1"), s.Balance(DefaultFeeAccount))
	}
	// The same key replays without charging.
	again, err := s.Charge(chargeCmd{Account: "alice", Cost: protocol.Cost{MicroCredits: 300}, Idem: tag})
	if err != nil || !again.Replayed || !bytes.Equal(again.Body, res.Body) || s.Balance("alice") != 700 {
		t.Fatalf("replay: %+v %v balance %d", again, err, s.Balance("alice"))
	}
	// The same key with another body conflicts.
	if _, err := s.Charge(chargeCmd{Account: "alice", Cost: protocol.Cost{MicroCredits: 1}, Idem: &IdemTag{Scope: tag.Scope, BodyHash: "b2"}}); !errors.Is(err, ErrConflict) {
		t.Fatalf("reused key: %v", err)
	}
	// Work already done is charged up to the balance, never below zero.
	capped, err := s.Charge(chargeCmd{Account: "alice", Operator: "op1", Cost: protocol.Cost{MicroCredits: 5000}})
	if err != nil || capped.Cost.MicroCredits != 700 || capped.Balance != 0 {
		t.Fatalf("capped charge %+v %v", capped, err)
	}
	// RequireAll refuses instead and changes nothing.
	if _, err := s.Charge(chargeCmd{Account: "alice", Cost: protocol.Cost{MicroCredits: 1}, RequireAll: true}); !errors.Is(err, ErrInsufficientBalance) {
		t.Fatalf("require all: %v", err)
	}
	// A bad run update leaves the ledger untouched.
	_ = s.ledger.Mint("alice", 100)
	before := s.ledger.Accounts()
	if _, err := s.Charge(chargeCmd{Account: "alice", Cost: protocol.Cost{MicroCredits: 10}, RunUpdate: &RunUpdate{RunID: "nope"}}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("charge with unknown run: %v", err)
	}
	if !reflect.DeepEqual(before, s.ledger.Accounts()) {
		t.Fatal("failed charge changed the ledger")
	}
	if err := s.ledger.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestStateRunMetricsAndMoves(t *testing.T) {
	s := mustState(t)
	loss := 10.0
	if _, err := s.UpdateRun(RunUpdate{RunID: "r1", Loss: &loss, Tokens: 4}); err != nil {
		t.Fatal(err)
	}
	r, err := s.UpdateRun(RunUpdate{RunID: "r1", Optim: &OptimFigures{Step: 1, LearningRate: 0.1, GradNorm: 2}, Time: "t1"})
	if err != nil {
		t.Fatal(err)
	}
	if r.Run.Step != 1 || len(r.Metrics) != 1 || *r.Metrics[0].LossMean != 2.5 || r.PendingLoss != nil {
		t.Fatalf("after optim %+v", r)
	}
	// With weights the step's mean is Σloss / Σweight, not Σloss / Σtokens:
	// prompt tokens (weight 0) count as tokens but not in the mean.
	for _, c := range []struct {
		loss, weight float64
		tokens       int64
	}{{6, 3, 10}, {4, 2, 6}} {
		if _, err := s.UpdateRun(RunUpdate{RunID: "r1", Loss: &c.loss, Tokens: c.tokens, Weight: &c.weight}); err != nil {
			t.Fatal(err)
		}
	}
	r, err = s.UpdateRun(RunUpdate{RunID: "r1", Optim: &OptimFigures{Step: 2}, Time: "t2"})
	if err != nil {
		t.Fatal(err)
	}
	if m := r.Metrics[1]; m.LossMean == nil || *m.LossMean != 2 || m.Tokens != 16 || r.PendingWeight != 0 {
		t.Fatalf("weighted step metrics %+v (loss_mean %v), pending weight %v", m, m.LossMean, r.PendingWeight)
	}
	if _, err := s.UpdateRun(RunUpdate{RunID: "r1", Status: protocol.RunReady, ExpectStatus: []string{protocol.RunMoving}}); !errors.Is(err, ErrConflict) {
		t.Fatalf("compare-and-set on status: %v", err)
	}
	if _, err := s.UpdateRun(RunUpdate{RunID: "r1", Status: "weird"}); !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("bad status: %v", err)
	}
	for i := 0; i < maxMetricsPerRun+5; i++ {
		_, _ = s.UpdateRun(RunUpdate{RunID: "r1", Optim: &OptimFigures{Step: i + 2}})
	}
	r, _ = s.Run("r1")
	if len(r.Metrics) != maxMetricsPerRun || r.Run.LastMetrics.Step != maxMetricsPerRun+6 {
		t.Fatalf("metrics not bounded: %d", len(r.Metrics))
	}
}

func TestStateRegisterNodeAndKeys(t *testing.T) {
	s := mustState(t)
	if _, err := s.RegisterNode("peer2", "wrong", "t"); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("bad join token: %v", err)
	}
	if _, ok := s.Node("peer2"); ok {
		t.Fatal("node joined with a bad token")
	}
	if err := s.CreateKey(KeyRecord{Hash: "h1", Account: "x"}, 0); !errors.Is(err, ErrConflict) {
		t.Fatalf("duplicate key hash: %v", err)
	}
	if _, err := s.Mint("ghost", 5); !errors.Is(err, ErrNotFound) {
		t.Fatalf("mint to unknown account: %v", err)
	}
}

// TestStateIdempotencyPerAccount is issue 13's eighth attack at the state
// level: one account's flood of records (by count, by bytes, or simply by
// age) evicts only its own oldest ones; a victim's record stays.
func TestStateIdempotencyPerAccount(t *testing.T) {
	s := NewState()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(d time.Duration) string { return t0.Add(d).Format(time.RFC3339Nano) }
	s.putIdem(IdemRecord{Scope: "victim\x00k", BodyHash: "h", Time: at(0)})
	for i := 0; i < maxIdempotencyKeys+10; i++ {
		s.putIdem(IdemRecord{Scope: "flood\x00k" + itoa(i), Time: at(time.Second)})
	}
	if n := len(s.idemOrder["flood"]); n != maxIdempotencyKeys {
		t.Fatalf("%d records of the flooding account, want %d", n, maxIdempotencyKeys)
	}
	if _, ok := s.Idem("flood\x00k0"); ok {
		t.Fatal("the flood's oldest record not evicted")
	}
	if _, ok := s.Idem("victim\x00k"); !ok {
		t.Fatal("another account's flood evicted the victim's record")
	}
	// Bytes: a few large bodies push the account's oldest out.
	big := json.RawMessage(`"` + strings.Repeat("x", maxIdempotencyBytes/4) + `"`)
	for i := 0; i < 5; i++ {
		s.putIdem(IdemRecord{Scope: "big\x00k" + itoa(i), Body: big, Time: at(time.Second)})
	}
	if s.idemBytes["big"] > maxIdempotencyBytes || len(s.idemOrder["big"]) != 3 {
		t.Fatalf("big account holds %d bytes in %d records", s.idemBytes["big"], len(s.idemOrder["big"]))
	}
	// Age: the victim's next record, a day and a second later, retires its first.
	s.putIdem(IdemRecord{Scope: "victim\x00k2", Time: at(24*time.Hour + 2*time.Second)})
	if _, ok := s.Idem("victim\x00k"); ok {
		t.Fatal("a record older than the TTL survived")
	}
	if _, ok := s.Idem("victim\x00k2"); !ok {
		t.Fatal("the new record is missing")
	}
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

// fullState has at least one record of every snapshot record type.
func fullState(t *testing.T) *State {
	s := mustState(t)
	_ = s.PutMember(MemberRecord{ID: "c1", RaftAddr: "127.0.0.1:1", HTTPAddr: "127.0.0.1:2"})
	_, _ = s.PutIdem(IdemTag{Scope: "alice\x00k", BodyHash: "h"}, 200, json.RawMessage(`{"a":1}`), "2026-01-01T00:00:00Z")
	_ = s.Hold(HoldRecord{ID: "hold_1", Account: "alice", Amount: 5, Holder: "c1", Time: "2026-01-01T00:00:00Z"})
	cp := protocol.Checkpoint{ID: "ck", RunID: "r1", Step: 3, Mode: "full", URI: "file:///x", Files: []protocol.CheckpointFile{{Name: "a", CID: "bafy", Size: 3}}}
	loss := 1.5
	_, _ = s.Charge(chargeCmd{Account: "alice", Operator: "op1", FeeBPS: 500, Cost: protocol.Cost{MicroCredits: 40}, RunID: "r1", Call: "fb", Time: "t",
		RunUpdate: &RunUpdate{RunID: "r1", Checkpoint: &cp, Loss: &loss, Tokens: 2}})
	_, _ = s.UpdateRun(RunUpdate{RunID: "r1", Optim: &OptimFigures{Step: 4, LearningRate: 1, GradNorm: 1}, Time: "t2"})
	// Escrowed earnings, verified by a pass, and more held since.
	_, _ = s.Charge(chargeCmd{Account: "alice", Operator: "op1", Node: "peer1", FeeBPS: 500, Cost: protocol.Cost{MicroCredits: 30}, Time: "2026-01-01T00:00:01Z"})
	_, _ = s.RecordAudit(auditResultCmd{Node: "peer1", At: 2, Audit: protocol.Audit{ID: "aud_1", RunID: "r1", Call: "forward", Validator: "peer2", Passed: true, Time: "t3"}})
	_, _ = s.Charge(chargeCmd{Account: "alice", Operator: "op1", Node: "peer1", FeeBPS: 500, Cost: protocol.Cost{MicroCredits: 20}, Time: "2026-01-01T00:00:03Z"})
	return s
}

func TestSnapshotRoundTripEveryRecordType(t *testing.T) {
	s := fullState(t)
	var buf bytes.Buffer
	if err := writeSnapshot(&buf, s); err != nil {
		t.Fatal(err)
	}
	got, err := readSnapshot(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		rec       recType
		want, got any
	}{
		{recMeta, s.ledger.Minted(), got.ledger.Minted()},
		{recLedgerAccount, s.ledger.Accounts(), got.ledger.Accounts()},
		{recAccount, s.accounts, got.accounts},
		{recKey, s.keys, got.keys},
		{recRun, s.runs, got.runs},
		{recNode, s.nodes, got.nodes},
		{recJoinToken, s.joinTokens, got.joinTokens},
		{recMember, s.members, got.members},
		{recIdem, s.idem, got.idem},
		{recHold, s.holds, got.holds},
		{recEscrow, s.ledger.Escrows(), got.ledger.Escrows()},
		{recNodeAudit, s.nodeAudits, got.nodeAudits},
	}
	if len(s.ledger.Escrows()) == 0 || len(s.nodeAudits) == 0 {
		t.Fatal("fullState has no escrow or audit record")
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.want, c.got) {
			t.Errorf("record type %d: restored %+v, want %+v", c.rec, c.got, c.want)
		}
	}
	if !reflect.DeepEqual(s.idemOrder, got.idemOrder) {
		t.Errorf("idempotency order %v, want %v", got.idemOrder, s.idemOrder)
	}
	// Snapshots are deterministic: the same state writes the same bytes.
	var again bytes.Buffer
	_ = writeSnapshot(&again, got)
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Error("snapshot of the restored state differs")
	}
	// Truncation and corruption are errors, never panics.
	for _, cut := range []int{0, 4, len(snapshotMagic) + 3, buf.Len() - 1} {
		if _, err := readSnapshot(bytes.NewReader(buf.Bytes()[:cut])); !errors.Is(err, errBadSnapshot) {
			t.Errorf("snapshot cut at %d: %v", cut, err)
		}
	}
}

func TestFSMApplyBatchAndSnapshotRestore(t *testing.T) {
	f := newFSM()
	k, _ := newCommand(cmdCreateKey, createKeyCmd{Key: KeyRecord{Hash: "h", Account: "a"}, Credits: 10})
	m, _ := newCommand(cmdMint, mintCmd{Account: "a", Amount: 5})
	bad, _ := newCommand(cmdMint, mintCmd{Account: "a", Amount: -1})
	res := f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: encodeBatch([]command{k, m, bad})}).([]cmdResult)
	if len(res) != 3 || res[0].Err != nil || res[1].Err != nil || !errors.Is(res[2].Err, ledger.ErrInvalidAmount) {
		t.Fatalf("results %+v", res)
	}
	snap, _ := f.Snapshot()
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	g := newFSM()
	if err := g.Restore(readCloser{bytes.NewReader(sink.Bytes())}); err != nil {
		t.Fatal(err)
	}
	if g.state.Balance("a") != 15 {
		t.Fatalf("restored balance %d, want 15", g.state.Balance("a"))
	}
}

func FuzzReadSnapshot(f *testing.F) {
	var buf bytes.Buffer
	_ = writeSnapshot(&buf, NewState())
	f.Add(buf.Bytes())
	f.Add([]byte(snapshotMagic + "\x02\x05{}"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := readSnapshot(bytes.NewReader(b))
		if err == nil {
			if cerr := s.ledger.Check(); cerr != nil {
				t.Fatalf("accepted snapshot breaks the ledger: %v", cerr)
			}
		}
	})
}

func FuzzDecodeBatch(f *testing.F) {
	c, _ := newCommand(cmdMint, mintCmd{Account: "a", Amount: 1})
	f.Add(encodeBatch([]command{c, c})[1:])
	f.Fuzz(func(t *testing.T, b []byte) {
		cmds, err := decodeBatch(b)
		if err != nil {
			return
		}
		again := encodeBatch(cmds)[1:]
		back, err := decodeBatch(again)
		if err != nil || len(back) != len(cmds) {
			t.Fatalf("re-encoded batch does not decode: %v", err)
		}
	})
}

type memSink struct{ bytes.Buffer }

func (m *memSink) ID() string    { return "mem" }
func (m *memSink) Cancel() error { return nil }
func (m *memSink) Close() error  { return nil }

type readCloser struct{ *bytes.Reader }

func (readCloser) Close() error { return nil }

// TestNodeFiguresAreChecked: the run record takes a compute answer's typed
// figures, and refuses figures that would poison the run's mean loss.
func TestNodeFiguresAreChecked(t *testing.T) {
	g := 1.5
	good := protocol.Figures{LossSum: 12, WeightSum: 3, Tokens: 4, GradNorm: &g}
	if f, err := figures(protocol.SessionResponse{Figures: &good}, protocol.CallForwardBackward); err != nil || f.WeightSum != 3 {
		t.Fatalf("good figures: %+v, %v", f, err)
	}
	for _, bad := range []*protocol.Figures{
		nil, // an answer without figures
		{LossSum: 1, WeightSum: -3},
		{LossSum: 1, WeightSum: math.NaN()},
		{LossSum: 1, WeightSum: math.Inf(1)},
		{LossSum: math.NaN(), WeightSum: 1},
		{LossSum: math.Inf(-1), WeightSum: 1},
		{LossSum: 1, WeightSum: 1, Tokens: -1},
	} {
		if _, err := figures(protocol.SessionResponse{Figures: bad}, protocol.CallForwardBackward); !errors.Is(err, ErrBadNodeAnswer) {
			t.Errorf("figures %+v: err %v, want ErrBadNodeAnswer", bad, err)
		}
	}
}

func TestFSMSkipsEntriesThatDoNotDecode(t *testing.T) {
	f := newFSM()
	k, _ := newCommand(cmdCreateKey, createKeyCmd{Key: KeyRecord{Hash: "h", Account: "a"}, Credits: 10})
	garbled := command{typ: cmdMint, payload: []byte(`{"account": "a", "amount": `)}
	unknown := command{typ: cmdType(0x7a), payload: []byte(`{}`)} // no ignoreUnknownTypeFlag
	badCharge := command{typ: cmdChargeBin, payload: []byte{0xff, 0x01}}
	m, _ := newCommand(cmdMint, mintCmd{Account: "a", Amount: 5})
	res := f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: encodeBatch([]command{k, garbled, unknown, badCharge, m})}).([]cmdResult)
	if len(res) != 5 || res[0].Err != nil || res[4].Err != nil {
		t.Fatalf("results %+v", res)
	}
	for i := 1; i <= 3; i++ {
		if !errors.Is(res[i].Err, errBadEntry) {
			t.Errorf("command %d: err %v, want errBadEntry", i, res[i].Err)
		}
	}
	// A batch entry whose framing is broken applies nothing and does not panic.
	if got := f.Apply(&raft.Log{Index: 2, Type: raft.LogCommand, Data: []byte{byte(cmdBatch), 0xff}}); got != nil {
		if rs, ok := got.([]cmdResult); !ok || len(rs) != 0 {
			t.Fatalf("broken batch answered %#v", got)
		}
	}
	if f.state.Balance("a") != 15 {
		t.Fatalf("balance %d, want 15: only the good commands apply", f.state.Balance("a"))
	}
}
