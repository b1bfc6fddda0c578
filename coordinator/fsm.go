package coordinator

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"

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
	// lastIndex is the index of the last applied entry (for tests and metrics).
	lastIndex uint64
}

var _ raft.FSM = (*fsm)(nil)

func newFSM() *fsm { return &fsm{state: NewState()} }

// read runs f with the state under a read lock.
func (f *fsm) read(fn func(s *State)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.state)
}

// Apply decodes one log entry. A payload that does not decode is a bug (an
// entry written by this code), never an input error, so it panics rather
// than let members diverge.
func (f *fsm) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand || len(l.Data) == 0 {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lastIndex = l.Index
	switch t := cmdType(l.Data[0]); t {
	case cmdBatch:
		return f.applyBatch(l.Index, l.Data[1:])
	default:
		return f.applyOne(l.Index, t, l.Data[1:])
	}
}

func (f *fsm) applyBatch(index uint64, payload []byte) []cmdResult {
	cmds, err := decodeBatch(payload)
	if err != nil {
		panic(fmt.Sprintf("raft entry %d: %v", index, err))
	}
	out := make([]cmdResult, len(cmds))
	for i, c := range cmds {
		out[i] = f.applyOne(index, c.typ, c.payload)
	}
	return out
}

func mustDecode(index uint64, t cmdType, payload []byte, v any) {
	if err := json.Unmarshal(payload, v); err != nil {
		panic(fmt.Sprintf("raft entry %d: decode %s: %v", index, t, err))
	}
}

func (f *fsm) applyOne(index uint64, t cmdType, p []byte) cmdResult {
	switch t {
	case cmdCreateKey:
		return f.applyCreateKey(index, p)
	case cmdMint:
		return f.applyMint(index, p)
	case cmdCharge:
		return f.applyCharge(index, p)
	case cmdCreateRun:
		return f.applyCreateRun(index, p)
	case cmdUpdateRun:
		return f.applyUpdateRun(index, p)
	case cmdCreateJoinToken:
		return f.applyCreateJoinToken(index, p)
	case cmdRegisterNode:
		return f.applyRegisterNode(index, p)
	case cmdPutMember:
		return f.applyPutMember(index, p)
	case cmdRemoveMember:
		return f.applyRemoveMember(index, p)
	case cmdPutIdem:
		return f.applyPutIdem(index, p)
	case cmdChargeBin:
		return f.applyChargeBin(index, p)
	default:
		panic(fmt.Sprintf("raft entry %d: unknown command type %d", index, byte(t)))
	}
}

func (f *fsm) applyCreateKey(index uint64, p []byte) cmdResult {
	var c createKeyCmd
	mustDecode(index, cmdCreateKey, p, &c)
	if err := f.state.CreateKey(c.Key, c.Credits); err != nil {
		return cmdResult{Err: err}
	}
	return cmdResult{Value: c.Key}
}

func (f *fsm) applyMint(index uint64, p []byte) cmdResult {
	var c mintCmd
	mustDecode(index, cmdMint, p, &c)
	if rec, ok, err := f.state.checkIdem(c.Idem); err != nil || ok {
		return cmdResult{Value: rec, Err: err}
	}
	bal, err := f.state.Mint(c.Account, c.Amount)
	if err != nil {
		return cmdResult{Err: err}
	}
	body, _ := json.Marshal(protocol.CreditResponse{Account: c.Account, Balance: bal})
	rec := IdemRecord{Status: 200, Body: body}
	if c.Idem != nil {
		// Recorded with the mint itself, so a retry after a leader change
		// finds it and credits once.
		rec, _ = f.state.PutIdem(*c.Idem, 200, body)
	}
	return cmdResult{Value: rec}
}

func (f *fsm) applyCharge(index uint64, p []byte) cmdResult {
	var c chargeCmd
	mustDecode(index, cmdCharge, p, &c)
	res, err := f.state.Charge(c)
	return cmdResult{Value: res, Err: err}
}

func (f *fsm) applyChargeBin(index uint64, p []byte) cmdResult {
	c, err := decodeCharge(p)
	if err != nil {
		panic(fmt.Sprintf("raft entry %d: decode %s: %v", index, cmdChargeBin, err))
	}
	res, err := f.state.Charge(c)
	return cmdResult{Value: res, Err: err}
}

func (f *fsm) applyCreateRun(index uint64, p []byte) cmdResult {
	var r RunRecord
	mustDecode(index, cmdCreateRun, p, &r)
	if err := f.state.CreateRun(r); err != nil {
		return cmdResult{Err: err}
	}
	rec, _ := f.state.Run(r.Run.ID)
	return cmdResult{Value: rec}
}

func (f *fsm) applyUpdateRun(index uint64, p []byte) cmdResult {
	var u RunUpdate
	mustDecode(index, cmdUpdateRun, p, &u)
	rec, err := f.state.UpdateRun(u)
	return cmdResult{Value: rec, Err: err}
}

func (f *fsm) applyCreateJoinToken(index uint64, p []byte) cmdResult {
	var t JoinTokenRecord
	mustDecode(index, cmdCreateJoinToken, p, &t)
	return cmdResult{Value: t, Err: f.state.CreateJoinToken(t)}
}

func (f *fsm) applyRegisterNode(index uint64, p []byte) cmdResult {
	var c registerNodeCmd
	mustDecode(index, cmdRegisterNode, p, &c)
	op, err := f.state.RegisterNode(c.PeerID, c.TokenHash, c.Time)
	return cmdResult{Value: op, Err: err}
}

func (f *fsm) applyPutMember(index uint64, p []byte) cmdResult {
	var m MemberRecord
	mustDecode(index, cmdPutMember, p, &m)
	return cmdResult{Err: f.state.PutMember(m)}
}

func (f *fsm) applyRemoveMember(index uint64, p []byte) cmdResult {
	var c removeMemberCmd
	mustDecode(index, cmdRemoveMember, p, &c)
	f.state.RemoveMember(c.ID)
	return cmdResult{}
}

func (f *fsm) applyPutIdem(index uint64, p []byte) cmdResult {
	var c putIdemCmd
	mustDecode(index, cmdPutIdem, p, &c)
	rec, err := f.state.PutIdem(c.Tag, c.Status, c.Body)
	return cmdResult{Value: rec, Err: err}
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
	// Idempotency records go in insertion order so eviction order survives.
	for _, scope := range s.idemOrder {
		if rec, ok := s.idem[scope]; ok {
			if err := put(recIdem, rec); err != nil {
				return err
			}
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
		if err := decodeRecord(s, t, buf, &meta, &accounts); err != nil {
			return nil, err
		}
	}
	l, err := ledger.Restore(accounts, meta.Minted)
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
