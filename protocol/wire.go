package protocol

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// The binary frame that carries session messages, join messages and capacity
// adverts between coordinators and nodes (libp2p streams and GossipSub).
//
//	offset size field
//	0      2    magic "SG" (catches a peer that speaks something else)
//	2      1    wire version (WireVersion)
//	3      1    message type (MsgType)
//	4      4    payload length, big-endian uint32
//	8      n    payload: the message as JSON
//
// JSON keeps the payloads identical to the public API's bodies (a session
// call's body is the API request body); the header makes the stream
// self-delimiting and lets a reader refuse an oversized or foreign message
// before allocating for it.
const (
	// WireVersion is the frame version this build writes and reads.
	WireVersion = 1
	// FrameHeaderBytes is the size of a frame header.
	FrameHeaderBytes = 8
	// MaxFrameBytes bounds a frame's payload unless a reader asks for less.
	MaxFrameBytes = 64 << 20
)

var frameMagic = [2]byte{'S', 'G'}

// MsgType names the message a frame carries.
type MsgType uint8

// Message types. New types are only appended.
const (
	MsgSessionRequest  MsgType = 1
	MsgSessionResponse MsgType = 2
	MsgAdvert          MsgType = 3
	MsgJoinRequest     MsgType = 4
	MsgJoinResponse    MsgType = 5
	MsgDrainReport     MsgType = 6
	MsgDrainAck        MsgType = 7
)

func (t MsgType) String() string {
	switch t {
	case MsgSessionRequest:
		return "session_request"
	case MsgSessionResponse:
		return "session_response"
	case MsgAdvert:
		return "advert"
	case MsgJoinRequest:
		return "join_request"
	case MsgJoinResponse:
		return "join_response"
	case MsgDrainReport:
		return "drain_report"
	case MsgDrainAck:
		return "drain_ack"
	}
	return fmt.Sprintf("msg_type(%d)", uint8(t))
}

func (t MsgType) known() bool { return t >= MsgSessionRequest && t <= MsgDrainAck }

// Frame decoding errors.
var (
	// ErrBadMagic means the bytes are not a Signal frame.
	ErrBadMagic = errors.New("not a signal frame")
	// ErrUnsupportedVersion means the frame was written by an incompatible version.
	ErrUnsupportedVersion = errors.New("unsupported wire version")
	// ErrUnknownMsgType means the frame's message type is not one this build knows.
	ErrUnknownMsgType = errors.New("unknown message type")
	// ErrFrameTooLarge means a frame's payload is above the reader's limit.
	ErrFrameTooLarge = errors.New("frame too large")
	// ErrMalformedFrame means a frame is truncated or its payload does not decode.
	ErrMalformedFrame = errors.New("malformed frame")
	// ErrUnexpectedMsgType means a valid frame arrived where another type was expected.
	ErrUnexpectedMsgType = errors.New("unexpected message type")
)

// EncodeFrame returns v encoded as JSON in a frame of type t.
func EncodeFrame(t MsgType, v any) ([]byte, error) {
	if !t.known() {
		return nil, fmt.Errorf("encode frame: %w: %d", ErrUnknownMsgType, uint8(t))
	}
	payload, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", t, err)
	}
	if len(payload) > MaxFrameBytes {
		return nil, fmt.Errorf("encode %s: %w: %d bytes, limit %d", t, ErrFrameTooLarge, len(payload), MaxFrameBytes)
	}
	buf := make([]byte, FrameHeaderBytes+len(payload))
	putHeader(buf, t, len(payload))
	copy(buf[FrameHeaderBytes:], payload)
	return buf, nil
}

func putHeader(buf []byte, t MsgType, n int) {
	buf[0], buf[1] = frameMagic[0], frameMagic[1]
	buf[2] = WireVersion
	buf[3] = byte(t)
	binary.BigEndian.PutUint32(buf[4:8], uint32(n))
}

// WriteFrame writes v as one frame of type t. It issues a single Write so
// that concurrent writers on a stream never interleave a frame.
func WriteFrame(w io.Writer, t MsgType, v any) error {
	buf, err := EncodeFrame(t, v)
	if err != nil {
		return err
	}
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("write %s frame: %w", t, err)
	}
	return nil
}

// parseHeader validates a frame header and returns its type and payload length.
func parseHeader(h []byte, maxBytes int) (MsgType, int, error) {
	if h[0] != frameMagic[0] || h[1] != frameMagic[1] {
		return 0, 0, fmt.Errorf("%w: magic %q", ErrBadMagic, h[:2])
	}
	if h[2] != WireVersion {
		return 0, 0, fmt.Errorf("%w: %d (this build speaks %d)", ErrUnsupportedVersion, h[2], WireVersion)
	}
	t := MsgType(h[3])
	if !t.known() {
		return 0, 0, fmt.Errorf("%w: %d", ErrUnknownMsgType, h[3])
	}
	n := binary.BigEndian.Uint32(h[4:8])
	if maxBytes <= 0 || maxBytes > MaxFrameBytes {
		maxBytes = MaxFrameBytes
	}
	if uint64(n) > uint64(maxBytes) {
		return 0, 0, fmt.Errorf("%w: %s of %d bytes, limit %d", ErrFrameTooLarge, t, n, maxBytes)
	}
	return t, int(n), nil
}

// ReadFrame reads one frame and returns its type and payload. maxBytes
// bounds the payload (0 or above MaxFrameBytes means MaxFrameBytes); the
// payload is allocated only after the header has been checked. io.EOF is
// returned unwrapped when the stream ends cleanly before a frame starts.
func ReadFrame(r io.Reader, maxBytes int) (MsgType, []byte, error) {
	var h [FrameHeaderBytes]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, nil, io.EOF
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, fmt.Errorf("%w: truncated header", ErrMalformedFrame)
		}
		return 0, nil, fmt.Errorf("read frame header: %w", err)
	}
	t, n, err := parseHeader(h[:], maxBytes)
	if err != nil {
		return 0, nil, err
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, fmt.Errorf("%w: %s payload truncated (want %d bytes)", ErrMalformedFrame, t, n)
		}
		return 0, nil, fmt.Errorf("read %s payload: %w", t, err)
	}
	return t, payload, nil
}

// DecodeFrame splits a complete frame held in memory (a GossipSub message)
// into its type and payload; trailing bytes are an error.
func DecodeFrame(b []byte, maxBytes int) (MsgType, []byte, error) {
	if len(b) < FrameHeaderBytes {
		return 0, nil, fmt.Errorf("%w: %d bytes, shorter than a header", ErrMalformedFrame, len(b))
	}
	t, n, err := parseHeader(b[:FrameHeaderBytes], maxBytes)
	if err != nil {
		return 0, nil, err
	}
	if len(b)-FrameHeaderBytes != n {
		return 0, nil, fmt.Errorf("%w: %s header says %d payload bytes, got %d", ErrMalformedFrame, t, n, len(b)-FrameHeaderBytes)
	}
	return t, b[FrameHeaderBytes:], nil
}

// ReadMessage reads one frame, checks that it is of type want and decodes
// its payload into v (one of the Decode functions' types).
func ReadMessage(r io.Reader, want MsgType, maxBytes int, v any) error {
	t, payload, err := ReadFrame(r, maxBytes)
	if err != nil {
		return err
	}
	if t != want {
		return fmt.Errorf("%w: got %s, want %s", ErrUnexpectedMsgType, t, want)
	}
	return decodePayload(t, payload, v)
}

func decodePayload(t MsgType, payload []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %s payload: %w", ErrMalformedFrame, t, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: %s payload has trailing data", ErrMalformedFrame, t)
	}
	var err error
	switch m := v.(type) {
	case *SessionRequest:
		err = m.Validate()
	case *SessionResponse:
		err = m.Validate()
	case *Node:
		err = validateAdvert(m)
	case *JoinRequest:
		err = m.Validate()
	case *DrainReport:
		err = m.Validate()
	}
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrMalformedFrame, t, err)
	}
	return nil
}

// DecodeSessionRequest decodes and validates a session request payload.
func DecodeSessionRequest(payload []byte) (SessionRequest, error) {
	var m SessionRequest
	err := decodePayload(MsgSessionRequest, payload, &m)
	return m, err
}

// DecodeSessionResponse decodes and validates a session response payload.
func DecodeSessionResponse(payload []byte) (SessionResponse, error) {
	var m SessionResponse
	err := decodePayload(MsgSessionResponse, payload, &m)
	return m, err
}

// DecodeAdvert decodes and validates a capacity advert payload.
func DecodeAdvert(payload []byte) (Node, error) {
	var m Node
	err := decodePayload(MsgAdvert, payload, &m)
	return m, err
}

// maxIDBytes bounds request and run ids so that a peer cannot make a node
// keep megabyte-sized keys in its caches.
const maxIDBytes = 256

// Validate checks the fields a node needs before it dispatches a request.
func (r *SessionRequest) Validate() error {
	if r.RequestID == "" || len(r.RequestID) > maxIDBytes {
		return fmt.Errorf("request_id: must be 1..%d bytes, got %d", maxIDBytes, len(r.RequestID))
	}
	if r.RunID == "" || len(r.RunID) > maxIDBytes {
		return fmt.Errorf("run_id: must be 1..%d bytes, got %d", maxIDBytes, len(r.RunID))
	}
	if !r.Call.Valid() {
		return fmt.Errorf("call: unknown call %q", r.Call)
	}
	return nil
}

// Validate checks that exactly one of Body and Error is set.
func (r *SessionResponse) Validate() error {
	if r.RequestID == "" || len(r.RequestID) > maxIDBytes {
		return fmt.Errorf("request_id: must be 1..%d bytes, got %d", maxIDBytes, len(r.RequestID))
	}
	if (r.Error == nil) == (len(r.Body) == 0) {
		return errors.New("exactly one of body and error must be set")
	}
	return nil
}

// Bounds on a capacity advert. A node is a stranger: what it claims
// decides placement, so claims beyond any real machine are refused whole.
const (
	MaxAdvertSessions = 256
	maxAdvertGPUs     = 16
	maxAdvertList     = 256
	maxAdvertString   = 256
	maxGPUMemoryBytes = 1 << 40 // 1 TiB; an H200 has 141 GB
	maxCPUMemoryBytes = 64 << 40
	maxCPUCores       = 4096
)

func validateAdvert(n *Node) error {
	if n.PeerID == "" || len(n.PeerID) > maxAdvertString {
		return errors.New("peer_id: missing or too long")
	}
	if n.Sessions < 0 || n.MaxSessions < 0 || n.MaxSessions > MaxAdvertSessions || (n.MaxSessions > 0 && n.Sessions > n.MaxSessions) {
		return fmt.Errorf("sessions: %d of %d, want 0 ≤ sessions ≤ max_sessions ≤ %d", n.Sessions, n.MaxSessions, MaxAdvertSessions)
	}
	if len(n.GPUs) > maxAdvertGPUs {
		return fmt.Errorf("gpus: %d, at most %d", len(n.GPUs), maxAdvertGPUs)
	}
	uuids := map[string]bool{}
	for i, g := range n.GPUs {
		if g.UUID == "" || uuids[g.UUID] || len(g.UUID) > maxAdvertString || len(g.Name) > maxAdvertString || len(g.ComputeCapability) > maxAdvertString {
			return fmt.Errorf("gpus[%d]: uuid missing, repeated or too long", i)
		}
		uuids[g.UUID] = true
		if g.MemoryTotal < 0 || g.MemoryTotal > maxGPUMemoryBytes || g.MemoryFree < 0 || g.MemoryFree > g.MemoryTotal {
			return fmt.Errorf("gpus[%d]: memory %d free of %d, want 0 ≤ free ≤ total ≤ %d", i, g.MemoryFree, g.MemoryTotal, int64(maxGPUMemoryBytes))
		}
		if !(g.Utilization >= 0 && g.Utilization <= 100) {
			return fmt.Errorf("gpus[%d]: utilization %v out of 0..100", i, g.Utilization)
		}
	}
	if n.CPU.Cores < 0 || n.CPU.Cores > maxCPUCores || n.CPU.MemoryTotal < 0 || n.CPU.MemoryTotal > maxCPUMemoryBytes {
		return fmt.Errorf("cpu: %d cores, %d bytes out of range", n.CPU.Cores, n.CPU.MemoryTotal)
	}
	for name, list := range map[string][]string{"addrs": n.Addrs, "backends": n.Backends, "models": n.Models} {
		if len(list) > maxAdvertList {
			return fmt.Errorf("%s: %d entries, at most %d", name, len(list), maxAdvertList)
		}
		for _, v := range list {
			if len(v) > maxAdvertString {
				return fmt.Errorf("%s: an entry over %d bytes", name, maxAdvertString)
			}
		}
	}
	return nil
}

// Valid reports whether c is one of the session calls.
func (c Call) Valid() bool {
	switch c {
	case CallInit, CallForwardBackward, CallForward, CallOptimStep, CallSample,
		CallSaveState, CallLoadState, CallClose:
		return true
	}
	return false
}
