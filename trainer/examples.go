package trainer

import (
	"errors"
	"fmt"
	"strings"
)

// TextEncoder turns text into token ids (trainer/tokenizer's Tokenizer is one).
type TextEncoder interface {
	Encode(text string, addSpecial bool) []int
}

// eosLister is a TextEncoder that knows the model's end-of-sequence ids.
type eosLister interface{ EOS() []int }

// Example is a text training example of the public API: a document (Text
// alone) or a Prompt and its Completion.
type Example struct {
	Text, Prompt, Completion string
}

// EncodeExample is the one converter from a text example to a Datum, used
// by every engine and the CLI alike, so the same request trains on the same
// tokens everywhere. The rule (API.md's "BOS/EOS rule"):
//
//   - Text is encoded with the tokenizer's own special tokens (a BOS where
//     its files add one: Llama, Mistral; none for Qwen) and no EOS — a
//     document may go on — and every next token is trained on (weight 1).
//   - Prompt is encoded with the special tokens, exactly as a sample call
//     encodes the same prompt text; Completion is encoded without them and
//     followed by the model's first EOS id, so the model learns to stop.
//     Targets inside the prompt weigh 0, the completion's and the EOS 1.
//     The two are encoded apart (not as one string) so that the prompt's
//     tokens are the ones sampling will see.
//
// Position i of the Datum predicts token i+1. Errors are *ExampleError and
// name the field relative to the example (the caller prefixes "examples[3]"
// or "line 3").
func EncodeExample(enc TextEncoder, ex Example) (Datum, error) {
	var ids []int
	nPrompt := 0
	switch {
	case enc == nil:
		return Datum{}, exampleErr("", "text examples need a model with a tokenizer; send data as token ids")
	case ex.Text != "" && (ex.Prompt != "" || ex.Completion != ""):
		return Datum{}, exampleErr("", "give text, or prompt and completion, not both")
	case ex.Text != "":
		ids = enc.Encode(ex.Text, true)
	case ex.Completion != "":
		ids = enc.Encode(ex.Prompt, true)
		nPrompt = len(ids)
		ids = append(ids, enc.Encode(ex.Completion, false)...)
		if e, ok := enc.(eosLister); ok && len(e.EOS()) > 0 {
			ids = append(ids, e.EOS()[0])
		}
	case ex.Prompt != "":
		return Datum{}, exampleErr("completion", "empty; a prompt needs a completion to train on")
	default:
		return Datum{}, exampleErr("text", "empty; give text, or prompt and completion")
	}
	if len(ids) < 2 {
		return Datum{}, exampleErr("", fmt.Sprintf("encodes to %d token(s), want at least 2 (one input and one target)", len(ids)))
	}
	d := Datum{Tokens: ids[:len(ids)-1], TargetTokens: ids[1:], Weights: make([]float32, len(ids)-1)}
	for i := range d.Weights {
		if i+1 >= nPrompt {
			d.Weights[i] = 1
		}
	}
	return d, nil
}

// ExampleError is a text example that EncodeExample refuses. Field is the
// example's field as the public API spells it ("text", "completion"; empty
// for the example as a whole), Problem what is wrong and how to fix it, and
// Index the example's position in a call (EncodeExamples), -1 for one
// example alone. It is an ErrInvalidInput.
type ExampleError struct {
	Index   int
	Field   string
	Problem string
}

// Error reads "examples[0]: invalid input: text: empty; ...".
func (e *ExampleError) Error() string {
	var b strings.Builder
	if e.Index >= 0 {
		fmt.Fprintf(&b, "examples[%d]: ", e.Index)
	}
	b.WriteString(ErrInvalidInput.Error())
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Problem)
	return b.String()
}

// Unwrap gives ErrInvalidInput to errors.Is.
func (e *ExampleError) Unwrap() error { return ErrInvalidInput }

func exampleErr(field, problem string) error {
	return &ExampleError{Index: -1, Field: field, Problem: problem}
}

// EncodeExamples converts a call's examples; errors name examples[i].
func EncodeExamples(enc TextEncoder, exs []Example) ([]Datum, error) {
	out := make([]Datum, len(exs))
	for i, ex := range exs {
		d, err := EncodeExample(enc, ex)
		var ee *ExampleError
		if errors.As(err, &ee) {
			e := *ee
			e.Index = i
			return nil, &e
		}
		if err != nil {
			return nil, fmt.Errorf("examples[%d]: %w", i, err)
		}
		out[i] = d
	}
	return out, nil
}

// EncodePrompt is the one converter from a prompt's text to the tokens a
// sample call continues: the tokenizer's special tokens included, as for
// an example's prompt.
func EncodePrompt(enc TextEncoder, text string) []int { return enc.Encode(text, true) }
