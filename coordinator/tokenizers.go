package coordinator

import (
	"context"
	"fmt"
	"sync"

	"github.com/signal-p2p/signal/protocol"
)

// tokenizers loads each model's tokenizer once and keeps it for the
// member's life: quotes and /v1/tokenize count text on the request path,
// and a tokenizer.json takes far longer to parse than a text to encode.
// Each member owns its own, so members sharing a process (tests, the
// testnet) do not share one member's loader.
type tokenizers struct {
	load   func(dir string) (Tokenizer, error) // nil: this member counts no text
	byPath sync.Map                            // model path -> Tokenizer
}

func newTokenizers(load func(dir string) (Tokenizer, error)) *tokenizers {
	return &tokenizers{load: load}
}

// get returns m's tokenizer; nil when this member has none for it.
func (t *tokenizers) get(m ModelSpec) (Tokenizer, error) {
	if t.load == nil || m.Path == "" {
		return nil, nil
	}
	if tk, ok := t.byPath.Load(m.Path); ok {
		return tk.(Tokenizer), nil
	}
	tk, err := t.load(m.Path)
	if err != nil {
		return nil, &protocol.UserError{Msg: fmt.Sprintf("model %s's tokenizer cannot be loaded on this coordinator; send token ids, or retry on another coordinator", m.Name),
			Err: fmt.Errorf("load tokenizer for %s: %w: %w", m.Name, ErrUnavailable, err)}
	}
	stored, _ := t.byPath.LoadOrStore(m.Path, tk)
	return stored.(Tokenizer), nil
}

// counter counts texts with the model's tokenizer where this member has
// it, so text examples are billed by their tokens, not bounded by bytes.
func (t *tokenizers) counter(m ModelSpec) textCounter {
	tk, err := t.get(m)
	if err != nil || tk == nil {
		return nil
	}
	return func(text string) int64 { return int64(len(tk.Encode(text, false))) }
}

// textCounter is the text counter of quotes on this member.
func (c *Coordinator) textCounter(m ModelSpec) textCounter { return c.tokenizers.counter(m) }

// maxTokenizeBytes bounds one /v1/tokenize text: the leader tokenizes it
// in memory, and a context's worth of text is far below this.
const maxTokenizeBytes = 1 << 20

// tokenize encodes req.Text with its model's tokenizer on this member, in
// one of its few tokenize slots: texts are CPU work the raft loop shares.
func (c *Coordinator) tokenize(ctx context.Context, req protocol.TokenizeRequest) ([]int, error) {
	if len(req.Text) > maxTokenizeBytes {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "field text: %d bytes, at most %d; split it into several calls", len(req.Text), maxTokenizeBytes)
	}
	m, err := c.models.get(req.BaseModel)
	if err != nil {
		return nil, err
	}
	t, err := c.tokenizers.get(m)
	if err != nil {
		return nil, err
	}
	if t == nil {
		return nil, retryAfter(protocol.UserErrorf(ErrUnavailable, "no tokenizer for model %s on this coordinator", m.Name), c.cfg.RetryAfter)
	}
	select {
	case c.tokenizeSlots <- struct{}{}:
		defer func() { <-c.tokenizeSlots }()
	case <-ctx.Done():
		return nil, fmt.Errorf("client gone while waiting to tokenize: %w", ctx.Err())
	}
	toks := t.Encode(req.Text, req.AddSpecialTokens)
	if toks == nil {
		toks = []int{}
	}
	return toks, nil
}
