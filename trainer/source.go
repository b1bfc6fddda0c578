package trainer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
)

// SourceFile, in a model directory, records where the directory came from
// (written by the node's Hub download): {"repo": "owner/name", "revision": "sha"}.
const SourceFile = "signal_source.json"

// Source is SourceFile's content.
type Source struct {
	Repo     string `json:"repo"`
	Revision string `json:"revision,omitempty"`
}

// WriteSource records a model directory's Hub repository.
func WriteSource(dir string, s Source) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, SourceFile), append(b, '\n'), 0o644)
}

// BaseModelID is what adapters name as base_model_name_or_path: the Hub
// repository id the directory was downloaded from, so that PEFT (and the
// Hub's model cards) find the base model; otherwise the directory's name.
func (m *Model) BaseModelID() string {
	if b, err := os.ReadFile(filepath.Join(m.dir, SourceFile)); err == nil {
		var s Source
		if json.Unmarshal(b, &s) == nil && strings.Count(s.Repo, "/") == 1 && !strings.ContainsAny(s.Repo, " \t\n") {
			return s.Repo
		}
	}
	return filepath.Base(m.dir)
}
