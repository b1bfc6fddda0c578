package gpu

import (
	"context"

	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

// StorageCheckpoints keeps checkpoints in node/storage: files named by
// their CIDs plus a manifest, verified on fetch.
type StorageCheckpoints struct {
	// Store receives new checkpoints.
	Store storage.Store
	// Resolver finds checkpoints by id, CID or URI (its Default is usually Store).
	Resolver storage.Resolver
}

var _ Checkpoints = StorageCheckpoints{}

// Save uploads the files of dir (see storage.SaveDir).
func (c StorageCheckpoints) Save(ctx context.Context, dir, runID string, step int, mode string) (protocol.Checkpoint, int64, error) {
	return storage.SaveDir(ctx, c.Store, dir, runID, step, mode)
}

// Fetch downloads and verifies the checkpoint ref names into destDir.
func (c StorageCheckpoints) Fetch(ctx context.Context, ref, destDir string) error {
	_, err := c.Resolver.Fetch(ctx, ref, destDir)
	return err
}
