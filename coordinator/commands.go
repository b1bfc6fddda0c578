package coordinator

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
)

// cmdType is the first byte of every raft log entry. New types are only
// appended; a number is never reused, because old logs replay forever.
type cmdType byte

const (
	// cmdBatch holds several commands in one log entry: concurrent writes
	// share one raft round trip and one fsync.
	cmdBatch cmdType = iota + 1
	cmdCreateKey
	cmdMint
	cmdCharge
	cmdCreateRun
	cmdUpdateRun
	cmdCreateJoinToken
	cmdRegisterNode
	cmdPutMember
	cmdRemoveMember
	cmdPutIdem
	// cmdChargeBin is a charge in the compact binary layout of
	// appendCharge: charges are the hot path, and JSON was a third of
	// every member's apply cost. cmdCharge (JSON) still replays old logs.
	cmdChargeBin
	// cmdHold reserves a billed call's quote before it reaches a node;
	// cmdReleaseHolds frees reservations whose calls will not be charged.
	cmdHold
	cmdReleaseHolds
	// cmdCreateRunLimited is a create_run under the account's quotas,
	// checked in the apply so concurrent creates cannot pass them together.
	cmdCreateRunLimited
	// cmdPruneRuns forgets ended runs past their retention.
	cmdPruneRuns
	// cmdRevokeKey deletes an API key: every member must apply it (a
	// member that skipped it would still authenticate the key on its
	// member-local routes), so it is written without the ignorable flag.
	cmdRevokeKey
	// cmdAuditResult records a spot-check audit's verdict on a node
	// (escrow.go): a pass verifies the node's held earnings, a failure
	// forfeits them to their payers and quarantines the node.
	cmdAuditResult
	// cmdReleaseEscrow pays operators the earnings audits verified
	// before its cutoff.
	cmdReleaseEscrow
	// cmdTinker is the Tinker door's one command (tinkerbook.go): a
	// queued call, its answer, the models, samplers and checkpoint names.
	cmdTinker
	// cmdLiftQuarantine is an admin's lift of a node's quarantine.
	cmdLiftQuarantine
	// cmdAuditQueue records a pending audit, or drops ended ones.
	cmdAuditQueue
	// cmdMeasure records a node's measured throughput (challenge.go).
	cmdMeasure
)

// ignoreUnknownTypeFlag, set on a command's type byte, tells a member that
// does not know the type to skip the command instead of taking it for a
// bad entry (nomad's structs.IgnoreUnknownTypeFlag). A command that a
// member may miss without diverging from the others is written with it,
// so a leader of a newer version can write it while older members still
// apply the log during a rolling upgrade; a command every member must
// apply alike is written without it, and needs every member upgraded
// first. Known types apply the same with or without it, so types stay
// below it: 127 of them.
const ignoreUnknownTypeFlag cmdType = 0x80

// base is t without ignoreUnknownTypeFlag.
func (t cmdType) base() cmdType { return t &^ ignoreUnknownTypeFlag }

// ignorable says whether a member that does not know t may skip it.
func (t cmdType) ignorable() bool { return t&ignoreUnknownTypeFlag != 0 }

var cmdNames = [...]string{"", "batch", "create_key", "mint", "charge", "create_run", "update_run",
	"create_join_token", "register_node", "put_member", "remove_member", "put_idem", "charge_bin", "hold", "release_holds", "create_run_limited", "prune_runs", "revoke_key",
	"audit_result", "release_escrow", "tinker", "lift_quarantine", "audit_queue", "measure"}

func (t cmdType) String() string {
	name := fmt.Sprintf("cmd(%d)", byte(t.base()))
	if b := t.base(); int(b) < len(cmdNames) && b > 0 {
		name = cmdNames[b]
	}
	if t.ignorable() {
		name += "+ignorable"
	}
	return name
}

// Payloads of the commands other than chargeCmd and RunUpdate (in state.go).

type createKeyCmd struct {
	Key     KeyRecord `json:"key"`
	Credits int64     `json:"credits"`
}

type mintCmd struct {
	Account string   `json:"account"`
	Amount  int64    `json:"amount"`
	Idem    *IdemTag `json:"idem,omitempty"`
	Time    string   `json:"time,omitempty"`
}

type registerNodeCmd struct {
	PeerID    string `json:"peer_id"`
	TokenHash string `json:"token_hash"`
	Time      string `json:"time"`
}

type createRunLimitedCmd struct {
	Run RunRecord `json:"run"`
	// MaxActive is the most runs holding a session the owner may have;
	// MinAvailable the balance less holds the owner needs to open one.
	MaxActive    int   `json:"max_active"`
	MinAvailable int64 `json:"min_available"`
}

type revokeKeyCmd struct {
	Hash string `json:"hash"`
}

type pruneRunsCmd struct {
	IDs []string `json:"ids"`
}

type releaseHoldsCmd struct {
	IDs []string `json:"ids"`
}

type removeMemberCmd struct {
	ID string `json:"id"`
}

type putIdemCmd struct {
	Tag    IdemTag         `json:"tag"`
	Status int             `json:"status"`
	Body   json.RawMessage `json:"body"`
	Time   string          `json:"time,omitempty"`
}

// command is one typed payload, before batching.
type command struct {
	typ     cmdType
	payload []byte
}

// The codec: newCommand encodes every command and decodeCommand decodes
// every command; each type's payload is JSON of the Go type decodeCommand
// names, except cmdChargeBin's (appendCharge's binary layout).

// newCommand encodes v as a command of type t. A charge (cmdCharge with a
// chargeCmd) is written as cmdChargeBin.
func newCommand(t cmdType, v any) (command, error) {
	if c, ok := v.(chargeCmd); ok && t == cmdCharge {
		return newChargeCommand(c)
	}
	b, err := json.Marshal(v)
	if err != nil {
		return command{}, fmt.Errorf("encode %s command: %w", t, err)
	}
	return command{typ: t, payload: b}, nil
}

// errUnknownCommand is a command type this member does not know.
var errUnknownCommand = errors.New("unknown command type")

// decodedCommand is a command's payload as its Go value: a charge in
// charge, every other type in v. Charges are the hot path, and boxing one
// in an interface would cost every member an allocation per charge.
type decodedCommand struct {
	charge chargeCmd
	v      any
}

// decodeCommand decodes c's payload into the value its type carries:
// newCommand's inverse. Known types decode alike with or without
// ignoreUnknownTypeFlag. A type this member does not know fails with
// errUnknownCommand, a payload that does not decode with its decoder's
// error.
func decodeCommand(c command) (decodedCommand, error) {
	var d decodedCommand
	var err error
	switch c.typ.base() {
	case cmdCreateKey:
		d.v, err = decodeJSONCommand[createKeyCmd](c.payload)
	case cmdMint:
		d.v, err = decodeJSONCommand[mintCmd](c.payload)
	case cmdCharge:
		// Into its own variable: &d.charge would move every decode's d
		// to the heap.
		var jc chargeCmd
		err = json.Unmarshal(c.payload, &jc)
		d.charge = jc
	case cmdChargeBin:
		d.charge, err = decodeCharge(c.payload)
	case cmdCreateRun:
		d.v, err = decodeJSONCommand[RunRecord](c.payload)
	case cmdUpdateRun:
		d.v, err = decodeJSONCommand[RunUpdate](c.payload)
	case cmdCreateJoinToken:
		d.v, err = decodeJSONCommand[JoinTokenRecord](c.payload)
	case cmdRegisterNode:
		d.v, err = decodeJSONCommand[registerNodeCmd](c.payload)
	case cmdPutMember:
		d.v, err = decodeJSONCommand[MemberRecord](c.payload)
	case cmdRemoveMember:
		d.v, err = decodeJSONCommand[removeMemberCmd](c.payload)
	case cmdPutIdem:
		d.v, err = decodeJSONCommand[putIdemCmd](c.payload)
	case cmdHold:
		d.v, err = decodeJSONCommand[HoldRecord](c.payload)
	case cmdReleaseHolds:
		d.v, err = decodeJSONCommand[releaseHoldsCmd](c.payload)
	case cmdCreateRunLimited:
		d.v, err = decodeJSONCommand[createRunLimitedCmd](c.payload)
	case cmdPruneRuns:
		d.v, err = decodeJSONCommand[pruneRunsCmd](c.payload)
	case cmdRevokeKey:
		d.v, err = decodeJSONCommand[revokeKeyCmd](c.payload)
	case cmdAuditResult:
		d.v, err = decodeJSONCommand[auditResultCmd](c.payload)
	case cmdReleaseEscrow:
		d.v, err = decodeJSONCommand[releaseEscrowCmd](c.payload)
	case cmdTinker:
		d.v, err = decodeJSONCommand[tinkerCmd](c.payload)
	case cmdLiftQuarantine:
		d.v, err = decodeJSONCommand[liftQuarantineCmd](c.payload)
	case cmdAuditQueue:
		d.v, err = decodeJSONCommand[auditQueueCmd](c.payload)
	case cmdMeasure:
		d.v, err = decodeJSONCommand[measureCmd](c.payload)
	default:
		err = errUnknownCommand
	}
	return d, err
}

func decodeJSONCommand[T any](p []byte) (any, error) {
	var v T
	if err := json.Unmarshal(p, &v); err != nil {
		return nil, err
	}
	return v, nil
}

// encodeBatch lays out a batch entry: cmdBatch, uvarint count, then per
// command its type byte, uvarint length and payload.
func encodeBatch(cmds []command) []byte {
	n := 1 + binary.MaxVarintLen64
	for _, c := range cmds {
		n += 1 + binary.MaxVarintLen64 + len(c.payload)
	}
	buf := make([]byte, 0, n)
	buf = append(buf, byte(cmdBatch))
	buf = binary.AppendUvarint(buf, uint64(len(cmds)))
	for _, c := range cmds {
		buf = append(buf, byte(c.typ))
		buf = binary.AppendUvarint(buf, uint64(len(c.payload)))
		buf = append(buf, c.payload...)
	}
	return buf
}

var errBadBatch = errors.New("malformed batch entry")

// decodeBatch splits a batch entry's payload (after the type byte).
func decodeBatch(b []byte) ([]command, error) {
	count, n := binary.Uvarint(b)
	if n <= 0 || count > uint64(len(b)) {
		return nil, fmt.Errorf("batch count: %w", errBadBatch)
	}
	b = b[n:]
	cmds := make([]command, 0, count)
	for i := uint64(0); i < count; i++ {
		if len(b) < 2 {
			return nil, fmt.Errorf("batch command %d: truncated: %w", i, errBadBatch)
		}
		t := cmdType(b[0])
		l, n := binary.Uvarint(b[1:])
		if n <= 0 || l > uint64(len(b)-1-n) {
			return nil, fmt.Errorf("batch command %d length: %w", i, errBadBatch)
		}
		start := 1 + n
		cmds = append(cmds, command{typ: t, payload: b[start : start+int(l)]})
		b = b[start+int(l):]
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("batch: %d trailing bytes: %w", len(b), errBadBatch)
	}
	return cmds, nil
}

// newChargeCommand encodes a charge as cmdChargeBin.
func newChargeCommand(c chargeCmd) (command, error) {
	var ru []byte
	if c.RunUpdate != nil {
		// Run updates are rarer and richer; JSON keeps them simple.
		var err error
		if ru, err = json.Marshal(c.RunUpdate); err != nil {
			return command{}, fmt.Errorf("encode charge run update: %w", err)
		}
	}
	return command{typ: cmdChargeBin, payload: appendCharge(nil, c, ru)}, nil
}

// Flags of a cmdChargeBin payload.
const (
	chargeRequireAll byte = 1 << iota
	chargeHasIdem
	chargeHasBody
	chargeHasRunUpdate
	chargeHasHold
	// chargeHasNode: the operator's share is held in the node's escrow.
	chargeHasNode
	chargeKnownFlags = chargeRequireAll | chargeHasIdem | chargeHasBody | chargeHasRunUpdate | chargeHasHold | chargeHasNode
)

// appendCharge lays out a charge: a flags byte; Account, Operator, RunID,
// Call and Time as uvarint-length strings; FeeBPS and the four Cost figures
// as varints; then, when flagged, the idempotency scope and body hash, the
// response body, the run update's JSON, the hold and the node.
func appendCharge(b []byte, c chargeCmd, runUpdate []byte) []byte {
	var flags byte
	if c.RequireAll {
		flags |= chargeRequireAll
	}
	if c.Idem != nil {
		flags |= chargeHasIdem
	}
	if c.Body != nil {
		flags |= chargeHasBody
	}
	if c.RunUpdate != nil {
		flags |= chargeHasRunUpdate
	}
	if c.HoldID != "" {
		flags |= chargeHasHold
	}
	if c.Node != "" {
		flags |= chargeHasNode
	}
	n := 1 + 2*binary.MaxVarintLen64 + len(c.HoldID) + len(c.Node) + 5*binary.MaxVarintLen64 + len(c.Account) + len(c.Operator) + len(c.RunID) + len(c.Call) + len(c.Time) +
		5*binary.MaxVarintLen64 + 3*binary.MaxVarintLen64 + len(c.Body) + len(runUpdate)
	if c.Idem != nil {
		n += len(c.Idem.Scope) + len(c.Idem.BodyHash)
	}
	if cap(b)-len(b) < n {
		nb := make([]byte, len(b), len(b)+n)
		copy(nb, b)
		b = nb
	}
	b = append(b, flags)
	for _, s := range [...]string{c.Account, c.Operator, c.RunID, c.Call, c.Time} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	b = binary.AppendVarint(b, int64(c.FeeBPS))
	b = binary.AppendVarint(b, c.Cost.MicroCredits)
	b = binary.AppendVarint(b, c.Cost.TrainTokens)
	b = binary.AppendVarint(b, c.Cost.PrefillTokens)
	b = binary.AppendVarint(b, c.Cost.SampledTokens)
	if c.Idem != nil {
		b = binary.AppendUvarint(b, uint64(len(c.Idem.Scope)))
		b = append(b, c.Idem.Scope...)
		b = binary.AppendUvarint(b, uint64(len(c.Idem.BodyHash)))
		b = append(b, c.Idem.BodyHash...)
	}
	if c.Body != nil {
		b = binary.AppendUvarint(b, uint64(len(c.Body)))
		b = append(b, c.Body...)
	}
	if c.RunUpdate != nil {
		b = binary.AppendUvarint(b, uint64(len(runUpdate)))
		b = append(b, runUpdate...)
	}
	if c.HoldID != "" {
		b = binary.AppendUvarint(b, uint64(len(c.HoldID)))
		b = append(b, c.HoldID...)
	}
	if c.Node != "" {
		b = binary.AppendUvarint(b, uint64(len(c.Node)))
		b = append(b, c.Node...)
	}
	return b
}

var errBadCharge = errors.New("malformed charge command")

// chargeReader walks a cmdChargeBin payload; the first error sticks.
type chargeReader struct {
	b   []byte
	err error
}

func (r *chargeReader) fail(what string) {
	if r.err == nil {
		r.err = fmt.Errorf("%s: %w", what, errBadCharge)
	}
}

func (r *chargeReader) bytes(what string) []byte {
	if r.err != nil {
		return nil
	}
	l, n := binary.Uvarint(r.b)
	if n <= 0 || l > uint64(len(r.b)-n) {
		r.fail(what)
		return nil
	}
	out := r.b[n : n+int(l)]
	r.b = r.b[n+int(l):]
	return out
}

func (r *chargeReader) str(what string) string { return string(r.bytes(what)) }

func (r *chargeReader) varint(what string) int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail(what)
		return 0
	}
	r.b = r.b[n:]
	return v
}

// decodeCharge reads a cmdChargeBin payload. It copies what it keeps, so
// the state never pins a log entry's buffer.
func decodeCharge(p []byte) (chargeCmd, error) {
	var c chargeCmd
	if len(p) == 0 {
		return c, fmt.Errorf("empty: %w", errBadCharge)
	}
	flags := p[0]
	if flags&^chargeKnownFlags != 0 {
		return c, fmt.Errorf("flags %#x: %w", flags, errBadCharge)
	}
	r := chargeReader{b: p[1:]}
	c.RequireAll = flags&chargeRequireAll != 0
	c.Account = r.str("account")
	c.Operator = r.str("operator")
	c.RunID = r.str("run_id")
	c.Call = r.str("call")
	c.Time = r.str("time")
	fee := r.varint("fee_bps")
	if fee < math.MinInt32 || fee > math.MaxInt32 {
		r.fail("fee_bps")
	}
	c.FeeBPS = int(fee)
	c.Cost.MicroCredits = r.varint("credits")
	c.Cost.TrainTokens = r.varint("train_tokens")
	c.Cost.PrefillTokens = r.varint("prefill_tokens")
	c.Cost.SampledTokens = r.varint("sampled_tokens")
	if flags&chargeHasIdem != 0 {
		c.Idem = &IdemTag{Scope: r.str("idem scope"), BodyHash: r.str("idem body hash")}
	}
	if flags&chargeHasBody != 0 {
		if b := r.bytes("body"); r.err == nil {
			c.Body = append(json.RawMessage{}, b...)
		}
	}
	if flags&chargeHasRunUpdate != 0 {
		if b := r.bytes("run_update"); r.err == nil {
			var u RunUpdate
			if err := json.Unmarshal(b, &u); err != nil {
				return c, fmt.Errorf("run_update: %w (%w)", errBadCharge, err)
			}
			c.RunUpdate = &u
		}
	}
	if flags&chargeHasHold != 0 {
		c.HoldID = r.str("hold_id")
	}
	if flags&chargeHasNode != 0 {
		c.Node = r.str("node")
	}
	if r.err == nil && len(r.b) != 0 {
		r.fail(fmt.Sprintf("%d trailing bytes", len(r.b)))
	}
	if r.err != nil {
		return chargeCmd{}, r.err
	}
	return c, nil
}
