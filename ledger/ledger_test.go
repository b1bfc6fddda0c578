package ledger

import (
	"errors"
	"math"
	"math/big"
	"math/rand"
	"reflect"
	"testing"
	"testing/quick"
)

// op is one random ledger operation for the property tests.
type op struct {
	Kind     uint8 // 0 mint, 1 transfer, 2 charge
	From, To uint8 // account indexes
	Amount   int64
	FeeBPS   int
}

var names = []string{"alice", "bob", "carol", "op1", "op2", "fee"}

func (op) Generate(r *rand.Rand, _ int) reflect.Value {
	o := op{Kind: uint8(r.Intn(3)), From: uint8(r.Intn(len(names))), To: uint8(r.Intn(len(names))), FeeBPS: r.Intn(12_000) - 1000}
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

func (l *Ledger) apply(o op) error {
	from, to := names[o.From], names[o.To]
	switch o.Kind {
	case 0:
		return l.Mint(from, o.Amount)
	case 1:
		return l.Transfer(from, to, o.Amount)
	default:
		s, err := SplitCharge(o.Amount, o.FeeBPS)
		if err != nil {
			return err
		}
		return l.Charge(from, to, "fee", s)
	}
}

// TestPropertyInvariants drives random sequences of mints, transfers and
// charges (many invalid) and checks after every step that no balance is
// negative, the sum equals the mints, and a failed operation changed nothing.
func TestPropertyInvariants(t *testing.T) {
	prop := func(ops []op) bool {
		l := New()
		for _, o := range ops {
			before := l.Clone()
			err := l.apply(o)
			if cerr := l.Check(); cerr != nil {
				t.Logf("after %+v: %v", o, cerr)
				return false
			}
			if err != nil {
				if !reflect.DeepEqual(before.Accounts(), l.Accounts()) || before.Minted() != l.Minted() {
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
