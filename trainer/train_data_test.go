package trainer

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// byteEncoder encodes each byte as its value + 10, with BOS 1 when asked.
type byteEncoder struct{}

func (byteEncoder) Encode(text string, addSpecial bool) []int {
	var ids []int
	if addSpecial {
		ids = append(ids, 1)
	}
	for _, b := range []byte(text) {
		ids = append(ids, int(b)+10)
	}
	return ids
}

func (byteEncoder) EOS() []int { return []int{2} }

func TestReadDataJSONL(t *testing.T) {
	in := `{"model_input": {"tokens": [5, 6]}, "loss_fn_inputs": {"target_tokens": [6, 7], "weights": [1, 0.5], "advantages": [0.1, -1]}}

{"text": "ab"}
{"prompt": "a", "completion": "b"}
`
	data, err := ReadDataJSONL(strings.NewReader(in), byteEncoder{})
	if err != nil {
		t.Fatal(err)
	}
	if len(data) != 3 {
		t.Fatalf("%d data, want 3", len(data))
	}
	if d := data[0]; !slices.Equal(d.Tokens, []int{5, 6}) || !slices.Equal(d.TargetTokens, []int{6, 7}) ||
		!slices.Equal(d.Weights, []float32{1, 0.5}) || !slices.Equal(d.Advantages, []float32{0.1, -1}) {
		t.Errorf("datum 0 = %+v", d)
	}
	// "ab" → BOS a b: inputs [1, a], targets [a, b], all weighted.
	if d := data[1]; !slices.Equal(d.Tokens, []int{1, 107}) || !slices.Equal(d.TargetTokens, []int{107, 108}) ||
		!slices.Equal(d.Weights, []float32{1, 1}) {
		t.Errorf("text datum = %+v", d)
	}
	// prompt "a" + completion "b" + EOS: BOS a b EOS; only b and EOS are weighted.
	if d := data[2]; !slices.Equal(d.Tokens, []int{1, 107, 108}) || !slices.Equal(d.TargetTokens, []int{107, 108, 2}) ||
		!slices.Equal(d.Weights, []float32{0, 1, 1}) {
		t.Errorf("prompt/completion datum = %+v", d)
	}
}

func TestReadDataJSONLErrors(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		enc      TextEncoder
	}{
		{"", "no datum", nil},
		{`{"text": "x"`, "line 1", byteEncoder{}},
		{"{\"text\": \"xy\"}\n{\"tokens\": [1]}", "line 2", byteEncoder{}},
		{`{"text": "xy"}`, "tokenizer", nil},
		{`{"prompt": "x"}`, "prompt and completion", byteEncoder{}},
		{`{"text": "x", "model_input": {"tokens": [1]}}`, "not both", byteEncoder{}},
		{`{"model_input": {"tokens": [1]}}`, "loss_fn_inputs", nil},
	} {
		_, err := ReadDataJSONL(strings.NewReader(tc.in), tc.enc)
		if !errors.Is(err, ErrInvalidInput) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want ErrInvalidInput naming %q", tc.in, err, tc.want)
		}
	}
}

// FuzzReadDataJSONL: any file gives data or an error, never a panic, and
// what it accepts has equal-length inputs and targets for text lines.
func FuzzReadDataJSONL(f *testing.F) {
	f.Add(`{"model_input": {"tokens": [5, 6]}, "loss_fn_inputs": {"target_tokens": [6, 7], "weights": [1, 0.5]}}`)
	f.Add(`{"prompt": "a", "completion": "b"}`)
	f.Add(`{"text": ""}`)
	f.Fuzz(func(t *testing.T, in string) {
		data, err := ReadDataJSONL(strings.NewReader(in), byteEncoder{})
		if err != nil {
			return
		}
		if len(data) == 0 {
			t.Fatal("no error and no data")
		}
	})
}
