package tokenizer

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"
)

// decoder turns token strings into text pieces; a chain feeds each stage the
// previous stage's pieces, and the final pieces are concatenated.
type decoder interface {
	decodeChain(tokens []string, t *Tokenizer) []string
}

func parseDecoder(raw json.RawMessage) (decoder, error) {
	typ, ok, err := typeOf(raw)
	if err != nil || !ok {
		return nil, err
	}
	switch typ {
	case "Sequence":
		seq, err := parseSequence(raw, "decoders", parseDecoder)
		return decoderSeq(seq), err
	case "ByteLevel":
		return byteLevelDecoder{}, nil
	case "Replace":
		old, repl, err := parseReplace(raw, "decoder")
		if err != nil {
			return nil, err
		}
		return replaceDecoder{old: old, new: repl}, nil
	case "ByteFallback":
		return byteFallbackDecoder{}, nil
	case "Fuse":
		return fuseDecoder{}, nil
	case "Strip":
		var s struct {
			Content string `json:"content"`
			Start   int    `json:"start"`
			Stop    int    `json:"stop"`
		}
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("%w: Strip: %w", ErrInvalidInput, err)
		}
		if utf8.RuneCountInString(s.Content) != 1 {
			return nil, fmt.Errorf("%w: Strip content %q is not one character", ErrInvalidInput, s.Content)
		}
		if s.Start < 0 || s.Stop < 0 {
			return nil, fmt.Errorf("%w: Strip start %d stop %d", ErrInvalidInput, s.Start, s.Stop)
		}
		return stripDecoder{content: s.Content, start: s.Start, stop: s.Stop}, nil
	case "Metaspace":
		var m struct {
			Replacement    string  `json:"replacement"`
			AddPrefixSpace *bool   `json:"add_prefix_space"`
			PrependScheme  *string `json:"prepend_scheme"`
		}
		if err := json.Unmarshal(raw, &m); err != nil {
			return nil, fmt.Errorf("%w: Metaspace: %w", ErrInvalidInput, err)
		}
		if m.Replacement == "" {
			return nil, fmt.Errorf("%w: Metaspace decoder without a replacement", ErrInvalidInput)
		}
		strip := m.PrependScheme == nil || *m.PrependScheme != "never"
		if m.AddPrefixSpace != nil {
			strip = *m.AddPrefixSpace
		}
		return metaspaceDecoder{replacement: m.Replacement, stripFirst: strip}, nil
	default:
		return nil, fmt.Errorf("%w: decoder type %q", ErrUnsupported, typ)
	}
}

type decoderSeq []decoder

func (d decoderSeq) decodeChain(tokens []string, t *Tokenizer) []string {
	for _, x := range d {
		tokens = x.decodeChain(tokens, t)
	}
	return tokens
}

// byteLevelDecoder maps byte stand-ins back to bytes. Added tokens are
// copied as they are, between runs of byte-level tokens.
type byteLevelDecoder struct{}

func (byteLevelDecoder) decodeChain(tokens []string, t *Tokenizer) []string {
	var out []string
	var buf []byte
	flush := func() {
		if len(buf) > 0 {
			out = append(out, decodeUTF8(buf, false))
			buf = buf[:0]
		}
	}
	for _, tok := range tokens {
		if t.addedByContent(tok) != nil {
			flush()
			out = append(out, tok)
			continue
		}
		for _, r := range tok {
			// Characters outside the byte alphabet become 0, as in the
			// reference's Uint8Array conversion of undefined.
			var b byte
			if r < byteRuneLimit {
				b = runeToByte[r]
			}
			buf = append(buf, b)
		}
	}
	flush()
	return out
}

type replaceDecoder struct{ old, new string }

func (r replaceDecoder) decodeChain(tokens []string, _ *Tokenizer) []string {
	out := make([]string, len(tokens))
	for i, s := range tokens {
		out[i] = strings.ReplaceAll(s, r.old, r.new)
	}
	return out
}

// byteFallbackDecoder turns runs of <0xNN> tokens into text.
type byteFallbackDecoder struct{}

func (byteFallbackDecoder) decodeChain(tokens []string, _ *Tokenizer) []string {
	var out []string
	var buf []byte
	for _, tok := range tokens {
		if b, ok := parseByteToken(tok); ok {
			buf = append(buf, b)
			continue
		}
		if len(buf) > 0 {
			out = append(out, decodeUTF8(buf, true))
			buf = buf[:0]
		}
		out = append(out, tok)
	}
	if len(buf) > 0 {
		out = append(out, decodeUTF8(buf, true))
	}
	return out
}

func parseByteToken(s string) (byte, bool) {
	if len(s) != 6 || !strings.HasPrefix(s, "<0x") || s[5] != '>' {
		return 0, false
	}
	hi, ok1 := hexVal(s[3])
	lo, ok2 := hexVal(s[4])
	if !ok1 || !ok2 {
		return 0, false
	}
	return hi<<4 | lo, true
}

func hexVal(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

type fuseDecoder struct{}

func (fuseDecoder) decodeChain(tokens []string, _ *Tokenizer) []string {
	return []string{strings.Join(tokens, "")}
}

// stripDecoder removes up to start leading and stop trailing copies of
// content from each piece.
type stripDecoder struct {
	content     string
	start, stop int
}

func (d stripDecoder) decodeChain(tokens []string, _ *Tokenizer) []string {
	out := make([]string, len(tokens))
	for i, s := range tokens {
		for k := 0; k < d.start && strings.HasPrefix(s, d.content); k++ {
			s = s[len(d.content):]
		}
		for k := 0; k < d.stop && strings.HasSuffix(s, d.content); k++ {
			s = s[:len(s)-len(d.content)]
		}
		out[i] = s
	}
	return out
}

// metaspaceDecoder turns ▁ back into spaces and drops the space the
// pre-tokenizer prepended to the first token.
type metaspaceDecoder struct {
	replacement string
	stripFirst  bool
}

func (d metaspaceDecoder) decodeChain(tokens []string, _ *Tokenizer) []string {
	out := make([]string, len(tokens))
	for i, s := range tokens {
		s = strings.ReplaceAll(s, d.replacement, " ")
		if d.stripFirst && i == 0 {
			s = strings.TrimPrefix(s, " ")
		}
		out[i] = s
	}
	return out
}

// decodeUTF8 decodes bytes as the WHATWG TextDecoder does (the reference's):
// each maximal invalid subsequence becomes one U+FFFD, and with stripBOM a
// leading byte-order mark is dropped.
func decodeUTF8(b []byte, stripBOM bool) string {
	if stripBOM && len(b) >= 3 && b[0] == 0xEF && b[1] == 0xBB && b[2] == 0xBF {
		b = b[3:]
	}
	if utf8.Valid(b) {
		return string(b)
	}
	var sb strings.Builder
	sb.Grow(len(b) + 8)
	for i := 0; i < len(b); {
		c := b[i]
		if c < 0x80 {
			sb.WriteByte(c)
			i++
			continue
		}
		var need int
		lower, upper := byte(0x80), byte(0xBF)
		switch {
		case 0xC2 <= c && c <= 0xDF:
			need = 1
		case 0xE0 <= c && c <= 0xEF:
			need = 2
			if c == 0xE0 {
				lower = 0xA0
			} else if c == 0xED {
				upper = 0x9F
			}
		case 0xF0 <= c && c <= 0xF4:
			need = 3
			if c == 0xF0 {
				lower = 0x90
			} else if c == 0xF4 {
				upper = 0x8F
			}
		default:
			sb.WriteRune(utf8.RuneError)
			i++
			continue
		}
		j := i + 1
		ok := true
		for k := 0; k < need; k++ {
			if j >= len(b) || b[j] < lower || b[j] > upper {
				ok = false
				break
			}
			lower, upper = 0x80, 0xBF
			j++
		}
		if ok {
			sb.Write(b[i:j])
		} else {
			// The bytes consumed so far form the maximal subpart; the byte
			// that broke the sequence is looked at again.
			sb.WriteRune(utf8.RuneError)
		}
		i = j
	}
	return sb.String()
}
