package trainer

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var tokenizerOf = map[string]string{"tiny-sp": "sentencepiece-bpe", "tiny-bl": "byte-level-bpe"}

// tinyWithTokenizer assembles a model directory from the test model and the
// tokenizer package's copy of its tokenizer files (symlinks, no copies).
func tinyWithTokenizer(t *testing.T, name string) string {
	t.Helper()
	dir := t.TempDir()
	link := func(src, dst string) {
		abs, err := filepath.Abs(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(abs, filepath.Join(dir, dst)); err != nil {
			t.Fatal(err)
		}
	}
	link(filepath.Join("testdata", name, "config.json"), "config.json")
	link(filepath.Join("testdata", name, "model.safetensors"), "model.safetensors")
	tk := filepath.Join("tokenizer", "testdata", tokenizerOf[name])
	link(filepath.Join(tk, "tokenizer.json"), "tokenizer.json")
	link(filepath.Join(tk, "tokenizer_config.json"), "tokenizer_config.json")
	return dir
}

func TestSampleStopStrings(t *testing.T) {
	for _, name := range tinyModels {
		t.Run(name, func(t *testing.T) {
			m, err := LoadModel(tinyWithTokenizer(t, name))
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if m.Tokenizer() == nil {
				t.Fatal("tokenizer not loaded")
			}
			prompt := m.Tokenizer().Encode("Once upon a time", true)
			full, err := m.Sample(context.Background(), [][]int{prompt}, 1, greedyParams(12), nil)
			if err != nil {
				t.Fatal(err)
			}
			s := full[0][0]
			if s.Text != m.Tokenizer().Decode(s.Tokens, true) {
				t.Errorf("Text %q is not the decoded tokens", s.Text)
			}
			// Stop on a piece of text the greedy continuation is known to produce.
			text := []rune(s.Text)
			if len(text) < 6 {
				t.Skipf("continuation %q too short to cut", s.Text)
			}
			stop := string(text[len(text)/2 : len(text)/2+2])
			p := greedyParams(12)
			p.Stop = []string{"\x00never", stop}
			got, err := m.Sample(context.Background(), [][]int{prompt}, 1, p, nil)
			if err != nil {
				t.Fatal(err)
			}
			g := got[0][0]
			wantText := s.Text[:strings.Index(s.Text, stop)]
			if g.StopReason != StopStop || g.Text != wantText {
				t.Errorf("stop %q: text %q (%s), want %q", stop, g.Text, g.StopReason, wantText)
			}
			if len(g.Tokens) > len(s.Tokens) || len(g.Tokens) != len(g.Logprobs) {
				t.Errorf("stopped sample has %d tokens, %d logprobs (full run %d)", len(g.Tokens), len(g.Logprobs), len(s.Tokens))
			}
			for i := range g.Tokens {
				if g.Tokens[i] != s.Tokens[i] {
					t.Fatalf("stopped tokens %v are not a prefix of %v", g.Tokens, s.Tokens)
				}
			}
		})
	}
}

func TestUnsupportedTokenizer(t *testing.T) {
	dir := copyModel(t, "tiny-sp")
	tok := `{"model": {"type": "WordPiece", "vocab": {"a": 0}}, "added_tokens": []}`
	if err := os.WriteFile(filepath.Join(dir, "tokenizer.json"), []byte(tok), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := LoadModel(dir)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "WordPiece") {
		t.Errorf("err = %v, want ErrUnsupported naming WordPiece", err)
	}
}
