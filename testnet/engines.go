package testnet

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/native"
)

// EngineFactory builds a node engine serving models (name → model dir);
// dataDir is the node's own directory, for whatever the engine keeps.
type EngineFactory func(dataDir string, models map[string]string) (node.Engine, error)

var (
	enginesMu sync.Mutex
	engines   = map[string]EngineFactory{"native": newNativeEngine}
)

// newNativeEngine is node/native over a per-node models directory whose
// entries link to the testnet's model directories (node/native names a
// model by its directory name).
func newNativeEngine(dataDir string, models map[string]string) (node.Engine, error) {
	if len(models) == 0 {
		return nil, fmt.Errorf("native engine: %w", errNoModels)
	}
	dir := filepath.Join(dataDir, "models")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("native engine: %w", err)
	}
	for name, target := range models {
		link := filepath.Join(dir, name)
		if cur, err := os.Readlink(link); err == nil && cur == target {
			continue
		}
		_ = os.Remove(link)
		if err := os.Symlink(target, link); err != nil {
			return nil, fmt.Errorf("native engine: link model %s: %w", name, err)
		}
	}
	// The node logs why a model is not served on its own stderr (the testnet
	// keeps it in logs/).
	return native.New(dir, slog.Default())
}

// RegisterEngine makes an engine available to testnets by name (Config.Engine,
// `signal testnet --engine`). Child processes see it when the binary
// registers it at init.
func RegisterEngine(name string, f EngineFactory) {
	enginesMu.Lock()
	defer enginesMu.Unlock()
	engines[name] = f
}

func engineFactory(name string) (EngineFactory, bool) {
	enginesMu.Lock()
	defer enginesMu.Unlock()
	f, ok := engines[name]
	return f, ok
}

func engineNames() []string {
	enginesMu.Lock()
	defer enginesMu.Unlock()
	var out []string
	for n := range engines {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}
