package node

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/signal-p2p/signal/trainer"
)

// ModelCatalog lists the model directories a node serves: the
// subdirectories of its models dir with a config.json that pass
// trainer.CheckModelDir, the one model check both engines share. A
// directory that fails is not advertised, and the node logs one line
// saying why (again only after the directory changes).
type ModelCatalog struct {
	dir string
	log *slog.Logger

	mu      sync.Mutex
	checked map[string]checkedModel
}

type checkedModel struct {
	stamp time.Time // config.json's modification time when checked
	err   error
}

// NewModelCatalog returns the catalog of dir; log may be nil.
func NewModelCatalog(dir string, log *slog.Logger) *ModelCatalog {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &ModelCatalog{dir: dir, log: log, checked: map[string]checkedModel{}}
}

// Models lists the served models, sorted. Checks are cached per directory
// until its config.json changes, so adverts every few seconds cost a stat.
func (c *ModelCatalog) Models() []string {
	if c == nil || c.dir == "" {
		return nil
	}
	ents, err := os.ReadDir(c.dir)
	if err != nil {
		return nil
	}
	var out []string
	for _, d := range ents {
		if c.Check(d.Name()) == nil {
			out = append(out, d.Name())
		}
	}
	sort.Strings(out)
	return out
}

// Check is the cached verdict on one model directory (nil: served).
func (c *ModelCatalog) Check(name string) error {
	dir := filepath.Join(c.dir, name)
	st, err := os.Stat(filepath.Join(dir, "config.json"))
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if prev, ok := c.checked[name]; ok && prev.stamp.Equal(st.ModTime()) {
		return prev.err
	}
	err = trainer.CheckModelDir(dir)
	c.checked[name] = checkedModel{stamp: st.ModTime(), err: err}
	if err != nil {
		c.log.Warn("model not served", "model", name, "reason", err.Error())
	}
	return err
}
