package coordinator

import (
	"fmt"
	"sort"

	"github.com/signal-p2p/signal/protocol"
)

// HoldRecord reserves part of an account's balance for a billed call that
// is running: the call's quote, held through raft before the call reaches a
// node and released by the call's charge, so concurrent calls cannot spend
// the same credits twice (issue 13, item 4).
type HoldRecord struct {
	ID      string `json:"id"`
	Account string `json:"account"`
	Amount  int64  `json:"amount"`
	// Holder is the member that placed it: only that member's charges can
	// settle it, so a new leader frees the others' (releaseStaleHolds).
	Holder string `json:"holder"`
	Time   string `json:"time"`
}

// Available is what an account may still commit: its balance less its holds.
func (s *State) Available(account string) int64 {
	return s.ledger.Balance(account) - s.held[account]
}

// Hold reserves h.Amount of h.Account's balance, or refuses with
// ErrInsufficientBalance when the balance less the account's other holds is
// below it.
func (s *State) Hold(h HoldRecord) error {
	if h.ID == "" || h.Account == "" || h.Amount < 0 {
		return fmt.Errorf("hold: id, account and a non-negative amount required: %w", ErrInvalidRequest)
	}
	if _, ok := s.holds[h.ID]; ok {
		return fmt.Errorf("hold %s exists: %w", h.ID, ErrConflict)
	}
	if _, ok := s.ledger.Account(h.Account); !ok {
		return protocol.UserErrorf(ErrNotFound, "account %q does not exist", h.Account)
	}
	bal, held := s.ledger.Balance(h.Account), s.held[h.Account]
	if h.Amount > bal-held {
		return protocol.UserErrorf(ErrInsufficientBalance, "this call's estimated cost of %s credits (%d micro-credits) is over account %s's available balance of %s credits (%d micro-credits; %s held by calls in progress): top it up (signal credit --account %s --credits N, or POST /v1/admin/credit) or send a smaller call",
			protocol.FormatCredits(h.Amount), h.Amount, h.Account, protocol.FormatCredits(bal-held), bal-held, protocol.FormatCredits(held), h.Account)
	}
	s.holds[h.ID] = h
	s.held[h.Account] += h.Amount
	return nil
}

// releaseHold frees a hold; an unknown (or empty) id is a no-op, since a
// new leader may have freed it already.
func (s *State) releaseHold(id string) {
	h, ok := s.holds[id]
	if !ok {
		return
	}
	delete(s.holds, id)
	if left := s.held[h.Account] - h.Amount; left > 0 {
		s.held[h.Account] = left
	} else {
		delete(s.held, h.Account)
	}
}

// ReleaseHolds frees the named holds.
func (s *State) ReleaseHolds(ids []string) {
	for _, id := range ids {
		s.releaseHold(id)
	}
}

// Holds returns every hold, sorted by id.
func (s *State) Holds() []HoldRecord {
	out := make([]HoldRecord, 0, len(s.holds))
	for _, h := range s.holds {
		out = append(out, h)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// putHold restores a hold from a snapshot.
func (s *State) putHold(h HoldRecord) {
	s.holds[h.ID] = h
	s.held[h.Account] += h.Amount
}
