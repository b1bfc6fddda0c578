package main

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/signal-p2p/signal/trainer"
)

// copyDir copies the regular files of src into a new directory.
func copyDir(t *testing.T, src string, extra ...string) string {
	t.Helper()
	dst := t.TempDir()
	for _, dir := range append([]string{src}, extra...) {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if !e.Type().IsRegular() {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return dst
}

// TestModelMergeAndExportGGUF runs the two export commands on the tiny
// test model: the merged directory loads and computes base + adapter, and
// export-gguf writes a model and an adapter file (package export checks
// them against transformers and llama.cpp).
func TestModelMergeAndExportGGUF(t *testing.T) {
	tok := filepath.Join("..", "..", "trainer", "tokenizer", "testdata", "sentencepiece-bpe")
	base := copyDir(t, tinySP, tok)
	adapter := filepath.Join(tinySP, "adapter")
	out := filepath.Join(t.TempDir(), "merged")
	if _, err := runModelCmd(t, "merge", "--model", base, "--adapter", adapter, "--out", out, "--dtype", "f32"); err != nil {
		t.Fatal(err)
	}
	// Both in f32: the merge is f32 arithmetic (its output here is F32), and
	// the BF16 base would otherwise be multiplied in bf16.
	m, err := trainer.LoadModelWith(base, trainer.LoadOptions{Precision: trainer.PrecisionF32})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	l, err := trainer.LoadAdapter(adapter, m)
	if err != nil {
		t.Fatal(err)
	}
	merged, err := trainer.LoadModel(out)
	if err != nil {
		t.Fatal(err)
	}
	defer merged.Close()
	tokens := []int{1, 415, 5255, 3290, 356, 272, 1610, 28723}
	want, err := m.Logits(context.Background(), tokens, l)
	if err != nil {
		t.Fatal(err)
	}
	got, err := merged.Logits(context.Background(), tokens, nil)
	if err != nil {
		t.Fatal(err)
	}
	var diff, scale float64
	for i := range want {
		diff = math.Max(diff, math.Abs(float64(got[i]-want[i])))
		scale = math.Max(scale, math.Abs(float64(want[i])))
	}
	if diff > 1e-4*scale {
		t.Errorf("merged logits differ from base + adapter by %.3g (largest logit %.3g)", diff, scale)
	}
	if merged.Tokenizer() == nil {
		t.Error("the merged directory lost the tokenizer")
	}

	for _, args := range [][]string{
		{"export-gguf", "--model", base, "--out", filepath.Join(t.TempDir(), "m.gguf"), "--dtype", "bf16"},
		{"export-gguf", "--model", base, "--adapter", adapter, "--out", filepath.Join(t.TempDir(), "a.gguf")},
	} {
		raw, err := runModelCmd(t, args...)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		var res struct{ Out string }
		if err := json.Unmarshal(raw, &res); err != nil {
			t.Fatalf("%v: %s", err, raw)
		}
		b, err := os.ReadFile(res.Out)
		if err != nil || len(b) < 4 || string(b[:4]) != "GGUF" {
			t.Errorf("%v: %s is not a GGUF file (%v)", args, res.Out, err)
		}
	}

	bad := [][]string{
		{"merge", "--model", base, "--adapter", adapter, "--out", out},                                   // not empty
		{"merge", "--model", base, "--adapter", adapter, "--out", t.TempDir(), "--dtype", "q8_0"},        // GGUF only
		{"export-gguf", "--model", tinySP, "--out", filepath.Join(t.TempDir(), "x.gguf")},                // no tokenizer
		{"export-gguf", "--model", base, "--out", filepath.Join(t.TempDir(), "x.gguf"), "--dtype", "q4"}, // unknown
	}
	for _, args := range bad {
		if _, err := runModelCmd(t, args...); !errors.Is(err, trainer.ErrInvalidInput) {
			t.Errorf("%v: err = %v, want ErrInvalidInput", args, err)
		}
	}
}
