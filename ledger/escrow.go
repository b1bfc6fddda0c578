package ledger

import (
	"fmt"
	"math"
	"sort"
	"strings"
)

// Escrow: a node operator's share of each charge is not credited at once.
// It is held in the node's escrow account (EscrowAccount), attributed to
// the payer it came from, until audits of the node's work decide:
//
//   - a passed audit closes the shares held since the previous pass into a
//     verified tranche stamped with the pass's time (PassAudit);
//   - a tranche verified long enough ago is released to the operator
//     (ReleaseEscrow, with a cutoff the caller computes from its clock);
//   - a failed audit forfeits everything held, verified or not, and pays
//     each share back to its payer (ForfeitEscrow): a pass vouches for one
//     call, not for the calls around it.
//
// The escrow account is an ordinary account whose balance is the sum of
// its shares, so the books still balance: the sum of all balances changes
// only by mints. Shares are aggregated per payer (one entry per payer in
// the open part and in each tranche) and tranches are merged beyond
// maxTranches, so an escrow's size is bounded by the payers it serves, not
// by the calls. Times are integers the caller chooses (the coordinator's
// leader puts Unix seconds in its commands): the ledger keeps no clock.

// EscrowPrefix begins the name of every escrow account; no other
// operation may name one (ErrInvalidAccount).
const EscrowPrefix = "escrow:"

// maxTranches bounds an escrow's verified tranches. A pass beyond it
// merges the two newest tranches, keeping the later time: a merged share
// is released no earlier than either would have been.
const maxTranches = 32

// EscrowAccount is the name of node's escrow account.
func EscrowAccount(node string) string { return EscrowPrefix + node }

// IsEscrowAccount reports whether name is an escrow account's.
func IsEscrowAccount(name string) bool { return strings.HasPrefix(name, EscrowPrefix) }

// Share is an amount held for an operator, and the payer it came from.
type Share struct {
	Payer  string `json:"payer"`
	Amount int64  `json:"amount"`
}

// Tranche is the shares a passed audit closed, and when it passed.
type Tranche struct {
	PassedAt int64   `json:"passed_at"`
	Shares   []Share `json:"shares"`
}

// EscrowState is one node's escrow, as snapshots store it and views show
// it. Shares are sorted by payer, tranches oldest first.
type EscrowState struct {
	Node     string `json:"node"`
	Operator string `json:"operator"`
	// Open is what the node earned since its last passed audit;
	// OpenSince the time of the first of it.
	Open      []Share `json:"open,omitempty"`
	OpenSince int64   `json:"open_since,omitempty"`
	// Verified is what passed audits closed, not yet released.
	Verified []Tranche `json:"verified,omitempty"`
}

// Held is the escrow's total: its account's balance.
func (e EscrowState) Held() int64 { return e.OpenAmount() + e.VerifiedAmount() }

// OpenAmount is the part earned since the last passed audit.
func (e EscrowState) OpenAmount() int64 { return sumShares(e.Open) }

// VerifiedAmount is the part passed audits closed.
func (e EscrowState) VerifiedAmount() int64 {
	var n int64
	for _, t := range e.Verified {
		n += sumShares(t.Shares)
	}
	return n
}

func sumShares(ss []Share) int64 {
	var n int64
	for _, s := range ss {
		n += s.Amount
	}
	return n
}

type tranche struct {
	passedAt int64
	shares   map[string]int64
}

type escrow struct {
	operator  string
	open      map[string]int64
	openSince int64
	tranches  []tranche
}

func (e *escrow) clone() *escrow {
	c := &escrow{operator: e.operator, open: cloneShares(e.open), openSince: e.openSince, tranches: make([]tranche, len(e.tranches))}
	for i, t := range e.tranches {
		c.tranches[i] = tranche{passedAt: t.passedAt, shares: cloneShares(t.shares)}
	}
	return c
}

func cloneShares(m map[string]int64) map[string]int64 {
	c := make(map[string]int64, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

func (e *escrow) state(node string) EscrowState {
	s := EscrowState{Node: node, Operator: e.operator, Open: sortedShares(e.open), OpenSince: e.openSince}
	for _, t := range e.tranches {
		s.Verified = append(s.Verified, Tranche{PassedAt: t.passedAt, Shares: sortedShares(t.shares)})
	}
	return s
}

func sortedShares(m map[string]int64) []Share {
	if len(m) == 0 {
		return nil
	}
	out := make([]Share, 0, len(m))
	for p, a := range m {
		out = append(out, Share{Payer: p, Amount: a})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Payer < out[j].Payer })
	return out
}

// ChargeEscrowed is Charge with the operator's share held in node's
// escrow, attributed to payer, instead of credited to the operator. at
// is the charge's time. An empty operator gives the whole amount to fee,
// as Charge does. The network may pay a node itself (payer == fee, as for
// an audit's replay) when the split takes no fee.
func (l *Ledger) ChargeEscrowed(payer, node, operator, fee string, split Split, at int64) error {
	if operator == "" {
		return l.Charge(payer, "", fee, split)
	}
	if payer == "" || fee == "" || node == "" {
		return fmt.Errorf("escrowed charge %q on node %q (fee account %q): %w", payer, node, fee, ErrInvalidAccount)
	}
	if IsEscrowAccount(payer) || IsEscrowAccount(operator) || IsEscrowAccount(fee) {
		return fmt.Errorf("escrowed charge %s: an escrow account as a leg: %w", payer, ErrInvalidAccount)
	}
	if split.Total < 0 || split.Operator < 0 || split.Fee < 0 || split.Operator+split.Fee != split.Total {
		return fmt.Errorf("escrowed charge %s split %+v: %w", payer, split, ErrInvalidAmount)
	}
	if payer == operator || (payer == fee && split.Fee > 0) {
		return fmt.Errorf("escrowed charge %s: payer is also a payee: %w", payer, ErrInvalidAccount)
	}
	if err := l.pay(payer, fee, split, "escrowed charge"); err != nil {
		return err
	}
	if split.Operator > 0 {
		e := l.escrows[node]
		if e == nil {
			e = &escrow{open: map[string]int64{}}
			l.escrows[node] = e
		}
		// The escrow follows the node: a node admitted again under another
		// operator's join token (which only that operator can hand out)
		// takes what it holds to that operator.
		e.operator = operator
		if len(e.open) == 0 {
			e.openSince = at
		}
		// Every share is part of the total, which fits in an int64.
		e.open[payer] += split.Operator
		l.account(EscrowAccount(node)).Balance += split.Operator
	}
	return nil
}

// PassAudit records a passed audit of node at time at: what it earned
// since its last pass becomes a verified tranche. It returns the amount
// verified.
func (l *Ledger) PassAudit(node string, at int64) (int64, error) {
	if node == "" {
		return 0, fmt.Errorf("pass audit: empty node: %w", ErrInvalidAccount)
	}
	e := l.escrows[node]
	if e == nil || len(e.open) == 0 {
		return 0, nil
	}
	var n int64
	for _, a := range e.open {
		n += a
	}
	e.tranches = append(e.tranches, tranche{passedAt: at, shares: e.open})
	e.open, e.openSince = map[string]int64{}, 0
	if k := len(e.tranches); k > maxTranches {
		a, b := e.tranches[k-2], e.tranches[k-1]
		for p, v := range b.shares {
			a.shares[p] += v
		}
		a.passedAt = max(a.passedAt, b.passedAt)
		e.tranches[k-2] = a
		e.tranches = e.tranches[:k-1]
	}
	return n, nil
}

// ReleaseEscrow pays node's operator the tranches verified at or before
// cutoff and returns the amount released.
func (l *Ledger) ReleaseEscrow(node string, cutoff int64) (int64, error) {
	if node == "" {
		return 0, fmt.Errorf("release escrow: empty node: %w", ErrInvalidAccount)
	}
	e := l.escrows[node]
	if e == nil {
		return 0, nil
	}
	var n int64
	k := 0
	for k < len(e.tranches) && e.tranches[k].passedAt <= cutoff {
		for _, a := range e.tranches[k].shares {
			n += a
		}
		k++
	}
	if n == 0 {
		return 0, nil
	}
	e.tranches = append([]tranche(nil), e.tranches[k:]...)
	l.account(EscrowAccount(node)).Balance -= n
	o := l.account(e.operator)
	o.Balance += n
	o.Earned = SaturatingAdd(o.Earned, n)
	l.dropEmpty(node)
	return n, nil
}

// ForfeitEscrow pays everything node holds back to its payers and returns
// the refunds, by payer.
func (l *Ledger) ForfeitEscrow(node string) ([]Share, error) {
	if node == "" {
		return nil, fmt.Errorf("forfeit escrow: empty node: %w", ErrInvalidAccount)
	}
	e := l.escrows[node]
	if e == nil {
		return nil, nil
	}
	refunds := cloneShares(e.open)
	for _, t := range e.tranches {
		for p, a := range t.shares {
			refunds[p] += a
		}
	}
	out := sortedShares(refunds)
	for _, r := range out {
		l.account(EscrowAccount(node)).Balance -= r.Amount
		p := l.account(r.Payer)
		p.Balance += r.Amount
		if p.Spent != math.MaxInt64 { // a saturated statistic stays so
			p.Spent = max(p.Spent-r.Amount, 0)
		}
	}
	e.open, e.openSince, e.tranches = map[string]int64{}, 0, nil
	l.dropEmpty(node)
	return out, nil
}

// dropEmpty forgets an escrow that holds nothing.
func (l *Ledger) dropEmpty(node string) {
	if e := l.escrows[node]; e != nil && len(e.open) == 0 && len(e.tranches) == 0 {
		delete(l.escrows, node)
	}
}

// Escrow returns node's escrow and whether it holds anything.
func (l *Ledger) Escrow(node string) (EscrowState, bool) {
	e := l.escrows[node]
	if e == nil {
		return EscrowState{Node: node}, false
	}
	return e.state(node), true
}

// OpenSince is the time of the oldest share node holds that no passed
// audit covers; ok is false when it holds none. It allocates nothing: the
// coordinator asks on every billed call.
func (l *Ledger) OpenSince(node string) (since int64, ok bool) {
	e := l.escrows[node]
	if e == nil || len(e.open) == 0 {
		return 0, false
	}
	return e.openSince, true
}

// Escrows returns every escrow that holds something, sorted by node.
func (l *Ledger) Escrows() []EscrowState {
	out := make([]EscrowState, 0, len(l.escrows))
	for n, e := range l.escrows {
		out = append(out, e.state(n))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Node < out[j].Node })
	return out
}

// checkEscrows verifies that each escrow account's balance is the sum of
// its escrow's shares, every share positive, and no escrow account holds
// money without an escrow.
func (l *Ledger) checkEscrows() error {
	for node, e := range l.escrows {
		if node == "" || e.operator == "" || IsEscrowAccount(e.operator) {
			return fmt.Errorf("escrow %q operator %q: %w", node, e.operator, ErrInvariant)
		}
		if len(e.open) == 0 && len(e.tranches) == 0 {
			return fmt.Errorf("escrow %s: empty but kept: %w", node, ErrInvariant)
		}
		var sum int64
		add := func(shares map[string]int64) error {
			if len(shares) == 0 {
				return fmt.Errorf("escrow %s: an empty tranche: %w", node, ErrInvariant)
			}
			for p, a := range shares {
				var ok bool
				if p == "" || IsEscrowAccount(p) || a <= 0 {
					return fmt.Errorf("escrow %s share %q %d: %w", node, p, a, ErrInvariant)
				}
				if sum, ok = addChecked(sum, a); !ok {
					return fmt.Errorf("escrow %s: %w", node, ErrOverflow)
				}
			}
			return nil
		}
		if len(e.open) > 0 {
			if err := add(e.open); err != nil {
				return err
			}
		}
		for i, t := range e.tranches {
			if i > 0 && t.passedAt < e.tranches[i-1].passedAt {
				return fmt.Errorf("escrow %s: tranches out of order: %w", node, ErrInvariant)
			}
			if err := add(t.shares); err != nil {
				return err
			}
		}
		if bal := l.Balance(EscrowAccount(node)); bal != sum {
			return fmt.Errorf("escrow %s: account balance %d, shares %d: %w", node, bal, sum, ErrInvariant)
		}
	}
	for name, a := range l.accounts {
		if IsEscrowAccount(name) && a.Balance != 0 && l.escrows[strings.TrimPrefix(name, EscrowPrefix)] == nil {
			return fmt.Errorf("escrow account %s holds %d without an escrow: %w", name, a.Balance, ErrInvariant)
		}
	}
	return nil
}

// restoreEscrows loads snapshot records into l (Restore checks them).
func (l *Ledger) restoreEscrows(escrows []EscrowState) error {
	toMap := func(ss []Share) (map[string]int64, error) {
		m := make(map[string]int64, len(ss))
		for _, s := range ss {
			if _, dup := m[s.Payer]; dup {
				return nil, fmt.Errorf("payer %s twice: %w", s.Payer, ErrInvariant)
			}
			m[s.Payer] = s.Amount
		}
		return m, nil
	}
	for _, es := range escrows {
		if _, dup := l.escrows[es.Node]; dup {
			return fmt.Errorf("escrow %s twice: %w", es.Node, ErrInvariant)
		}
		open, err := toMap(es.Open)
		if err != nil {
			return fmt.Errorf("escrow %s: %w", es.Node, err)
		}
		e := &escrow{operator: es.Operator, open: open, openSince: es.OpenSince}
		for _, t := range es.Verified {
			m, err := toMap(t.Shares)
			if err != nil {
				return fmt.Errorf("escrow %s: %w", es.Node, err)
			}
			e.tranches = append(e.tranches, tranche{passedAt: t.PassedAt, shares: m})
		}
		l.escrows[es.Node] = e
	}
	return nil
}
