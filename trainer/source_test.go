package trainer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// TestAdapterNamesTheHubRepo: an adapter of a model directory downloaded
// from the Hub names the repository as base_model_name_or_path, as PEFT's
// own adapters do; one of a local directory names the directory.
func TestAdapterNamesTheHubRepo(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "smol")
	if err := GenerateRandomModel(dir, Config{HiddenSize: 16, IntermediateSize: 32, NumHiddenLayers: 1,
		NumAttentionHeads: 2, VocabSize: 64, TorchDtype: "float32"}, 1, ""); err != nil {
		t.Fatal(err)
	}
	name := func() string {
		t.Helper()
		m, err := LoadModel(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		l, err := NewLoRA(m, 2, 4, nil, 1)
		if err != nil {
			t.Fatal(err)
		}
		out := t.TempDir()
		if err := l.Save(out); err != nil {
			t.Fatal(err)
		}
		var cfg struct {
			Base string `json:"base_model_name_or_path"`
		}
		b, err := os.ReadFile(filepath.Join(out, "adapter_config.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &cfg); err != nil {
			t.Fatal(err)
		}
		return cfg.Base
	}
	if got := name(); got != "smol" {
		t.Fatalf("local directory: base_model_name_or_path %q, want the directory's name", got)
	}
	if err := WriteSource(dir, Source{Repo: "HuggingFaceTB/SmolLM-135M", Revision: "abc"}); err != nil {
		t.Fatal(err)
	}
	if got := name(); got != "HuggingFaceTB/SmolLM-135M" {
		t.Fatalf("downloaded directory: base_model_name_or_path %q, want the repository", got)
	}
}
