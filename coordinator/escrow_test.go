package coordinator

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/ledger"
	"github.com/signal-p2p/signal/protocol"
)

// TestEscrowRules follows one node's earnings through the state's rules:
// held per charge, verified by a pass (the validator paid by the network),
// released after the window, and the next failure refunding what was held
// since, quarantining the node and billing nothing more of its calls.
func TestEscrowRules(t *testing.T) {
	s := mustState(t) // alice holds 1000; peer1 earns for op1
	if err := s.CreateJoinToken(JoinTokenRecord{Hash: "jt2", Operator: "op2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RegisterNode("peer2", "jt2", "t0"); err != nil {
		t.Fatal(err)
	}
	check := func() {
		t.Helper()
		if err := s.ledger.Check(); err != nil {
			t.Fatal(err)
		}
	}
	charge := func(credits int64, at string) ChargeResult {
		t.Helper()
		res, err := s.Charge(chargeCmd{Account: "alice", Operator: "op1", Node: "peer1", FeeBPS: 1000, Cost: protocol.Cost{MicroCredits: credits}, RunID: "r1", Call: "forward", Time: at})
		if err != nil {
			t.Fatal(err)
		}
		check()
		return res
	}
	charge(200, "2026-01-01T00:00:00Z")
	if s.Balance("op1") != 0 || s.Balance(ledger.EscrowAccount("peer1")) != 180 || s.Balance(DefaultFeeAccount) != 20 || s.Balance("alice") != 800 {
		t.Fatalf("after a charge: op1 %d, escrow %d, fee %d, alice %d", s.Balance("op1"), s.Balance(ledger.EscrowAccount("peer1")), s.Balance(DefaultFeeAccount), s.Balance("alice"))
	}
	if since, ok := s.UnauditedSince("peer1"); !ok || since != 1767225600000 {
		t.Fatalf("unaudited since %d %v", since, ok)
	}
	pass := auditResultCmd{Node: "peer1", At: 10, ValidatorOperator: "op2", ValidatorPay: 15,
		Audit: protocol.Audit{ID: "aud_1", RunID: "r1", Call: "forward", Validator: "peer2", Passed: true, Time: "t1"}}
	out, err := s.RecordAudit(pass)
	if err != nil || out.Verified != 180 || out.ValidatorPaid != 15 {
		t.Fatalf("pass: %+v %v", out, err)
	}
	check()
	if again, _ := s.RecordAudit(pass); again.Verified != 0 || s.nodeAudits["peer1"].Passed != 1 {
		t.Fatalf("a retried verdict counted twice: %+v", s.nodeAudits["peer1"])
	}
	if got := s.ReleasableNodes(9); len(got) != 0 {
		t.Fatalf("releasable before the window: %v", got)
	}
	nodes := s.ReleasableNodes(10)
	if n, err := s.ReleaseEscrow(releaseEscrowCmd{Cutoff: 10, Nodes: nodes}); err != nil || n != 180 || s.Balance("op1") != 180 {
		t.Fatalf("release %v: %d %v, op1 %d", nodes, n, err, s.Balance("op1"))
	}
	check()

	charge(100, "2026-01-01T00:00:20Z") // 90 held for alice
	fail := auditResultCmd{Node: "peer1", At: 30, Audit: protocol.Audit{ID: "aud_2", RunID: "r1", Call: "forward", Validator: "peer2", Reason: "loss_sum: claimed 1, replay 2", Time: "t2"}}
	out, err = s.RecordAudit(fail)
	if err != nil || !reflect.DeepEqual(out.Refunds, []ledger.Share{{Payer: "alice", Amount: 90}}) {
		t.Fatalf("failure: %+v %v", out, err)
	}
	check()
	if !s.Quarantined("peer1") || s.Balance("alice") != 800-100+90 {
		t.Fatalf("quarantined %v, alice %d", s.Quarantined("peer1"), s.Balance("alice"))
	}
	if res := charge(100, "2026-01-01T00:00:40Z"); res.Cost.MicroCredits != 0 {
		t.Fatalf("a quarantined node's call billed %d", res.Cost.MicroCredits)
	}
	v := s.NodeAuditView("peer1")
	if v.Passed != 1 || v.Failed != 1 || !v.Quarantined || v.RefundedMicroCredits != 90 || v.HeldMicroCredits != 0 || len(v.Recent) != 2 {
		t.Fatalf("view %+v", v)
	}
	op := s.OperatorView("op1")
	if op == nil || op.EarnedMicroCredits != 180 || op.RefundedMicroCredits != 90 || len(op.Nodes) != 1 || !op.Nodes[0].Audits.Quarantined {
		t.Fatalf("operator view %+v", op)
	}
	val := s.OperatorView("op2")
	if val == nil || val.HeldMicroCredits != 15 || val.Nodes[0].Audits.Validated != 2 {
		t.Fatalf("validator's operator view %+v", val)
	}
	if s.OperatorView("alice") != nil {
		t.Fatal("a user has an operator view")
	}

	// It all survives a snapshot.
	var buf bytes.Buffer
	if err := writeSnapshot(&buf, s); err != nil {
		t.Fatal(err)
	}
	got, err := readSnapshot(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.nodeAudits, s.nodeAudits) || !reflect.DeepEqual(got.ledger.Escrows(), s.ledger.Escrows()) || !got.Quarantined("peer1") {
		t.Fatalf("restored audits %+v escrows %+v", got.nodeAudits, got.ledger.Escrows())
	}
}

// A quarantined operator's new nodes are refused until an admin lifts the
// quarantine; the lift keeps the failed audit in the node's history.
func TestQuarantineLiftAndOperatorsNewNodes(t *testing.T) {
	s := mustState(t) // peer1 joined for op1 with join token "jt"
	if _, err := s.LiftQuarantine(liftQuarantineCmd{PeerID: "peer1", Reason: "x", Time: "t1"}); err == nil {
		t.Fatal("lifted a quarantine that is not there")
	}
	fail := auditResultCmd{Node: "peer1", At: 30, Audit: protocol.Audit{ID: "aud_f", RunID: "r1", Call: "forward", Validator: "peer9", Reason: "loss_sum: claimed 1, replay 2", Time: "t2"}}
	if _, err := s.RecordAudit(fail); err != nil {
		t.Fatal(err)
	}
	_, err := s.RegisterNode("peer-new", "jt", "t3")
	if !errors.Is(err, ErrForbidden) || !strings.Contains(err.Error(), "peer1 is quarantined") {
		t.Fatalf("a quarantined operator's new node: %v", err)
	}
	if _, ok := s.Node("peer-new"); ok {
		t.Fatal("the refused node was recorded")
	}
	// The quarantined node itself re-registering is not a new node.
	if _, err := s.RegisterNode("peer1", "jt", "t3"); err != nil {
		t.Fatalf("the quarantined node's own re-registration: %v", err)
	}
	rec, err := s.LiftQuarantine(liftQuarantineCmd{PeerID: "peer1", Reason: "the operator replaced a faulty GPU", Time: "t4"})
	if err != nil || rec.Quarantined || rec.LiftReason == "" || rec.Failed != 1 {
		t.Fatalf("lift: %+v %v", rec, err)
	}
	if v := s.NodeAuditView("peer1"); v.Quarantined || v.LiftedAt != "t4" || len(v.Recent) != 1 {
		t.Fatalf("view after the lift: %+v", v)
	}
	if _, err := s.RegisterNode("peer-new", "jt", "t5"); err != nil {
		t.Fatalf("after the lift: %v", err)
	}
}

// A move off a quarantined node resumes from a checkpoint its passed
// audits cover, or one another node made: never from the ones it made
// after its last pass.
func TestMoveSkipsAQuarantinedNodesUnverifiedCheckpoints(t *testing.T) {
	c := mustStart(t, func() Config { cfg := testConfig(t, "solo"); cfg.Bootstrap = true; return cfg }())
	cp := func(id, node, at string) protocol.Checkpoint {
		return protocol.Checkpoint{ID: id, Mode: "full", Node: node, CreatedAt: at}
	}
	c.fsm.mu.Lock()
	c.fsm.state.nodeAudits["liar"] = NodeAuditRecord{PeerID: "liar", Passed: 3, Failed: 1, Quarantined: true, LastPassed: "2026-01-01T10:00:00Z"}
	c.fsm.mu.Unlock()
	r := &RunRecord{Run: protocol.Run{ID: "r1", Checkpoints: []protocol.Checkpoint{
		cp("before-pass", "liar", "2026-01-01T09:00:00Z"),
		cp("other-node", "honest", "2026-01-01T09:30:00Z"),
		cp("after-pass", "liar", "2026-01-01T11:00:00Z"),
	}}}
	if got, _ := c.nextResume(r); got == nil || got.ID != "other-node" {
		t.Errorf("resume from %v, want other-node (after-pass is the liar's word alone)", got)
	}
	r.Run.Checkpoints = r.Run.Checkpoints[:1:1]
	r.Run.Checkpoints = append(r.Run.Checkpoints, cp("after-pass", "liar", "2026-01-01T11:00:00Z"))
	if got, _ := c.nextResume(r); got == nil || got.ID != "before-pass" {
		t.Errorf("resume from %v, want before-pass (its last passed audit covers it)", got)
	}
	c.fsm.mu.Lock()
	c.fsm.state.nodeAudits["liar"] = NodeAuditRecord{PeerID: "liar", Failed: 1, Quarantined: true}
	c.fsm.mu.Unlock()
	if got, tried := c.nextResume(r); got != nil || tried != 0 {
		t.Errorf("a node with no passed audit vouches for none of its checkpoints: resume from %v (tried %d)", got, tried)
	}
}
