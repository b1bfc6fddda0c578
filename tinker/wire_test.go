package tinker

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"os"
	"os/exec"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/tinker/tinkerpb"
)

func i32(xs ...int32) []byte {
	var b []byte
	for _, x := range xs {
		b = binary.LittleEndian.AppendUint32(b, uint32(x))
	}
	return b
}

func f32(xs ...float32) []byte {
	var b []byte
	for _, x := range xs {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
	}
	return b
}

func i64(xs ...int64) []byte {
	var b []byte
	for _, x := range xs {
		b = binary.LittleEndian.AppendUint64(b, uint64(x))
	}
	return b
}

func protoRequest() *tinkerpb.ForwardBackwardRequest {
	return &tinkerpb.ForwardBackwardRequest{
		ModelId: "s:train:0", SeqId: 7, LossFn: "ppo",
		LossFnConfig:   map[string]float64{"clip_low_threshold": 0.5},
		LossFnConfigV2: map[string]*tinkerpb.LossConfigValue{"clip_low_threshold": {Value: &tinkerpb.LossConfigValue_Number{Number: 0.7}}},
		Data: []*tinkerpb.Datum{{
			ModelInput: []*tinkerpb.Chunk{
				{Chunk: &tinkerpb.Chunk_EncodedText{EncodedText: &tinkerpb.EncodedTextChunk{Tokens: i32(5, 6)}}},
				{Chunk: &tinkerpb.Chunk_EncodedText{EncodedText: &tinkerpb.EncodedTextChunk{Tokens: i32(7)}}},
			},
			LossFnInputs: map[string]*tinkerpb.Tensor{
				"target_tokens": {Encoding: &tinkerpb.Tensor_Dense{Dense: i64(6, 7, 8)}, Dtype: tinkerpb.DType_DTYPE_INT64, Shape: []int64{3}},
				"logprobs":      {Encoding: &tinkerpb.Tensor_Dense{Dense: f32(-1, -2, -0.5)}, Dtype: tinkerpb.DType_DTYPE_FLOAT32},
				"advantages":    {Encoding: &tinkerpb.Tensor_Dense{Dense: f32(1, 0, -1)}, Dtype: tinkerpb.DType_DTYPE_FLOAT32},
			},
		}},
	}
}

func TestDecodeForwardBackwardProto(t *testing.T) {
	raw, err := proto.Marshal(protoRequest())
	if err != nil {
		t.Fatal(err)
	}
	enc, _ := zstd.NewWriter(nil)
	want := FwdBwd{ModelID: "s:train:0", SeqID: 7, Call: protocol.ForwardBackwardRequest{
		LossFn: "ppo", LossFnConfig: map[string]float64{"clip_low_threshold": 0.7}, // v2 wins
		Data: []protocol.Datum{{ModelInput: protocol.ModelInput{Tokens: []int{5, 6, 7}},
			LossFnInputs: protocol.LossFnInputs{TargetTokens: []int{6, 7, 8}, Logprobs: []float64{-1, -2, -0.5}, Advantages: []float64{1, 0, -1}}}},
	}}
	for name, tc := range map[string]struct {
		body     []byte
		encoding string
	}{"plain": {raw, ""}, "zstd": {enc.EncodeAll(raw, nil), "zstd"}} {
		got, err := DecodeForwardBackward(tc.body, ProtoContentType, tc.encoding, false)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\n got %+v\nwant %+v", name, got, want)
		}
	}
	got, err := DecodeForwardBackward(raw, ProtoContentType, "", true)
	if err != nil || !got.ForwardOnly {
		t.Errorf("the forward route's call: forward_only %v, %v", got.ForwardOnly, err)
	}
}

func TestDecodeForwardBackwardJSON(t *testing.T) {
	body := `{"model_id":"m","seq_id":3,"forward_backward_input":{"loss_fn":"cross_entropy","data":[{"model_input":{"chunks":[{"type":"encoded_text","tokens":[1,2]}]},
		"loss_fn_inputs":{"target_tokens":{"data":[2,3],"dtype":"int64","shape":[2]},"weights":{"data":[0,1],"dtype":"float32"}}}]}}`
	got, err := DecodeForwardBackward([]byte(body), "application/json", "", false)
	if err != nil {
		t.Fatal(err)
	}
	want := FwdBwd{ModelID: "m", SeqID: 3, Call: protocol.ForwardBackwardRequest{LossFn: "cross_entropy",
		Data: []protocol.Datum{{ModelInput: protocol.ModelInput{Tokens: []int{1, 2}}, LossFnInputs: protocol.LossFnInputs{TargetTokens: []int{2, 3}, Weights: []float64{0, 1}}}}}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
}

// Every refusal names the field the user sent.
func TestDecodeRefusals(t *testing.T) {
	mut := func(f func(*tinkerpb.ForwardBackwardRequest)) []byte {
		m := protoRequest()
		f(m)
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name, ctype, enc string
		body             []byte
		want             string
	}{
		{"image chunk", ProtoContentType, "", mut(func(m *tinkerpb.ForwardBackwardRequest) {
			m.Data[0].ModelInput[1] = &tinkerpb.Chunk{Chunk: &tinkerpb.Chunk_Image{Image: &tinkerpb.ImageChunk{Format: "png"}}}
		}), "data[0].model_input.chunks[1] is not encoded text"},
		{"odd token bytes", ProtoContentType, "", mut(func(m *tinkerpb.ForwardBackwardRequest) {
			m.Data[0].ModelInput[0].GetEncodedText().Tokens = []byte{1, 2, 3}
		}), "data[0].model_input.chunks[0].tokens holds 3 bytes"},
		{"unknown input", ProtoContentType, "", mut(func(m *tinkerpb.ForwardBackwardRequest) {
			m.Data[0].LossFnInputs["mask"] = &tinkerpb.Tensor{Encoding: &tinkerpb.Tensor_Dense{Dense: f32(1)}, Dtype: tinkerpb.DType_DTYPE_FLOAT32}
		}), "data[0].loss_fn_inputs.mask is not an input"},
		{"no targets", ProtoContentType, "", mut(func(m *tinkerpb.ForwardBackwardRequest) {
			delete(m.Data[0].LossFnInputs, "target_tokens")
		}), "data[0].loss_fn_inputs.target_tokens is missing"},
		{"text setting", ProtoContentType, "", mut(func(m *tinkerpb.ForwardBackwardRequest) {
			m.LossFnConfigV2["mode"] = &tinkerpb.LossConfigValue{Value: &tinkerpb.LossConfigValue_Text{Text: "x"}}
		}), "loss_fn_config.mode is the text"},
		{"sparse", ProtoContentType, "", mut(func(m *tinkerpb.ForwardBackwardRequest) {
			m.Data[0].LossFnInputs["weights"] = &tinkerpb.Tensor{Encoding: &tinkerpb.Tensor_SparseCsr{SparseCsr: &tinkerpb.SparseCsr{}}}
		}), "data[0].loss_fn_inputs.weights is a sparse tensor"},
		{"bad zstd", ProtoContentType, "zstd", []byte("not zstd"), "zstd body"},
		{"gzip", ProtoContentType, "gzip", []byte{}, `Content-Encoding "gzip"`},
		{"not proto", ProtoContentType, "", []byte{0xff, 0xff, 0xff}, "not a ForwardBackwardRequest"},
		{"no input", "application/json", "", []byte(`{"model_id":"m"}`), "forward_backward_input is missing"},
		{"image json", "application/json", "", []byte(`{"forward_backward_input":{"data":[{"model_input":{"chunks":[{"type":"image"}]}}]}}`), `chunks[0] has type "image"`},
		{"fractional target", "application/json", "", []byte(`{"forward_backward_input":{"data":[{"model_input":{"chunks":[{"tokens":[1]}]},"loss_fn_inputs":{"target_tokens":{"data":[1.5]}}}]}}`), "target_tokens[0] is 1.5"},
	} {
		_, err := DecodeForwardBackward(tc.body, tc.ctype, tc.enc, false)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrInvalid naming %q", tc.name, err, tc.want)
		}
	}
}

func TestAnswersRoundTrip(t *testing.T) {
	b, err := ForwardBackwardOutput(protocol.ForwardBackwardResponse{LossSum: 2.5, Logprobs: [][]float64{{-1, -2}, {-3}}})
	if err != nil {
		t.Fatal(err)
	}
	var out tinkerpb.ForwardBackwardOutput
	if err := proto.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	rec := out.GetLossFnOutputs()[0]
	lp := rec.GetFields()["logprobs"]
	if out.GetMetrics()["loss:sum"] != 2.5 || rec.GetNumDatums() != 2 || string(lp.GetOffsets()) != string(i64(0, 8, 12)) || string(lp.GetData()) != string(f32(-1, -2, -3)) {
		t.Errorf("forward_backward output: %v", &out)
	}
	b, err = SampleResponse(Sampled{Samples: []protocol.Sample{{Tokens: []int{4, 5}, Logprobs: []float64{-0.5, -1}, StopReason: "length"}},
		PromptLogprobs: []float64{math.NaN(), -2}})
	if err != nil {
		t.Fatal(err)
	}
	var s tinkerpb.SampleResponse
	if err := proto.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	seq := s.GetSequences()[0]
	if seq.GetStopReason() != tinkerpb.StopReason_STOP_REASON_LENGTH || string(seq.GetTokens()) != string(i32(4, 5)) || string(seq.GetLogprobs()) != string(f32(-0.5, -1)) {
		t.Errorf("sampled sequence: %v", seq)
	}
	if plp := s.GetPromptLogprobs(); len(plp) != 8 || !math.IsNaN(float64(math.Float32frombits(binary.LittleEndian.Uint32(plp)))) {
		t.Errorf("prompt logprobs %x: want NaN then -2", plp)
	}
	// Top-k prompt logprobs: position 0 is the SDK's sentinel row.
	b, err = SampleResponse(Sampled{TopK: 2, TopIDs: [][]int{nil, {7, 3}}, TopLogprobs: [][]float64{nil, {-0.5, -1.5}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	top := s.GetTopkPromptLogprobs()
	if top.GetK() != 2 || top.GetLength() != 2 || string(top.GetTokenIds()) != string(i32(0, 0, 7, 3)) ||
		string(top.GetLogprobs()) != string(f32(-99999, -99999, -0.5, -1.5)) {
		t.Errorf("top-k prompt logprobs: %v", top)
	}
}

// TestSchemaMatchesSDK compares Signal's schema with the descriptor the
// pinned tinker SDK ships: every message's fields, by number, name, type
// and label. A drift (a new SDK renumbering a field) fails here first.
func TestSchemaMatchesSDK(t *testing.T) {
	py := os.Getenv("SIGNAL_HF_PYTHON")
	if py == "" || exec.Command(py, "-c", "import tinker").Run() != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("$SIGNAL_HF_PYTHON (%q) does not import tinker", py)
		}
		t.Skip("no Python with the tinker SDK ($SIGNAL_HF_PYTHON)")
	}
	out, err := exec.Command(py, "-c", `
import sys
from tinker.proto import tinker_public_pb2 as m
from google.protobuf import descriptor_pb2
fd = descriptor_pb2.FileDescriptorProto()
m.DESCRIPTOR.CopyToProto(fd)
sys.stdout.buffer.write(fd.SerializeToString())
`).Output()
	if err != nil {
		t.Fatal(err)
	}
	var sdk descriptorpb.FileDescriptorProto
	if err := proto.Unmarshal(out, &sdk); err != nil {
		t.Fatal(err)
	}
	ours := protodesc.ToFileDescriptorProto(tinkerpb.File_tinker_public_proto)
	if sdk.GetPackage() != ours.GetPackage() {
		t.Errorf("package %q, the SDK's %q", ours.GetPackage(), sdk.GetPackage())
	}
	type field struct {
		Name  string
		Type  descriptorpb.FieldDescriptorProto_Type
		Label descriptorpb.FieldDescriptorProto_Label
		TName string
	}
	var walk func(prefix string, ms []*descriptorpb.DescriptorProto, into map[string]field)
	walk = func(prefix string, ms []*descriptorpb.DescriptorProto, into map[string]field) {
		for _, m := range ms {
			for _, f := range m.GetField() {
				into[prefix+m.GetName()+"."+strconv.Itoa(int(f.GetNumber()))] = field{f.GetName(), f.GetType(), f.GetLabel(), f.GetTypeName()}
			}
			walk(prefix+m.GetName()+".", m.GetNestedType(), into)
		}
	}
	a, b := map[string]field{}, map[string]field{}
	walk("", sdk.GetMessageType(), a)
	walk("", ours.GetMessageType(), b)
	for k, f := range a {
		if b[k] != f {
			t.Errorf("field %s: the SDK's %+v, Signal's %+v", k, f, b[k])
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			t.Errorf("field %s is Signal's only", k)
		}
	}
	if len(a) == 0 {
		t.Fatal("the SDK's descriptor has no fields")
	}
}

// FuzzDecodeForwardBackward: bodies from the network never panic, and what
// decodes re-encodes to a request that decodes alike.
func FuzzDecodeForwardBackward(f *testing.F) {
	raw, _ := proto.Marshal(protoRequest())
	f.Add(raw, true)
	f.Add([]byte(`{"model_id":"m","seq_id":1,"forward_backward_input":{"data":[{"model_input":{"chunks":[{"tokens":[1]}]},"loss_fn_inputs":{"target_tokens":{"data":[1]}}}]}}`), false)
	f.Fuzz(func(t *testing.T, body []byte, isProto bool) {
		ctype := "application/json"
		if isProto {
			ctype = ProtoContentType
		}
		got, err := DecodeForwardBackward(body, ctype, "", false)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error outside ErrInvalid: %v", err)
			}
			return
		}
		js, err := json.Marshal(got.Call)
		if err != nil {
			t.Fatal(err)
		}
		var back protocol.ForwardBackwardRequest
		if err := json.Unmarshal(js, &back); err != nil {
			t.Fatal(err)
		}
		if len(back.Data) != len(got.Call.Data) {
			t.Fatalf("datums %d, after a round trip %d", len(got.Call.Data), len(back.Data))
		}
	})
}
