package coordinator

import (
	"encoding/json"
	"fmt"
	"maps"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/signal-p2p/signal/ledger"
	"github.com/signal-p2p/signal/protocol"
)

// Bounds on replicated history. They are constants, not configuration,
// because every member must trim at the same point to stay deterministic.
const (
	maxMetricsPerRun     = 1000
	maxCheckpointsPerRun = 50
	maxChargesPerAccount = 100
	// Each account's idempotency records are its own FIFO, bounded by
	// count, bytes and age, so one tenant's flood evicts only its own
	// records (issue 13, item 8).
	maxIdempotencyKeys    = 10_000
	maxIdempotencyBytes   = 64 << 20
	idempotencyTTLSeconds = 24 * 60 * 60
)

// KeyRecord is an API key, stored only as its SHA-256 hash.
type KeyRecord struct {
	Hash      string `json:"hash"`
	Account   string `json:"account"`
	Name      string `json:"name,omitempty"`
	CreatedAt string `json:"created_at"`
}

// JoinTokenRecord is a node join token, stored hashed, bound to the
// operator account that the nodes joining with it earn for.
type JoinTokenRecord struct {
	Hash      string `json:"hash"`
	Operator  string `json:"operator"`
	CreatedAt string `json:"created_at"`
}

// NodeRecord is a node that proved a join token.
type NodeRecord struct {
	PeerID   string `json:"peer_id"`
	Operator string `json:"operator"`
	JoinedAt string `json:"joined_at"`
}

// MemberRecord maps a raft server to the HTTP address followers forward to.
type MemberRecord struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	HTTPAddr string `json:"http_addr"`
}

// AccountRecord is the non-ledger part of an account: its recent charges.
type AccountRecord struct {
	Name    string            `json:"name"`
	Charges []protocol.Charge `json:"charges"`
}

// RunRecord is a run as the state holds it: the public view plus what only
// the coordinator needs. Records are replaced, never changed in place, so a
// snapshot can share them.
type RunRecord struct {
	Run        protocol.Run       `json:"run"`
	Owner      string             `json:"owner"`
	Seed       int64              `json:"seed"`
	LRSchedule json.RawMessage    `json:"lr_schedule,omitempty"`
	Metrics    []protocol.Metrics `json:"metrics,omitempty"`
	// PendingLoss, PendingTokens and PendingWeight come from
	// forward_backward calls since the last optim_step; that step's Metrics
	// report them. The step's loss_mean is PendingLoss / PendingWeight (the
	// loss weights' sum, which leaves out weight-0 prompt tokens), the mean
	// that forward_backward itself returns.
	PendingLoss   *float64 `json:"pending_loss,omitempty"`
	PendingTokens int64    `json:"pending_tokens,omitempty"`
	PendingWeight float64  `json:"pending_weight,omitempty"`
	// PendingBatches counts those calls (forward_backward answers it).
	PendingBatches int `json:"pending_batches,omitempty"`
	// EndedAt is when the run ended or failed; its checkpoints are
	// collected, and the record itself pruned, some time after.
	EndedAt string `json:"ended_at,omitempty"`
	// StorageBilledTo is how far its checkpoints' storage is billed.
	StorageBilledTo string `json:"storage_billed_to,omitempty"`
	// LastActive is the time of its last billed call (or its creation):
	// a run idle for IdleRunTTL is saved and closed.
	LastActive string `json:"last_active,omitempty"`
}

// IdemRecord is the first response to a call made with an Idempotency-Key.
type IdemRecord struct {
	Scope    string          `json:"scope"`
	BodyHash string          `json:"body_hash"`
	Status   int             `json:"status"`
	Body     json.RawMessage `json:"body"`
	// Time is when the leader recorded it (RFC 3339); empty never ages out.
	Time string `json:"time,omitempty"`
}

// idemAccount is the account an idempotency scope belongs to.
func idemAccount(scope string) string {
	acct, _, _ := strings.Cut(scope, "\x00")
	return acct
}

func (r IdemRecord) size() int64 { return int64(len(r.Scope) + len(r.BodyHash) + len(r.Body) + 64) }

// IdemTag asks a command to record its response under an idempotency scope
// (account + key), or to return the recorded one.
type IdemTag struct {
	Scope    string `json:"scope"`
	BodyHash string `json:"body_hash"`
}

// State is the coordinator's replicated state and its rules. It knows
// nothing of raft: the FSM decodes commands and calls its methods, and tests
// drive it directly. It is not safe for concurrent use; the FSM locks.
type State struct {
	ledger     *ledger.Ledger
	keys       map[string]KeyRecord
	accounts   map[string]AccountRecord
	runs       map[string]*RunRecord
	nodes      map[string]NodeRecord
	joinTokens map[string]JoinTokenRecord
	members    map[string]MemberRecord
	idem       map[string]IdemRecord
	// idemOrder is each account's scopes in insertion order, oldest first,
	// and idemBytes their sizes' sum, for bounded eviction.
	idemOrder map[string][]string
	idemBytes map[string]int64
	holds     map[string]HoldRecord
	// held is each account's sum of holds (derived from holds).
	held map[string]int64
	// nodeAudits are the nodes' audit histories and quarantines (escrow.go).
	nodeAudits map[string]NodeAuditRecord
	// pendingAudits are audited calls awaiting their replay (auditqueue.go).
	pendingAudits map[string]PendingAudit
	// tinker is the Tinker door's futures, models, samplers and
	// checkpoint names (tinkerbook.go).
	tinker tinkerBook
	// FeeAccount receives the network's share of every charge.
	feeAccount string
}

// DefaultFeeAccount is the account that receives the network fee.
const DefaultFeeAccount = "network-fee"

// NewState returns an empty state.
func NewState() *State {
	return &State{
		ledger:        ledger.New(),
		keys:          map[string]KeyRecord{},
		accounts:      map[string]AccountRecord{},
		runs:          map[string]*RunRecord{},
		nodes:         map[string]NodeRecord{},
		joinTokens:    map[string]JoinTokenRecord{},
		members:       map[string]MemberRecord{},
		idem:          map[string]IdemRecord{},
		idemOrder:     map[string][]string{},
		idemBytes:     map[string]int64{},
		holds:         map[string]HoldRecord{},
		held:          map[string]int64{},
		nodeAudits:    map[string]NodeAuditRecord{},
		tinker:        newTinkerBook(),
		pendingAudits: map[string]PendingAudit{},
		feeAccount:    DefaultFeeAccount,
	}
}

// clone copies the maps; records are immutable and shared. raft takes a
// snapshot under the FSM's lock, so this is on the charge path's tail:
// maps.Clone copies a map's tables wholesale, 2-3x faster than
// re-inserting 100,000 idempotency records one by one
// (BenchmarkSnapshotClone).
func (s *State) clone() *State {
	c := &State{
		ledger:     s.ledger.Clone(),
		keys:       maps.Clone(s.keys),
		accounts:   make(map[string]AccountRecord, len(s.accounts)),
		runs:       maps.Clone(s.runs),
		nodes:      maps.Clone(s.nodes),
		joinTokens: maps.Clone(s.joinTokens),
		members:    maps.Clone(s.members),
		idem:       maps.Clone(s.idem),
		// Eviction only reslices and appends past a clone's length, so
		// the clone may share the order slices' arrays.
		idemOrder:     maps.Clone(s.idemOrder),
		idemBytes:     maps.Clone(s.idemBytes),
		holds:         maps.Clone(s.holds),
		held:          maps.Clone(s.held),
		nodeAudits:    maps.Clone(s.nodeAudits),
		tinker:        s.tinker.clone(),
		pendingAudits: maps.Clone(s.pendingAudits),
		feeAccount:    s.feeAccount,
	}
	for k, v := range s.accounts {
		// Capped, so an append on either side reallocates (appendCharge100).
		v.Charges = v.Charges[:len(v.Charges):len(v.Charges)]
		c.accounts[k] = v
	}
	return c
}

// ---- reads ----

// KeyByHash returns the key record with this hash.
func (s *State) KeyByHash(hash string) (KeyRecord, bool) {
	k, ok := s.keys[hash]
	return k, ok
}

// Balance returns an account's balance.
func (s *State) Balance(account string) int64 { return s.ledger.Balance(account) }

// AccountView is GET /v1/account's body for an account.
func (s *State) AccountView(account string) protocol.Account {
	a, _ := s.ledger.Account(account)
	charges := append([]protocol.Charge{}, s.accounts[account].Charges...)
	return protocol.Account{Account: account, BalanceMicroCredits: a.Balance, SpentMicroCredits: a.Spent, Charges: charges}
}

// Run returns a run's record.
func (s *State) Run(id string) (*RunRecord, bool) {
	r, ok := s.runs[id]
	return r, ok
}

// RunsOf returns an owner's runs, oldest first.
func (s *State) RunsOf(owner string) []*RunRecord {
	var out []*RunRecord
	for _, r := range s.runs {
		if r.Owner == owner {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Run.CreatedAt != out[j].Run.CreatedAt {
			return out[i].Run.CreatedAt < out[j].Run.CreatedAt
		}
		return out[i].Run.ID < out[j].Run.ID
	})
	return out
}

// ActiveRuns returns the runs that hold a node session (starting, ready, moving).
func (s *State) ActiveRuns() []*RunRecord {
	var out []*RunRecord
	for _, r := range s.runs {
		if isActive(r.Run.Status) {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Run.ID < out[j].Run.ID })
	return out
}

// OwnedCheckpoint finds ref (a checkpoint's ID, CID or URI) among the
// checkpoints of account's runs, and the run that made it. Checkpoints
// belong to their run's owner: nobody else can load one by any name.
func (s *State) OwnedCheckpoint(account, ref string) (protocol.Checkpoint, *RunRecord, bool) {
	for _, r := range s.RunsOf(account) {
		for i := len(r.Run.Checkpoints) - 1; i >= 0; i-- {
			if cp := r.Run.Checkpoints[i]; cp.ID == ref || (cp.URI != "" && cp.URI == ref) {
				return cp, r, true
			}
		}
	}
	return protocol.Checkpoint{}, nil, false
}

// Node returns a joined node.
func (s *State) Node(peerID string) (NodeRecord, bool) {
	n, ok := s.nodes[peerID]
	return n, ok
}

// JoinToken returns the join token with this hash.
func (s *State) JoinToken(hash string) (JoinTokenRecord, bool) {
	t, ok := s.joinTokens[hash]
	return t, ok
}

// Member returns a raft member's record.
func (s *State) Member(id string) (MemberRecord, bool) {
	m, ok := s.members[id]
	return m, ok
}

// Members returns every member, sorted by ID.
func (s *State) Members() []MemberRecord {
	out := make([]MemberRecord, 0, len(s.members))
	for _, m := range s.members {
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Idem returns the recorded response for an idempotency scope.
func (s *State) Idem(scope string) (IdemRecord, bool) {
	r, ok := s.idem[scope]
	return r, ok
}

// Ledger exposes the ledger for invariant checks in tests.
func (s *State) Ledger() *ledger.Ledger { return s.ledger }

// ---- rules: each returns an error and leaves the state unchanged on failure ----

// checkIdem returns the recorded response for tag, ErrConflict when the
// scope was used with a different body, or ok=false when it is new.
func (s *State) checkIdem(tag *IdemTag) (IdemRecord, bool, error) {
	if tag == nil {
		return IdemRecord{}, false, nil
	}
	rec, ok := s.idem[tag.Scope]
	if !ok {
		return IdemRecord{}, false, nil
	}
	if rec.BodyHash != tag.BodyHash {
		return IdemRecord{}, false, protocol.UserErrorf(ErrConflict, "idempotency key reused with a different request")
	}
	return rec, true, nil
}

func (s *State) putIdem(rec IdemRecord) {
	if _, ok := s.idem[rec.Scope]; ok {
		return
	}
	acct := idemAccount(rec.Scope)
	s.idem[rec.Scope] = rec
	order := append(s.idemOrder[acct], rec.Scope)
	bytes := s.idemBytes[acct] + rec.size()
	// Evict the account's oldest records: over the count or byte bound, or
	// older than the TTL by the new record's time (the leader's clock,
	// carried in the command, so every member evicts the same).
	cutoff, aging := recordTime(rec.Time)
	for len(order) > 0 {
		old, ok := s.idem[order[0]]
		if !ok {
			order = order[1:]
			continue
		}
		t, dated := recordTime(old.Time)
		expired := aging && dated && cutoff.Sub(t).Seconds() > idempotencyTTLSeconds
		if len(order) <= maxIdempotencyKeys && bytes <= maxIdempotencyBytes && !expired {
			break
		}
		delete(s.idem, order[0])
		bytes -= old.size()
		order = order[1:]
	}
	// Compact once the dead prefix dominates so eviction stays amortised O(1).
	if cap(order) > 2*len(order)+64 {
		order = append([]string(nil), order...)
	}
	if len(order) == 0 {
		delete(s.idemOrder, acct)
		delete(s.idemBytes, acct)
		return
	}
	s.idemOrder[acct], s.idemBytes[acct] = order, bytes
}

// recordTime parses a record's RFC 3339 time.
func recordTime(v string) (time.Time, bool) {
	t, err := time.Parse(time.RFC3339Nano, v)
	return t, err == nil
}

// PutIdem records a response under tag unless one is recorded already; it
// returns the record that stands.
func (s *State) PutIdem(tag IdemTag, status int, body json.RawMessage, at string) (IdemRecord, error) {
	if tag.Scope == "" {
		return IdemRecord{}, fmt.Errorf("idempotency scope empty: %w", ErrInvalidRequest)
	}
	if rec, ok, err := s.checkIdem(&tag); err != nil || ok {
		return rec, err
	}
	rec := IdemRecord{Scope: tag.Scope, BodyHash: tag.BodyHash, Status: status, Body: body, Time: at}
	s.putIdem(rec)
	return rec, nil
}

// CreateKey stores a new API key for a new account and mints its credits.
func (s *State) CreateKey(k KeyRecord, credits int64) error {
	if k.Hash == "" || k.Account == "" {
		return fmt.Errorf("create key: hash and account required: %w", ErrInvalidRequest)
	}
	if _, ok := s.keys[k.Hash]; ok {
		return fmt.Errorf("create key: hash exists: %w", ErrConflict)
	}
	if credits < 0 {
		return fmt.Errorf("field credits: %d is negative: %w", credits, ErrInvalidRequest)
	}
	if credits > 0 {
		if err := s.ledger.Mint(k.Account, credits); err != nil {
			return fmt.Errorf("create key: %w", err)
		}
	} else if err := s.ledger.Open(k.Account); err != nil {
		return err
	}
	s.keys[k.Hash] = k
	return nil
}

// KeyID is how the admin API names a key: a prefix of its hash, which
// names it without being the secret.
func KeyID(k KeyRecord) string { return "key_" + k.Hash[:min(16, len(k.Hash))] }

// Keys lists the API keys, of account alone when it is set, oldest first.
func (s *State) Keys(account string) []KeyRecord {
	out := make([]KeyRecord, 0, len(s.keys))
	for _, h := range sortedKeys(s.keys) {
		if k := s.keys[h]; account == "" || k.Account == account {
			out = append(out, k)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].CreatedAt < out[j].CreatedAt })
	return out
}

// KeyByID finds a key by its KeyID.
func (s *State) KeyByID(id string) (KeyRecord, bool) {
	for _, k := range s.keys {
		if KeyID(k) == id {
			return k, true
		}
	}
	return KeyRecord{}, false
}

// RevokeKey deletes an API key: calls with it are refused from then on.
// The account and its balance stay (a new key can be made for it).
func (s *State) RevokeKey(hash string) (KeyRecord, error) {
	k, ok := s.keys[hash]
	if !ok {
		return KeyRecord{}, protocol.UserErrorf(ErrNotFound, "the key is unknown or already revoked: signal keys list shows the keys")
	}
	delete(s.keys, hash)
	return k, nil
}

// Mint credits an account (admin); the account must exist.
func (s *State) Mint(account string, amount int64) (int64, error) {
	if _, ok := s.ledger.Account(account); !ok {
		return 0, protocol.UserErrorf(ErrNotFound, "account %q does not exist: check the account id (signal keys create printed it)", account)
	}
	if err := s.ledger.Mint(account, amount); err != nil {
		return 0, err
	}
	return s.ledger.Balance(account), nil
}

// ChargeResult is what a charge did.
type ChargeResult struct {
	// Cost is what was charged; Credits may be below the requested amount
	// when the balance ran out during the call (the work is done and cannot
	// be refused, so the charge takes what is left).
	Cost    protocol.Cost `json:"cost"`
	Balance int64         `json:"balance"`
	Status  int           `json:"status"`
	// Body is the recorded answer: set for a call with an idempotency key
	// (and for its replays), nil otherwise.
	Body json.RawMessage `json:"body,omitempty"`
	// PendingBatches is the run's forward_backward calls waiting for
	// optim_step after this charge (forward_backward only).
	PendingBatches int `json:"pending_batches,omitempty"`
	// Replayed is true when the response came from an earlier call with the
	// same idempotency key and nothing was charged.
	Replayed bool `json:"replayed,omitempty"`
}

// chargeCmd is one billed call: charge, run update and recorded response,
// applied together so a retried call is charged once.
type chargeCmd struct {
	Account  string        `json:"account"`
	Operator string        `json:"operator,omitempty"`
	FeeBPS   int           `json:"fee_bps"`
	Cost     protocol.Cost `json:"cost"`
	RunID    string        `json:"run_id,omitempty"`
	Call     string        `json:"call,omitempty"`
	Time     string        `json:"time"`
	Idem     *IdemTag      `json:"idem,omitempty"`
	// Body is the node's answer, carried only with Idem: the FSM records
	// the billed answer for replays. Without a key the entry stays lean
	// (cost, usage, run update) and the leader answers from its own copy.
	Body       json.RawMessage `json:"body,omitempty"`
	RunUpdate  *RunUpdate      `json:"run_update,omitempty"`
	RequireAll bool            `json:"require_all,omitempty"`
	// HoldID is the call's reservation (cmdHold), released by this charge.
	HoldID string `json:"hold_id,omitempty"`
	// Node is the node that served the call: set, the operator's share is
	// held in its escrow until audits release it (escrow.go).
	Node string `json:"node,omitempty"`
}

// Charge applies a billed call.
func (s *State) Charge(c chargeCmd) (ChargeResult, error) {
	if rec, ok, err := s.checkIdem(c.Idem); err != nil {
		return ChargeResult{}, err
	} else if ok {
		// Answer exactly what the first call answered, balance included.
		var first struct {
			Cost    protocol.Cost `json:"cost"`
			Balance int64         `json:"balance"`
		}
		_ = json.Unmarshal(rec.Body, &first)
		s.releaseHold(c.HoldID)
		return ChargeResult{Status: rec.Status, Body: rec.Body, Cost: first.Cost, Balance: first.Balance, Replayed: true}, nil
	}
	if _, ok := s.ledger.Account(c.Account); !ok {
		return ChargeResult{}, protocol.UserErrorf(ErrNotFound, "account %q does not exist", c.Account)
	}
	if c.Cost.MicroCredits < 0 {
		return ChargeResult{}, fmt.Errorf("charge %d: %w", c.Cost.MicroCredits, ledger.ErrInvalidAmount)
	}
	cost := c.Cost
	if c.Node != "" && s.Quarantined(c.Node) {
		// A node caught lying is not paid, nor its user billed, for the
		// calls it still answers before its runs move.
		cost.MicroCredits = 0
	}
	bal := s.ledger.Balance(c.Account)
	// Other calls' holds are not this charge's to take; its own is.
	var own int64
	if h, ok := s.holds[c.HoldID]; ok && h.Account == c.Account {
		own = h.Amount
	}
	avail := max(bal-(s.held[c.Account]-own), 0)
	if cost.MicroCredits > avail {
		if c.RequireAll {
			return ChargeResult{}, fmt.Errorf("charge %d with available balance %d: %w", cost.MicroCredits, avail, ErrInsufficientBalance)
		}
		cost.MicroCredits = avail
	}
	// Compute the run's next record before touching the ledger so that a
	// failing update leaves everything unchanged.
	var run *RunRecord
	if c.RunUpdate != nil {
		u := *c.RunUpdate
		u.AddSpent = cost.MicroCredits
		var err error
		if run, err = s.nextRun(u); err != nil {
			return ChargeResult{}, err
		}
	}
	split, err := ledger.SplitCharge(cost.MicroCredits, c.FeeBPS)
	if err != nil {
		return ChargeResult{}, err
	}
	operator := c.Operator
	if operator == c.Account {
		// A user charged for their own node pays the network only.
		operator = ""
	}
	pending := 0
	if run != nil && c.Call == "forward_backward" {
		pending = run.PendingBatches
	}
	// The answer is built here only when an idempotent replay needs it
	// recorded; otherwise the leader builds it from the node's answer
	// (billedBody), and the entry carries no body at all.
	var body json.RawMessage
	if c.Idem != nil {
		var err error
		if body, err = billedBody(c.Body, cost, bal-cost.MicroCredits, pending); err != nil {
			return ChargeResult{}, err
		}
	}
	if err := s.chargeLedger(c, operator, split); err != nil {
		return ChargeResult{}, err
	}
	if cost.MicroCredits > 0 || c.Call != "" {
		a := s.accounts[c.Account]
		a.Name = c.Account
		a.Charges = appendCharge100(a.Charges, protocol.Charge{RunID: c.RunID, Call: c.Call, MicroCredits: cost.MicroCredits, Time: c.Time})
		s.accounts[c.Account] = a
	}
	if run != nil {
		if c.Call != "storage" {
			run.LastActive = c.Time
		}
		s.runs[run.Run.ID] = run
	}
	s.releaseHold(c.HoldID)
	res := ChargeResult{Cost: cost, Balance: s.ledger.Balance(c.Account), Status: 200, Body: body, PendingBatches: pending}
	if c.Idem != nil {
		s.putIdem(IdemRecord{Scope: c.Idem.Scope, BodyHash: c.Idem.BodyHash, Status: res.Status, Body: res.Body, Time: c.Time})
	}
	return res, nil
}

// appendCharge100 appends ch to an account's recent charges, keeping the
// last maxChargesPerAccount. Elements already in the slice are never written
// again (a snapshot's clone may still read them): the window slides along a
// backing array with room for twice the bound and moves to a new one when it
// reaches the end, so each charge costs O(1) amortised instead of a copy of
// the whole history. clone caps the slices it shares, so a clone that
// appended would never write into this array either.
func appendCharge100(charges []protocol.Charge, ch protocol.Charge) []protocol.Charge {
	if len(charges) >= maxChargesPerAccount {
		charges = charges[len(charges)-maxChargesPerAccount+1:]
	}
	if len(charges) == cap(charges) {
		n := make([]protocol.Charge, len(charges), min(2*maxChargesPerAccount, 2*len(charges)+4))
		copy(n, charges)
		charges = n
	}
	return append(charges, ch)
}

// billedBody is a billed call's answer: the node's JSON object with "cost"
// and "balance" (after the charge) added, and "pending_batches" when
// pending > 0. It is deterministic (keys sorted), so the answer the FSM
// records for a replay equals the one the leader sends the first time.
func billedBody(body json.RawMessage, cost protocol.Cost, balance int64, pending int) (json.RawMessage, error) {
	if len(body) == 0 {
		body = json.RawMessage("{}")
	}
	var extra map[string]json.RawMessage
	if pending > 0 {
		extra = map[string]json.RawMessage{"pending_batches": json.RawMessage(strconv.Itoa(pending))}
	}
	return withBilling(body, cost, balance, extra)
}

// withBilling adds "cost" and "balance_micro_credits" (and "balance", its
// deprecated name, and extra) to a JSON object response.
func withBilling(body json.RawMessage, cost protocol.Cost, balance int64, extra map[string]json.RawMessage) (json.RawMessage, error) {
	if string(body) == "{}" && len(extra) == 0 {
		// The common bare charge: the bytes the general path below would
		// produce (keys sorted: "balance" < "balance_micro_credits" <
		// "cost"), without a map round trip.
		cb, err := cost.MarshalJSON()
		if err != nil {
			return nil, err
		}
		out := make([]byte, 0, len(`{"balance":,"balance_micro_credits":,"cost":}`)+40+len(cb))
		out = append(out, `{"balance":`...)
		out = strconv.AppendInt(out, balance, 10)
		out = append(out, `,"balance_micro_credits":`...)
		out = strconv.AppendInt(out, balance, 10)
		out = append(out, `,"cost":`...)
		out = append(out, cb...)
		return append(out, '}'), nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, fmt.Errorf("node response is not a JSON object: %w", ErrInvalidRequest)
	}
	if m == nil {
		m = map[string]json.RawMessage{}
	}
	cb, _ := json.Marshal(cost)
	bb, _ := json.Marshal(balance)
	m["cost"], m["balance_micro_credits"], m["balance"] = cb, bb, bb
	for k, v := range extra {
		m[k] = v
	}
	return json.Marshal(m) // map keys marshal sorted: deterministic on every member
}

// CreateRun stores a new run.
func (s *State) CreateRun(r RunRecord) error {
	if r.Run.ID == "" || r.Owner == "" {
		return fmt.Errorf("create run: id and owner required: %w", ErrInvalidRequest)
	}
	if _, ok := s.runs[r.Run.ID]; ok {
		return fmt.Errorf("run %s exists: %w", r.Run.ID, ErrConflict)
	}
	cp := r
	s.runs[r.Run.ID] = &cp
	return nil
}

// CreateRunLimited stores a new run if its owner is within the quotas: at
// most maxActive runs holding a session, and at least minAvailable
// micro-credits of balance not held by calls in progress. Session slots
// are the network's scarcest resource; an unfunded account must not hold
// them, nor one account all of them (issue 13, item 6).
func (s *State) CreateRunLimited(r RunRecord, maxActive int, minAvailable int64) error {
	if avail := s.Available(r.Owner); avail < minAvailable {
		return protocol.UserErrorf(ErrInsufficientBalance, "opening a run needs %s credits (%d micro-credits) available, account %s has %s: top it up first (signal credit --account %s --credits N, or POST /v1/admin/credit)", protocol.FormatCredits(minAvailable), minAvailable, r.Owner, protocol.FormatCredits(avail), r.Owner)
	}
	active := 0
	for _, o := range s.runs {
		if o.Owner == r.Owner && isActive(o.Run.Status) {
			active++
		}
	}
	if maxActive > 0 && active >= maxActive {
		return protocol.UserErrorf(ErrTooManyRuns, "the account holds %d open runs, at most %d; end one (DELETE /v1/runs/{id}) first", active, maxActive)
	}
	return s.CreateRun(r)
}

func isActive(status string) bool {
	return status == protocol.RunStarting || status == protocol.RunReady || status == protocol.RunMoving
}

// RunUpdate changes a run; nil fields are left alone.
type RunUpdate struct {
	RunID           string               `json:"run_id"`
	Status          string               `json:"status,omitempty"`
	Node            *string              `json:"node,omitempty"`
	Step            *int                 `json:"step,omitempty"`
	ResumedFromStep *int                 `json:"resumed_from_step,omitempty"`
	Checkpoint      *protocol.Checkpoint `json:"checkpoint,omitempty"`
	// Loss (the call's loss_sum), Tokens and Weight (the sum of its loss
	// weights) of a forward_backward accumulate until the next optim_step.
	// A nil Weight (entries written before it existed) counts Tokens.
	Loss   *float64 `json:"loss,omitempty"`
	Tokens int64    `json:"tokens,omitempty"`
	Weight *float64 `json:"weight,omitempty"`
	// Optim, set by an optim_step, appends a Metrics entry.
	Optim *OptimFigures `json:"optim,omitempty"`
	// ExpectStatus, when set, makes the update fail with ErrConflict unless
	// the run is in one of these statuses (compare-and-set for moves).
	ExpectStatus []string `json:"expect_status,omitempty"`
	AddSpent     int64    `json:"add_spent,omitempty"`
	// ExpectNode, when set, makes the update fail with ErrConflict unless
	// the run is still assigned to this node (a stopping node's drain
	// checkpoint must not land on a run that moved on).
	ExpectNode string `json:"expect_node,omitempty"`
	// CheckpointIfNewer makes the update fail with ErrConflict when
	// Checkpoint is older than the run's recorded step or already
	// recorded (a drain report reaches every coordinator).
	CheckpointIfNewer bool `json:"checkpoint_if_newer,omitempty"`
	// Reason is recorded as the run's status_reason.
	Reason string `json:"reason,omitempty"`
	// StorageBilledTo advances the run's storage billing (a storage charge).
	StorageBilledTo string `json:"storage_billed_to,omitempty"`
	// DropCheckpoints forgets the run's checkpoints (collected).
	DropCheckpoints bool   `json:"drop_checkpoints,omitempty"`
	Time            string `json:"time"`
}

// OptimFigures are an optim_step's results.
type OptimFigures struct {
	Step         int     `json:"step"`
	LearningRate float64 `json:"learning_rate"`
	GradNorm     float64 `json:"grad_norm"`
}

var validStatus = map[string]bool{
	protocol.RunStarting: true, protocol.RunReady: true, protocol.RunMoving: true,
	protocol.RunEnded: true, protocol.RunFailed: true,
}

// UpdateRun applies u and returns the new record.
func (s *State) UpdateRun(u RunUpdate) (*RunRecord, error) {
	r, err := s.nextRun(u)
	if err != nil {
		return nil, err
	}
	s.runs[u.RunID] = r
	return r, nil
}

// nextRun computes the record u makes, without storing it.
func (s *State) nextRun(u RunUpdate) (*RunRecord, error) {
	old, ok := s.runs[u.RunID]
	if !ok {
		return nil, fmt.Errorf("run %s: %w", u.RunID, ErrNotFound)
	}
	if u.Status != "" && !validStatus[u.Status] {
		return nil, fmt.Errorf("run status %q: %w", u.Status, ErrInvalidRequest)
	}
	if len(u.ExpectStatus) > 0 {
		match := false
		for _, st := range u.ExpectStatus {
			match = match || st == old.Run.Status
		}
		if !match {
			return nil, fmt.Errorf("run %s is %s: %w", u.RunID, old.Run.Status, ErrConflict)
		}
	}
	if u.ExpectNode != "" && old.Run.Node != u.ExpectNode {
		return nil, fmt.Errorf("run %s is on node %q, not %q: %w", u.RunID, old.Run.Node, u.ExpectNode, ErrConflict)
	}
	if u.CheckpointIfNewer && u.Checkpoint != nil {
		if u.Checkpoint.Step < old.Run.Step {
			return nil, fmt.Errorf("run %s checkpoint %s: step %d is older than the run's step %d: %w", u.RunID, u.Checkpoint.ID, u.Checkpoint.Step, old.Run.Step, ErrConflict)
		}
		for _, cp := range old.Run.Checkpoints {
			if cp.ID == u.Checkpoint.ID {
				return nil, fmt.Errorf("run %s checkpoint %s: already recorded: %w", u.RunID, cp.ID, ErrConflict)
			}
		}
	}
	r := *old
	if u.Status != "" {
		if (u.Status == protocol.RunEnded || u.Status == protocol.RunFailed) && r.EndedAt == "" {
			r.EndedAt = u.Time
		}
		r.Run.Status = u.Status
	}
	if u.StorageBilledTo != "" {
		r.StorageBilledTo = u.StorageBilledTo
	}
	if u.DropCheckpoints {
		r.Run.Checkpoints = nil
	}
	if u.Node != nil {
		r.Run.Node = *u.Node
	}
	if u.Reason != "" {
		r.Run.StatusReason = u.Reason
	}
	if u.Step != nil {
		r.Run.Step = *u.Step
	}
	if u.ResumedFromStep != nil {
		v := *u.ResumedFromStep
		r.Run.ResumedFromStep = &v
	}
	if u.Checkpoint != nil {
		cps := make([]protocol.Checkpoint, 0, len(r.Run.Checkpoints)+1)
		cps = append(cps, r.Run.Checkpoints...)
		cps = append(cps, *u.Checkpoint)
		if len(cps) > maxCheckpointsPerRun {
			cps = cps[len(cps)-maxCheckpointsPerRun:]
		}
		r.Run.Checkpoints = cps
	}
	if u.Loss != nil {
		sum := *u.Loss
		if r.PendingLoss != nil {
			sum += *r.PendingLoss
		}
		r.PendingLoss = &sum
		r.PendingTokens += u.Tokens
		r.PendingBatches++
		if u.Weight != nil {
			r.PendingWeight += *u.Weight
		} else {
			r.PendingWeight += float64(u.Tokens)
		}
	}
	if u.Optim != nil {
		m := protocol.Metrics{Step: u.Optim.Step, Tokens: r.PendingTokens, Time: u.Time}
		lr, gn := u.Optim.LearningRate, u.Optim.GradNorm
		m.LearningRate, m.GradNorm = &lr, &gn
		if r.PendingLoss != nil && r.PendingWeight > 0 {
			mean := *r.PendingLoss / r.PendingWeight
			m.LossMean = &mean
		}
		ms := make([]protocol.Metrics, 0, len(r.Metrics)+1)
		ms = append(ms, r.Metrics...)
		ms = append(ms, m)
		if len(ms) > maxMetricsPerRun {
			ms = ms[len(ms)-maxMetricsPerRun:]
		}
		r.Metrics = ms
		r.Run.LastMetrics = &ms[len(ms)-1]
		r.Run.Step = u.Optim.Step
		r.PendingLoss, r.PendingTokens, r.PendingWeight, r.PendingBatches = nil, 0, 0, 0
	}
	r.Run.SpentMicroCredits = ledger.SaturatingAdd(r.Run.SpentMicroCredits, u.AddSpent)
	return &r, nil
}

// CreateJoinToken stores a join token for an operator account, opening it.
func (s *State) CreateJoinToken(t JoinTokenRecord) error {
	if t.Hash == "" || t.Operator == "" {
		return fmt.Errorf("join token: hash and operator required: %w", ErrInvalidRequest)
	}
	if err := s.ledger.Open(t.Operator); err != nil {
		return err
	}
	s.joinTokens[t.Hash] = t
	return nil
}

// RegisterNode records that a node proved a join token; it returns the
// operator account. A node that joined already keeps its operator.
func (s *State) RegisterNode(peerID, tokenHash, now string) (string, error) {
	if peerID == "" {
		return "", fmt.Errorf("register node: empty peer id: %w", ErrInvalidRequest)
	}
	t, ok := s.joinTokens[tokenHash]
	if !ok {
		return "", fmt.Errorf("register node %s: unknown join token: %w", peerID, ErrUnauthorized)
	}
	if n, ok := s.nodes[peerID]; ok && n.Operator == t.Operator {
		return n.Operator, nil
	}
	// A caught operator does not come back under a new peer id: its new
	// nodes wait until an admin lifts the quarantine.
	if q, ok := s.quarantinedOf(t.Operator); ok {
		return "", protocol.UserErrorf(ErrForbidden, "operator %s's node %s is quarantined (a failed audit): its new nodes cannot join until an admin lifts the quarantine (POST /v1/admin/nodes/%s/lift_quarantine)", t.Operator, q, q)
	}
	s.nodes[peerID] = NodeRecord{PeerID: peerID, Operator: t.Operator, JoinedAt: now}
	return t.Operator, nil
}

// PutMember records or updates a raft member's addresses.
func (s *State) PutMember(m MemberRecord) error {
	if m.ID == "" {
		return fmt.Errorf("member: empty id: %w", ErrInvalidRequest)
	}
	s.members[m.ID] = m
	return nil
}

// PruneRuns forgets ended or failed runs (their checkpoints collected
// already); an active run is never pruned.
func (s *State) PruneRuns(ids []string) {
	for _, id := range ids {
		if r, ok := s.runs[id]; ok && !isActive(r.Run.Status) && len(r.Run.Checkpoints) == 0 {
			delete(s.runs, id)
		}
	}
}

// RemoveMember forgets a raft member.
func (s *State) RemoveMember(id string) { delete(s.members, id) }

func sortStrings(s []string) { sort.Strings(s) }
