package coordinator

import (
	"errors"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/protocol"
)

// TestAPIMessagesNameWhatTheUserSent: through the real API, each refusal
// is one sentence naming the field, the limit and the fix, and a node's
// sentence reaches the user as the node wrote it, without "node: ...:
// invalid request" around it.
func TestAPIMessagesNameWhatTheUserSent(t *testing.T) {
	c, fnet := startOne(t, func(cfg *Config) {
		cfg.Models = append(cfg.Models, ModelSpec{Name: "unserved", ContextLength: 128, MemoryBytes: 1 << 20, Prices: cfg.Models[0].Prices})
	})
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny"})
	runURL := base + "/v1/runs/" + run.ID

	t.Run("examples as the user sent them", func(t *testing.T) {
		for _, tc := range []struct {
			body any
			want string
		}{
			{map[string]any{"examples": []any{map[string]any{"text": "ok"}, map[string]any{}}}, "examples[1] is empty: give either text, or prompt and completion"},
			{map[string]any{"examples": []any{map[string]any{"text": "a", "prompt": "b", "completion": "c"}}}, "examples[0] has both text and prompt/completion: give either text, or prompt and completion"},
			{map[string]any{"examples": []any{map[string]any{"prompt": "Q"}}}, "examples[0].completion is empty: a prompt needs a completion to train on"},
			{map[string]any{}, "send a batch in exactly one of data (token Datum) and examples (text); this request has neither"},
		} {
			r := do(t, "POST", runURL+"/forward_backward", key, tc.body)
			mustStatus(t, r, 400)
			if got := r.errMessage(t); got != tc.want {
				t.Errorf("message %q, want %q", got, tc.want)
			}
		}
	})

	t.Run("a node's sentence as it wrote it", func(t *testing.T) {
		const sentence = "examples[0] is too long: 300 tokens, over the model's context of 128; shorten it or split it into several examples"
		fnet.mu.Lock()
		fnet.refuse = &protocol.ErrorBody{Code: protocol.CodeInvalidRequest, Message: sentence}
		fnet.mu.Unlock()
		defer func() { fnet.mu.Lock(); fnet.refuse = nil; fnet.mu.Unlock() }()
		r := do(t, "POST", runURL+"/forward_backward", key, map[string]any{"examples": []any{map[string]any{"text": strings.Repeat("long ", 60)}}})
		mustStatus(t, r, 400)
		if got := r.errMessage(t); got != sentence {
			t.Fatalf("message %q, want the node's %q", got, sentence)
		}
	})

	t.Run("a listed model no live node serves", func(t *testing.T) {
		fnet.serve("tiny")
		r := do(t, "POST", base+"/v1/runs", key, map[string]any{"base_model": "unserved"})
		if r.status != 503 || r.errCode(t) != protocol.CodeUnavailable || r.header.Get("Retry-After") == "" {
			t.Fatalf("run of an unserved model: %d %s", r.status, r.body)
		}
		if msg := r.errMessage(t); !strings.Contains(msg, "no node could open a run of unserved") || !strings.Contains(msg, `does not serve base_model "unserved"`) {
			t.Fatalf("message %q does not name the model", msg)
		}
	})

	t.Run("a listed model whose tokenizer cannot load", func(t *testing.T) {
		c2, _ := startOne(t, func(cfg *Config) {
			cfg.Models[0].Path = t.TempDir()
			cfg.LoadTokenizer = func(string) (Tokenizer, error) { return nil, errors.New("tokenizer.json: no such file") }
		})
		k2, _ := createKey(t, c2.URL(), 1000)
		r := do(t, "POST", c2.URL()+"/v1/tokenize", k2, map[string]any{"base_model": "tiny", "text": "hi"})
		mustStatus(t, r, 503)
		if msg := r.errMessage(t); !strings.Contains(msg, "model tiny's tokenizer cannot be loaded") {
			t.Fatalf("message %q", msg)
		}
	})
}
