package coordinator

import (
	"context"
	"errors"
	"log/slog"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/signal-p2p/signal/protocol"
)

// logRecords keeps the messages a member logs at error level; the FSM logs
// a bad entry there.
type logRecords struct {
	mu     sync.Mutex
	errors []string
}

func (r *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecords) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *logRecords) WithGroup(string) slog.Handler            { return r }

func (r *logRecords) Handle(_ context.Context, rec slog.Record) error {
	if rec.Level >= slog.LevelError {
		r.mu.Lock()
		r.errors = append(r.errors, rec.Message)
		r.mu.Unlock()
	}
	return nil
}

func (r *logRecords) count(msg string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.errors {
		if m == msg {
			n++
		}
	}
	return n
}

// futureType is a command type no member of this version knows.
const futureType cmdType = 0x7e

func TestCodecRoundTripsEveryCommand(t *testing.T) {
	for _, tc := range []struct {
		t cmdType
		v any
	}{
		{cmdCreateKey, createKeyCmd{Key: KeyRecord{Hash: "h", Account: "a"}, Credits: 10}},
		{cmdMint, mintCmd{Account: "a", Amount: 5, Time: "t"}},
		{cmdCreateRun, RunRecord{Owner: "a"}},
		{cmdUpdateRun, RunUpdate{RunID: "r", Time: "t"}},
		{cmdCreateJoinToken, JoinTokenRecord{Hash: "h", Operator: "op"}},
		{cmdRegisterNode, registerNodeCmd{PeerID: "p", TokenHash: "h", Time: "t"}},
		{cmdPutMember, MemberRecord{ID: "c1", RaftAddr: "r", HTTPAddr: "h"}},
		{cmdRemoveMember, removeMemberCmd{ID: "c1"}},
		{cmdPutIdem, putIdemCmd{Tag: IdemTag{Scope: "s", BodyHash: "b"}, Status: 200, Body: []byte(`{}`)}},
		{cmdHold, HoldRecord{ID: "hold_1", Account: "a", Amount: 3}},
		{cmdReleaseHolds, releaseHoldsCmd{IDs: []string{"hold_1"}}},
		{cmdCreateRunLimited, createRunLimitedCmd{Run: RunRecord{Owner: "a"}, MaxActive: 2}},
		{cmdPruneRuns, pruneRunsCmd{IDs: []string{"r"}}},
		{cmdRevokeKey, revokeKeyCmd{Hash: "h"}},
		{cmdAuditResult, auditResultCmd{Node: "n", Audit: protocol.Audit{ID: "a", Validator: "v"}, At: 1}},
		{cmdReleaseEscrow, releaseEscrowCmd{Cutoff: 1, Nodes: []string{"n"}}},
		{cmdTinker, tinkerCmd{Submit: &TinkerFuture{ID: "m#1", Account: "a", Model: "m", Seq: 1, Kind: kindOptimStep}}},
		{cmdLiftQuarantine, liftQuarantineCmd{PeerID: "n", Reason: "r", Time: "t"}},
		{cmdAuditQueue, auditQueueCmd{Put: &PendingAudit{ID: "aud_1", RunID: "r", Node: "n"}, Drop: []string{"aud_0"}}},
		{cmdCharge, chargeCmd{Account: "a", RunID: "r", Call: "sample", Time: "t"}},
	} {
		t.Run(tc.t.String(), func(t *testing.T) {
			c, err := newCommand(tc.t, tc.v)
			if err != nil {
				t.Fatal(err)
			}
			// The flag changes nothing for a type this member knows.
			for _, typ := range []cmdType{c.typ, c.typ | ignoreUnknownTypeFlag} {
				d, err := decodeCommand(command{typ: typ, payload: c.payload})
				if err != nil {
					t.Fatalf("decode %s: %v", typ, err)
				}
				v := d.v
				if tc.t == cmdCharge {
					v = d.charge
				}
				if reflect.TypeOf(v) != reflect.TypeOf(tc.v) {
					t.Fatalf("decode %s: %T, want %T", typ, v, tc.v)
				}
			}
		})
	}
	for _, typ := range []cmdType{futureType, futureType | ignoreUnknownTypeFlag} {
		if _, err := decodeCommand(command{typ: typ, payload: []byte(`{}`)}); !errors.Is(err, errUnknownCommand) {
			t.Fatalf("%s: err %v, want errUnknownCommand", typ, err)
		}
	}
}

// TestFSMSkipsUnknownTypes: a command of a type this member does not know
// is skipped quietly when flagged ignorable and as a logged bad entry when
// not; neither stops the commands after it.
func TestFSMSkipsUnknownTypes(t *testing.T) {
	logs := &logRecords{}
	f := newFSM()
	f.log = slog.New(logs)
	k, _ := newCommand(cmdCreateKey, createKeyCmd{Key: KeyRecord{Hash: "h", Account: "a"}, Credits: 10})
	m, _ := newCommand(cmdMint, mintCmd{Account: "a", Amount: 5})
	flaggedMint := command{typ: m.typ | ignoreUnknownTypeFlag, payload: m.payload}
	ignorable := command{typ: futureType | ignoreUnknownTypeFlag, payload: []byte(`{"from":"a newer version"}`)}
	unknown := command{typ: futureType, payload: []byte(`{}`)}
	res := f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: encodeBatch([]command{k, ignorable, m, unknown, flaggedMint})}).([]cmdResult)
	if len(res) != 5 {
		t.Fatalf("results %+v", res)
	}
	for i, want := range []error{nil, nil, nil, errBadEntry, nil} {
		if !errors.Is(res[i].Err, want) || (want == nil && res[i].Err != nil) {
			t.Errorf("command %d: err %v, want %v", i, res[i].Err, want)
		}
	}
	if got := logs.count("raft entry skipped"); got != 1 {
		t.Errorf("%d bad entries logged, want 1 (the unflagged unknown type): %v", got, logs.errors)
	}
	// An entry that is one ignorable command, outside a batch.
	if r := f.Apply(&raft.Log{Index: 2, Type: raft.LogCommand, Data: append([]byte{byte(ignorable.typ)}, ignorable.payload...)}).(cmdResult); r.Err != nil {
		t.Errorf("lone ignorable entry: %v", r.Err)
	}
	if f.state.Balance("a") != 20 {
		t.Fatalf("balance %d, want 20: both mints apply", f.state.Balance("a"))
	}
}

// TestClusterSkipsIgnorableUnknownTypes: every member skips a flagged
// command of an unknown type without logging it as bad, and applies the
// entries after it.
func TestClusterSkipsIgnorableUnknownTypes(t *testing.T) {
	var logs []*logRecords
	cs := startCluster(t, 3, func(cfg *Config) {
		l := &logRecords{}
		logs = append(logs, l)
		cfg.Logger = slog.New(l)
	})
	l := leaderOf(cs)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	mintAccount(t, l, "acct", 1)
	if _, err := l.batch.propose(ctx, command{typ: futureType | ignoreUnknownTypeFlag, payload: []byte(`{}`)}); err != nil {
		t.Fatalf("ignorable command: %v", err)
	}
	mint := func(amount int64) {
		t.Helper()
		if _, err := l.propose(ctx, cmdMint, mintCmd{Account: "acct", Amount: amount}); err != nil {
			t.Fatal(err)
		}
	}
	mint(2)
	if _, err := l.batch.propose(ctx, command{typ: futureType, payload: []byte(`{}`)}); !errors.Is(err, errBadEntry) {
		t.Fatalf("unknown command: err %v, want errBadEntry", err)
	}
	mint(4)
	waitFor(t, 10*time.Second, "every member applies the mints", func() bool {
		for _, c := range cs {
			if balanceOn(c, "acct") != 7 {
				return false
			}
		}
		return true
	})
	for i, lr := range logs {
		if got := lr.count("raft entry skipped"); got != 1 {
			t.Errorf("member %d logged %d bad entries, want 1 (the unflagged one): %v", i, got, lr.errors)
		}
	}
}
