package trainer

// textCodec is what the sampler needs from a tokenizer: decoding for stop
// strings and text, and the end-of-sequence ids.
type textCodec interface {
	Decode(ids []int, skipSpecial bool) string
	EOS() []int
}

// tokenizerHandle is the model's tokenizer (nil when the directory has none).
type tokenizerHandle = textCodec

// loadTokenizer is replaced by the trainer/tokenizer-backed loader once that
// package lands; until then models load without a tokenizer.
func (m *Model) loadTokenizer() error { return nil }

// codec returns the tokenizer as a textCodec, or nil.
func (m *Model) codec() textCodec { return m.tok }
