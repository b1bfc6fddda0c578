package coordinator

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/signal-p2p/signal/protocol"
)

func chargeSamples() []chargeCmd {
	loss, step := 6.5, 7
	return []chargeCmd{
		{},
		{Account: "alice", FeeBPS: 1000, Cost: protocol.Cost{MicroCredits: 1}, Time: "t", RequireAll: true},
		{Account: "alice", Operator: "op1", FeeBPS: 10_000, Cost: protocol.Cost{MicroCredits: 1 << 62, TrainTokens: 5, PrefillTokens: -3, SampledTokens: 9},
			RunID: "run-1", Call: "forward_backward", Time: "2026-01-01T00:00:00Z",
			Idem: &IdemTag{Scope: "alice\x00key", BodyHash: "abc"}, Body: json.RawMessage(`{"loss_sum":6.5}`),
			RunUpdate: &RunUpdate{RunID: "run-1", Loss: &loss, Tokens: 3, Step: &step, ExpectStatus: []string{"ready"}, Time: "t2"}},
		{Account: "bob", Idem: &IdemTag{}, Body: json.RawMessage{}},
		{Account: "carol", Operator: "op2", Cost: protocol.Cost{MicroCredits: 9}, Time: "t", HoldID: "hold_1", Node: "12D3KooWnode"},
	}
}

// Every charge survives the binary layout unchanged, and the FSM applies a
// cmdChargeBin entry exactly as it applies the JSON cmdCharge entries that
// logs written before it still hold.
func TestChargeCodecRoundTrip(t *testing.T) {
	for i, c := range chargeSamples() {
		cmd, err := newCommand(cmdCharge, c)
		if err != nil {
			t.Fatal(err)
		}
		if cmd.typ != cmdChargeBin {
			t.Fatalf("sample %d: charge encoded as %s, want charge_bin", i, cmd.typ)
		}
		got, err := decodeCharge(cmd.payload)
		if err != nil {
			t.Fatalf("sample %d: %v", i, err)
		}
		if !reflect.DeepEqual(got, c) {
			t.Fatalf("sample %d: round trip\n got %+v\nwant %+v", i, got, c)
		}
	}

	// The same charges through both encodings leave equal states and answers.
	apply := func(binary bool) (*State, []cmdResult) {
		f := newFSM()
		if err := f.state.CreateKey(KeyRecord{Hash: "h", Account: "alice"}, 1000); err != nil {
			t.Fatal(err)
		}
		var cmds []command
		for i := 0; i < 3; i++ {
			c := chargeCmd{Account: "alice", Operator: "op", FeeBPS: 1000, Cost: protocol.Cost{MicroCredits: 300}, Time: "t",
				Idem: &IdemTag{Scope: "alice\x00k" + string(rune('a'+i%2)), BodyHash: "b"}, Body: json.RawMessage(`{"x":1}`)}
			var cmd command
			var err error
			if binary {
				cmd, err = newChargeCommand(c)
			} else {
				var b []byte
				b, err = json.Marshal(c)
				cmd = command{typ: cmdCharge, payload: b}
			}
			if err != nil {
				t.Fatal(err)
			}
			cmds = append(cmds, cmd)
		}
		res := f.Apply(&raft.Log{Type: raft.LogCommand, Index: 1, Data: encodeBatch(cmds)}).([]cmdResult)
		return f.state, res
	}
	sj, rj := apply(false)
	sb, rb := apply(true)
	if !reflect.DeepEqual(rj, rb) {
		t.Fatalf("results differ:\njson   %+v\nbinary %+v", rj, rb)
	}
	if sj.Balance("alice") != 400 || sb.Balance("alice") != 400 || !reflect.DeepEqual(sj.AccountView("alice"), sb.AccountView("alice")) {
		t.Fatalf("states differ: json %+v binary %+v", sj.AccountView("alice"), sb.AccountView("alice"))
	}
	if !rb[2].Value.(ChargeResult).Replayed {
		t.Fatalf("third charge reuses the first key and must replay: %+v", rb[2])
	}
}

func TestDecodeChargeRejectsMalformed(t *testing.T) {
	cmd, err := newChargeCommand(chargeSamples()[2])
	if err != nil {
		t.Fatal(err)
	}
	p := cmd.payload
	for cut := 0; cut < len(p); cut++ {
		if _, err := decodeCharge(p[:cut]); !errors.Is(err, errBadCharge) {
			t.Fatalf("payload cut at %d of %d: err %v, want errBadCharge", cut, len(p), err)
		}
	}
	if _, err := decodeCharge(append(append([]byte{}, p...), 0)); !errors.Is(err, errBadCharge) {
		t.Fatalf("trailing byte: %v", err)
	}
	bad := append([]byte{}, p...)
	bad[0] |= 0x80
	if _, err := decodeCharge(bad); !errors.Is(err, errBadCharge) {
		t.Fatalf("unknown flag: %v", err)
	}
}

// FuzzDecodeCharge: log entries come from disk and the network, so any
// payload must decode or fail with errBadCharge, never panic, and what
// decodes must encode to a payload that decodes to the same charge.
func FuzzDecodeCharge(f *testing.F) {
	for _, c := range chargeSamples() {
		cmd, err := newChargeCommand(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(cmd.payload)
	}
	f.Add([]byte{0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, p []byte) {
		c, err := decodeCharge(p)
		if err != nil {
			if !errors.Is(err, errBadCharge) {
				t.Fatalf("error %v does not wrap errBadCharge", err)
			}
			return
		}
		again, err := newChargeCommand(c)
		if err != nil {
			t.Fatal(err)
		}
		c2, err := decodeCharge(again.payload)
		if err != nil || !reflect.DeepEqual(c, c2) {
			t.Fatalf("re-encoded charge: %v\n got %+v\nwant %+v", err, c2, c)
		}
	})
}

// The fast path for an empty object answers the very bytes of the general
// path, so members agree whichever one they take.
func TestWithBillingFastPathMatchesGeneral(t *testing.T) {
	for _, cost := range []protocol.Cost{{}, {MicroCredits: 5}, {MicroCredits: 1 << 60, TrainTokens: 7, PrefillTokens: 8, SampledTokens: 9}} {
		for _, bal := range []int64{0, 42, -1, 1 << 62} {
			fast, err := withBilling(json.RawMessage(`{}`), cost, bal, nil)
			if err != nil {
				t.Fatal(err)
			}
			general, err := withBilling(json.RawMessage(`{ }`), cost, bal, nil) // not "{}": takes the map path
			if err != nil {
				t.Fatal(err)
			}
			if string(fast) != string(general) {
				t.Fatalf("cost %+v balance %d: fast %s, general %s", cost, bal, fast, general)
			}
		}
	}
}

// An account keeps its last maxChargesPerAccount charges, and a snapshot's
// clone keeps seeing exactly what it cloned while the live state charges on.
func TestAccountChargeHistoryWindow(t *testing.T) {
	s := NewState()
	if err := s.CreateKey(KeyRecord{Hash: "h", Account: "alice"}, 1<<40); err != nil {
		t.Fatal(err)
	}
	charge := func(n int) {
		for i := 0; i < n; i++ {
			if _, err := s.Charge(chargeCmd{Account: "alice", Cost: protocol.Cost{MicroCredits: 1}, Time: "t", Call: "c"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	charge(150)
	snap := s.clone()
	before := append([]protocol.Charge(nil), snap.accounts["alice"].Charges...)
	charge(3*maxChargesPerAccount + 7)
	if got := snap.accounts["alice"].Charges; !reflect.DeepEqual(got, before) {
		t.Fatal("the clone's history changed when the live state charged")
	}
	hist := s.AccountView("alice").Charges
	if len(hist) != maxChargesPerAccount {
		t.Fatalf("history length %d, want %d", len(hist), maxChargesPerAccount)
	}
	// Charges on the clone do not leak into the live state either.
	live := append([]protocol.Charge(nil), s.accounts["alice"].Charges...)
	if _, err := snap.Charge(chargeCmd{Account: "alice", Cost: protocol.Cost{MicroCredits: 2}, Time: "clone"}); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(s.accounts["alice"].Charges, live) {
		t.Fatal("a charge on the clone changed the live history")
	}
	if got := snap.accounts["alice"].Charges; got[len(got)-1].Time != "clone" || len(got) != maxChargesPerAccount {
		t.Fatalf("clone history after its charge: len %d last %+v", len(got), got[len(got)-1])
	}
}
