package coordinator

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
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
)

func (t cmdType) String() string {
	names := [...]string{"", "batch", "create_key", "mint", "charge", "create_run", "update_run",
		"create_join_token", "register_node", "put_member", "remove_member", "put_idem"}
	if int(t) < len(names) && t > 0 {
		return names[t]
	}
	return fmt.Sprintf("cmd(%d)", byte(t))
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
}

type registerNodeCmd struct {
	PeerID    string `json:"peer_id"`
	TokenHash string `json:"token_hash"`
	Time      string `json:"time"`
}

type removeMemberCmd struct {
	ID string `json:"id"`
}

type putIdemCmd struct {
	Tag    IdemTag         `json:"tag"`
	Status int             `json:"status"`
	Body   json.RawMessage `json:"body"`
}

// command is one typed payload, before batching.
type command struct {
	typ     cmdType
	payload []byte
}

func newCommand(t cmdType, v any) (command, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return command{}, fmt.Errorf("encode %s command: %w", t, err)
	}
	return command{typ: t, payload: b}, nil
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
