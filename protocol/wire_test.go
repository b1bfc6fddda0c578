package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"testing"
)

func TestFrameRoundTrip(t *testing.T) {
	req := SessionRequest{RequestID: "r1", RunID: "run-1", Call: CallForwardBackward, Body: json.RawMessage(`{"data":[]}`)}
	resp := SessionResponse{RequestID: "r1", Body: json.RawMessage(`{"loss_sum":1.5}`), Usage: Usage{TrainTokens: 12},
		Checkpoint: &Checkpoint{ID: "c", Step: 3, Files: []CheckpointFile{{Name: "a", CID: "bafk", Size: 9}}}}
	adv := Node{PeerID: "12D3", Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, CPU: CPU{Cores: 2, MemoryTotal: 1 << 30}, MaxSessions: 4}

	var buf bytes.Buffer
	for _, m := range []struct {
		t MsgType
		v any
	}{{MsgSessionRequest, req}, {MsgSessionResponse, resp}, {MsgAdvert, adv}} {
		if err := WriteFrame(&buf, m.t, m.v); err != nil {
			t.Fatal(err)
		}
	}
	var gotReq SessionRequest
	if err := ReadMessage(&buf, MsgSessionRequest, 0, &gotReq); err != nil {
		t.Fatal(err)
	}
	var gotResp SessionResponse
	if err := ReadMessage(&buf, MsgSessionResponse, 0, &gotResp); err != nil {
		t.Fatal(err)
	}
	var gotAdv Node
	if err := ReadMessage(&buf, MsgAdvert, 0, &gotAdv); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(gotReq, req) || !reflect.DeepEqual(gotResp, resp) || !reflect.DeepEqual(gotAdv, adv) {
		t.Fatalf("round trip changed messages:\n%+v\n%+v\n%+v", gotReq, gotResp, gotAdv)
	}
	if _, _, err := ReadFrame(&buf, 0); err != io.EOF {
		t.Fatalf("ReadFrame at end = %v, want io.EOF", err)
	}
}

func TestFrameHeaderLayout(t *testing.T) {
	b, err := EncodeFrame(MsgJoinRequest, JoinRequest{JoinToken: "tok"})
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{'S', 'G', WireVersion, byte(MsgJoinRequest), 0, 0, 0, byte(len(`{"join_token":"tok"}`))}
	if !bytes.Equal(b[:FrameHeaderBytes], want) {
		t.Fatalf("header = %v, want %v", b[:FrameHeaderBytes], want)
	}
	typ, payload, err := DecodeFrame(b, 0)
	if err != nil || typ != MsgJoinRequest || string(payload) != `{"join_token":"tok"}` {
		t.Fatalf("DecodeFrame = %v %q %v", typ, payload, err)
	}
}

func TestFrameErrors(t *testing.T) {
	good, err := EncodeFrame(MsgSessionRequest, SessionRequest{RequestID: "r", RunID: "x", Call: CallClose})
	if err != nil {
		t.Fatal(err)
	}
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := []struct {
		name string
		in   []byte
		max  int
		want error
	}{
		{"bad magic", mut(func(b []byte) []byte { b[0] = 'X'; return b }), 0, ErrBadMagic},
		{"version", mut(func(b []byte) []byte { b[2] = 9; return b }), 0, ErrUnsupportedVersion},
		{"type", mut(func(b []byte) []byte { b[3] = 200; return b }), 0, ErrUnknownMsgType},
		{"too large", good, 4, ErrFrameTooLarge},
		{"truncated payload", good[:len(good)-2], 0, ErrMalformedFrame},
		{"truncated header", good[:5], 0, ErrMalformedFrame},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := ReadFrame(bytes.NewReader(c.in), c.max)
			if !errors.Is(err, c.want) {
				t.Fatalf("ReadFrame err = %v, want %v", err, c.want)
			}
		})
	}
	// A valid frame of the wrong type, and payloads that fail validation.
	if err := ReadMessage(bytes.NewReader(good), MsgAdvert, 0, &Node{}); !errors.Is(err, ErrUnexpectedMsgType) {
		t.Fatalf("wrong type err = %v", err)
	}
	for _, req := range []SessionRequest{
		{RunID: "x", Call: CallInit},
		{RequestID: "r", Call: CallInit},
		{RequestID: "r", RunID: "x", Call: "explode"},
	} {
		b, err := EncodeFrame(MsgSessionRequest, req)
		if err != nil {
			t.Fatal(err)
		}
		_, payload, err := DecodeFrame(b, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := DecodeSessionRequest(payload); !errors.Is(err, ErrMalformedFrame) {
			t.Fatalf("DecodeSessionRequest(%+v) err = %v, want ErrMalformedFrame", req, err)
		}
	}
	if _, err := DecodeSessionResponse([]byte(`{"request_id":"r"}`)); !errors.Is(err, ErrMalformedFrame) {
		t.Fatalf("response with neither body nor error: err = %v", err)
	}
	if _, _, err := DecodeFrame(append(good, 0), 0); !errors.Is(err, ErrMalformedFrame) {
		t.Fatalf("trailing byte: err = %v", err)
	}
}

// FuzzReadFrame feeds arbitrary bytes to the stream decoder and the typed
// decoders: they must return an error or a message that re-encodes to an
// equal message, never panic or allocate past the limit.
func FuzzReadFrame(f *testing.F) {
	for _, m := range []struct {
		t MsgType
		v any
	}{
		{MsgSessionRequest, SessionRequest{RequestID: "r", RunID: "run", Call: CallSample, Body: json.RawMessage(`{"prompts":[]}`)}},
		{MsgSessionResponse, SessionResponse{RequestID: "r", Error: &ErrorBody{Code: CodeInternal, Message: "x"}}},
		{MsgAdvert, Node{PeerID: "p", GPUs: []GPU{{Name: "H200"}}}},
		{MsgJoinRequest, JoinRequest{JoinToken: "t"}},
		{MsgDrainReport, DrainReport{PeerID: "p", Checkpoints: []Checkpoint{{ID: "c", RunID: "run", Step: 7, Mode: "full", URI: "file:///x"}}}},
	} {
		b, err := EncodeFrame(m.t, m.v)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("SG\x01\x01\xff\xff\xff\xff"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		typ, payload, err := ReadFrame(bytes.NewReader(data), 1<<20)
		if err != nil {
			return
		}
		if len(payload) > 1<<20 {
			t.Fatalf("payload of %d bytes passed a 1 MiB limit", len(payload))
		}
		switch typ {
		case MsgSessionRequest:
			m, err := DecodeSessionRequest(payload)
			if err == nil {
				reencode(t, typ, &m, &SessionRequest{})
			}
		case MsgSessionResponse:
			m, err := DecodeSessionResponse(payload)
			if err == nil {
				reencode(t, typ, &m, &SessionResponse{})
			}
		case MsgAdvert:
			m, err := DecodeAdvert(payload)
			if err == nil {
				reencode(t, typ, &m, &Node{})
			}
		case MsgDrainReport:
			var m DrainReport
			if ReadMessage(bytes.NewReader(data), MsgDrainReport, 1<<20, &m) == nil {
				reencode(t, typ, &m, &DrainReport{})
			}
		}
	})
}

func reencode(t *testing.T, typ MsgType, m, fresh any) {
	t.Helper()
	b, err := EncodeFrame(typ, m)
	if err != nil {
		t.Fatalf("re-encode %s: %v", typ, err)
	}
	if err := ReadMessage(bytes.NewReader(b), typ, 0, fresh); err != nil {
		t.Fatalf("decode re-encoded %s: %v", typ, err)
	}
	a, _ := json.Marshal(m)
	c, _ := json.Marshal(fresh)
	if !bytes.Equal(a, c) {
		t.Fatalf("%s changed on re-encode:\n%s\n%s", typ, a, c)
	}
}

// TestAdvertBounds: adverts that claim more than any machine has (issue
// 13's fake H100 with a thousand sessions) do not decode.
func TestAdvertBounds(t *testing.T) {
	honest := Node{PeerID: "p", MaxSessions: 8, Sessions: 1, Backends: []string{"cuda"},
		GPUs: []GPU{{Name: "NVIDIA H100", UUID: "GPU-1", MemoryTotal: 80 << 30, MemoryFree: 70 << 30, Utilization: 3}}}
	encode := func(n Node) []byte {
		b, err := json.Marshal(n)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if _, err := DecodeAdvert(encode(honest)); err != nil {
		t.Fatalf("honest advert refused: %v", err)
	}
	for name, mut := range map[string]func(*Node){
		"a thousand sessions":  func(n *Node) { n.MaxSessions = 1000 },
		"more open than max":   func(n *Node) { n.Sessions = 9 },
		"free above total":     func(n *Node) { n.GPUs[0].MemoryFree = 90 << 30 },
		"petabyte GPU":         func(n *Node) { n.GPUs[0].MemoryTotal, n.GPUs[0].MemoryFree = 1<<50, 1<<50 },
		"repeated GPU":         func(n *Node) { n.GPUs = append(n.GPUs, n.GPUs[0]) },
		"GPU without uuid":     func(n *Node) { n.GPUs[0].UUID = "" },
		"a hundred GPUs":       func(n *Node) { n.GPUs = make([]GPU, 100) },
		"million-core CPU":     func(n *Node) { n.CPU.Cores = 1 << 20 },
		"endless models list":  func(n *Node) { n.Models = make([]string, 1000) },
		"utilization over 100": func(n *Node) { n.GPUs[0].Utilization = 1e9 },
	} {
		n := honest
		n.GPUs = append([]GPU(nil), honest.GPUs...)
		mut(&n)
		if _, err := DecodeAdvert(encode(n)); err == nil {
			t.Errorf("%s: advert accepted", name)
		}
	}
}
