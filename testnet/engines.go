package testnet

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/gpu"
	"github.com/signal-p2p/signal/node/native"
)

// EngineFactory builds a node engine serving models (name → model dir);
// dataDir is the node's own directory, for whatever the engine keeps.
type EngineFactory func(dataDir string, models map[string]string) (node.Engine, error)

var (
	enginesMu sync.Mutex
	engines   = map[string]EngineFactory{"native": newNativeEngine, gpu.BackendCPUTorch: newTorchCPUEngine}
)

// linkModels makes a per-node models directory whose entries link to the
// testnet's model directories (both engines name a model by its
// directory's name).
func linkModels(dataDir string, models map[string]string) (string, error) {
	if len(models) == 0 {
		return "", errNoModels
	}
	dir := filepath.Join(dataDir, "models")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	for name, target := range models {
		link := filepath.Join(dir, name)
		if cur, err := os.Readlink(link); err == nil && cur == target {
			continue
		}
		_ = os.Remove(link)
		if err := os.Symlink(target, link); err != nil {
			return "", fmt.Errorf("link model %s: %w", name, err)
		}
	}
	return dir, nil
}

// newNativeEngine is node/native, the Go engine.
func newNativeEngine(dataDir string, models map[string]string) (node.Engine, error) {
	dir, err := linkModels(dataDir, models)
	if err != nil {
		return nil, fmt.Errorf("native engine: %w", err)
	}
	// The node logs why a model is not served on its own stderr (the testnet
	// keeps it in logs/).
	return native.New(dir, slog.Default())
}

// newTorchCPUEngine is node/gpu's PyTorch worker on the CPU (python3 with
// torch: $SIGNAL_PYTHON, else /usr/bin/python3), as a GPU node runs it on
// its GPUs: one worker process, supervised, restarted if it dies. The node
// stops it when it stops (Node.Stop).
func newTorchCPUEngine(dataDir string, models map[string]string) (node.Engine, error) {
	dir, err := linkModels(dataDir, models)
	if err != nil {
		return nil, fmt.Errorf("cpu-torch engine: %w", err)
	}
	c := gpu.DefaultConfig()
	c.Device, c.ModelsDir, c.RunDir, c.Logger = "cpu", dir, filepath.Join(dataDir, "worker"), slog.Default()
	pool, err := gpu.NewPool([]gpu.Config{c})
	if err != nil {
		return nil, fmt.Errorf("cpu-torch engine: %w", err)
	}
	if err := pool.Start(context.Background()); err != nil {
		_ = pool.Stop()
		return nil, fmt.Errorf("cpu-torch engine: start the PyTorch worker (%s): %w", c.Python, err)
	}
	return pool, nil
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
