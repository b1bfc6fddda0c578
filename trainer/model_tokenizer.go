package trainer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/signal-p2p/signal/trainer/tokenizer"
)

// textCodec is what the sampler needs from a tokenizer: decoding for stop
// strings and text, and the end-of-sequence ids.
type textCodec interface {
	Decode(ids []int, skipSpecial bool) string
	EOS() []int
}

// tokenizerHandle is the model's tokenizer (nil when the directory has none).
type tokenizerHandle = *tokenizer.Tokenizer

// loadTokenizer loads dir/tokenizer.json when present. A tokenizer whose ids
// do not fit the model's vocabulary is refused.
func (m *Model) loadTokenizer() error {
	if _, err := os.Stat(filepath.Join(m.dir, tokenizer.TokenizerFile)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	tk, err := tokenizer.Load(m.dir)
	if err != nil {
		if errors.Is(err, tokenizer.ErrUnsupported) {
			return fmt.Errorf("%w: %w", ErrUnsupported, err)
		}
		return fmt.Errorf("%w: %w", ErrInvalidInput, err)
	}
	if tk.VocabSize() > m.cfg.VocabSize {
		return fmt.Errorf("%w: tokenizer.json has ids up to %d but the model's vocab_size is %d", ErrInvalidInput, tk.VocabSize()-1, m.cfg.VocabSize)
	}
	m.tok = tk
	return nil
}

// Tokenizer returns the model's tokenizer, or nil when its directory has no
// tokenizer.json.
func (m *Model) Tokenizer() *tokenizer.Tokenizer { return m.tok }

// codec returns the tokenizer as a textCodec, or nil (never a typed nil).
func (m *Model) codec() textCodec {
	if m.tok == nil {
		return nil
	}
	return m.tok
}
