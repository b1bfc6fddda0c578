package ledger

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"math/rand"
	"reflect"
	"testing"
	"testing/quick"
)

// op is one random ledger operation for the property tests.
type op struct {
	Kind     uint8 // see apply
	From, To uint8 // account indexes
	Amount   int64
	FeeBPS   int
}

const opKinds = 7

var names = []string{"alice", "bob", "carol", "op1", "op2", "fee"}

// nodes are the escrowed charges' nodes; their operator is names[To], so
// a node is sometimes charged under another operator than before.
var nodes = []string{"n1", "n2"}

func (op) Generate(r *rand.Rand, _ int) reflect.Value {
	o := op{Kind: uint8(r.Intn(opKinds)), From: uint8(r.Intn(len(names))), To: uint8(r.Intn(len(names))), FeeBPS: r.Intn(12_000) - 1000}
	switch r.Intn(6) {
	case 0:
		o.Amount = -r.Int63n(1000)
	case 1:
		o.Amount = math.MaxInt64 - r.Int63n(10)
	case 2:
		o.Amount = 0
	default:
		o.Amount = r.Int63n(5_000_000)
	}
	return reflect.ValueOf(o)
}

// apply runs o at time at. Escrow operations also check what they did
// against the escrow as it stood: a release pays the operator exactly the
// tranches at or before its cutoff, a forfeit pays each payer exactly
// what the escrow held of theirs.
func (l *Ledger) apply(o op, at int64) error {
	from, to := names[o.From], names[o.To]
	node := nodes[int(o.To)%len(nodes)]
	switch o.Kind {
	case 0:
		return l.Mint(from, o.Amount)
	case 1:
		return l.Transfer(from, to, o.Amount)
	case 2, 3:
		s, err := SplitCharge(o.Amount, o.FeeBPS)
		if err != nil {
			return err
		}
		if o.Kind == 2 {
			return l.Charge(from, to, "fee", s)
		}
		return l.ChargeEscrowed(from, node, to, "fee", s, at)
	case 4:
		before, _ := l.Escrow(node)
		n, err := l.PassAudit(node, at)
		if err == nil && n != before.OpenAmount() {
			return fmt.Errorf("pass audit verified %d, the escrow had %d open: %w", n, before.OpenAmount(), ErrInvariant)
		}
		return err
	case 5:
		before, _ := l.Escrow(node)
		cutoff := at - o.Amount%8
		var due int64
		for _, t := range before.Verified {
			if t.PassedAt <= cutoff {
				due += sumShares(t.Shares)
			}
		}
		opBefore := l.Balance(before.Operator)
		n, err := l.ReleaseEscrow(node, cutoff)
		if err == nil && (n != due || (n > 0 && l.Balance(before.Operator) != opBefore+due)) {
			return fmt.Errorf("release paid %d (operator %d → %d), due %d: %w", n, opBefore, l.Balance(before.Operator), due, ErrInvariant)
		}
		return err
	default:
		before, _ := l.Escrow(node)
		owed := map[string]int64{}
		for _, sh := range before.Open {
			owed[sh.Payer] += sh.Amount
		}
		for _, t := range before.Verified {
			for _, sh := range t.Shares {
				owed[sh.Payer] += sh.Amount
			}
		}
		balances := map[string]int64{}
		for p := range owed {
			balances[p] = l.Balance(p)
		}
		refunds, err := l.ForfeitEscrow(node)
		if err != nil {
			return err
		}
		for _, r := range refunds {
			if r.Amount != owed[r.Payer] || l.Balance(r.Payer) != balances[r.Payer]+r.Amount {
				return fmt.Errorf("forfeit refunded %s %d, owed %d: %w", r.Payer, r.Amount, owed[r.Payer], ErrInvariant)
			}
			delete(owed, r.Payer)
		}
		if len(owed) != 0 || l.Balance(EscrowAccount(node)) != 0 {
			return fmt.Errorf("forfeit left %v unpaid, escrow %d: %w", owed, l.Balance(EscrowAccount(node)), ErrInvariant)
		}
		return nil
	}
}

// TestPropertyInvariants drives random sequences of mints, transfers,
// charges, escrowed charges, passed audits, releases and forfeits (many
// invalid) and checks after every step that no balance is negative, the
// sum equals the mints, every escrow account holds exactly its shares,
// each escrow operation moved what the escrow said, and a failed
// operation changed nothing.
func TestPropertyInvariants(t *testing.T) {
	prop := func(ops []op) bool {
		l := New()
		for i, o := range ops {
			before := l.Clone()
			err := l.apply(o, int64(i))
			if errors.Is(err, ErrInvariant) {
				t.Logf("after %+v: %v", o, err)
				return false
			}
			if cerr := l.Check(); cerr != nil {
				t.Logf("after %+v: %v", o, cerr)
				return false
			}
			if err != nil {
				if !reflect.DeepEqual(before.Accounts(), l.Accounts()) || !reflect.DeepEqual(before.Escrows(), l.Escrows()) || before.Minted() != l.Minted() {
					t.Logf("failed op %+v (%v) changed state", o, err)
					return false
				}
				continue
			}
			if o.Kind != 0 && l.Minted() != before.Minted() {
				t.Logf("non-mint %+v changed minted total", o)
				return false
			}
		}
		// The books survive a snapshot: restored, they are the same.
		r, err := RestoreWithEscrows(l.Accounts(), l.Minted(), l.Escrows())
		if err != nil || !reflect.DeepEqual(r.Accounts(), l.Accounts()) || !reflect.DeepEqual(r.Escrows(), l.Escrows()) {
			t.Logf("restore: %v", err)
			return false
		}
		return true
	}
	if err := quick.Check(prop, &quick.Config{MaxCount: 5000}); err != nil {
		t.Fatal(err)
	}
}

// TestPropertySplit checks that a split always adds up, the fee never
// exceeds its share, and both parts are non-negative.
func TestPropertySplit(t *testing.T) {
	prop := func(amount int64, bps uint16) bool {
		if amount < 0 {
			amount = -(amount + 1)
		}
		b := int(bps) % (MaxBasisPoints + 1)
		s, err := SplitCharge(amount, b)
		if err != nil {
			return false
		}
		// The fee must be exactly floor(amount*b/10000), computed without overflow.
		exact := new(big.Int).Mul(big.NewInt(amount), big.NewInt(int64(b)))
		exact.Quo(exact, big.NewInt(MaxBasisPoints))
		return s.Operator >= 0 && s.Fee >= 0 && s.Operator+s.Fee == amount && exact.Cmp(big.NewInt(s.Fee)) == 0
	}
	if err := quick.Check(prop, &quick.Config{MaxCount: 2000}); err != nil {
		t.Fatal(err)
	}
}

func TestChargeSplitsBetweenOperatorAndFee(t *testing.T) {
	l := New()
	if err := l.Mint("u", 1_000_000); err != nil {
		t.Fatal(err)
	}
	s, err := SplitCharge(10_000, 1000) // 10% fee
	if err != nil {
		t.Fatal(err)
	}
	if s.Fee != 1000 || s.Operator != 9000 {
		t.Fatalf("split %+v, want fee 1000 operator 9000", s)
	}
	if err := l.Charge("u", "op", "fee", s); err != nil {
		t.Fatal(err)
	}
	if got := l.Balance("u"); got != 990_000 {
		t.Errorf("user balance %d, want 990000", got)
	}
	if got := l.Balance("op"); got != 9000 {
		t.Errorf("operator balance %d, want 9000", got)
	}
	if got := l.Balance("fee"); got != 1000 {
		t.Errorf("fee balance %d, want 1000", got)
	}
	if a, _ := l.Account("u"); a.Spent != 10_000 {
		t.Errorf("spent %d, want 10000", a.Spent)
	}
	// No operator: the network keeps everything.
	if err := l.Charge("u", "", "fee", s); err != nil {
		t.Fatal(err)
	}
	if got := l.Balance("fee"); got != 11_000 {
		t.Errorf("fee balance %d after operator-less charge, want 11000", got)
	}
}

func TestErrors(t *testing.T) {
	l := New()
	if err := l.Mint("u", 100); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		do   func() error
		want error
	}{
		{"mint zero", func() error { return l.Mint("u", 0) }, ErrInvalidAmount},
		{"mint negative", func() error { return l.Mint("u", -5) }, ErrInvalidAmount},
		{"mint overflow", func() error { return l.Mint("v", math.MaxInt64) }, ErrOverflow},
		{"mint empty account", func() error { return l.Mint("", 5) }, ErrInvalidAccount},
		{"transfer too much", func() error { return l.Transfer("u", "v", 101) }, ErrInsufficientBalance},
		{"transfer to self", func() error { return l.Transfer("u", "u", 1) }, ErrInvalidAccount},
		{"charge too much", func() error { return l.Charge("u", "op", "fee", Split{Total: 101, Operator: 101}) }, ErrInsufficientBalance},
		{"charge bad split", func() error { return l.Charge("u", "op", "fee", Split{Total: 10, Operator: 3, Fee: 3}) }, ErrInvalidAmount},
		{"charge self", func() error { return l.Charge("u", "u", "fee", Split{Total: 1, Operator: 1}) }, ErrInvalidAccount},
		{"split bps", func() error { _, err := SplitCharge(10, 10_001); return err }, ErrInvalidAmount},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.do(); !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if l.Balance("u") != 100 || l.Check() != nil {
				t.Fatalf("state changed: balance %d, check %v", l.Balance("u"), l.Check())
			}
		})
	}
}

func TestRestoreRoundTripAndCorruption(t *testing.T) {
	l := New()
	_ = l.Mint("a", 500)
	_ = l.Transfer("a", "b", 200)
	r, err := Restore(l.Accounts(), l.Minted())
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(r.Accounts(), l.Accounts()) || r.Total() != l.Total() {
		t.Fatalf("restored %+v, want %+v", r.Accounts(), l.Accounts())
	}
	if _, err := Restore(l.Accounts(), l.Minted()+1); !errors.Is(err, ErrInvariant) {
		t.Fatalf("restore with wrong minted: %v, want ErrInvariant", err)
	}
	bad := append(l.Accounts(), AccountState{Name: "c", Balance: -1})
	if _, err := Restore(bad, l.Minted()-1); !errors.Is(err, ErrInvariant) {
		t.Fatalf("restore with negative balance: %v, want ErrInvariant", err)
	}
}

// TestLifetimeCountersSaturate is the case a random run found: credits that
// cycle between two accounts through charges grow Earned and Spent past the
// total in existence. The counters must stop at MaxInt64 while the charges,
// which the balances allow, keep going through.
func TestLifetimeCountersSaturate(t *testing.T) {
	l := New()
	const big = math.MaxInt64 - 10
	if err := l.Mint("a", big); err != nil {
		t.Fatal(err)
	}
	payer, payee := "a", "b"
	for i := range 3 {
		if err := l.Charge(payer, payee, "fee", Split{Total: big, Operator: big}); err != nil {
			t.Fatalf("charge %d: %v", i, err)
		}
		if err := l.Check(); err != nil {
			t.Fatalf("after charge %d: %v", i, err)
		}
		payer, payee = payee, payer
	}
	a, _ := l.Account("a")
	b, _ := l.Account("b")
	if a.Spent != math.MaxInt64 || a.Earned != big || b.Spent != big || b.Earned != math.MaxInt64 {
		t.Fatalf("counters a %+v b %+v: want the twice-hit ones saturated at MaxInt64", a, b)
	}
	if b.Balance != big || a.Balance != 0 {
		t.Fatalf("balances a %d b %d, want 0 and %d", a.Balance, b.Balance, int64(big))
	}
}

// TestEscrowLifecycle follows one node's earnings: held per payer, closed
// by passed audits, released once their pass is old enough, and a later
// failure forfeiting everything still held back to the payers.
func TestEscrowLifecycle(t *testing.T) {
	l := New()
	for _, u := range []string{"u1", "u2"} {
		if err := l.Mint(u, 1000); err != nil {
			t.Fatal(err)
		}
	}
	split := func(n int64) Split { s, _ := SplitCharge(n, 1000); return s }
	mustCharge := func(payer string, n, at int64) {
		t.Helper()
		if err := l.ChargeEscrowed(payer, "n1", "op", "fee", split(n), at); err != nil {
			t.Fatal(err)
		}
		if err := l.Check(); err != nil {
			t.Fatal(err)
		}
	}
	mustCharge("u1", 100, 1) // 90 held for u1
	mustCharge("u2", 200, 2) // 180 held for u2
	mustCharge("u1", 100, 3) // 180 held for u1
	e, _ := l.Escrow("n1")
	if since, ok := l.OpenSince("n1"); !ok || since != 1 {
		t.Fatalf("open since %d %v, want 1", since, ok)
	}
	if e.OpenAmount() != 360 || e.OpenSince != 1 || l.Balance(EscrowAccount("n1")) != 360 || l.Balance("op") != 0 || l.Balance("fee") != 40 {
		t.Fatalf("escrow %+v, escrow account %d, operator %d, fee %d", e, l.Balance(EscrowAccount("n1")), l.Balance("op"), l.Balance("fee"))
	}
	if n, _ := l.PassAudit("n1", 10); n != 360 {
		t.Fatalf("pass verified %d, want 360", n)
	}
	mustCharge("u2", 100, 11) // 90 open for u2
	if n, _ := l.ReleaseEscrow("n1", 9); n != 0 {
		t.Fatalf("released %d before the window, want 0", n)
	}
	if n, _ := l.ReleaseEscrow("n1", 10); n != 360 || l.Balance("op") != 360 {
		t.Fatalf("released %d (operator %d), want 360", n, l.Balance("op"))
	}
	if a, _ := l.Account("op"); a.Earned != 360 {
		t.Fatalf("operator earned %d, want 360", a.Earned)
	}
	mustCharge("u1", 50, 12) // 45 open for u1
	if n, _ := l.PassAudit("n1", 20); n != 135 {
		t.Fatalf("second pass verified %d, want 135", n)
	}
	mustCharge("u1", 10, 21) // 9 open for u1
	refunds, err := l.ForfeitEscrow("n1")
	if err != nil {
		t.Fatal(err)
	}
	want := []Share{{Payer: "u1", Amount: 54}, {Payer: "u2", Amount: 90}}
	if !reflect.DeepEqual(refunds, want) {
		t.Fatalf("refunds %+v, want %+v", refunds, want)
	}
	// u1 paid 260 and got 54 back, u2 paid 300 and got 90.
	if l.Balance("u1") != 1000-260+54 || l.Balance("u2") != 1000-300+90 || l.Balance(EscrowAccount("n1")) != 0 {
		t.Fatalf("balances u1 %d u2 %d escrow %d", l.Balance("u1"), l.Balance("u2"), l.Balance(EscrowAccount("n1")))
	}
	if a, _ := l.Account("u1"); a.Spent != 260-54 {
		t.Fatalf("u1 spent %d, want %d", a.Spent, 260-54)
	}
	if _, held := l.Escrow("n1"); held || len(l.Escrows()) != 0 {
		t.Fatalf("escrow kept after forfeit: %+v", l.Escrows())
	}
	if err := l.Check(); err != nil {
		t.Fatal(err)
	}
}

// TestEscrowTranchesBounded: however many audits pass between releases,
// an escrow keeps at most maxTranches, and a merged tranche is released
// no earlier than its newest part.
func TestEscrowTranchesBounded(t *testing.T) {
	l := New()
	if err := l.Mint("u", 1_000_000); err != nil {
		t.Fatal(err)
	}
	for i := range int64(100) {
		if err := l.ChargeEscrowed("u", "n", "op", "fee", Split{Total: 10, Operator: 10}, i); err != nil {
			t.Fatal(err)
		}
		if _, err := l.PassAudit("n", i); err != nil {
			t.Fatal(err)
		}
	}
	e, _ := l.Escrow("n")
	if len(e.Verified) != maxTranches || e.VerifiedAmount() != 1000 || e.Held() != 1000 {
		t.Fatalf("%d tranches holding %d, want %d holding 1000", len(e.Verified), e.VerifiedAmount(), maxTranches)
	}
	if last := e.Verified[len(e.Verified)-1]; last.PassedAt != 99 || last.Shares[0].Amount != 10*(100-maxTranches+1) {
		t.Fatalf("newest tranche %+v", last)
	}
	if n, _ := l.ReleaseEscrow("n", 98); n != 10*(maxTranches-1) {
		t.Fatalf("released %d before the merged tranche's time, want %d", n, 10*(maxTranches-1))
	}
	if err := l.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestEscrowErrorsAndRestore(t *testing.T) {
	l := New()
	if err := l.Mint("u", 100); err != nil {
		t.Fatal(err)
	}
	if err := l.ChargeEscrowed("u", "n", "op", "fee", Split{Total: 50, Operator: 50}, 1); err != nil {
		t.Fatal(err)
	}
	esc := EscrowAccount("n")
	for name, do := range map[string]func() error{
		"mint to escrow":       func() error { return l.Mint(esc, 5) },
		"open escrow":          func() error { return l.Open(esc) },
		"transfer from escrow": func() error { return l.Transfer(esc, "u", 5) },
		"charge to escrow":     func() error { return l.Charge("u", esc, "fee", Split{Total: 5, Operator: 5}) },
		"escrow pays":          func() error { return l.ChargeEscrowed(esc, "n", "op", "fee", Split{Total: 5, Operator: 5}, 2) },
		"operator pays itself": func() error { return l.ChargeEscrowed("op", "n", "op", "fee", Split{Total: 0}, 2) },
		"too much":             func() error { return l.ChargeEscrowed("u", "n", "op", "fee", Split{Total: 51, Operator: 51}, 2) },
		"no node":              func() error { return l.ChargeEscrowed("u", "", "op", "fee", Split{Total: 5, Operator: 5}, 2) },
	} {
		if err := do(); !errors.Is(err, ErrInvalidAccount) && !errors.Is(err, ErrInsufficientBalance) {
			t.Errorf("%s: %v, want a refusal", name, err)
		}
	}
	// The network may pay a node (an audit's replay) when it takes no fee.
	if err := l.Mint("fee", 10); err != nil {
		t.Fatal(err)
	}
	if err := l.ChargeEscrowed("fee", "n", "op", "fee", Split{Total: 10, Operator: 10}, 3); err != nil {
		t.Fatalf("network pays a validator: %v", err)
	}
	if err := l.Check(); err != nil {
		t.Fatal(err)
	}
	r, err := RestoreWithEscrows(l.Accounts(), l.Minted(), l.Escrows())
	if err != nil || !reflect.DeepEqual(r.Escrows(), l.Escrows()) {
		t.Fatalf("restore: %v", err)
	}
	// An escrow whose shares do not match its account is refused, and so
	// is escrowed money without an escrow.
	bad := l.Escrows()
	bad[0].Open[0].Amount++
	if _, err := RestoreWithEscrows(l.Accounts(), l.Minted(), bad); !errors.Is(err, ErrInvariant) {
		t.Fatalf("restore with shares off by one: %v, want ErrInvariant", err)
	}
	if _, err := RestoreWithEscrows(l.Accounts(), l.Minted(), nil); !errors.Is(err, ErrInvariant) {
		t.Fatalf("restore without the escrows: %v, want ErrInvariant", err)
	}
}
