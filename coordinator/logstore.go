package coordinator

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
)

// Where raft's log lives (Config.LogStore). raft-boltdb is always the
// stable store (term and vote, in raft.db); the log is either there too or
// in hashicorp/raft-wal's segment files.
const (
	// LogStoreWAL keeps the log in raft-wal segments under DataDir/wal:
	// one fdatasync per write where a bbolt commit takes two, which halves
	// the disk waits on a charge's commit path and cuts its tail latency
	// (scripts/bench-coordinator.sh compares both).
	LogStoreWAL = "wal"
	// LogStoreBolt keeps the log in raft.db with the stable store.
	LogStoreBolt = "bolt"
)

// walDirName is the raft-wal directory inside DataDir.
const walDirName = "wal"

// openLogStore opens the raft log. A data dir that already holds a log keeps
// its store whatever the configuration says (switching would hide every
// entry after the last snapshot); only a fresh one follows cfg.LogStore.
// The returned kind is LogStoreWAL or LogStoreBolt.
func openLogStore(dataDir, configured string, bolt *raftboltdb.BoltStore) (raft.LogStore, io.Closer, string, error) {
	dir := filepath.Join(dataDir, walDirName)
	_, err := os.Stat(dir)
	switch {
	case err == nil:
	case errors.Is(err, fs.ErrNotExist):
		last, err := bolt.LastIndex()
		if err != nil {
			return nil, nil, "", fmt.Errorf("read raft.db log: %w", err)
		}
		if last > 0 || configured == LogStoreBolt {
			return bolt, nil, LogStoreBolt, nil
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, nil, "", fmt.Errorf("raft wal dir: %w", err)
		}
	default:
		return nil, nil, "", fmt.Errorf("raft wal dir: %w", err)
	}
	meta := &metadb.BoltMetaDB{}
	w, err := wal.Open(dir, wal.WithMetaStore(meta))
	if err != nil {
		_ = meta.Close()
		return nil, nil, "", fmt.Errorf("open raft wal %s: %w", dir, err)
	}
	return w, &walStore{WAL: w, meta: meta}, LogStoreWAL, nil
}

// walStore closes a WAL and its meta database. WAL.Close leaves the meta
// database (a bbolt file) open and locked, so a member restarted in the
// same process would wait for the lock forever.
type walStore struct {
	*wal.WAL
	meta *metadb.BoltMetaDB
}

func (w *walStore) Close() error {
	return errors.Join(w.WAL.Close(), w.meta.Close())
}
