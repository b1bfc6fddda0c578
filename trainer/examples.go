package trainer

import "fmt"

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
// Position i of the Datum predicts token i+1. Errors name the field
// relative to the example (the caller prefixes "examples[3]" or "line 3").
func EncodeExample(enc TextEncoder, ex Example) (Datum, error) {
	var ids []int
	nPrompt := 0
	switch {
	case enc == nil:
		return Datum{}, fmt.Errorf("%w: text examples need a model with a tokenizer; send data as token ids", ErrInvalidInput)
	case ex.Text != "" && (ex.Prompt != "" || ex.Completion != ""):
		return Datum{}, fmt.Errorf("%w: give text, or prompt and completion, not both", ErrInvalidInput)
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
		return Datum{}, fmt.Errorf("%w: completion: empty; a prompt needs a completion to train on", ErrInvalidInput)
	default:
		return Datum{}, fmt.Errorf("%w: text: empty; give text, or prompt and completion", ErrInvalidInput)
	}
	if len(ids) < 2 {
		return Datum{}, fmt.Errorf("%w: encodes to %d token(s), want at least 2 (one input and one target)", ErrInvalidInput, len(ids))
	}
	d := Datum{Tokens: ids[:len(ids)-1], TargetTokens: ids[1:], Weights: make([]float32, len(ids)-1)}
	for i := range d.Weights {
		if i+1 >= nPrompt {
			d.Weights[i] = 1
		}
	}
	return d, nil
}

// EncodeExamples converts a call's examples; errors name examples[i].
func EncodeExamples(enc TextEncoder, exs []Example) ([]Datum, error) {
	out := make([]Datum, len(exs))
	for i, ex := range exs {
		d, err := EncodeExample(enc, ex)
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
