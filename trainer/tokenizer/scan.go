package tokenizer

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// A Llama 3 tokenizer.json is 9 MB, nearly all of it the model's vocab
// (128k entries) and merges (280k). encoding/json takes about half a second
// of CPU on it (it validates the whole input before decoding, and again for
// every RawMessage), so those two fields are read by the small scanner below,
// straight into the maps the model needs; keys are substrings of one copy of
// the file. Every other field is small and goes through encoding/json.

// jsonScanner reads JSON from s; its methods return an error naming the byte
// offset of the first malformed value.
type jsonScanner struct {
	s string
	i int
}

func (p *jsonScanner) errf(format string, a ...any) error {
	return fmt.Errorf("%w: offset %d: %s", ErrInvalidInput, p.i, fmt.Sprintf(format, a...))
}

func (p *jsonScanner) ws() {
	for p.i < len(p.s) {
		switch p.s[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

// peek returns the next non-space byte, or 0 at the end.
func (p *jsonScanner) peek() byte {
	p.ws()
	if p.i >= len(p.s) {
		return 0
	}
	return p.s[p.i]
}

func (p *jsonScanner) expect(c byte) error {
	if p.peek() != c {
		if p.i >= len(p.s) {
			return p.errf("want %q, got end of input", c)
		}
		return p.errf("want %q, got %q", c, p.s[p.i])
	}
	p.i++
	return nil
}

// str reads a string. Without escapes it is a substring of the input.
func (p *jsonScanner) str() (string, error) {
	if err := p.expect('"'); err != nil {
		return "", err
	}
	start := p.i
	for p.i < len(p.s) {
		c := p.s[p.i]
		switch {
		case c == '"':
			s := p.s[start:p.i]
			p.i++
			if !utf8.ValidString(s) {
				s = strings.ToValidUTF8(s, "\uFFFD")
			}
			return s, nil
		case c == '\\':
			return p.strSlow(start)
		case c < 0x20:
			return "", p.errf("control character in string")
		}
		p.i++
	}
	return "", p.errf("unterminated string")
}

func (p *jsonScanner) strSlow(start int) (string, error) {
	var b strings.Builder
	b.WriteString(p.s[start:p.i])
	for p.i < len(p.s) {
		c := p.s[p.i]
		switch {
		case c == '"':
			p.i++
			s := b.String()
			if !utf8.ValidString(s) {
				s = strings.ToValidUTF8(s, "\uFFFD")
			}
			return s, nil
		case c < 0x20:
			return "", p.errf("control character in string")
		case c != '\\':
			b.WriteByte(c)
			p.i++
			continue
		}
		if p.i+1 >= len(p.s) {
			return "", p.errf("unterminated escape")
		}
		e := p.s[p.i+1]
		p.i += 2
		switch e {
		case '"', '\\', '/':
			b.WriteByte(e)
		case 'b':
			b.WriteByte('\b')
		case 'f':
			b.WriteByte('\f')
		case 'n':
			b.WriteByte('\n')
		case 'r':
			b.WriteByte('\r')
		case 't':
			b.WriteByte('\t')
		case 'u':
			r, err := p.hex4()
			if err != nil {
				return "", err
			}
			if utf16.IsSurrogate(r) {
				// A high surrogate pairs with a following \uDC00-\uDFFF;
				// alone it is U+FFFD, as in encoding/json.
				r2 := utf8.RuneError
				if p.i+6 <= len(p.s) && p.s[p.i] == '\\' && p.s[p.i+1] == 'u' {
					save := p.i
					p.i += 2
					lo, err := p.hex4()
					if err != nil {
						return "", err
					}
					if dec := utf16.DecodeRune(r, lo); dec != utf8.RuneError {
						r2 = dec
					} else {
						p.i = save
					}
				}
				r = r2
			}
			b.WriteRune(r)
		default:
			return "", p.errf("bad escape \\%c", e)
		}
	}
	return "", p.errf("unterminated string")
}

func (p *jsonScanner) hex4() (rune, error) {
	if p.i+4 > len(p.s) {
		return 0, p.errf("short \\u escape")
	}
	v, err := strconv.ParseUint(p.s[p.i:p.i+4], 16, 16)
	if err != nil {
		return 0, p.errf("bad \\u escape %q", p.s[p.i:p.i+4])
	}
	p.i += 4
	return rune(v), nil
}

// integer reads a JSON number that must be an integer.
func (p *jsonScanner) integer() (int64, error) {
	p.ws()
	start := p.i
	for p.i < len(p.s) && (p.s[p.i] == '-' || p.s[p.i] == '+' || p.s[p.i] == '.' ||
		p.s[p.i] == 'e' || p.s[p.i] == 'E' || ('0' <= p.s[p.i] && p.s[p.i] <= '9')) {
		p.i++
	}
	v, err := strconv.ParseInt(p.s[start:p.i], 10, 64)
	if err != nil {
		p.i = start
		return 0, p.errf("want an integer, got %q", p.s[start:min(p.i+20, len(p.s))])
	}
	return v, nil
}

// object calls fn for each key; fn must consume the value.
func (p *jsonScanner) object(fn func(key string) error) error {
	if err := p.expect('{'); err != nil {
		return err
	}
	if p.peek() == '}' {
		p.i++
		return nil
	}
	for {
		k, err := p.str()
		if err != nil {
			return err
		}
		if err := p.expect(':'); err != nil {
			return err
		}
		if err := fn(k); err != nil {
			return err
		}
		switch p.peek() {
		case ',':
			p.i++
		case '}':
			p.i++
			return nil
		default:
			return p.errf("want ',' or '}' in object")
		}
	}
}

// array calls fn for each element; fn must consume it.
func (p *jsonScanner) array(fn func(i int) error) error {
	if err := p.expect('['); err != nil {
		return err
	}
	if p.peek() == ']' {
		p.i++
		return nil
	}
	for n := 0; ; n++ {
		if err := fn(n); err != nil {
			return err
		}
		switch p.peek() {
		case ',':
			p.i++
		case ']':
			p.i++
			return nil
		default:
			return p.errf("want ',' or ']' in array")
		}
	}
}

// raw skips one value and returns its text, checked by encoding/json.
func (p *jsonScanner) raw() (json.RawMessage, error) {
	p.ws()
	start := p.i
	if err := p.skip(0); err != nil {
		return nil, err
	}
	r := json.RawMessage(p.s[start:p.i])
	if !json.Valid(r) {
		p.i = start
		return nil, p.errf("malformed value")
	}
	return r, nil
}

const maxJSONDepth = 1000

func (p *jsonScanner) skip(depth int) error {
	if depth > maxJSONDepth {
		return p.errf("nested too deep")
	}
	switch c := p.peek(); {
	case c == '{':
		return p.object(func(string) error { return p.skip(depth + 1) })
	case c == '[':
		return p.array(func(int) error { return p.skip(depth + 1) })
	case c == '"':
		_, err := p.str()
		return err
	case c == 0:
		return p.errf("unexpected end of input")
	default:
		start := p.i
		for p.i < len(p.s) && strings.IndexByte(",]} \t\r\n", p.s[p.i]) < 0 {
			p.i++
		}
		if start == p.i {
			return p.errf("unexpected %q", c)
		}
		return nil
	}
}

// scannedModel is tokenizer.json's model with vocab and merges decoded.
type scannedModel struct {
	fields json.RawMessage // the model object without vocab and merges
	vocab  map[string]int32
	maxID  int32
	merges [][2]string
	seen   bool // the file has a model object
}

// scanTokenizerFile splits tokenizer.json into its top-level fields, decoding
// the model's vocab and merges on the way.
func scanTokenizerFile(data []byte) (tokenizerFile, scannedModel, error) {
	var f tokenizerFile
	var m scannedModel
	p := &jsonScanner{s: string(data)}
	top := map[string]*json.RawMessage{
		"normalizer": &f.Normalizer, "pre_tokenizer": &f.PreTokenizer,
		"post_processor": &f.PostProcessor, "decoder": &f.Decoder,
	}
	var added json.RawMessage
	err := p.object(func(key string) error {
		switch key {
		case "model":
			if p.peek() == 'n' {
				_, err := p.raw() // null
				return err
			}
			m.seen = true
			return p.scanModel(&m)
		case "added_tokens":
			r, err := p.raw()
			added = r
			return err
		}
		r, err := p.raw()
		if dst, ok := top[key]; ok {
			*dst = r
		}
		return err
	})
	if err == nil && p.peek() != 0 {
		err = p.errf("data after the top-level object")
	}
	if err != nil {
		return f, m, err
	}
	if !isNull(added) {
		if err := json.Unmarshal(added, &f.AddedTokens); err != nil {
			return f, m, fmt.Errorf("%w: added_tokens: %w", ErrInvalidInput, err)
		}
	}
	return f, m, nil
}

func (p *jsonScanner) scanModel(m *scannedModel) error {
	var other []string
	m.maxID = -1
	err := p.object(func(key string) error {
		switch key {
		case "vocab":
			if p.peek() != '{' {
				return p.errf("model vocab is not an object")
			}
			// Sized from the file (about 70 bytes of JSON per vocab entry
			// and merge) to spare most of the map's regrowth.
			m.vocab = make(map[string]int32, len(p.s)/70+64)
			return p.object(func(tok string) error {
				id, err := p.integer()
				if err != nil {
					return err
				}
				if id < 0 || id >= maxTokenID {
					return fmt.Errorf("%w: model vocab %q has id %d", ErrInvalidInput, tok, id)
				}
				m.vocab[tok] = int32(id)
				m.maxID = max(m.maxID, int32(id))
				return nil
			})
		case "merges":
			if p.peek() == 'n' {
				_, err := p.raw()
				return err
			}
			return p.array(func(i int) error {
				if p.peek() == '"' {
					s, err := p.str()
					if err != nil {
						return err
					}
					a, b, ok := strings.Cut(s, " ")
					if !ok || strings.Contains(b, " ") {
						return fmt.Errorf("%w: model merges[%d] %q is not two tokens separated by one space", ErrInvalidInput, i, s)
					}
					m.merges = append(m.merges, [2]string{a, b})
					return nil
				}
				var pair [2]string
				n := 0
				err := p.array(func(k int) error {
					s, err := p.str()
					if k < 2 {
						pair[k] = s
					}
					n++
					return err
				})
				if err != nil {
					return err
				}
				if n != 2 {
					return fmt.Errorf("%w: model merges[%d] has %d parts, want 2", ErrInvalidInput, i, n)
				}
				m.merges = append(m.merges, pair)
				return nil
			})
		}
		r, err := p.raw()
		if err != nil {
			return err
		}
		ks, _ := json.Marshal(key)
		other = append(other, string(ks)+":"+string(r))
		return nil
	})
	m.fields = json.RawMessage("{" + strings.Join(other, ",") + "}")
	return err
}
