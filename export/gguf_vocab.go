package export

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/signal-p2p/signal/trainer"
	"github.com/signal-p2p/signal/trainer/tokenizer"
)

// llama.cpp's token types (tokenizer.ggml.token_type), SentencePiece's.
const (
	tokNormal      int32 = 1
	tokUnknown     int32 = 2
	tokControl     int32 = 3
	tokUserDefined int32 = 4
	tokUnused      int32 = 5
	tokByte        int32 = 6
)

// The Split regexes of the byte-level tokenizers Signal's tokenizer runs
// (trainer/tokenizer's known patterns), and llama.cpp's pre-tokenizer name
// for each (tokenizer.ggml.pre): llama.cpp picks its regex by that name,
// not from the file, so an unknown pattern cannot be exported faithfully.
var preTokenizers = map[string]string{
	`(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`: "llama-bpe",
	`(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`:      "qwen2",
	`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`:                                          "gpt-2",
}

// hfTokenizer is the part of tokenizer.json the GGUF vocabulary is made
// from; trainer/tokenizer parses the rest (and judges it supported).
type hfTokenizer struct {
	AddedTokens []struct {
		ID      int    `json:"id"`
		Content string `json:"content"`
		Special bool   `json:"special"`
	} `json:"added_tokens"`
	Normalizer   json.RawMessage `json:"normalizer"`
	PreTokenizer json.RawMessage `json:"pre_tokenizer"`
	Model        struct {
		Type         string            `json:"type"`
		Vocab        map[string]int    `json:"vocab"`
		Merges       []json.RawMessage `json:"merges"`
		ByteFallback bool              `json:"byte_fallback"`
		UnkToken     *string           `json:"unk_token"`
	} `json:"model"`
}

// component is a normalizer or pre-tokenizer object, possibly a Sequence.
type component struct {
	Type          string          `json:"type"`
	Prepend       string          `json:"prepend"`
	Pattern       json.RawMessage `json:"pattern"`
	PrependScheme string          `json:"prepend_scheme"`
	AddPrefix     *bool           `json:"add_prefix_space"`
	Normalizers   []component     `json:"normalizers"`
	PreTokenizers []component     `json:"pretokenizers"`
}

// flatten lists a component and, for a Sequence, its members.
func flatten(raw json.RawMessage) ([]component, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var c component
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	out := []component{c}
	for _, sub := range append(c.Normalizers, c.PreTokenizers...) {
		out = append(out, sub)
	}
	return out, nil
}

// addVocab writes llama.cpp's tokenizer metadata for m's tokenizer.json:
// model "llama" (SentencePiece-style BPE with byte fallback: tokens, scores,
// types) or "gpt2" (byte-level BPE: tokens, types, merges and the
// pre-tokenizer's name), the special ids and whether BOS/EOS are added.
// Ids the tokenizer leaves unassigned below vocab_size become unused
// "[PADn]" tokens, as llama.cpp's converter pads them.
func addVocab(g *ggufFile, m *trainer.Model) error {
	tk := m.Tokenizer()
	if tk == nil {
		return fmt.Errorf("%w: %s has no tokenizer.json; llama.cpp needs the vocabulary", trainer.ErrInvalidInput, m.Dir())
	}
	raw, err := os.ReadFile(filepath.Join(m.Dir(), tokenizer.TokenizerFile))
	if err != nil {
		return fmt.Errorf("read tokenizer: %w", err)
	}
	var tj hfTokenizer
	if err := json.Unmarshal(raw, &tj); err != nil {
		return fmt.Errorf("%w: tokenizer.json: %v", trainer.ErrInvalidInput, err)
	}
	merges, err := mergeStrings(tj.Model.Merges)
	if err != nil {
		return err
	}
	norms, err := flatten(tj.Normalizer)
	if err != nil {
		return fmt.Errorf("%w: tokenizer.json normalizer: %v", trainer.ErrInvalidInput, err)
	}
	pres, err := flatten(tj.PreTokenizer)
	if err != nil {
		return fmt.Errorf("%w: tokenizer.json pre_tokenizer: %v", trainer.ErrInvalidInput, err)
	}
	V := m.Config().VocabSize
	tokens := make([]string, V)
	types := make([]int32, V)
	assigned := make([]bool, V)
	for s, id := range tj.Model.Vocab {
		if id < 0 || id >= V {
			return fmt.Errorf("%w: tokenizer.json token %q has id %d outside vocab_size %d", trainer.ErrInvalidInput, s, id, V)
		}
		tokens[id], types[id], assigned[id] = s, tokNormal, true
	}
	for _, a := range tj.AddedTokens {
		if a.ID < 0 || a.ID >= V {
			return fmt.Errorf("%w: tokenizer.json added token %q has id %d outside vocab_size %d", trainer.ErrInvalidInput, a.Content, a.ID, V)
		}
		tokens[a.ID], assigned[a.ID] = a.Content, true
		types[a.ID] = tokUserDefined
		if a.Special {
			types[a.ID] = tokControl
		}
	}
	for id := range tokens {
		if !assigned[id] {
			tokens[id], types[id] = fmt.Sprintf("[PAD%d]", id), tokUnused
		}
	}

	byteLevel := false
	preName := ""
	for _, p := range pres {
		switch p.Type {
		case "ByteLevel":
			byteLevel = true
		case "Split":
			var pat struct{ Regex string }
			_ = json.Unmarshal(p.Pattern, &pat)
			name, ok := preTokenizers[pat.Regex]
			if !ok {
				return fmt.Errorf("%w: tokenizer.json Split regex %q has no llama.cpp pre-tokenizer name (known: Llama 3, Qwen 2, GPT-2)", trainer.ErrUnsupported, pat.Regex)
			}
			preName = name
		}
	}
	switch {
	case tj.Model.Type != "BPE":
		return fmt.Errorf("%w: tokenizer.json model %q (want BPE)", trainer.ErrUnsupported, tj.Model.Type)
	case byteLevel:
		if preName == "" {
			preName = "gpt-2" // ByteLevel's own regex
		}
		g.set("tokenizer.ggml.model", "gpt2")
		g.set("tokenizer.ggml.pre", preName)
		g.set("tokenizer.ggml.tokens", tokens)
		g.set("tokenizer.ggml.token_type", types)
		g.set("tokenizer.ggml.merges", merges)
	case tj.Model.ByteFallback:
		spmVocab(g, tj, tokens, types, merges, norms, pres)
	default:
		return fmt.Errorf("%w: tokenizer.json is neither byte-level BPE nor SentencePiece-style BPE with byte fallback", trainer.ErrUnsupported)
	}

	if bos, ok := bosID(tk, m.Config()); ok {
		g.set("tokenizer.ggml.bos_token_id", uint32(bos))
	}
	if eos, ok := eosID(tk, m.Config()); ok {
		g.set("tokenizer.ggml.eos_token_id", uint32(eos))
	}
	if u := tj.Model.UnkToken; u != nil {
		if id, ok := tj.Model.Vocab[*u]; ok {
			g.set("tokenizer.ggml.unknown_token_id", uint32(id))
		}
	}
	// Whether the tokenizer adds BOS or EOS is read from what Signal's own
	// encoder does with special tokens on, so llama.cpp adds exactly what
	// Signal adds (Llama 3's base tokenizer, for one, adds nothing).
	plain, special := tk.Encode("a", false), tk.Encode("a", true)
	addBOS := len(special) > len(plain) && !slices.Equal(special[:len(plain)], plain)
	addEOS := len(special) > len(plain) && !slices.Equal(special[len(special)-len(plain):], plain)
	g.set("tokenizer.ggml.add_bos_token", addBOS)
	g.set("tokenizer.ggml.add_eos_token", addEOS)
	if tmpl := chatTemplate(m.Dir()); tmpl != "" {
		g.set("tokenizer.chat_template", tmpl)
	}
	return nil
}

// spmVocab writes the "llama" (SentencePiece) vocabulary. llama.cpp's SPM
// tokenizer merges the adjacent pair whose joined token scores highest, so
// each token scores minus the rank of the first merge that makes it: the
// order tokenizer.json's merges give (llama.cpp's own converter, from a
// tokenizer.json without tokenizer.model, scores every token -1000 and so
// merges left to right instead). Byte tokens <0xXX> get the BYTE type
// llama.cpp's byte fallback looks for.
func spmVocab(g *ggufFile, tj hfTokenizer, tokens []string, types []int32, merges []string, norms, pres []component) {
	// Tokens no merge makes (characters, bytes, specials) score below
	// every merge, so llama.cpp never prefers joining into one of them.
	scores := make([]float32, len(tokens))
	for i := range scores {
		scores[i] = -float32(len(merges) + 1)
	}
	seen := make(map[string]bool, len(merges))
	for rank, mg := range merges {
		joined := strings.Replace(mg, " ", "", 1)
		if seen[joined] {
			continue
		}
		seen[joined] = true
		if id, ok := tj.Model.Vocab[joined]; ok {
			scores[id] = -float32(rank + 1)
		}
	}
	for id, s := range tokens {
		if types[id] == tokNormal && isByteToken(s) {
			types[id] = tokByte
		}
	}
	if u := tj.Model.UnkToken; u != nil {
		if id, ok := tj.Model.Vocab[*u]; ok {
			types[id] = tokUnknown
		}
	}
	// A leading "▁" is added either by a Prepend normalizer (Llama 2,
	// Mistral) or by a Metaspace pre-tokenizer (newer exports).
	prefix := false
	for _, n := range norms {
		if n.Type == "Prepend" && n.Prepend == "▁" {
			prefix = true
		}
	}
	for _, p := range pres {
		if p.Type == "Metaspace" && p.PrependScheme != "never" && (p.AddPrefix == nil || *p.AddPrefix) {
			prefix = true
		}
	}
	g.set("tokenizer.ggml.model", "llama")
	g.set("tokenizer.ggml.pre", "default")
	g.set("tokenizer.ggml.tokens", tokens)
	g.set("tokenizer.ggml.scores", scores)
	g.set("tokenizer.ggml.token_type", types)
	g.set("tokenizer.ggml.add_space_prefix", prefix)
}

func isByteToken(s string) bool {
	if len(s) != 6 || !strings.HasPrefix(s, "<0x") || s[5] != '>' {
		return false
	}
	for _, c := range s[3:5] {
		if !strings.ContainsRune("0123456789abcdefABCDEF", c) {
			return false
		}
	}
	return true
}

// mergeStrings returns tokenizer.json's merges as GGUF writes them, "a b",
// from either spelling ("a b" strings or ["a", "b"] pairs).
func mergeStrings(raw []json.RawMessage) ([]string, error) {
	out := make([]string, len(raw))
	for i, r := range raw {
		if err := json.Unmarshal(r, &out[i]); err == nil {
			continue
		}
		var pair []string
		if err := json.Unmarshal(r, &pair); err != nil || len(pair) != 2 {
			return nil, fmt.Errorf("%w: tokenizer.json merge %d is %s (want \"a b\" or [\"a\", \"b\"])", trainer.ErrInvalidInput, i, r)
		}
		if strings.Contains(pair[0], " ") || strings.Contains(pair[1], " ") {
			return nil, fmt.Errorf("%w: tokenizer.json merge %d %q has a space, which GGUF's \"a b\" merges cannot hold", trainer.ErrUnsupported, i, pair)
		}
		out[i] = pair[0] + " " + pair[1]
	}
	return out, nil
}

// bosID is the tokenizer's BOS, else config.json's.
func bosID(tk *tokenizer.Tokenizer, c trainer.Config) (int, bool) {
	if id, ok := tk.BOS(); ok {
		return id, true
	}
	if len(c.BOSTokenID) > 0 {
		return c.BOSTokenID[0], true
	}
	return 0, false
}

// eosID is the tokenizer's EOS, else config.json's first. llama.cpp also
// stops at the end-of-turn tokens it recognises by their text.
func eosID(tk *tokenizer.Tokenizer, c trainer.Config) (int, bool) {
	if ids := tk.EOS(); len(ids) > 0 {
		return ids[0], true
	}
	if len(c.EOSTokenID) > 0 {
		return c.EOSTokenID[0], true
	}
	return 0, false
}

// chatTemplate is tokenizer_config.json's chat_template when it is one
// string (Ollama and llama.cpp's server read it), or "".
func chatTemplate(dir string) string {
	raw, err := os.ReadFile(filepath.Join(dir, tokenizer.ConfigFile))
	if err != nil { // none, or unreadable: the template is optional
		return ""
	}
	var c struct {
		ChatTemplate json.RawMessage `json:"chat_template"`
	}
	var s string
	if json.Unmarshal(raw, &c) != nil || json.Unmarshal(c.ChatTemplate, &s) != nil {
		return ""
	}
	return s
}
