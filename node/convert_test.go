package node_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/nodetest"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// byteTokenizer encodes a text as its bytes (plus a BOS of 1 with special
// tokens), so a test controls how many tokens an example makes.
type byteTokenizer struct{}

func (byteTokenizer) Encode(text string, addSpecial bool) []int {
	var ids []int
	if addSpecial {
		ids = append(ids, 1)
	}
	for _, b := range []byte(text) {
		ids = append(ids, int(b))
	}
	return ids
}
func (byteTokenizer) Decode(ids []int, _ bool) string { return fmt.Sprint(ids) }
func (byteTokenizer) EOS() []int                      { return []int{2} }

// contextSession is a session over a model with a context of 8 tokens: it
// refuses a longer datum as the native engine does (trainer's DatumError
// wrapped in node.ErrInvalidRequest).
type contextSession struct{ *nodetest.Session }

func (contextSession) Tokenizer() node.Tokenizer { return byteTokenizer{} }
func (contextSession) ForwardBackward(_ context.Context, data []trainer.Datum, _ node.Loss) (trainer.ForwardResult, error) {
	for i, d := range data {
		if len(d.Tokens) > 8 {
			return trainer.ForwardResult{}, fmt.Errorf("%w: %w", node.ErrInvalidRequest,
				&trainer.DatumError{Index: i, Field: "model_input.tokens", Problem: fmt.Sprintf("%d tokens, over the model's context of 8", len(d.Tokens))})
		}
	}
	return trainer.ForwardResult{Tokens: 1}, nil
}

// TestComputeErrorsNameWhatTheUserSent: a refused example or datum is named
// as the user sent it (examples[i], not the data[i] it was converted to),
// in one sentence without the chain of sentinels around it.
func TestComputeErrorsNameWhatTheUserSent(t *testing.T) {
	long := strings.Repeat("x", 20)
	for _, tc := range []struct {
		name string
		req  protocol.ForwardBackwardRequest
		want string
	}{
		{"empty text", protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{{Text: "ok text"}, {}}},
			"examples[1].text: empty; give text, or prompt and completion"},
		{"prompt without completion", protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{{Prompt: "Q"}}},
			"examples[0].completion: empty; a prompt needs a completion to train on"},
		{"example over the context", protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{{Text: "short"}, {Text: long}}},
			"examples[1] is too long: 20 tokens, over the model's context of 8; shorten it or split it into several examples"},
		{"datum over the context", protocol.ForwardBackwardRequest{Data: []protocol.Datum{{ModelInput: protocol.ModelInput{Tokens: make([]int, 9)}}}},
			"data[0].model_input.tokens: 9 tokens, over the model's context of 8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, _ := json.Marshal(tc.req)
			_, err := node.Compute(context.Background(), contextSession{&nodetest.Session{}}, protocol.CallForwardBackward, body)
			if !errors.Is(err, node.ErrInvalidRequest) {
				t.Fatalf("err = %v, want ErrInvalidRequest", err)
			}
			if got := protocol.UserMessage(err); got != tc.want {
				t.Fatalf("message %q, want %q", got, tc.want)
			}
		})
	}
}

// TestSessionErrorMessages: what the coordinator receives from a node is
// the sentence, not "forward_backward: invalid request: ...".
func TestSessionErrorMessages(t *testing.T) {
	m, _ := newManager(1)
	r := m.Handle(context.Background(), req("i", "a", protocol.CallInit, protocol.SessionSpec{BaseModel: "llama-70b"}))
	if r.Error == nil || r.Error.Code != protocol.CodeUnknownModel || r.Error.Message != `this node does not serve base_model "llama-70b" (it serves tiny)` {
		t.Fatalf("init of an unserved model: %+v", r.Error)
	}
	initRun(t, m, "a")
	r = m.Handle(context.Background(), req("s", "a", protocol.CallSample, protocol.SampleRequest{Prompts: []protocol.Prompt{{}}, SamplingParams: protocol.SamplingParams{MaxTokens: 1}}))
	if r.Error == nil || r.Error.Code != protocol.CodeInvalidRequest || r.Error.Message != "prompts[0] is empty: give tokens or text" {
		t.Fatalf("empty prompt: %+v", r.Error)
	}
	r = m.Handle(context.Background(), req("m", "a", protocol.CallSaveState, protocol.SaveStateRequest{Mode: "everything"}))
	if r.Error == nil || r.Error.Message != `mode "everything" is not a checkpoint mode: use adapter or full` {
		t.Fatalf("bad mode: %+v", r.Error)
	}
}
