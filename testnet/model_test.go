package testnet

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/signal-p2p/signal/trainer"
)

// TestDefaultModelTrains generates signal-tiny, checks it is deterministic
// and has the real tokenizer, and trains it the way the examples do: 20
// steps of the same small batch must make the loss fall clearly.
func TestDefaultModelTrains(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "models", DefaultModelName)
	if err := EnsureDefaultModel(dir); err != nil {
		t.Fatal(err)
	}
	// A second call is a no-op; a second generation elsewhere is byte-identical.
	if err := EnsureDefaultModel(dir); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(root, "again")
	if err := EnsureDefaultModel(other); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(filepath.Join(dir, "model.safetensors"))
	b, _ := os.ReadFile(filepath.Join(other, "model.safetensors"))
	if len(a) == 0 || !bytes.Equal(a, b) {
		t.Fatalf("two generations differ (%d and %d bytes)", len(a), len(b))
	}

	m, err := trainer.LoadModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	tok := m.Tokenizer()
	if tok == nil {
		t.Fatal("signal-tiny has no tokenizer")
	}
	if tok.VocabSize() != 32000 {
		t.Fatalf("vocab size %d, want the Llama-2 tokenizer's 32000", tok.VocabSize())
	}
	// Real text round-trips through the real vocabulary, with BOS (id 1) first.
	const text = "The quick brown fox jumps over the lazy dog."
	ids := tok.Encode(text, true)
	if len(ids) < 5 || ids[0] != 1 {
		t.Fatalf("Encode(%q) = %v: want BOS then word pieces", text, ids)
	}
	if got := tok.Decode(ids, true); got != text {
		t.Fatalf("Decode(Encode(%q)) = %q", text, got)
	}

	s, err := trainer.NewSession(m, trainer.SessionConfig{Rank: 8, Alpha: 32, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var data []trainer.Datum
	for _, text := range []string{"The cat sat on the mat.", "The dog sat on the log.", "The bird sat on the branch.", "The fox sat on the box."} {
		ids := append(tok.Encode(text, true), tok.EOS()...)
		w := make([]float32, len(ids)-1)
		for i := range w {
			w[i] = 1
		}
		data = append(data, trainer.Datum{Tokens: ids[:len(ids)-1], TargetTokens: ids[1:], Weights: w})
	}
	ctx := context.Background()
	p := trainer.DefaultAdamParams()
	p.LearningRate = 5e-3
	var losses []float64
	for i := 0; i < 20; i++ {
		fb, err := s.ForwardBackward(ctx, data, trainer.LossCrossEntropy, nil)
		if err != nil {
			t.Fatal(err)
		}
		losses = append(losses, fb.LossMean)
		if _, err := s.OptimStep(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("losses: %.3f", losses)
	// Random weights start near or above ln(32000) = 10.4 nats; the adapter
	// must learn the four sentences well enough to lose most of that.
	if !(losses[19] < losses[0]/2) {
		t.Fatalf("loss %.3f -> %.3f: did not fall to half", losses[0], losses[19])
	}
}
