package tokenizer

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// addedToken is an entry of tokenizer.json's added_tokens: text matched
// verbatim before normalization and BPE.
type addedToken struct {
	content    string
	id         int32
	lstrip     bool // eat whitespace on the left
	rstrip     bool // eat whitespace on the right
	singleWord bool // match only when not inside a word
	special    bool
}

// trie is a byte trie over added-token contents, for leftmost-longest
// matching in one pass over the text.
type trie struct {
	edges map[uint64]int32 // node<<8 | byte → child node
	term  []int32          // node → index into added, -1 when none
	first [256]bool        // bytes some content starts with
}

func newTrie() *trie { return &trie{edges: map[uint64]int32{}, term: []int32{-1}} }

func (t *trie) insert(s string, idx int) {
	t.first[s[0]] = true
	node := int32(0)
	for i := 0; i < len(s); i++ {
		k := uint64(node)<<8 | uint64(s[i])
		child, ok := t.edges[k]
		if !ok {
			child = int32(len(t.term))
			t.term = append(t.term, -1)
			t.edges[k] = child
		}
		node = child
	}
	t.term[node] = int32(idx)
}

// section is a piece of input text: either an added token (added ≥ 0, its
// id) or text for the normalizer and model (added = -1).
type section struct {
	text  string
	added int32
}

// splitAdded cuts text around added tokens, leftmost-longest as the
// reference's DictionarySplitter does, then applies lstrip/rstrip.
func (t *Tokenizer) splitAdded(text string) []section {
	if len(t.added) == 0 {
		return []section{{text: text, added: -1}}
	}
	var out []section
	start := 0
	for i := 0; i < len(text); {
		if !t.addedTrie.first[text[i]] {
			i++
			continue
		}
		match := -1
		matchLen := 0
		node := int32(0)
		for j := i; j < len(text); j++ {
			child, ok := t.addedTrie.edges[uint64(node)<<8|uint64(text[j])]
			if !ok {
				break
			}
			node = child
			if idx := t.addedTrie.term[node]; idx >= 0 {
				if a := &t.added[idx]; !a.singleWord || isWordBoundary(text, i, j+1) {
					match, matchLen = int(idx), j+1-i
				}
			}
		}
		if match < 0 {
			i++
			continue
		}
		if i > start {
			out = append(out, section{text: text[start:i], added: -1})
		}
		out = append(out, section{text: text[i : i+matchLen], added: t.added[match].id})
		i += matchLen
		start = i
	}
	if start < len(text) {
		out = append(out, section{text: text[start:], added: -1})
	}
	for i, s := range out {
		if s.added < 0 {
			continue
		}
		a := t.addedByContent(s.text)
		if a == nil {
			continue
		}
		if a.lstrip && i > 0 && out[i-1].added < 0 {
			out[i-1].text = strings.TrimRightFunc(out[i-1].text, isJSSpace)
		}
		if a.rstrip && i+1 < len(out) && out[i+1].added < 0 {
			out[i+1].text = strings.TrimLeftFunc(out[i+1].text, isJSSpace)
		}
	}
	return out
}

func (t *Tokenizer) addedByContent(s string) *addedToken {
	if s == "" || !t.addedTrie.first[s[0]] {
		return nil
	}
	node := int32(0)
	for i := 0; i < len(s); i++ {
		child, ok := t.addedTrie.edges[uint64(node)<<8|uint64(s[i])]
		if !ok {
			return nil
		}
		node = child
	}
	if idx := t.addedTrie.term[node]; idx >= 0 {
		return &t.added[idx]
	}
	return nil
}

// isWordBoundary reports whether text[i:j] is not glued to a word character
// on either side (single_word, as in the Rust tokenizers library).
func isWordBoundary(text string, i, j int) bool {
	if i > 0 {
		r, _ := utf8.DecodeLastRuneInString(text[:i])
		if isWordChar(r) {
			return false
		}
	}
	if j < len(text) {
		r, _ := utf8.DecodeRuneInString(text[j:])
		if isWordChar(r) {
			return false
		}
	}
	return true
}

func isWordChar(r rune) bool {
	return r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.Is(unicode.M, r)
}
