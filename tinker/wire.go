// Package tinker is Tinker's wire as Signal speaks it at /api/v1: the JSON
// and protobuf bodies the tinker SDK sends and accepts, decoded into
// Signal's protocol types and encoded back from them. It knows nothing of
// raft, runs or nodes: the coordinator's front door (coordinator/tinker.go)
// owns the futures and calls; this package only translates, so every rule
// about what a call means lives in one place on each side.
//
// Checked against tinker SDK 0.38.0 (scripts/pyenv.lock pins it).
package tinker

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/proto"

	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/tinker/tinkerpb"
)

// ErrInvalid wraps every refusal of a body: the coordinator answers it 400
// with the message, which names the field.
var ErrInvalid = errors.New("invalid tinker request")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// ProtoContentType is the media type of protobuf bodies both ways.
const ProtoContentType = "application/x-protobuf"

// MaxDecodedBytes bounds a zstd body once decompressed: a small upload may
// not become an unbounded allocation.
const MaxDecodedBytes = 256 << 20

// ---- JSON shapes ----

// TensorData is Tinker's JSON tensor: flat data, its dtype ("int64" or
// "float32") and shape.
type TensorData struct {
	Data  []float64 `json:"data"`
	DType string    `json:"dtype"`
	Shape []int64   `json:"shape,omitempty"`
}

// Chunk is one chunk of a ModelInput; Signal's models read text tokens only.
type Chunk struct {
	Type   string `json:"type"`
	Tokens []int  `json:"tokens,omitempty"`
}

// ModelInput is a prompt or a training sequence.
type ModelInput struct {
	Chunks []Chunk `json:"chunks"`
}

// Datum is one training sequence.
type Datum struct {
	ModelInput   ModelInput            `json:"model_input"`
	LossFnInputs map[string]TensorData `json:"loss_fn_inputs"`
}

// FwdBwdInput is forward_backward_input (and forward_input).
type FwdBwdInput struct {
	Data         []Datum        `json:"data"`
	LossFn       string         `json:"loss_fn"`
	LossFnConfig map[string]any `json:"loss_fn_config,omitempty"`
}

// fwdBwdJSON is the JSON body of forward_backward and forward.
type fwdBwdJSON struct {
	ForwardBackwardInput *FwdBwdInput `json:"forward_backward_input"`
	ForwardInput         *FwdBwdInput `json:"forward_input"`
	ModelID              string       `json:"model_id"`
	SeqID                *int         `json:"seq_id"`
}

// FwdBwd is a decoded forward_backward or forward call.
type FwdBwd struct {
	ModelID     string
	SeqID       int
	ForwardOnly bool
	Call        protocol.ForwardBackwardRequest
}

// DecodeForwardBackward reads a forward_backward (or forward) body in
// either encoding: protobuf (optionally zstd) or JSON.
func DecodeForwardBackward(body []byte, contentType, contentEncoding string, forwardRoute bool) (FwdBwd, error) {
	body, err := decompress(body, contentEncoding)
	if err != nil {
		return FwdBwd{}, err
	}
	if strings.HasPrefix(contentType, ProtoContentType) {
		var m tinkerpb.ForwardBackwardRequest
		if err := proto.Unmarshal(body, &m); err != nil {
			return FwdBwd{}, invalid("the protobuf body is not a ForwardBackwardRequest: %v", err)
		}
		return fromProto(&m, forwardRoute)
	}
	var j fwdBwdJSON
	if err := json.Unmarshal(body, &j); err != nil {
		return FwdBwd{}, invalid("the JSON body does not decode: %v", err)
	}
	in := j.ForwardBackwardInput
	only := forwardRoute
	if in == nil {
		in, only = j.ForwardInput, true
	}
	if in == nil {
		return FwdBwd{}, invalid("forward_backward_input is missing: send the batch under it")
	}
	out := FwdBwd{ModelID: j.ModelID, ForwardOnly: only}
	if j.SeqID != nil {
		out.SeqID = *j.SeqID
	}
	cfg, err := lossConfig(in.LossFnConfig)
	if err != nil {
		return FwdBwd{}, err
	}
	out.Call = protocol.ForwardBackwardRequest{LossFn: in.LossFn, LossFnConfig: cfg}
	for i, d := range in.Data {
		tokens, err := chunkTokens(d.ModelInput.Chunks, fmt.Sprintf("data[%d].model_input", i))
		if err != nil {
			return FwdBwd{}, err
		}
		inputs := map[string][]float64{}
		for k, t := range d.LossFnInputs {
			inputs[k] = t.Data
		}
		pd, err := datum(i, tokens, inputs)
		if err != nil {
			return FwdBwd{}, err
		}
		out.Call.Data = append(out.Call.Data, pd)
	}
	return out, nil
}

func decompress(body []byte, encoding string) ([]byte, error) {
	switch strings.ToLower(strings.TrimSpace(encoding)) {
	case "", "identity":
		return body, nil
	case "zstd":
		d, err := zstd.NewReader(bytes.NewReader(body), zstd.WithDecoderMaxMemory(MaxDecodedBytes))
		if err != nil {
			return nil, invalid("the zstd body does not open: %v", err)
		}
		defer d.Close()
		out, err := io.ReadAll(io.LimitReader(d, MaxDecodedBytes+1))
		if err != nil {
			return nil, invalid("the zstd body does not decode: %v", err)
		}
		if len(out) > MaxDecodedBytes {
			return nil, invalid("the zstd body decodes to over %d bytes: split the batch into smaller calls", MaxDecodedBytes)
		}
		return out, nil
	default:
		return nil, invalid("Content-Encoding %q is not supported: send identity or zstd", encoding)
	}
}

func fromProto(m *tinkerpb.ForwardBackwardRequest, forwardRoute bool) (FwdBwd, error) {
	out := FwdBwd{ModelID: m.GetModelId(), SeqID: int(m.GetSeqId()), ForwardOnly: m.GetForwardOnly() || forwardRoute}
	cfg := map[string]float64{}
	for k, v := range m.GetLossFnConfig() {
		cfg[k] = v
	}
	// v2 wins where both name a key (the SDK writes both for numbers).
	for k, v := range m.GetLossFnConfigV2() {
		switch x := v.GetValue().(type) {
		case *tinkerpb.LossConfigValue_Number:
			cfg[k] = x.Number
		case *tinkerpb.LossConfigValue_Text:
			return FwdBwd{}, invalid("loss_fn_config.%s is the text %q: Signal's losses take numbers only", k, x.Text)
		}
	}
	if len(cfg) > 0 {
		out.Call.LossFnConfig = cfg
	}
	out.Call.LossFn = m.GetLossFn()
	for i, d := range m.GetData() {
		var tokens []int
		for j, c := range d.GetModelInput() {
			t, ok := c.GetChunk().(*tinkerpb.Chunk_EncodedText)
			if !ok {
				return FwdBwd{}, invalid("data[%d].model_input.chunks[%d] is not encoded text: Signal's models read text tokens only", i, j)
			}
			ids, err := int32s(t.EncodedText.GetTokens(), fmt.Sprintf("data[%d].model_input.chunks[%d].tokens", i, j))
			if err != nil {
				return FwdBwd{}, err
			}
			tokens = append(tokens, ids...)
		}
		inputs := map[string][]float64{}
		for k, t := range d.GetLossFnInputs() {
			xs, err := tensorValues(t, fmt.Sprintf("data[%d].loss_fn_inputs.%s", i, k))
			if err != nil {
				return FwdBwd{}, err
			}
			inputs[k] = xs
		}
		pd, err := datum(i, tokens, inputs)
		if err != nil {
			return FwdBwd{}, err
		}
		out.Call.Data = append(out.Call.Data, pd)
	}
	return out, nil
}

// lossConfig keeps the numeric settings; a text setting names no loss
// Signal has.
func lossConfig(in map[string]any) (map[string]float64, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make(map[string]float64, len(in))
	for k, v := range in {
		f, ok := v.(float64)
		if !ok {
			return nil, invalid("loss_fn_config.%s is %v: Signal's losses take numbers only", k, v)
		}
		out[k] = f
	}
	return out, nil
}

// datum maps Tinker's loss_fn_inputs onto Signal's Datum. The four inputs
// Signal's losses read are named alike on both wires; anything else is
// refused by name, so a recipe never trains on an input silently dropped.
func datum(i int, tokens []int, inputs map[string][]float64) (protocol.Datum, error) {
	d := protocol.Datum{ModelInput: protocol.ModelInput{Tokens: tokens}}
	for k, xs := range inputs {
		switch k {
		case "target_tokens":
			ids := make([]int, len(xs))
			for j, x := range xs {
				if x != math.Trunc(x) || math.Abs(x) > 1<<31 {
					return d, invalid("data[%d].loss_fn_inputs.target_tokens[%d] is %v: give token ids", i, j, x)
				}
				ids[j] = int(x)
			}
			d.LossFnInputs.TargetTokens = ids
		case "weights":
			d.LossFnInputs.Weights = xs
		case "logprobs":
			d.LossFnInputs.Logprobs = xs
		case "advantages":
			d.LossFnInputs.Advantages = xs
		default:
			return d, invalid("data[%d].loss_fn_inputs.%s is not an input of Signal's losses: send target_tokens, weights, logprobs and advantages only", i, k)
		}
	}
	if d.LossFnInputs.TargetTokens == nil {
		return d, invalid("data[%d].loss_fn_inputs.target_tokens is missing: give one target per model_input token", i)
	}
	return d, nil
}

func chunkTokens(chunks []Chunk, field string) ([]int, error) {
	var out []int
	for j, c := range chunks {
		if c.Type != "" && c.Type != "encoded_text" {
			return nil, invalid("%s.chunks[%d] has type %q: Signal's models read encoded_text chunks only", field, j, c.Type)
		}
		out = append(out, c.Tokens...)
	}
	return out, nil
}

// PromptTokens reads a JSON ModelInput as one token list.
func PromptTokens(in ModelInput, field string) ([]int, error) { return chunkTokens(in.Chunks, field) }

func int32s(b []byte, field string) ([]int, error) {
	if len(b)%4 != 0 {
		return nil, invalid("%s holds %d bytes, not a whole number of int32 ids", field, len(b))
	}
	out := make([]int, len(b)/4)
	for i := range out {
		out[i] = int(int32(binary.LittleEndian.Uint32(b[4*i:])))
	}
	return out, nil
}

// tensorValues reads a dense protobuf tensor as float64s (int64 ids are
// exact below 2^53; Signal's vocabularies are far below).
func tensorValues(t *tinkerpb.Tensor, field string) ([]float64, error) {
	dense, ok := t.GetEncoding().(*tinkerpb.Tensor_Dense)
	if !ok {
		if t.GetEncoding() == nil {
			return nil, nil
		}
		return nil, invalid("%s is a sparse tensor: send it dense", field)
	}
	b := dense.Dense
	switch t.GetDtype() {
	case tinkerpb.DType_DTYPE_FLOAT32:
		if len(b)%4 != 0 {
			return nil, invalid("%s holds %d bytes, not a whole number of float32s", field, len(b))
		}
		out := make([]float64, len(b)/4)
		for i := range out {
			out[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:])))
		}
		return out, nil
	case tinkerpb.DType_DTYPE_INT64:
		if len(b)%8 != 0 {
			return nil, invalid("%s holds %d bytes, not a whole number of int64s", field, len(b))
		}
		out := make([]float64, len(b)/8)
		for i := range out {
			out[i] = float64(int64(binary.LittleEndian.Uint64(b[8*i:])))
		}
		return out, nil
	case tinkerpb.DType_DTYPE_INT32:
		ids, err := int32s(b, field)
		out := make([]float64, len(ids))
		for i, v := range ids {
			out[i] = float64(v)
		}
		return out, err
	default:
		return nil, invalid("%s has dtype %v: send float32 or int64", field, t.GetDtype())
	}
}

// ---- answers ----

// ForwardBackwardOutput encodes a forward(_backward) answer as the SDK's
// protobuf ForwardBackwardOutput: each datum's logprobs (float32) as one
// batched field, and loss:sum as Tinker names the metric.
func ForwardBackwardOutput(r protocol.ForwardBackwardResponse) ([]byte, error) {
	var data, offsets []byte
	offsets = binary.LittleEndian.AppendUint64(offsets, 0)
	for _, lp := range r.Logprobs {
		for _, v := range lp {
			data = binary.LittleEndian.AppendUint32(data, math.Float32bits(float32(v)))
		}
		offsets = binary.LittleEndian.AppendUint64(offsets, uint64(len(data)))
	}
	rec := &tinkerpb.ArrayRecord{
		TypeTag:   "ArrayRecord",
		NumDatums: int64(len(r.Logprobs)),
		Fields: map[string]*tinkerpb.BatchedTensor{
			"logprobs": {Data: data, Offsets: offsets, Dtype: tinkerpb.DType_DTYPE_FLOAT32},
		},
	}
	out := &tinkerpb.ForwardBackwardOutput{
		LossFnOutputType: "ArrayRecord",
		LossFnOutputs:    []*tinkerpb.ArrayRecord{rec},
		Metrics:          map[string]float64{"loss:sum": r.LossSum},
	}
	return proto.Marshal(out)
}

// Sampled is one prompt's sampling answer: its samples and, when asked,
// the prompt's logprobs (NaN at position 0, which has no context).
type Sampled struct {
	Samples        []protocol.Sample
	PromptLogprobs []float64
	// TopK > 0: each prompt position's TopK most likely tokens (nil rows,
	// position 0's, go as the SDK's sentinel: id 0, logprob -99999).
	TopK        int
	TopIDs      [][]int
	TopLogprobs [][]float64
}

// maskLogprob is the SDK's sentinel of an empty top-k entry.
const maskLogprob = -99999

// SampleResponse encodes a sampling answer as the SDK's protobuf.
func SampleResponse(s Sampled) ([]byte, error) {
	out := &tinkerpb.SampleResponse{}
	for _, smp := range s.Samples {
		seq := &tinkerpb.SampledSequence{StopReason: tinkerpb.StopReason_STOP_REASON_STOP}
		if smp.StopReason == "length" {
			seq.StopReason = tinkerpb.StopReason_STOP_REASON_LENGTH
		}
		for _, t := range smp.Tokens {
			seq.Tokens = binary.LittleEndian.AppendUint32(seq.Tokens, uint32(int32(t)))
		}
		lp := []byte{}
		for _, v := range smp.Logprobs {
			lp = binary.LittleEndian.AppendUint32(lp, math.Float32bits(float32(v)))
		}
		seq.Logprobs = lp
		out.Sequences = append(out.Sequences, seq)
	}
	if s.PromptLogprobs != nil {
		b := []byte{}
		for _, v := range s.PromptLogprobs {
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(float32(v)))
		}
		out.PromptLogprobs = b
	}
	if k := s.TopK; k > 0 {
		t := &tinkerpb.TopkLogprobs{K: uint32(k), Length: uint32(len(s.TopIDs))}
		for p, ids := range s.TopIDs {
			for j := range k {
				id, lp := 0, float64(maskLogprob)
				if j < len(ids) {
					id, lp = ids[j], s.TopLogprobs[p][j]
				}
				t.TokenIds = binary.LittleEndian.AppendUint32(t.TokenIds, uint32(int32(id)))
				t.Logprobs = binary.LittleEndian.AppendUint32(t.Logprobs, math.Float32bits(float32(lp)))
			}
		}
		out.TopkPromptLogprobs = t
	}
	return proto.Marshal(out)
}
