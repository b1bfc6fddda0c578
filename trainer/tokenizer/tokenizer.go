// Package tokenizer reads Hugging Face tokenizer.json + tokenizer_config.json
// files and turns text into token ids and back, for the two BPE families the
// trainer serves: byte-level BPE (Llama 3, SmolLM, Qwen) and
// SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama).
//
// The reference is transformers.js (@lenml/tokenizers on npm): for the same
// files, Encode and Decode give the ids and text it gives. Where the reference
// and the Rust tokenizers library differ (JavaScript's \s, Unicode version,
// added-token matching on raw text), this package follows the reference; see
// DESIGN.md beside this file.
//
// A Tokenizer is immutable after Load apart from an internal cache, and is
// safe for concurrent use.
package tokenizer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf8"
)

// Sentinel errors; Load wraps them with the file and field at fault.
var (
	// ErrInvalidInput marks a malformed tokenizer file: bad JSON, a missing
	// or inconsistent field.
	ErrInvalidInput = errors.New("invalid tokenizer")
	// ErrUnsupported marks a well-formed file that uses a model, normalizer,
	// pre-tokenizer, post-processor or decoder type this package lacks.
	ErrUnsupported = errors.New("unsupported tokenizer")
)

// File names inside a model directory.
const (
	TokenizerFile = "tokenizer.json"
	ConfigFile    = "tokenizer_config.json"
)

// Tokenizer encodes text to token ids and decodes ids to text.
type Tokenizer struct {
	model *bpeModel

	// added are the added tokens, matched in raw text before normalization.
	added      []addedToken
	addedTrie  *trie
	addedByID  map[int32]bool // ids whose content is an added token's
	specialIDs map[int32]bool // ids Decode drops when skipSpecial is set

	normalizer   normalizer   // nil: none
	preTokenizer preTokenizer // nil: the whole section is one pre-token
	template     []templatePiece
	decoder      decoder // nil: tokens joined by spaces
	cleanUp      bool    // clean_up_tokenization_spaces

	bos   int32 // -1: none
	eos   int32 // -1: none
	vocab int   // 1 + the largest id
}

// Load reads dir/tokenizer.json and, when present, dir/tokenizer_config.json.
// An unsupported component is an error wrapping ErrUnsupported that names the
// type and the file; a malformed file wraps ErrInvalidInput.
func Load(dir string) (*Tokenizer, error) {
	tokPath := filepath.Join(dir, TokenizerFile)
	data, err := os.ReadFile(tokPath)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer: %w", err)
	}
	var cfgData []byte
	cfgPath := filepath.Join(dir, ConfigFile)
	if b, err := os.ReadFile(cfgPath); err == nil {
		cfgData = b
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("load tokenizer: %w", err)
	}
	t, err := parse(data, cfgData)
	if err != nil {
		var fe *fileError
		if errors.As(err, &fe) && fe.config {
			return nil, fmt.Errorf("load tokenizer %s: %w", cfgPath, fe.err)
		}
		if errors.As(err, &fe) {
			err = fe.err
		}
		return nil, fmt.Errorf("load tokenizer %s: %w", tokPath, err)
	}
	return t, nil
}

// Parse builds a Tokenizer from the contents of tokenizer.json and
// tokenizer_config.json (config may be nil). Errors are as Load's, without
// the path.
func Parse(tokenizerJSON, configJSON []byte) (*Tokenizer, error) {
	t, err := parse(tokenizerJSON, configJSON)
	if err != nil {
		var fe *fileError
		if errors.As(err, &fe) {
			name := TokenizerFile
			if fe.config {
				name = ConfigFile
			}
			return nil, fmt.Errorf("parse %s: %w", name, fe.err)
		}
		return nil, err
	}
	return t, nil
}

// VocabSize is one more than the largest token id, added tokens included:
// the number of rows a model's embedding needs.
func (t *Tokenizer) VocabSize() int { return t.vocab }

// BOS returns the beginning-of-sequence id named by tokenizer_config.json's
// bos_token, and whether there is one.
func (t *Tokenizer) BOS() (int, bool) {
	if t.bos < 0 {
		return 0, false
	}
	return int(t.bos), true
}

// EOS returns the end-of-sequence ids named by tokenizer_config.json's
// eos_token (empty when it names none). Callers merge these with the model's
// generation config, which may list more.
func (t *Tokenizer) EOS() []int {
	if t.eos < 0 {
		return nil
	}
	return []int{int(t.eos)}
}

// TokenID returns the id of a token given as its vocabulary string (for
// byte-level vocabularies, in the byte-to-unicode alphabet), or false.
func (t *Tokenizer) TokenID(token string) (int, bool) {
	id, ok := t.model.vocab[token]
	return int(id), ok
}

// Token returns the vocabulary string of id, or false when id is not assigned.
func (t *Tokenizer) Token(id int) (string, bool) {
	if id < 0 || id >= len(t.model.tokens) || !t.model.assigned(int32(id)) {
		return "", false
	}
	return t.model.tokens[id], true
}

// Encode turns text into token ids. With addSpecial, the post-processor of
// tokenizer.json (TemplateProcessing, or add_bos_token/add_eos_token for
// Llama tokenizers) adds BOS/EOS; special-token text inside text (for example
// "<|begin_of_text|>") is always encoded as that token. Invalid UTF-8 bytes
// are encoded as U+FFFD, one per byte.
func (t *Tokenizer) Encode(text string, addSpecial bool) []int {
	if !utf8.ValidString(text) {
		text = toValidUTF8(text)
	}
	ids := make([]int, 0, len(text)/3+2)
	if addSpecial {
		for _, p := range t.template {
			if p.sequence {
				ids = t.encodeText(text, ids)
			} else {
				for _, id := range p.ids {
					ids = append(ids, int(id))
				}
			}
		}
		return ids
	}
	return t.encodeText(text, ids)
}

// encodeText appends the ids of text, without post-processing, to dst.
func (t *Tokenizer) encodeText(text string, dst []int) []int {
	sections := t.splitAdded(text)
	var scratch []string
	for i, s := range sections {
		if s.added >= 0 {
			dst = append(dst, int(s.added))
			continue
		}
		x := s.text
		if x == "" {
			continue
		}
		if t.normalizer != nil {
			x = t.normalizer.normalize(x)
			if x == "" {
				continue
			}
		}
		scratch = append(scratch[:0], x)
		if t.preTokenizer != nil {
			scratch = t.preTokenizer.preTokenize(scratch, i)
		}
		dst = t.model.encode(scratch, dst)
	}
	return dst
}

// Decode turns ids back into text as the reference does: special tokens are
// kept (or dropped with skipSpecial), bytes that do not form valid UTF-8
// become U+FFFD, and tokenizer_config.json's clean_up_tokenization_spaces
// (" ." → ".", " n't" → "n't", ...) applies. Ids outside the vocabulary are
// skipped. Use DecodeWith to turn the clean-up off.
func (t *Tokenizer) Decode(ids []int, skipSpecial bool) string {
	return t.DecodeWith(ids, DecodeOptions{SkipSpecial: skipSpecial, CleanUpSpaces: t.cleanUp})
}

// DecodeOptions tunes DecodeWith.
type DecodeOptions struct {
	// SkipSpecial drops special tokens (BOS, EOS, ...).
	SkipSpecial bool
	// CleanUpSpaces removes the space before punctuation and English
	// contractions. Decode sets it from tokenizer_config.json; leave it
	// false for the exact inverse of Encode.
	CleanUpSpaces bool
}

// DecodeWith is Decode with every option explicit. With CleanUpSpaces unset
// it is the inverse of Encode for byte-level tokenizers on valid UTF-8.
func (t *Tokenizer) DecodeWith(ids []int, o DecodeOptions) string {
	tokens := make([]string, 0, len(ids))
	for _, id := range ids {
		if id < 0 || id >= len(t.model.tokens) || !t.model.assigned(int32(id)) {
			continue
		}
		if o.SkipSpecial && t.specialIDs[int32(id)] {
			continue
		}
		tokens = append(tokens, t.model.tokens[id])
	}
	var s string
	if t.decoder != nil {
		s = strings.Join(t.decoder.decodeChain(tokens, t), "")
	} else {
		s = strings.Join(tokens, " ")
	}
	if o.CleanUpSpaces {
		s = cleanUpTokenization(s)
	}
	return s
}

// cleanUpRules are the replacements of transformers' clean_up_tokenization,
// in its order (each rule applied to the result of the last).
var cleanUpRules = [][2]string{
	{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
	{" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"},
}

func cleanUpTokenization(s string) string {
	for _, r := range cleanUpRules {
		if strings.Contains(s, r[0]) {
			s = strings.ReplaceAll(s, r[0], r[1])
		}
	}
	return s
}

// toValidUTF8 replaces each byte that is not part of a valid UTF-8 sequence
// with U+FFFD.
func toValidUTF8(s string) string {
	var b strings.Builder
	b.Grow(len(s) + 8)
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n == 1 {
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}
