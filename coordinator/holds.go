package coordinator

import (
	"fmt"
	"sort"
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
		return fmt.Errorf("account %q: %w", h.Account, ErrNotFound)
	}
	bal, held := s.ledger.Balance(h.Account), s.held[h.Account]
	if h.Amount > bal-held {
		return fmt.Errorf("estimated cost %d micro-credits exceeds the available balance %d (balance %d, %d held by calls in progress); top the account up (POST /v1/admin/credit) or send a smaller call: %w",
			h.Amount, bal-held, bal, held, ErrInsufficientBalance)
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
