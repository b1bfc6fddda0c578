package node

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/trainer"
)

// TestModelCatalogServesOnlyCheckedModels: a models dir with a Llama and
// Llama weights under Qwen2's architecture name advertises the Llama only,
// and logs one line about the other saying why, once.
func TestModelCatalogServesOnlyCheckedModels(t *testing.T) {
	root := t.TempDir()
	small := trainer.Config{HiddenSize: 16, IntermediateSize: 32, NumHiddenLayers: 1, NumAttentionHeads: 2, VocabSize: 64, TorchDtype: "float32"}
	if err := trainer.GenerateRandomModel(filepath.Join(root, "llama"), small, 1, ""); err != nil {
		t.Fatal(err)
	}
	// Llama weights under Qwen2's architecture name (the check refuses them).
	if err := trainer.GenerateRandomModel(filepath.Join(root, "qwen"), small, 1, ""); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(root, "qwen", "config.json")
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	raw = bytes.ReplaceAll(raw, []byte(`"LlamaForCausalLM"`), []byte(`"Qwen2ForCausalLM"`))
	if err := os.WriteFile(cfgPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "not-a-model"), 0o755); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	c := NewModelCatalog(root, slog.New(slog.NewTextHandler(&logs, nil)))
	for i := 0; i < 3; i++ {
		if got := c.Models(); len(got) != 1 || got[0] != "llama" {
			t.Fatalf("served %v, want [llama]", got)
		}
	}
	if n := strings.Count(logs.String(), "model not served"); n != 1 || !strings.Contains(logs.String(), "Qwen2ForCausalLM") {
		t.Fatalf("logged %d lines (want 1 naming the architecture):\n%s", n, logs.String())
	}
}
