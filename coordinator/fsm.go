package coordinator

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/signal-p2p/signal/ledger"
	"github.com/signal-p2p/signal/protocol"
)

// cmdResult is one command's outcome inside a batch entry. Rule errors
// (insufficient balance, unknown run) are results, not FSM failures: every
// member reaches the same one.
type cmdResult struct {
	Value any
	Err   error
}

// fsm is the raft.FSM over State. It decodes entries and dispatches; the
// rules live in State.
type fsm struct {
	mu    sync.RWMutex
	state *State
	log   *slog.Logger
	// observe, when set, gets each command's decode-and-apply time
	// (the coordinator's metrics).
	observe func(t cmdType, d time.Duration)
	// changed, when set, is called after each Tinker command applies
	// (tinker.go's wake-up of long polls and of the queue runner).
	changed func()
}

var _ raft.FSM = (*fsm)(nil)

func newFSM() *fsm { return &fsm{state: NewState(), log: slog.New(slog.DiscardHandler)} }

// read runs f with the state under a read lock.
func (f *fsm) read(fn func(s *State)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.state)
}

// errBadEntry marks a command that did not decode. Only members write the
// log (the raft transport is mutually authenticated), so such an entry is a
// bug; every member skips the same entry the same way and logs which one,
// instead of crashing the whole cluster on it, on every replay.
var errBadEntry = errors.New("raft entry does not decode")

// Apply decodes one log entry and dispatches it.
func (f *fsm) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand || len(l.Data) == 0 {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if t := cmdType(l.Data[0]); t.base() != cmdBatch {
		return f.applyOne(l.Index, command{typ: t, payload: l.Data[1:]})
	}
	return f.applyBatch(l.Index, l.Data[1:])
}

func (f *fsm) applyBatch(index uint64, payload []byte) []cmdResult {
	cmds, err := decodeBatch(payload)
	if err != nil {
		// The results slice is empty: the proposers' futures see too few
		// results and fail with errBadEntry (batcher).
		f.badEntry(index, cmdBatch, err)
		return nil
	}
	out := make([]cmdResult, len(cmds))
	for i, c := range cmds {
		out[i] = f.applyOne(index, c)
	}
	return out
}

// badEntry logs a command that did not decode and returns its result.
func (f *fsm) badEntry(index uint64, t cmdType, err error) cmdResult {
	f.log.Error("raft entry skipped", "category", "infrastructure", "index", index, "type", t.String(), "err", err)
	return cmdResult{Err: fmt.Errorf("raft entry %d: %s: %v: %w", index, t, err, errBadEntry)}
}

// applyOne applies one command and times it.
func (f *fsm) applyOne(index uint64, c command) cmdResult {
	if f.observe == nil {
		return f.applyCommand(index, c)
	}
	start := time.Now()
	res := f.applyCommand(index, c)
	f.observe(c.typ, time.Since(start))
	return res
}

// applyCommand decodes one command and applies it to the state. A type
// this member does not know is skipped: quietly when its writer flagged it
// ignorable, as a bad entry otherwise.
func (f *fsm) applyCommand(index uint64, c command) cmdResult {
	d, err := decodeCommand(c)
	switch {
	case errors.Is(err, errUnknownCommand) && c.typ.ignorable():
		f.log.Debug("raft command of an unknown, ignorable type skipped", "category", "infrastructure", "index", index, "type", c.typ.String())
		return cmdResult{}
	case err != nil:
		return f.badEntry(index, c.typ, err)
	}
	s := f.state
	switch c.typ.base() {
	case cmdCreateKey:
		k := d.v.(createKeyCmd)
		if err := s.CreateKey(k.Key, k.Credits); err != nil {
			return cmdResult{Err: err}
		}
		return cmdResult{Value: k.Key}
	case cmdMint:
		return f.applyMint(d.v.(mintCmd))
	case cmdCharge, cmdChargeBin:
		res, err := s.Charge(d.charge)
		return cmdResult{Value: res, Err: err}
	case cmdCreateRun:
		r := d.v.(RunRecord)
		if err := s.CreateRun(r); err != nil {
			return cmdResult{Err: err}
		}
		rec, _ := s.Run(r.Run.ID)
		return cmdResult{Value: rec}
	case cmdCreateRunLimited:
		cr := d.v.(createRunLimitedCmd)
		if err := s.CreateRunLimited(cr.Run, cr.MaxActive, cr.MinAvailable); err != nil {
			return cmdResult{Err: err}
		}
		rec, _ := s.Run(cr.Run.Run.ID)
		return cmdResult{Value: rec}
	case cmdPruneRuns:
		s.PruneRuns(d.v.(pruneRunsCmd).IDs)
		return cmdResult{}
	case cmdRevokeKey:
		k, err := s.RevokeKey(d.v.(revokeKeyCmd).Hash)
		return cmdResult{Value: k, Err: err}
	case cmdAuditResult:
		out, err := s.RecordAudit(d.v.(auditResultCmd))
		return cmdResult{Value: out, Err: err}
	case cmdReleaseEscrow:
		n, err := s.ReleaseEscrow(d.v.(releaseEscrowCmd))
		return cmdResult{Value: n, Err: err}
	case cmdUpdateRun:
		rec, err := s.UpdateRun(d.v.(RunUpdate))
		return cmdResult{Value: rec, Err: err}
	case cmdCreateJoinToken:
		jt := d.v.(JoinTokenRecord)
		return cmdResult{Value: jt, Err: s.CreateJoinToken(jt)}
	case cmdRegisterNode:
		rn := d.v.(registerNodeCmd)
		op, err := s.RegisterNode(rn.PeerID, rn.TokenHash, rn.Time)
		return cmdResult{Value: op, Err: err}
	case cmdPutMember:
		return cmdResult{Err: s.PutMember(d.v.(MemberRecord))}
	case cmdRemoveMember:
		s.RemoveMember(d.v.(removeMemberCmd).ID)
		return cmdResult{}
	case cmdHold:
		h := d.v.(HoldRecord)
		return cmdResult{Value: h, Err: s.Hold(h)}
	case cmdReleaseHolds:
		s.ReleaseHolds(d.v.(releaseHoldsCmd).IDs)
		return cmdResult{}
	case cmdPutIdem:
		pi := d.v.(putIdemCmd)
		rec, err := s.PutIdem(pi.Tag, pi.Status, pi.Body, pi.Time)
		return cmdResult{Value: rec, Err: err}
	case cmdLiftQuarantine:
		rec, err := s.LiftQuarantine(d.v.(liftQuarantineCmd))
		return cmdResult{Value: rec, Err: err}
	case cmdAuditQueue:
		s.ApplyAuditQueue(d.v.(auditQueueCmd))
		return cmdResult{}
	case cmdMeasure:
		s.RecordMeasure(d.v.(measureCmd))
		return cmdResult{}
	case cmdTinker:
		tf, err := s.ApplyTinker(d.v.(tinkerCmd))
		if f.changed != nil {
			// Long polls and the leader's queue runner on this member look
			// again; changed only closes a channel (it must not take the
			// lock this apply holds).
			f.changed()
		}
		return cmdResult{Value: tf, Err: err}
	}
	// decodeCommand knows a type this switch does not: a bug in this file.
	return f.badEntry(index, c.typ, errUnknownCommand)
}

func (f *fsm) applyMint(c mintCmd) cmdResult {
	if rec, ok, err := f.state.checkIdem(c.Idem); err != nil || ok {
		return cmdResult{Value: rec, Err: err}
	}
	bal, err := f.state.Mint(c.Account, c.Amount)
	if err != nil {
		return cmdResult{Err: err}
	}
	body, _ := json.Marshal(protocol.CreditResponse{Account: c.Account, BalanceMicroCredits: bal})
	rec := IdemRecord{Status: 200, Body: body}
	if c.Idem != nil {
		// Recorded with the mint itself, so a retry after a leader change
		// finds it and credits once.
		rec, _ = f.state.PutIdem(*c.Idem, 200, body, c.Time)
	}
	return cmdResult{Value: rec}
}

// ---- snapshots ----

// Snapshot records: a type byte, a uvarint length, a JSON payload. The
// stream starts with snapshotMagic and ends with recEnd, so a truncated
// file is detected.
type recType byte

const (
	recEnd recType = iota
	recMeta
	recLedgerAccount
	recAccount
	recKey
	recRun
	recNode
	recJoinToken
	recMember
	recIdem
	recHold
	// recEscrow is a node's held earnings (ledger.EscrowState), restored
	// with the ledger's accounts; recNodeAudit a node's audit history.
	recEscrow
	recNodeAudit
	// recTinker is one record of the Tinker door's book.
	recTinker
	// recPendingAudit is an audit awaiting its replay.
	recPendingAudit
)

const snapshotMagic = "SIGSNAP1"

// maxRecordBytes bounds one snapshot record, so a corrupt length cannot make
// Restore allocate without limit.
const maxRecordBytes = 64 << 20

type snapshotMeta struct {
	Minted     int64  `json:"minted"`
	FeeAccount string `json:"fee_account"`
}

// Snapshot is cheap: it clones the state's maps (records are immutable) and
// leaves the encoding to Persist, which runs off the FSM lock.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return &fsmSnapshot{state: f.state.clone()}, nil
}

// Restore builds a fresh state from a snapshot stream and swaps it in.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	s, err := readSnapshot(rc)
	if err != nil {
		return fmt.Errorf("restore snapshot: %w", err)
	}
	f.mu.Lock()
	f.state = s
	f.mu.Unlock()
	return nil
}

type fsmSnapshot struct{ state *State }

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := writeSnapshot(sink, s.state); err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("persist snapshot: %w", err)
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}

// writeSnapshot streams s as typed records, in a deterministic order.
func writeSnapshot(w io.Writer, s *State) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	if _, err := bw.WriteString(snapshotMagic); err != nil {
		return err
	}
	var lenBuf [binary.MaxVarintLen64]byte
	put := func(t recType, v any) error {
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("encode record %d: %w", t, err)
		}
		if err := bw.WriteByte(byte(t)); err != nil {
			return err
		}
		n := binary.PutUvarint(lenBuf[:], uint64(len(b)))
		if _, err := bw.Write(lenBuf[:n]); err != nil {
			return err
		}
		_, err = bw.Write(b)
		return err
	}
	if err := put(recMeta, snapshotMeta{Minted: s.ledger.Minted(), FeeAccount: s.feeAccount}); err != nil {
		return err
	}
	for _, a := range s.ledger.Accounts() {
		if err := put(recLedgerAccount, a); err != nil {
			return err
		}
	}
	for _, k := range sortedKeys(s.accounts) {
		if err := put(recAccount, s.accounts[k]); err != nil {
			return err
		}
	}
	for _, k := range sortedKeys(s.keys) {
		if err := put(recKey, s.keys[k]); err != nil {
			return err
		}
	}
	for _, k := range sortedKeys(s.runs) {
		if err := put(recRun, s.runs[k]); err != nil {
			return err
		}
	}
	for _, k := range sortedKeys(s.nodes) {
		if err := put(recNode, s.nodes[k]); err != nil {
			return err
		}
	}
	for _, k := range sortedKeys(s.joinTokens) {
		if err := put(recJoinToken, s.joinTokens[k]); err != nil {
			return err
		}
	}
	for _, k := range sortedKeys(s.members) {
		if err := put(recMember, s.members[k]); err != nil {
			return err
		}
	}
	// Idempotency records go account by account in insertion order, so
	// eviction order survives.
	for _, acct := range sortedKeys(s.idemOrder) {
		for _, scope := range s.idemOrder[acct] {
			if rec, ok := s.idem[scope]; ok {
				if err := put(recIdem, rec); err != nil {
					return err
				}
			}
		}
	}
	for _, h := range s.Holds() {
		if err := put(recHold, h); err != nil {
			return err
		}
	}
	for _, e := range s.ledger.Escrows() {
		if err := put(recEscrow, e); err != nil {
			return err
		}
	}
	for _, k := range sortedKeys(s.nodeAudits) {
		if err := put(recNodeAudit, s.nodeAudits[k]); err != nil {
			return err
		}
	}
	for _, r := range s.tinker.records() {
		if err := put(recTinker, r); err != nil {
			return err
		}
	}
	for _, a := range s.PendingAudits() {
		if err := put(recPendingAudit, a); err != nil {
			return err
		}
	}
	if err := bw.WriteByte(byte(recEnd)); err != nil {
		return err
	}
	return bw.Flush()
}

var errBadSnapshot = errors.New("malformed snapshot")

// readSnapshot decodes a snapshot stream into a fresh State. Snapshots come
// from disk or the network, so every malformed input is an error.
func readSnapshot(r io.Reader) (*State, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	magic := make([]byte, len(snapshotMagic))
	if _, err := io.ReadFull(br, magic); err != nil || string(magic) != snapshotMagic {
		return nil, fmt.Errorf("magic: %w", errBadSnapshot)
	}
	s := NewState()
	var meta snapshotMeta
	var accounts []ledger.AccountState
	var escrows []ledger.EscrowState
	for {
		tb, err := br.ReadByte()
		if err != nil {
			return nil, fmt.Errorf("record type: %w (%w)", errBadSnapshot, err)
		}
		t := recType(tb)
		if t == recEnd {
			break
		}
		l, err := binary.ReadUvarint(br)
		if err != nil || l > maxRecordBytes {
			return nil, fmt.Errorf("record %d length: %w", t, errBadSnapshot)
		}
		buf := make([]byte, l)
		if _, err := io.ReadFull(br, buf); err != nil {
			return nil, fmt.Errorf("record %d: %w (%w)", t, errBadSnapshot, err)
		}
		if t == recEscrow {
			var e ledger.EscrowState
			if err := json.Unmarshal(buf, &e); err != nil {
				return nil, fmt.Errorf("record %d: %w (%w)", t, errBadSnapshot, err)
			}
			escrows = append(escrows, e)
			continue
		}
		if err := decodeRecord(s, t, buf, &meta, &accounts); err != nil {
			return nil, err
		}
	}
	l, err := ledger.RestoreWithEscrows(accounts, meta.Minted, escrows)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errBadSnapshot, err)
	}
	s.ledger = l
	if meta.FeeAccount != "" {
		s.feeAccount = meta.FeeAccount
	}
	return s, nil
}

func decodeRecord(s *State, t recType, buf []byte, meta *snapshotMeta, accounts *[]ledger.AccountState) error {
	dec := func(v any) error {
		if err := json.Unmarshal(buf, v); err != nil {
			return fmt.Errorf("record %d: %w (%w)", t, errBadSnapshot, err)
		}
		return nil
	}
	switch t {
	case recMeta:
		return dec(meta)
	case recLedgerAccount:
		var a ledger.AccountState
		if err := dec(&a); err != nil {
			return err
		}
		*accounts = append(*accounts, a)
	case recAccount:
		var a AccountRecord
		if err := dec(&a); err != nil {
			return err
		}
		s.accounts[a.Name] = a
	case recKey:
		var k KeyRecord
		if err := dec(&k); err != nil {
			return err
		}
		s.keys[k.Hash] = k
	case recRun:
		var r RunRecord
		if err := dec(&r); err != nil {
			return err
		}
		if r.Run.ID == "" {
			return fmt.Errorf("run record without id: %w", errBadSnapshot)
		}
		s.runs[r.Run.ID] = &r
	case recNode:
		var n NodeRecord
		if err := dec(&n); err != nil {
			return err
		}
		s.nodes[n.PeerID] = n
	case recJoinToken:
		var j JoinTokenRecord
		if err := dec(&j); err != nil {
			return err
		}
		s.joinTokens[j.Hash] = j
	case recMember:
		var m MemberRecord
		if err := dec(&m); err != nil {
			return err
		}
		s.members[m.ID] = m
	case recIdem:
		var rec IdemRecord
		if err := dec(&rec); err != nil {
			return err
		}
		s.putIdem(rec)
	case recHold:
		var h HoldRecord
		if err := dec(&h); err != nil {
			return err
		}
		if h.ID == "" || h.Amount < 0 {
			return fmt.Errorf("hold record without id or with a negative amount: %w", errBadSnapshot)
		}
		s.putHold(h)
	case recPendingAudit:
		var a PendingAudit
		if err := dec(&a); err != nil {
			return err
		}
		if a.ID == "" {
			return fmt.Errorf("pending audit record without an id: %w", errBadSnapshot)
		}
		s.pendingAudits[a.ID] = a
	case recTinker:
		var r tinkerRecord
		if err := dec(&r); err != nil {
			return err
		}
		return s.tinker.restore(r)
	case recNodeAudit:
		var a NodeAuditRecord
		if err := dec(&a); err != nil {
			return err
		}
		if a.PeerID == "" {
			return fmt.Errorf("node audit record without a peer id: %w", errBadSnapshot)
		}
		s.nodeAudits[a.PeerID] = a
	default:
		return fmt.Errorf("record type %d: %w", t, errBadSnapshot)
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sortStrings(out)
	return out
}
