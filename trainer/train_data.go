package trainer

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
)

// jsonDatum is the public API's Datum, or a TextExample ({"text"} or
// {"prompt", "completion"}) that the encoder turns into one.
type jsonDatum struct {
	ModelInput *struct {
		Tokens []int `json:"tokens"`
	} `json:"model_input,omitempty"`
	LossFnInputs *struct {
		TargetTokens []int     `json:"target_tokens"`
		Weights      []float32 `json:"weights,omitempty"`
		Logprobs     []float32 `json:"logprobs,omitempty"`
		Advantages   []float32 `json:"advantages,omitempty"`
	} `json:"loss_fn_inputs,omitempty"`
	Text       *string `json:"text,omitempty"`
	Prompt     *string `json:"prompt,omitempty"`
	Completion *string `json:"completion,omitempty"`
}

// ReadDataJSONL reads one datum per line (blank lines skipped): either the
// API's Datum, {"model_input": {"tokens"}, "loss_fn_inputs": {"target_tokens",
// "weights", "logprobs"?, "advantages"?}}, or a text example, {"text"} or
// {"prompt", "completion"}, which enc encodes (with BOS/EOS as its files say)
// into next-token targets, weight 0 on the prompt and 1 on the rest. enc may
// be nil when every line is a Datum. Errors name the line.
func ReadDataJSONL(r io.Reader, enc TextEncoder) ([]Datum, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<30)
	var out []Datum
	for line := 1; sc.Scan(); line++ {
		raw := bytes.TrimSpace(sc.Bytes())
		if len(raw) == 0 {
			continue
		}
		var jd jsonDatum
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&jd); err != nil {
			return nil, fmt.Errorf("%w: data line %d: %v", ErrInvalidInput, line, err)
		}
		d, err := jd.datum(enc)
		if err != nil {
			return nil, fmt.Errorf("data line %d: %w", line, err)
		}
		out = append(out, d)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read data: %w", err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: data: no datum in the file", ErrInvalidInput)
	}
	return out, nil
}

func (jd *jsonDatum) datum(enc TextEncoder) (Datum, error) {
	isText := jd.Text != nil || jd.Prompt != nil || jd.Completion != nil
	switch {
	case isText && (jd.ModelInput != nil || jd.LossFnInputs != nil):
		return Datum{}, fmt.Errorf("%w: a line is either a Datum or a text example, not both", ErrInvalidInput)
	case !isText:
		if jd.ModelInput == nil || jd.LossFnInputs == nil {
			return Datum{}, fmt.Errorf("%w: want model_input and loss_fn_inputs (or text, or prompt and completion)", ErrInvalidInput)
		}
		li := jd.LossFnInputs
		return Datum{Tokens: jd.ModelInput.Tokens, TargetTokens: li.TargetTokens, Weights: li.Weights,
			Logprobs: li.Logprobs, Advantages: li.Advantages}, nil
	case jd.Prompt != nil && jd.Completion == nil:
		return Datum{}, fmt.Errorf("%w: prompt and completion go together", ErrInvalidInput)
	}
	deref := func(s *string) string {
		if s == nil {
			return ""
		}
		return *s
	}
	return EncodeExample(enc, Example{Text: deref(jd.Text), Prompt: deref(jd.Prompt), Completion: deref(jd.Completion)})
}
