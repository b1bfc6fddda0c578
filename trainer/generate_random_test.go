package trainer

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

func TestGenerateRandomModel(t *testing.T) {
	cfg := Config{HiddenSize: 32, IntermediateSize: 48, NumHiddenLayers: 2, NumAttentionHeads: 4,
		NumKeyValueHeads: 2, VocabSize: 300, MaxPositionEmbeddings: 64, EOSTokenID: TokenIDs{2}}
	a, b := t.TempDir(), t.TempDir()
	if err := GenerateRandomModel(a, cfg, 11, filepath.Join("tokenizer", "testdata", "sentencepiece-bpe")); err == nil {
		// The sentencepiece tokenizer has 32000 ids: more than this vocab.
		if _, err := LoadModel(a); err == nil {
			t.Error("a tokenizer larger than the vocabulary loaded without error")
		}
	}
	a = t.TempDir()
	for _, d := range []string{a, b} {
		if err := GenerateRandomModel(d, cfg, 11, ""); err != nil {
			t.Fatal(err)
		}
	}
	fa, _ := os.ReadFile(filepath.Join(a, "model.safetensors"))
	fb, _ := os.ReadFile(filepath.Join(b, "model.safetensors"))
	if len(fa) == 0 || !bytes.Equal(fa, fb) {
		t.Error("same seed produced different weights")
	}
	m, err := LoadModel(a)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if got := m.Config(); got.HeadDim != 8 || got.TorchDtype != "bfloat16" || len(got.EOSTokenID) != 1 {
		t.Errorf("config round trip: %+v", got)
	}
	if _, err := m.Sample(context.Background(), [][]int{{1, 2, 3}}, 2, greedyParams(4), nil); err != nil {
		t.Fatal(err)
	}
}
