package tokenizer

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// normalizer rewrites one section of text before pre-tokenization.
type normalizer interface {
	normalize(s string) string
}

type normalizerSeq []normalizer

func (n normalizerSeq) normalize(s string) string {
	for _, x := range n {
		s = x.normalize(s)
	}
	return s
}

type prependNormalizer string

func (p prependNormalizer) normalize(s string) string { return string(p) + s }

type replaceNormalizer struct{ old, new string }

func (r replaceNormalizer) normalize(s string) string { return strings.ReplaceAll(s, r.old, r.new) }

// unicodeNormalizer applies a Unicode normalization form (Qwen uses NFC).
type unicodeNormalizer struct{ form norm.Form }

func (u unicodeNormalizer) normalize(s string) string { return u.form.String(s) }

// patternJSON is the {"String": ...} | {"Regex": ...} pattern of Replace and
// Split components.
type patternJSON struct {
	String *string `json:"String"`
	Regex  *string `json:"Regex"`
}

func (p patternJSON) literal(component string) (string, error) {
	switch {
	case p.String != nil && *p.String != "":
		return *p.String, nil
	case p.Regex != nil:
		return "", fmt.Errorf("%w: %s with Regex pattern %q", ErrUnsupported, component, *p.Regex)
	default:
		return "", fmt.Errorf("%w: %s without a pattern", ErrInvalidInput, component)
	}
}

func parseNormalizer(raw json.RawMessage) (normalizer, error) {
	typ, ok, err := typeOf(raw)
	if err != nil || !ok {
		return nil, err
	}
	switch typ {
	case "Sequence":
		seq, err := parseSequence(raw, "normalizers", parseNormalizer)
		return normalizerSeq(seq), err
	case "Prepend":
		var p struct {
			Prepend string `json:"prepend"`
		}
		if err := json.Unmarshal(raw, &p); err != nil {
			return nil, fmt.Errorf("%w: Prepend: %w", ErrInvalidInput, err)
		}
		return prependNormalizer(p.Prepend), nil
	case "Replace":
		old, repl, err := parseReplace(raw, "normalizer")
		if err != nil {
			return nil, err
		}
		return replaceNormalizer{old: old, new: repl}, nil
	case "NFC":
		return unicodeNormalizer{norm.NFC}, nil
	case "NFD":
		return unicodeNormalizer{norm.NFD}, nil
	case "NFKC":
		return unicodeNormalizer{norm.NFKC}, nil
	case "NFKD":
		return unicodeNormalizer{norm.NFKD}, nil
	default:
		return nil, fmt.Errorf("%w: normalizer type %q", ErrUnsupported, typ)
	}
}

// preTokenizer splits pieces of a section into pre-tokens, each of which the
// model encodes on its own. section is the index of the section (text
// between added tokens), which Metaspace's prepend_scheme "first" needs.
type preTokenizer interface {
	preTokenize(pieces []string, section int) []string
}

type preTokenizerSeq []preTokenizer

func (p preTokenizerSeq) preTokenize(pieces []string, section int) []string {
	for _, x := range p {
		pieces = x.preTokenize(pieces, section)
	}
	return pieces
}

func parsePreTokenizer(raw json.RawMessage) (preTokenizer, error) {
	typ, ok, err := typeOf(raw)
	if err != nil || !ok {
		return nil, err
	}
	switch typ {
	case "Sequence":
		seq, err := parseSequence(raw, "pretokenizers", parsePreTokenizer)
		return preTokenizerSeq(seq), err
	case "Split":
		return parseSplit(raw)
	case "ByteLevel":
		var b struct {
			AddPrefixSpace bool  `json:"add_prefix_space"`
			UseRegex       *bool `json:"use_regex"`
		}
		if err := json.Unmarshal(raw, &b); err != nil {
			return nil, fmt.Errorf("%w: ByteLevel: %w", ErrInvalidInput, err)
		}
		return byteLevelPre{addPrefixSpace: b.AddPrefixSpace, useRegex: b.UseRegex == nil || *b.UseRegex}, nil
	case "Metaspace":
		var m struct {
			Replacement    string  `json:"replacement"`
			AddPrefixSpace *bool   `json:"add_prefix_space"`
			PrependScheme  *string `json:"prepend_scheme"`
			Split          *bool   `json:"split"`
		}
		if err := json.Unmarshal(raw, &m); err != nil {
			return nil, fmt.Errorf("%w: Metaspace: %w", ErrInvalidInput, err)
		}
		if m.Replacement == "" {
			return nil, fmt.Errorf("%w: Metaspace without a replacement", ErrInvalidInput)
		}
		p := metaspacePre{replacement: m.Replacement, scheme: "always", split: m.Split == nil || *m.Split}
		if m.PrependScheme != nil {
			p.scheme = *m.PrependScheme
		}
		switch p.scheme {
		case "always", "first", "never":
		default:
			return nil, fmt.Errorf("%w: Metaspace prepend_scheme %q", ErrUnsupported, p.scheme)
		}
		if m.AddPrefixSpace != nil && !*m.AddPrefixSpace {
			p.scheme = "never"
		}
		return p, nil
	case "Digits":
		var d struct {
			IndividualDigits bool `json:"individual_digits"`
		}
		if err := json.Unmarshal(raw, &d); err != nil {
			return nil, fmt.Errorf("%w: Digits: %w", ErrInvalidInput, err)
		}
		return digitsPre{individual: d.IndividualDigits}, nil
	default:
		return nil, fmt.Errorf("%w: pre_tokenizer type %q", ErrUnsupported, typ)
	}
}

// The Split regexes this package knows, each implemented by a hand-written
// matcher because Go's regexp lacks the lookahead in \s+(?!\S).
const (
	// llama3Pattern is Llama 3's (numbers in runs of 1–3 digits).
	llama3Pattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	// qwen2Pattern is Qwen 2's (one digit per pre-token).
	qwen2Pattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	// gpt2Pattern is GPT-2's, also ByteLevel's built-in regex.
	gpt2Pattern = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
)

func parseSplit(raw json.RawMessage) (preTokenizer, error) {
	var s struct {
		Pattern  patternJSON `json:"pattern"`
		Behavior string      `json:"behavior"`
		Invert   bool        `json:"invert"`
	}
	if err := json.Unmarshal(raw, &s); err != nil {
		return nil, fmt.Errorf("%w: Split: %w", ErrInvalidInput, err)
	}
	if s.Invert {
		return nil, fmt.Errorf("%w: Split with invert true", ErrUnsupported)
	}
	if s.Behavior != "Isolated" {
		return nil, fmt.Errorf("%w: Split behavior %q (only Isolated)", ErrUnsupported, s.Behavior)
	}
	if s.Pattern.Regex != nil {
		switch *s.Pattern.Regex {
		case llama3Pattern:
			return splitPre{m: gptMatcher{llama: true, maxDigits: 3}}, nil
		case qwen2Pattern:
			return splitPre{m: gptMatcher{llama: true, maxDigits: 1}}, nil
		case gpt2Pattern:
			return splitPre{m: gptMatcher{}}, nil
		}
		return nil, fmt.Errorf("%w: Split regex %q (known: the Llama 3, Qwen 2 and GPT-2 patterns)", ErrUnsupported, *s.Pattern.Regex)
	}
	lit, err := s.Pattern.literal("pre_tokenizer Split")
	if err != nil {
		return nil, err
	}
	return splitPre{m: literalMatcher(lit)}, nil
}

// matcher finds the end of the match starting at byte i of s, as a regex
// used with matchAll would; ok is false when nothing matches at i.
type matcher interface {
	matchAt(s string, i int) (end int, ok bool)
}

// splitPre is Split with behavior Isolated: matches become pre-tokens and
// so does the text between them.
type splitPre struct{ m matcher }

func (p splitPre) preTokenize(pieces []string, _ int) []string {
	out := make([]string, 0, len(pieces)*4)
	for _, s := range pieces {
		prev := 0
		for i := 0; i < len(s); {
			end, ok := p.m.matchAt(s, i)
			if !ok || end == i {
				_, n := utf8.DecodeRuneInString(s[i:])
				i += n
				continue
			}
			if prev < i {
				out = append(out, s[prev:i])
			}
			out = append(out, s[i:end])
			i, prev = end, end
		}
		if prev < len(s) {
			out = append(out, s[prev:])
		}
	}
	return out
}

type literalMatcher string

func (l literalMatcher) matchAt(s string, i int) (int, bool) {
	if strings.HasPrefix(s[i:], string(l)) {
		return i + len(l), true
	}
	return 0, false
}

// Character classes as JavaScript's regexp (the reference) defines them,
// from unicode_tables.go, with ASCII fast paths.
func isL(r rune) bool {
	if r < utf8.RuneSelf {
		return 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z'
	}
	return unicode.Is(letterTable, r)
}

func isN(r rune) bool {
	if r < utf8.RuneSelf {
		return '0' <= r && r <= '9'
	}
	return unicode.Is(numberTable, r)
}

func isJSSpace(r rune) bool {
	if r < utf8.RuneSelf {
		return r == ' ' || '\t' <= r && r <= '\r'
	}
	return unicode.Is(spaceTable, r)
}

// gptMatcher matches the GPT-2 family of split patterns. With llama it is
// the Llama 3 / Qwen 2 pattern:
//
//	(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,maxDigits}|
//	 ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//
// and without it GPT-2's:
//
//	's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// The alternatives are tried in order, each resolved as a backtracking
// engine would (the comments on each branch say how).
type gptMatcher struct {
	llama     bool
	maxDigits int
}

func (g gptMatcher) matchAt(s string, i int) (int, bool) {
	c0, n0 := utf8.DecodeRuneInString(s[i:])
	var c1 rune = -1
	if i+n0 < len(s) {
		c1, _ = utf8.DecodeRuneInString(s[i+n0:])
	}

	// Contractions. Only ASCII letters, case-insensitively for Llama
	// (the reference rewrites (?i:...) to explicit [sS] classes).
	if c0 == '\'' && c1 >= 0 {
		lower := func(r rune) rune {
			if g.llama && 'A' <= r && r <= 'Z' {
				return r + 'a' - 'A'
			}
			return r
		}
		var second rune
		switch lower(c1) {
		case 's', 't', 'm', 'd':
			return i + 2, true
		case 'r', 'v':
			second = 'e'
		case 'l':
			second = 'l'
		}
		if second != 0 && i+2 < len(s) && lower(rune(s[i+2])) == second {
			return i + 3, true
		}
	}

	letters := func(j int) int {
		for j < len(s) {
			r, n := utf8.DecodeRuneInString(s[j:])
			if !isL(r) {
				break
			}
			j += n
		}
		return j
	}

	if g.llama {
		// [^\r\n\p{L}\p{N}]?\p{L}+ : the optional character can only be
		// taken when a letter follows it.
		if isL(c0) {
			return letters(i + n0), true
		}
		if c0 != '\r' && c0 != '\n' && !isN(c0) && isL(c1) {
			return letters(i + n0), true
		}
		// \p{N}{1,maxDigits}
		if isN(c0) {
			j := i
			for k := 0; k < g.maxDigits && j < len(s); k++ {
				r, n := utf8.DecodeRuneInString(s[j:])
				if !isN(r) {
					break
				}
				j += n
			}
			return j, true
		}
	} else {
		// ' ?\p{L}+' and ' ?\p{N}+'
		if isL(c0) {
			return letters(i + n0), true
		}
		if c0 == ' ' && isL(c1) {
			return letters(i + n0), true
		}
		digits := func(j int) int {
			for j < len(s) {
				r, n := utf8.DecodeRuneInString(s[j:])
				if !isN(r) {
					break
				}
				j += n
			}
			return j
		}
		if isN(c0) {
			return digits(i + n0), true
		}
		if c0 == ' ' && isN(c1) {
			return digits(i + n0), true
		}
	}

	// ' ?[^\s\p{L}\p{N}]+' (Llama adds [\r\n]*): the space is optional, so
	// it is taken only when a symbol follows it.
	isSym := func(r rune) bool { return r >= 0 && !isJSSpace(r) && !isL(r) && !isN(r) }
	symStart := -1
	if isSym(c0) {
		symStart = i
	} else if c0 == ' ' && isSym(c1) {
		symStart = i + n0
	}
	if symStart >= 0 {
		j := symStart
		for j < len(s) {
			r, n := utf8.DecodeRuneInString(s[j:])
			if !isSym(r) {
				break
			}
			j += n
		}
		if g.llama {
			for j < len(s) && (s[j] == '\r' || s[j] == '\n') {
				j++
			}
		}
		return j, true
	}

	if !isJSSpace(c0) {
		return 0, false
	}
	// The whitespace run starting at i, and where its last \r or \n ends.
	j := i
	lastNL := -1
	runes := 0
	for j < len(s) {
		r, n := utf8.DecodeRuneInString(s[j:])
		if !isJSSpace(r) {
			break
		}
		j += n
		runes++
		if r == '\r' || r == '\n' {
			lastNL = j
		}
	}
	// \s*[\r\n]+ : greedy \s* backs off to the last line break of the run.
	if g.llama && lastNL >= 0 {
		return lastNL, true
	}
	// \s+(?!\S) : the whole run at the end of the text, else the run less
	// its last character (which then starts the next word), if that leaves
	// at least one.
	if j == len(s) {
		return j, true
	}
	if runes >= 2 {
		_, n := utf8.DecodeLastRuneInString(s[:j])
		return j - n, true
	}
	// \s+
	return j, true
}

// byteLevelPre maps every byte to its printable stand-in (GPT-2's
// bytes_to_unicode), optionally after splitting with the GPT-2 regex.
type byteLevelPre struct {
	addPrefixSpace bool
	useRegex       bool
}

func (b byteLevelPre) preTokenize(pieces []string, section int) []string {
	if b.useRegex || b.addPrefixSpace {
		var in []string
		for _, s := range pieces {
			if b.addPrefixSpace && !strings.HasPrefix(s, " ") {
				s = " " + s
			}
			in = append(in, s)
		}
		if b.useRegex {
			in = splitPre{m: gptMatcher{}}.preTokenize(in, section)
		}
		pieces = in
	}
	out := pieces[:0:0]
	for _, s := range pieces {
		out = append(out, byteLevelEncode(s))
	}
	return out
}

// appendByteLevel appends the byte-level form of s to dst.
func appendByteLevel(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		dst = utf8.AppendRune(dst, byteToRune[s[i]])
	}
	return dst
}

// detachByteLevel removes a trailing plain ByteLevel step (no prefix space)
// from a pre-tokenizer so the model can apply it (see bpeModel.byteLevel);
// GPT-2's regex, when ByteLevel asks for it, stays as a Split step.
func detachByteLevel(p preTokenizer) (preTokenizer, bool) {
	switch x := p.(type) {
	case byteLevelPre:
		if x.addPrefixSpace {
			return p, false
		}
		if x.useRegex {
			return splitPre{m: gptMatcher{}}, true
		}
		return nil, true
	case preTokenizerSeq:
		if len(x) == 0 {
			return p, false
		}
		last, ok := detachByteLevel(x[len(x)-1])
		if !ok {
			return p, false
		}
		seq := append(preTokenizerSeq{}, x[:len(x)-1]...)
		if last != nil {
			seq = append(seq, last)
		}
		if len(seq) == 0 {
			return nil, true
		}
		return seq, true
	}
	return p, false
}

func byteLevelEncode(s string) string {
	ascii := true
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf || byteToRune[s[i]] != rune(s[i]) {
			ascii = false
			break
		}
	}
	if ascii {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) * 2)
	for i := 0; i < len(s); i++ {
		b.WriteRune(byteToRune[s[i]])
	}
	return b.String()
}

// byteToRune and runeToByte are GPT-2's bytes_to_unicode: printable bytes
// stand for themselves, the rest are shifted to U+0100 and up.
var byteToRune, runeToByte = func() ([256]rune, [byteRuneLimit]byte) {
	var b2r [256]rune
	var r2b [byteRuneLimit]byte
	n := 0
	for b := 0; b < 256; b++ {
		if ('!' <= b && b <= '~') || (0xA1 <= b && b <= 0xAC) || (0xAE <= b && b <= 0xFF) {
			b2r[b] = rune(b)
		} else {
			b2r[b] = rune(256 + n)
			n++
		}
		r2b[b2r[b]] = byte(b)
	}
	return b2r, r2b
}()

// byteRuneLimit bounds the stand-in runes (U+0000..U+0143).
const byteRuneLimit = 0x144

// metaspacePre is the legacy SentencePiece pre-tokenizer: spaces become the
// replacement character (▁), which is prepended per scheme, and with split
// each ▁ starts a new pre-token.
type metaspacePre struct {
	replacement string
	scheme      string // always | first | never
	split       bool
}

func (m metaspacePre) preTokenize(pieces []string, section int) []string {
	var out []string
	for _, s := range pieces {
		s = strings.ReplaceAll(s, " ", m.replacement)
		if !strings.HasPrefix(s, m.replacement) &&
			(m.scheme == "always" || (m.scheme == "first" && section == 0)) {
			s = m.replacement + s
		}
		if !m.split {
			out = append(out, s)
			continue
		}
		// Split before every replacement character (MergedWithNext).
		start := 0
		for start+1 < len(s) {
			k := strings.Index(s[start+1:], m.replacement)
			if k < 0 {
				break
			}
			out = append(out, s[start:start+1+k])
			start = start + 1 + k
		}
		if start < len(s) {
			out = append(out, s[start:])
		}
	}
	return out
}

// digitsPre splits runs of ASCII digits from everything else (one digit per
// pre-token with individual).
type digitsPre struct{ individual bool }

func (d digitsPre) preTokenize(pieces []string, _ int) []string {
	var out []string
	isDigit := func(c byte) bool { return '0' <= c && c <= '9' }
	for _, s := range pieces {
		for i := 0; i < len(s); {
			j := i + 1
			if isDigit(s[i]) {
				if !d.individual {
					for j < len(s) && isDigit(s[j]) {
						j++
					}
				}
			} else {
				for j < len(s) && !isDigit(s[j]) {
					j++
				}
			}
			out = append(out, s[i:j])
			i = j
		}
	}
	return out
}

// parseReplace reads a Replace step (normalizer or decoder: the same JSON)
// whose pattern must be a literal string.
func parseReplace(raw json.RawMessage, kind string) (old, repl string, err error) {
	var r struct {
		Pattern patternJSON `json:"pattern"`
		Content string      `json:"content"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return "", "", fmt.Errorf("%w: Replace: %w", ErrInvalidInput, err)
	}
	old, err = r.Pattern.literal(kind + " Replace")
	return old, r.Content, err
}
