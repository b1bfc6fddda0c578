package tokenizer

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// synthFile is a small SentencePiece-style tokenizer.json as a map, for
// tests to alter one component at a time. Ids: see vocab.
func synthFile() map[string]any {
	return map[string]any{
		"version":    "1.0",
		"truncation": nil,
		"padding":    nil,
		"added_tokens": []any{
			map[string]any{"id": 0, "content": "<unk>", "special": true},
			map[string]any{"id": 1, "content": "<s>", "special": true},
			map[string]any{"id": 2, "content": "</s>", "special": true},
		},
		"normalizer": map[string]any{"type": "Sequence", "normalizers": []any{
			map[string]any{"type": "Prepend", "prepend": "▁"},
			map[string]any{"type": "Replace", "pattern": map[string]any{"String": " "}, "content": "▁"},
		}},
		"pre_tokenizer": nil,
		"post_processor": map[string]any{
			"type":           "TemplateProcessing",
			"single":         []any{map[string]any{"SpecialToken": map[string]any{"id": "<s>", "type_id": 0}}, map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}}},
			"special_tokens": map[string]any{"<s>": map[string]any{"id": "<s>", "ids": []any{1}, "tokens": []any{"<s>"}}},
		},
		"decoder": map[string]any{"type": "Sequence", "decoders": []any{
			map[string]any{"type": "Replace", "pattern": map[string]any{"String": "▁"}, "content": " "},
			map[string]any{"type": "ByteFallback"},
			map[string]any{"type": "Fuse"},
			map[string]any{"type": "Strip", "content": " ", "start": 1, "stop": 0},
		}},
		"model": map[string]any{
			"type": "BPE", "unk_token": "<unk>", "byte_fallback": true, "fuse_unk": true,
			"vocab": map[string]any{
				"<unk>": 0, "<s>": 1, "</s>": 2, "<0x41>": 3, "<0xC3>": 4, "<0xA9>": 5,
				"▁": 6, "a": 7, "b": 8, "▁a": 9, "▁b": 10, "ab": 11, "▁ab": 12, "1": 13, "2": 14, "12": 15,
			},
			"merges": []any{"▁ a", "a b", "▁a b", "▁ b", "1 2"},
		},
	}
}

func synthConfig() map[string]any {
	return map[string]any{"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "LlamaTokenizer", "add_bos_token": true, "add_eos_token": false, "clean_up_tokenization_spaces": false}
}

// writeSynth writes the two files into a temporary directory.
func writeSynth(t *testing.T, file, config map[string]any) string {
	t.Helper()
	dir := t.TempDir()
	for name, v := range map[string]map[string]any{TokenizerFile: file, ConfigFile: config} {
		if v == nil {
			continue
		}
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func mustSynth(t *testing.T, file, config map[string]any) *Tokenizer {
	t.Helper()
	tok, err := Load(writeSynth(t, file, config))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestSynthSentencePiece(t *testing.T) {
	tok := mustSynth(t, synthFile(), synthConfig())
	// "ab b": normalized "▁ab▁b"; merges ▁a(0) then ▁a+b(2) and ▁+b(3).
	if got, want := tok.Encode("ab b", false), []int{12, 10}; !slices.Equal(got, want) {
		t.Errorf("Encode = %v, want %v", got, want)
	}
	if got, want := tok.Encode("ab b", true), []int{1, 12, 10}; !slices.Equal(got, want) {
		t.Errorf("Encode special = %v, want %v", got, want)
	}
	// "A" and "é" are not in the vocabulary: byte fallback; "Z" has no
	// byte token: <unk>, and consecutive unknowns fuse into one.
	if got, want := tok.Encode("aAé", false), []int{9, 3, 4, 5}; !slices.Equal(got, want) {
		t.Errorf("byte fallback = %v, want %v", got, want)
	}
	if got, want := tok.Encode("aZZ", false), []int{9, 0}; !slices.Equal(got, want) {
		t.Errorf("fused unk = %v, want %v", got, want)
	}
	if got := tok.Decode([]int{1, 12, 10, 3, 4, 5, 2}, false); got != "<s> ab bAé</s>" {
		t.Errorf("Decode = %q", got)
	}
	if got := tok.Decode([]int{1, 12, 10, 2}, true); got != "ab b" {
		t.Errorf("Decode skip special = %q", got)
	}
}

func TestSynthMergePairs(t *testing.T) {
	f := synthFile()
	var pairs []any
	for _, m := range f["model"].(map[string]any)["merges"].([]any) {
		a, b, _ := strings.Cut(m.(string), " ")
		pairs = append(pairs, []any{a, b})
	}
	f["model"].(map[string]any)["merges"] = pairs
	tok := mustSynth(t, f, synthConfig())
	if got, want := tok.Encode("ab b 12", false), []int{12, 10, 6, 15}; !slices.Equal(got, want) {
		t.Errorf("Encode with pair merges = %v, want %v", got, want)
	}
}

func TestSynthLlamaAddEOS(t *testing.T) {
	c := synthConfig()
	c["add_eos_token"] = true
	tok := mustSynth(t, synthFile(), c)
	if got, want := tok.Encode("a", true), []int{1, 9, 2}; !slices.Equal(got, want) {
		t.Errorf("Encode with add_eos_token = %v, want %v", got, want)
	}
	c["add_bos_token"] = false
	tok = mustSynth(t, synthFile(), c)
	if got, want := tok.Encode("a", true), []int{9, 2}; !slices.Equal(got, want) {
		t.Errorf("Encode without add_bos_token = %v, want %v", got, want)
	}
}

// TestSynthMetaspace: the legacy pre-tokenizer form (Mistral, older Llama
// files): no normalizer, Metaspace splits before each ▁.
func TestSynthMetaspace(t *testing.T) {
	for _, tc := range []struct {
		scheme string
		split  bool
		text   string
		want   []int
	}{
		{"always", true, "ab b", []int{12, 10}},
		{"always", false, "ab b", []int{12, 10}},
		{"first", true, "a</s>a", []int{9, 2, 7}},  // no ▁ after the first section
		{"always", true, "a</s>a", []int{9, 2, 9}}, // ▁ before every section
		{"never", true, "a b", []int{7, 10}},
	} {
		f := synthFile()
		f["normalizer"] = nil
		f["pre_tokenizer"] = map[string]any{"type": "Metaspace", "replacement": "▁", "prepend_scheme": tc.scheme, "split": tc.split}
		f["decoder"] = map[string]any{"type": "Metaspace", "replacement": "▁", "prepend_scheme": tc.scheme}
		tok := mustSynth(t, f, synthConfig())
		if got := tok.Encode(tc.text, false); !slices.Equal(got, tc.want) {
			t.Errorf("%s split=%v: Encode(%q) = %v, want %v", tc.scheme, tc.split, tc.text, got, tc.want)
		}
	}
	f := synthFile()
	f["decoder"] = map[string]any{"type": "Metaspace", "replacement": "▁", "add_prefix_space": true}
	if got := mustSynth(t, f, synthConfig()).Decode([]int{12, 10}, false); got != "ab b" {
		t.Errorf("Metaspace decode = %q, want %q", got, "ab b")
	}
}

func TestSynthAddedTokenFlags(t *testing.T) {
	f := synthFile()
	f["added_tokens"] = append(f["added_tokens"].([]any),
		map[string]any{"id": 16, "content": "<m>", "lstrip": true, "rstrip": true},
		map[string]any{"id": 17, "content": "ab", "single_word": true},
	)
	tok := mustSynth(t, f, synthConfig())
	// lstrip/rstrip eat the spaces around <m>, so "a" and "b" become
	// separate sections, each with its own ▁.
	if got, want := tok.Encode("a  <m>  b", false), []int{9, 16, 10}; !slices.Equal(got, want) {
		t.Errorf("lstrip/rstrip: %v, want %v", got, want)
	}
	// single_word: "ab" alone is the added token; inside "bab" it is not.
	if got, want := tok.Encode("ab", false), []int{17}; !slices.Equal(got, want) {
		t.Errorf("single word alone: %v, want %v", got, want)
	}
	if got := tok.Encode("bab", false); slices.Contains(got, 17) {
		t.Errorf("single word inside a word matched: %v", got)
	}
	if got := tok.VocabSize(); got != 18 {
		t.Errorf("VocabSize = %d, want 18", got)
	}
}

func TestSynthDigits(t *testing.T) {
	f := synthFile()
	f["pre_tokenizer"] = map[string]any{"type": "Digits", "individual_digits": true}
	tok := mustSynth(t, f, synthConfig())
	// Digits splits "▁12" into "▁", "1", "2", so "1 2" never merges.
	if got, want := tok.Encode("12", false), []int{6, 13, 14}; !slices.Equal(got, want) {
		t.Errorf("individual digits: %v, want %v", got, want)
	}
}

func TestMatchers(t *testing.T) {
	split := func(m matcher, s string) []string { return splitPre{m: m}.preTokenize([]string{s}, 0) }
	for _, tc := range []struct {
		m    matcher
		in   string
		want []string
	}{
		{gptMatcher{}, "Hello  world's 12345!!", []string{"Hello", " ", " world", "'s", " 12345", "!!"}},
		{gptMatcher{}, "I'M  \n x", []string{"I", "'", "M", "  \n", " x"}}, // \s+(?!\S) backs off one
		{gptMatcher{llama: true, maxDigits: 3}, "I'M 1234567", []string{"I", "'M", " ", "123", "456", "7"}},
		{gptMatcher{llama: true, maxDigits: 1}, "x 123", []string{"x", " ", "1", "2", "3"}},
		{gptMatcher{llama: true, maxDigits: 3}, "a \n\n b  ", []string{"a", " \n\n", " b", "  "}},
		{gptMatcher{llama: true, maxDigits: 3}, "x...\r\n\ty", []string{"x", "...\r\n", "\ty"}},
		{literalMatcher("--"), "a--b----c", []string{"a", "--", "b", "--", "--", "c"}},
	} {
		if got := split(tc.m, tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("%T%+v split %q = %q, want %q", tc.m, tc.m, tc.in, got, tc.want)
		}
	}
}

// TestLoadErrors: each bad or unsupported file is an error that names the
// file, the component and the offending value, and wraps the right sentinel.
func TestLoadErrors(t *testing.T) {
	set := func(path string, v any) func(f, c map[string]any) {
		return func(f, c map[string]any) {
			m := f
			keys := strings.Split(path, ".")
			if keys[0] == "config" {
				m, keys = c, keys[1:]
			}
			for _, k := range keys[:len(keys)-1] {
				m = m[k].(map[string]any)
			}
			m[keys[len(keys)-1]] = v
		}
	}
	for _, tc := range []struct {
		name   string
		mutate func(f, c map[string]any)
		raw    string // replaces tokenizer.json when set
		want   error
		says   []string
	}{
		{"model type", set("model.type", "Unigram"), "", ErrUnsupported, []string{"tokenizer.json", `"Unigram"`}},
		{"normalizer", set("normalizer", map[string]any{"type": "BertNormalizer"}), "", ErrUnsupported, []string{"normalizer", `"BertNormalizer"`}},
		{"nested normalizer", set("normalizer.normalizers", []any{map[string]any{"type": "Lowercase"}}), "", ErrUnsupported, []string{"normalizers[0]", `"Lowercase"`}},
		{"replace regex", set("normalizer", map[string]any{"type": "Replace", "pattern": map[string]any{"Regex": " +"}, "content": "▁"}), "", ErrUnsupported, []string{"Regex", `" +"`}},
		{"pre-tokenizer", set("pre_tokenizer", map[string]any{"type": "BertPreTokenizer"}), "", ErrUnsupported, []string{"pre_tokenizer", `"BertPreTokenizer"`}},
		{"split regex", set("pre_tokenizer", map[string]any{"type": "Split", "pattern": map[string]any{"Regex": `\w+`}, "behavior": "Isolated"}), "", ErrUnsupported, []string{"Split regex", `\\w+`}},
		{"split behavior", set("pre_tokenizer", map[string]any{"type": "Split", "pattern": map[string]any{"String": "x"}, "behavior": "Contiguous"}), "", ErrUnsupported, []string{`"Contiguous"`}},
		{"decoder", set("decoder", map[string]any{"type": "WordPiece"}), "", ErrUnsupported, []string{"decoder", `"WordPiece"`}},
		{"post-processor", set("post_processor", map[string]any{"type": "BertProcessing"}), "", ErrUnsupported, []string{"post_processor", `"BertProcessing"`}},
		{"dropout", set("model.dropout", 0.1), "", ErrUnsupported, []string{"dropout", "0.1"}},
		{"merge token", set("model.merges", []any{"▁ a", "a zz"}), "", ErrInvalidInput, []string{"merges[1]", `"zz"`}},
		{"merge parts", set("model.merges", []any{"▁ a b"}), "", ErrInvalidInput, []string{"merges[0]"}},
		{"negative id", set("model.vocab.a", -3), "", ErrInvalidInput, []string{`"a"`, "-3"}},
		{"huge id", set("model.vocab.a", 1<<40), "", ErrInvalidInput, []string{`"a"`, "1099511627776"}},
		{"huge added id", set("added_tokens", []any{map[string]any{"id": 1 << 30, "content": "<x>"}}), "", ErrInvalidInput, []string{"added_tokens[0]"}},
		{"float id", set("model.vocab.a", 1.5), "", ErrInvalidInput, []string{"integer"}},
		{"unk token", set("model.unk_token", "<nope>"), "", ErrInvalidInput, []string{"unk_token", `"<nope>"`}},
		{"added id", set("added_tokens", []any{map[string]any{"content": "<x>"}}), "", ErrInvalidInput, []string{"added_tokens[0]", `"<x>"`}},
		{"template token", set("post_processor.special_tokens", map[string]any{}), "", nil, nil}, // falls back to the vocabulary
		{"bos token", set("config.bos_token", "<bos>"), "", ErrInvalidInput, []string{"tokenizer_config.json", "bos_token", `"<bos>"`}},
		{"bos object", set("config.bos_token", map[string]any{"__type": "AddedToken"}), "", ErrInvalidInput, []string{"tokenizer_config.json", "bos_token"}},
		{"remove_space", set("config.remove_space", true), "", ErrUnsupported, []string{"remove_space"}},
		{"truncated", nil, `{"model": {"type": "BPE", "vocab": {"a": 0`, ErrInvalidInput, []string{"tokenizer.json", "offset 42"}},
		{"not json", nil, `<html>`, ErrInvalidInput, []string{"tokenizer.json"}},
		{"trailing data", nil, `{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}} x`, ErrInvalidInput, []string{"after the top-level"}},
		{"no model", nil, `{"added_tokens": []}`, ErrInvalidInput, []string{"no model"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, c := synthFile(), synthConfig()
			if tc.mutate != nil {
				tc.mutate(f, c)
			}
			dir := writeSynth(t, f, c)
			if tc.raw != "" {
				if err := os.WriteFile(filepath.Join(dir, TokenizerFile), []byte(tc.raw), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			_, err := Load(dir)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Load: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Load error = %v, want %v", err, tc.want)
			}
			for _, s := range tc.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %s", err, s)
				}
			}
		})
	}
}

func TestLoadMissing(t *testing.T) {
	_, err := Load(t.TempDir())
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load(empty dir) = %v, want ErrNotExist", err)
	}
	// tokenizer_config.json is optional: no BOS/EOS then, clean-up on.
	tok, err := Load(writeSynth(t, synthFile(), nil))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := tok.BOS(); ok {
		t.Error("BOS without a config")
	}
	if _, err := Parse([]byte(`{}`), []byte(`{`)); !errors.Is(err, ErrInvalidInput) || !strings.Contains(err.Error(), ConfigFile) {
		t.Errorf("Parse with a bad config = %v", err)
	}
}

// FuzzParse: no tokenizer.json crashes the loader.
func FuzzParse(f *testing.F) {
	b, _ := json.Marshal(synthFile())
	f.Add(b)
	f.Add([]byte(`{"model": {"type": "BPE", "vocab": {"a\u0000\ud800": 0}, "merges": [["a","a"]]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		tok, err := Parse(data, nil)
		if err != nil {
			if !errors.Is(err, ErrInvalidInput) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("error without a sentinel: %v", err)
			}
			return
		}
		ids := tok.Encode("a b ab 12 é", true)
		tok.Decode(ids, false)
	})
}
