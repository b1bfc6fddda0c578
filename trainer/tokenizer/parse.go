package tokenizer

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// fileError carries which of the two files an error is about, so Load and
// Parse can name it.
type fileError struct {
	config bool
	err    error
}

func (e *fileError) Error() string { return e.err.Error() }
func (e *fileError) Unwrap() error { return e.err }

func tokErr(err error) error  { return &fileError{err: err} }
func confErr(err error) error { return &fileError{config: true, err: err} }

type tokenizerFile struct {
	AddedTokens   []addedTokenJSON `json:"added_tokens"`
	Normalizer    json.RawMessage  `json:"normalizer"`
	PreTokenizer  json.RawMessage  `json:"pre_tokenizer"`
	PostProcessor json.RawMessage  `json:"post_processor"`
	Decoder       json.RawMessage  `json:"decoder"`
}

type addedTokenJSON struct {
	ID         *int64 `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type configFile struct {
	BOS                  json.RawMessage   `json:"bos_token"`
	EOS                  json.RawMessage   `json:"eos_token"`
	AddBOS               *bool             `json:"add_bos_token"`
	AddEOS               *bool             `json:"add_eos_token"`
	CleanUp              *bool             `json:"clean_up_tokenization_spaces"`
	TokenizerClass       string            `json:"tokenizer_class"`
	AdditionalSpecial    []json.RawMessage `json:"additional_special_tokens"`
	RemoveSpace          bool              `json:"remove_space"`
	LowercaseStripAccent bool              `json:"do_lowercase_and_remove_accent"`
}

// typeOf reads the "type" field of a component; "" for JSON null.
func typeOf(raw json.RawMessage) (string, bool, error) {
	if isNull(raw) {
		return "", false, nil
	}
	var h struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(raw, &h); err != nil {
		return "", true, fmt.Errorf("%w: %w", ErrInvalidInput, err)
	}
	return h.Type, true, nil
}

func isNull(raw json.RawMessage) bool {
	b := bytes.TrimSpace(raw)
	return len(b) == 0 || bytes.Equal(b, []byte("null"))
}

func parse(tokenizerJSON, configJSON []byte) (*Tokenizer, error) {
	f, sm, err := scanTokenizerFile(tokenizerJSON)
	if err != nil {
		return nil, tokErr(err)
	}
	var c configFile
	if len(bytes.TrimSpace(configJSON)) > 0 {
		if err := json.Unmarshal(configJSON, &c); err != nil {
			return nil, confErr(fmt.Errorf("%w: %w", ErrInvalidInput, err))
		}
	}
	if c.RemoveSpace {
		return nil, confErr(fmt.Errorf("%w: remove_space true", ErrUnsupported))
	}
	if c.LowercaseStripAccent {
		return nil, confErr(fmt.Errorf("%w: do_lowercase_and_remove_accent true", ErrUnsupported))
	}

	t := &Tokenizer{bos: -1, eos: -1, cleanUp: true}
	if c.CleanUp != nil {
		t.cleanUp = *c.CleanUp
	}
	m, err := parseModel(sm)
	if err != nil {
		return nil, tokErr(err)
	}
	t.model = m
	if err := t.addTokens(f.AddedTokens); err != nil {
		return nil, tokErr(err)
	}
	if t.normalizer, err = parseNormalizer(f.Normalizer); err != nil {
		return nil, tokErr(fmt.Errorf("normalizer: %w", err))
	}
	if t.preTokenizer, err = parsePreTokenizer(f.PreTokenizer); err != nil {
		return nil, tokErr(fmt.Errorf("pre_tokenizer: %w", err))
	}
	t.preTokenizer, m.byteLevel = detachByteLevel(t.preTokenizer)
	if t.decoder, err = parseDecoder(f.Decoder); err != nil {
		return nil, tokErr(fmt.Errorf("decoder: %w", err))
	}
	if t.template, err = t.parsePostProcessor(f.PostProcessor); err != nil {
		return nil, tokErr(fmt.Errorf("post_processor: %w", err))
	}

	// Special tokens, by content, as the reference collects them: added
	// tokens marked special plus additional_special_tokens.
	special := map[string]bool{}
	for _, a := range t.added {
		if a.special {
			special[a.content] = true
		}
	}
	for i, raw := range c.AdditionalSpecial {
		s, ok, err := tokenString(raw)
		if err != nil || !ok {
			return nil, confErr(fmt.Errorf("%w: additional_special_tokens[%d]: %s", ErrInvalidInput, i, raw))
		}
		special[s] = true
	}
	t.specialIDs = map[int32]bool{}
	for s := range special {
		if id, ok := m.vocab[s]; ok {
			t.specialIDs[id] = true
		}
	}

	if t.bos, err = t.configToken(c.BOS, "bos_token"); err != nil {
		return nil, confErr(err)
	}
	if t.eos, err = t.configToken(c.EOS, "eos_token"); err != nil {
		return nil, confErr(err)
	}
	// transformers' LlamaTokenizerFast rebuilds its post-processor from
	// add_bos_token/add_eos_token; honour them when the config sets either.
	switch c.TokenizerClass {
	case "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast":
		if c.AddBOS != nil || c.AddEOS != nil {
			addBOS := c.AddBOS == nil || *c.AddBOS
			addEOS := c.AddEOS != nil && *c.AddEOS
			var tmpl []templatePiece
			if addBOS {
				if t.bos < 0 {
					return nil, confErr(fmt.Errorf("%w: add_bos_token set but no bos_token", ErrInvalidInput))
				}
				tmpl = append(tmpl, templatePiece{ids: []int32{t.bos}})
			}
			tmpl = append(tmpl, templatePiece{sequence: true})
			if addEOS {
				if t.eos < 0 {
					return nil, confErr(fmt.Errorf("%w: add_eos_token set but no eos_token", ErrInvalidInput))
				}
				tmpl = append(tmpl, templatePiece{ids: []int32{t.eos}})
			}
			t.template = tmpl
		}
	}

	for id := range m.tokens {
		if m.assigned(int32(id)) {
			t.vocab = id + 1
		}
	}
	return t, nil
}

// tokenString reads a token given either as a string or as an AddedToken
// object ({"content": ...}).
func tokenString(raw json.RawMessage) (string, bool, error) {
	if isNull(raw) {
		return "", false, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, true, nil
	}
	var o struct {
		Content *string `json:"content"`
	}
	if err := json.Unmarshal(raw, &o); err != nil || o.Content == nil {
		return "", false, fmt.Errorf("%w: token %s is neither a string nor an object with content", ErrInvalidInput, raw)
	}
	return *o.Content, true, nil
}

func (t *Tokenizer) configToken(raw json.RawMessage, field string) (int32, error) {
	s, ok, err := tokenString(raw)
	if err != nil {
		return -1, fmt.Errorf("%s: %w", field, err)
	}
	if !ok {
		return -1, nil
	}
	id, found := t.model.vocab[s]
	if !found {
		return -1, fmt.Errorf("%w: %s %q is not in the vocabulary", ErrInvalidInput, field, s)
	}
	return id, nil
}

// addTokens registers added tokens in the vocabulary (the reference lets an
// added token override a model token of the same content or id).
func (t *Tokenizer) addTokens(list []addedTokenJSON) error {
	t.addedByID = map[int32]bool{}
	t.addedTrie = newTrie()
	for i, a := range list {
		if a.ID == nil || *a.ID < 0 || *a.ID >= maxTokenID {
			return fmt.Errorf("%w: added_tokens[%d] %q: missing or bad id", ErrInvalidInput, i, a.Content)
		}
		if a.Content == "" {
			return fmt.Errorf("%w: added_tokens[%d]: empty content", ErrInvalidInput, i)
		}
		id := int32(*a.ID)
		t.model.setToken(a.Content, id)
		t.added = append(t.added, addedToken{
			content: a.Content, id: id, lstrip: a.LStrip, rstrip: a.RStrip,
			singleWord: a.SingleWord, special: a.Special,
		})
		t.addedByID[id] = true
	}
	// Later duplicates win in the reference's map; index the trie so.
	for i := range t.added {
		t.addedTrie.insert(t.added[i].content, i)
	}
	return nil
}

// templatePiece is one item of a post-processing template: either the
// encoded text or fixed special ids.
type templatePiece struct {
	sequence bool
	ids      []int32
}

func (t *Tokenizer) parsePostProcessor(raw json.RawMessage) ([]templatePiece, error) {
	plain := []templatePiece{{sequence: true}}
	typ, ok, err := typeOf(raw)
	if err != nil || !ok {
		return plain, err
	}
	switch typ {
	case "ByteLevel":
		// Only trims offsets, which this package does not report.
		return plain, nil
	case "TemplateProcessing":
		return t.parseTemplate(raw)
	case "Sequence":
		var s struct {
			Processors []json.RawMessage `json:"processors"`
		}
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("%w: Sequence: %w", ErrInvalidInput, err)
		}
		out := plain
		templates := 0
		for i, p := range s.Processors {
			tmpl, err := t.parsePostProcessor(p)
			if err != nil {
				return nil, fmt.Errorf("processors[%d]: %w", i, err)
			}
			if len(tmpl) != 1 || !tmpl[0].sequence {
				templates++
				out = tmpl
			}
		}
		if templates > 1 {
			return nil, fmt.Errorf("%w: Sequence with %d templates", ErrUnsupported, templates)
		}
		return out, nil
	default:
		return nil, fmt.Errorf("%w: post_processor type %q", ErrUnsupported, typ)
	}
}

func (t *Tokenizer) parseTemplate(raw json.RawMessage) ([]templatePiece, error) {
	var p struct {
		Single []struct {
			SpecialToken *struct {
				ID string `json:"id"`
			} `json:"SpecialToken"`
			Sequence *struct {
				ID string `json:"id"`
			} `json:"Sequence"`
		} `json:"single"`
		SpecialTokens map[string]struct {
			IDs []int64 `json:"ids"`
		} `json:"special_tokens"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, fmt.Errorf("%w: TemplateProcessing: %w", ErrInvalidInput, err)
	}
	var out []templatePiece
	seq := 0
	for i, item := range p.Single {
		switch {
		case item.Sequence != nil:
			if item.Sequence.ID != "A" {
				return nil, fmt.Errorf("%w: TemplateProcessing single[%d]: sequence %q in a single template", ErrInvalidInput, i, item.Sequence.ID)
			}
			seq++
			out = append(out, templatePiece{sequence: true})
		case item.SpecialToken != nil:
			name := item.SpecialToken.ID
			var ids []int32
			if st, ok := p.SpecialTokens[name]; ok && len(st.IDs) > 0 {
				for _, id := range st.IDs {
					if id < 0 || id >= maxTokenID {
						return nil, fmt.Errorf("%w: TemplateProcessing special token %q id %d", ErrInvalidInput, name, id)
					}
					ids = append(ids, int32(id))
				}
			} else if id, ok := t.model.vocab[name]; ok {
				ids = []int32{id}
			} else {
				return nil, fmt.Errorf("%w: TemplateProcessing special token %q is not in the vocabulary", ErrInvalidInput, name)
			}
			out = append(out, templatePiece{ids: ids})
		default:
			return nil, fmt.Errorf("%w: TemplateProcessing single[%d]: neither SpecialToken nor Sequence", ErrInvalidInput, i)
		}
	}
	if seq != 1 {
		return nil, fmt.Errorf("%w: TemplateProcessing single template has %d sequences, want 1", ErrInvalidInput, seq)
	}
	return out, nil
}

// parseSequence parses the stages of a Sequence component (a normalizer,
// pre-tokenizer or decoder) listed under key, dropping null stages.
func parseSequence[T comparable](raw json.RawMessage, key string, parse func(json.RawMessage) (T, error)) ([]T, error) {
	var s map[string]json.RawMessage
	if err := json.Unmarshal(raw, &s); err != nil {
		return nil, fmt.Errorf("%w: Sequence: %w", ErrInvalidInput, err)
	}
	var stages []json.RawMessage
	if list, ok := s[key]; ok && !isNull(list) {
		if err := json.Unmarshal(list, &stages); err != nil {
			return nil, fmt.Errorf("%w: Sequence %s: %w", ErrInvalidInput, key, err)
		}
	}
	var zero T
	var seq []T
	for i, r := range stages {
		stage, err := parse(r)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: %w", key, i, err)
		}
		if stage != zero {
			seq = append(seq, stage)
		}
	}
	return seq, nil
}
