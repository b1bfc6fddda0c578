// Package ledger is Signal's accounting: integer micro-credit balances,
// mints, charges and transfers, and node operators' earnings held in
// escrow until audits release or forfeit them (escrow.go), with
// invariants that every operation keeps — no balance ever goes below
// zero, the sum of all balances changes only by mints, and an escrow
// account holds exactly its escrow's shares. It does no I/O and holds no clock, so the
// coordinator's raft FSM can replay it deterministically on every member.
package ledger

import (
	"errors"
	"fmt"
	"math"
	"sort"
)

// Sentinel errors; operations wrap them with the account and amount involved.
var (
	// ErrInvalidAmount means an amount was zero, negative or out of range.
	ErrInvalidAmount = errors.New("invalid amount")
	// ErrInsufficientBalance means a debit would take a balance below zero.
	ErrInsufficientBalance = errors.New("insufficient balance")
	// ErrInvalidAccount means an account name was empty or two legs of one
	// operation named the same account.
	ErrInvalidAccount = errors.New("invalid account")
	// ErrOverflow means a credit would overflow an int64 balance or total.
	ErrOverflow = errors.New("amount overflows")
	// ErrInvariant means the ledger's books do not balance: a bug.
	ErrInvariant = errors.New("ledger invariant broken")
)

// MaxBasisPoints is 100% expressed in basis points.
const MaxBasisPoints = 10_000

// Split is how one charge's amount is divided: the user pays Total, the
// serving node's operator receives Operator and the network's fee account
// receives Fee; Operator + Fee == Total.
type Split struct {
	Total    int64
	Operator int64
	Fee      int64
}

// SplitCharge divides amount between a node operator and the network fee at
// feeBasisPoints (0..10000). The fee is rounded down so that rounding always
// favours the operator who did the work.
func SplitCharge(amount int64, feeBasisPoints int) (Split, error) {
	if amount < 0 {
		return Split{}, fmt.Errorf("charge amount %d: %w", amount, ErrInvalidAmount)
	}
	if feeBasisPoints < 0 || feeBasisPoints > MaxBasisPoints {
		return Split{}, fmt.Errorf("fee %d basis points (allowed 0..%d): %w", feeBasisPoints, MaxBasisPoints, ErrInvalidAmount)
	}
	// amount*bps can overflow int64 for huge amounts; divide first and add
	// the remainder's share, which is exact for integers.
	fee := (amount/MaxBasisPoints)*int64(feeBasisPoints) + (amount%MaxBasisPoints)*int64(feeBasisPoints)/MaxBasisPoints
	return Split{Total: amount, Operator: amount - fee, Fee: fee}, nil
}

// AccountState is one account's books, as snapshots store them.
type AccountState struct {
	Name    string `json:"name"`
	Balance int64  `json:"balance"`
	// Spent is the total this account has paid in charges. Like Earned it
	// is a lifetime statistic, not money: credits can cycle between
	// accounts without bound, so it saturates at math.MaxInt64 instead of
	// overflowing or refusing a charge the balances allow.
	Spent int64 `json:"spent"`
	// Earned is the total this account has received from charges.
	Earned int64 `json:"earned"`
}

// Ledger holds every account's balance. The zero value is not usable; call
// New. A Ledger is not safe for concurrent use: the coordinator's FSM
// serialises access.
type Ledger struct {
	accounts map[string]*AccountState
	total    int64 // sum of balances
	minted   int64 // sum of all mints
	// escrows are the nodes' held earnings (escrow.go), each backed by
	// its escrow account's balance.
	escrows map[string]*escrow
}

// New returns an empty ledger.
func New() *Ledger {
	return &Ledger{accounts: make(map[string]*AccountState), escrows: make(map[string]*escrow)}
}

func (l *Ledger) account(name string) *AccountState {
	a := l.accounts[name]
	if a == nil {
		a = &AccountState{Name: name}
		l.accounts[name] = a
	}
	return a
}

// Balance returns an account's balance; an unknown account has 0.
func (l *Ledger) Balance(name string) int64 {
	if a := l.accounts[name]; a != nil {
		return a.Balance
	}
	return 0
}

// Account returns a copy of an account's books and whether it exists.
func (l *Ledger) Account(name string) (AccountState, bool) {
	a := l.accounts[name]
	if a == nil {
		return AccountState{Name: name}, false
	}
	return *a, true
}

// Open creates an account with a zero balance if it does not exist yet.
func (l *Ledger) Open(name string) error {
	if name == "" || IsEscrowAccount(name) {
		return fmt.Errorf("open account %q: %w", name, ErrInvalidAccount)
	}
	l.account(name)
	return nil
}

// Total is the sum of all balances.
func (l *Ledger) Total() int64 { return l.total }

// Minted is the sum of all mints; Total always equals Minted.
func (l *Ledger) Minted() int64 { return l.minted }

// SaturatingAdd adds a non-negative b to a, stopping at math.MaxInt64: for
// lifetime statistics that must never overflow or refuse a valid charge.
func SaturatingAdd(a, b int64) int64 {
	if s, ok := addChecked(a, b); ok {
		return s
	}
	return math.MaxInt64
}

func addChecked(a, b int64) (int64, bool) {
	if b > 0 && a > math.MaxInt64-b {
		return 0, false
	}
	return a + b, true
}

// Mint creates amount micro-credits in account: the only way the total grows.
func (l *Ledger) Mint(name string, amount int64) error {
	if name == "" || IsEscrowAccount(name) {
		return fmt.Errorf("mint to %q: %w", name, ErrInvalidAccount)
	}
	if amount <= 0 {
		return fmt.Errorf("mint %d to %s: must be positive: %w", amount, name, ErrInvalidAmount)
	}
	minted, ok1 := addChecked(l.minted, amount)
	total, ok2 := addChecked(l.total, amount)
	bal, ok3 := addChecked(l.Balance(name), amount)
	if !ok1 || !ok2 || !ok3 {
		return fmt.Errorf("mint %d to %s: %w", amount, name, ErrOverflow)
	}
	l.account(name).Balance = bal
	l.minted, l.total = minted, total
	return nil
}

// Transfer moves amount from one account to another.
func (l *Ledger) Transfer(from, to string, amount int64) error {
	if from == "" || to == "" || from == to || IsEscrowAccount(from) || IsEscrowAccount(to) {
		return fmt.Errorf("transfer %q -> %q: %w", from, to, ErrInvalidAccount)
	}
	if amount <= 0 {
		return fmt.Errorf("transfer %d from %s: must be positive: %w", amount, from, ErrInvalidAmount)
	}
	if bal := l.Balance(from); bal < amount {
		return fmt.Errorf("transfer %d from %s with balance %d: %w", amount, from, bal, ErrInsufficientBalance)
	}
	// The destination cannot overflow: its balance plus amount is at most
	// the total, which fits in an int64.
	l.account(from).Balance -= amount
	l.account(to).Balance += amount
	return nil
}

// Charge debits split.Total from user and credits split.Operator to the
// operator account and split.Fee to the fee account. A zero charge is
// allowed and changes nothing (calls that did no billable work). When
// operator is empty (no node served the call) the whole amount goes to fee.
func (l *Ledger) Charge(user, operator, fee string, split Split) error {
	if user == "" || fee == "" || IsEscrowAccount(user) || IsEscrowAccount(operator) || IsEscrowAccount(fee) {
		return fmt.Errorf("charge %q (operator %q, fee account %q): %w", user, operator, fee, ErrInvalidAccount)
	}
	if split.Total < 0 || split.Operator < 0 || split.Fee < 0 || split.Operator+split.Fee != split.Total {
		return fmt.Errorf("charge %s split %+v: %w", user, split, ErrInvalidAmount)
	}
	if operator == "" {
		split.Fee, split.Operator = split.Total, 0
	}
	if user == operator || user == fee {
		return fmt.Errorf("charge %s: payer is also a payee: %w", user, ErrInvalidAccount)
	}
	if err := l.pay(user, fee, split, "charge"); err != nil {
		return err
	}
	if split.Operator > 0 {
		o := l.account(operator)
		o.Balance += split.Operator
		o.Earned = SaturatingAdd(o.Earned, split.Operator)
	}
	return nil
}

// pay is the part every charge shares: it debits split.Total from payer
// (refused past its balance) and credits split.Fee to the fee account. The
// operator's share, split.Operator, is the caller's to place: credited
// (Charge) or held in a node's escrow (ChargeEscrowed). what names the
// operation in the error.
func (l *Ledger) pay(payer, fee string, split Split, what string) error {
	if bal := l.Balance(payer); bal < split.Total {
		return fmt.Errorf("%s %d to %s with balance %d: %w", what, split.Total, payer, bal, ErrInsufficientBalance)
	}
	if split.Total == 0 {
		return nil
	}
	p := l.account(payer)
	p.Balance -= split.Total
	p.Spent = SaturatingAdd(p.Spent, split.Total)
	if split.Fee > 0 {
		f := l.account(fee)
		f.Balance += split.Fee
		f.Earned = SaturatingAdd(f.Earned, split.Fee)
	}
	return nil
}

// Accounts returns every account's books, sorted by name (snapshots need a
// stable order).
func (l *Ledger) Accounts() []AccountState {
	out := make([]AccountState, 0, len(l.accounts))
	for _, a := range l.accounts {
		out = append(out, *a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Clone returns an independent copy.
func (l *Ledger) Clone() *Ledger {
	c := &Ledger{accounts: make(map[string]*AccountState, len(l.accounts)), total: l.total, minted: l.minted, escrows: make(map[string]*escrow, len(l.escrows))}
	for k, a := range l.accounts {
		cp := *a
		c.accounts[k] = &cp
	}
	for k, e := range l.escrows {
		c.escrows[k] = e.clone()
	}
	return c
}

// Restore builds a ledger from snapshot records and checks its invariants.
func Restore(accounts []AccountState, minted int64) (*Ledger, error) {
	return RestoreWithEscrows(accounts, minted, nil)
}

// RestoreWithEscrows is Restore with the nodes' escrows.
func RestoreWithEscrows(accounts []AccountState, minted int64, escrows []EscrowState) (*Ledger, error) {
	l := New()
	if err := l.restoreEscrows(escrows); err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	for _, a := range accounts {
		if a.Name == "" {
			return nil, fmt.Errorf("restore: empty account name: %w", ErrInvalidAccount)
		}
		if _, dup := l.accounts[a.Name]; dup {
			return nil, fmt.Errorf("restore: account %s twice: %w", a.Name, ErrInvariant)
		}
		cp := a
		l.accounts[a.Name] = &cp
		t, ok := addChecked(l.total, a.Balance)
		if !ok {
			return nil, fmt.Errorf("restore: total: %w", ErrOverflow)
		}
		l.total = t
	}
	l.minted = minted
	if err := l.Check(); err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	return l, nil
}

// Check verifies the invariants: every balance is non-negative, the sum
// of balances equals the sum of mints, and each escrow account holds
// exactly its escrow's shares.
func (l *Ledger) Check() error {
	var sum int64
	for name, a := range l.accounts {
		if a.Balance < 0 || a.Spent < 0 || a.Earned < 0 {
			return fmt.Errorf("account %s balance %d spent %d earned %d: %w", name, a.Balance, a.Spent, a.Earned, ErrInvariant)
		}
		var ok bool
		if sum, ok = addChecked(sum, a.Balance); !ok {
			return fmt.Errorf("sum of balances: %w", ErrOverflow)
		}
	}
	if sum != l.total || l.total != l.minted {
		return fmt.Errorf("sum of balances %d, recorded total %d, minted %d: %w", sum, l.total, l.minted, ErrInvariant)
	}
	return l.checkEscrows()
}
