package storage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// ManifestVersion is the manifest format this package writes.
const ManifestVersion = 1

// maxManifestBytes bounds a manifest read from storage.
const maxManifestBytes = 1 << 20

// Manifest lists a checkpoint's files. It is stored as JSON under its own
// CID, which is the checkpoint's id: one CID names and verifies everything.
type Manifest struct {
	Version int            `json:"version"`
	RunID   string         `json:"run_id"`
	Step    int            `json:"step"`
	Mode    string         `json:"mode"`
	Files   []ManifestFile `json:"files"`
}

// ManifestFile is one file of a checkpoint.
type ManifestFile struct {
	Name string `json:"name"`
	CID  string `json:"cid"`
	Size int64  `json:"size"`
}

// Validate checks what Fetch relies on: safe, unique file names and
// parseable CIDs.
func (m *Manifest) Validate() error {
	if m.Version != ManifestVersion {
		return fmt.Errorf("%w: version %d, want %d", ErrInvalidManifest, m.Version, ManifestVersion)
	}
	seen := make(map[string]bool, len(m.Files))
	for _, f := range m.Files {
		if err := checkName(f.Name); err != nil || seen[f.Name] {
			return fmt.Errorf("%w: file name %q", ErrInvalidManifest, f.Name)
		}
		seen[f.Name] = true
		if _, err := ParseCID(f.CID); err != nil {
			return fmt.Errorf("%w: file %s: %w", ErrInvalidManifest, f.Name, err)
		}
		if f.Size < 0 {
			return fmt.Errorf("%w: file %s: size %d", ErrInvalidManifest, f.Name, f.Size)
		}
	}
	return nil
}

// SaveDir uploads every regular file in dir, each named by its CID, then
// the manifest, and returns the checkpoint as the API shows it (its ID is
// the manifest's CID, its URI the manifest's URI) and the bytes stored.
func SaveDir(ctx context.Context, st Store, dir, runID string, step int, mode string) (protocol.Checkpoint, int64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return protocol.Checkpoint{}, 0, fmt.Errorf("save checkpoint: %w", err)
	}
	m := Manifest{Version: ManifestVersion, RunID: runID, Step: step, Mode: mode}
	cp := protocol.Checkpoint{RunID: runID, Step: step, Mode: mode}
	var stored int64
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		f, err := putFile(ctx, st, filepath.Join(dir, e.Name()))
		if err != nil {
			return protocol.Checkpoint{}, 0, fmt.Errorf("save checkpoint: %w", err)
		}
		m.Files = append(m.Files, ManifestFile{Name: e.Name(), CID: f.CID, Size: f.Size})
		cp.Files = append(cp.Files, f)
		stored += f.Size
	}
	sort.Slice(m.Files, func(i, j int) bool { return m.Files[i].Name < m.Files[j].Name })
	sort.Slice(cp.Files, func(i, j int) bool { return cp.Files[i].Name < cp.Files[j].Name })
	body, err := json.Marshal(m)
	if err != nil {
		return protocol.Checkpoint{}, 0, fmt.Errorf("save checkpoint: encode manifest: %w", err)
	}
	c := NewCID(body)
	uri, err := st.Put(ctx, c.String(), bytes.NewReader(body), int64(len(body)))
	if err != nil {
		return protocol.Checkpoint{}, 0, fmt.Errorf("save checkpoint manifest: %w", err)
	}
	cp.ID = c.String()
	cp.URI = uri
	cp.CreatedAt = time.Now().UTC().Format(time.RFC3339Nano)
	return cp, stored + int64(len(body)), nil
}

// putFile hashes a file, then streams it to the store under its CID.
func putFile(ctx context.Context, st Store, path string) (protocol.CheckpointFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return protocol.CheckpointFile{}, err
	}
	defer f.Close()
	c, n, err := CIDOf(f)
	if err != nil {
		return protocol.CheckpointFile{}, fmt.Errorf("%s: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return protocol.CheckpointFile{}, fmt.Errorf("%s: %w", path, err)
	}
	// The file itself (an io.ReaderAt) goes to Put: minio-go then uploads
	// parts in parallel, as `mc cp` does, where a wrapping reader would
	// force one sequential stream. The files are the node's own temporary
	// copies, written before SaveDir is called, so they do not change
	// between the hash and the upload.
	uri, err := st.Put(ctx, c.String(), f, n)
	if err != nil {
		return protocol.CheckpointFile{}, fmt.Errorf("%s: %w", path, err)
	}
	return protocol.CheckpointFile{Name: filepath.Base(path), CID: c.String(), Size: n, URI: uri}, nil
}

// Resolver finds checkpoints in the node's own store, by CID or by that
// store's URI. It never opens another store: a checkpoint reference comes
// from the network, and a URI naming another directory or S3 endpoint
// would make the node create directories or send its signed requests
// wherever a stranger points (issue 13, item 10).
type Resolver struct {
	// Default is where CIDs are looked up and new checkpoints go.
	Default Store
}

// ErrForeignStore means a checkpoint URI names a store other than the
// node's own.
var ErrForeignStore = errors.New("checkpoint is outside this node's store")

// maxCheckpointBytes bounds the files one manifest may list, so a manifest
// cannot make a node fill its disk (a rank-256 full checkpoint of a 70B
// model is about 40 GB).
const maxCheckpointBytes = 64 << 30

// storeFor returns the store and object name a reference points to.
func (r Resolver) storeFor(ref string) (Store, string, error) {
	if r.Default == nil {
		return nil, "", fmt.Errorf("checkpoint %q: %w: no storage configured", ref, ErrForeignStore)
	}
	if c, err := ParseCID(ref); err == nil {
		return r.Default, c.String(), nil
	}
	_, name, err := splitObjectURI(ref)
	if err != nil {
		return nil, "", fmt.Errorf("checkpoint %q is neither a CID nor a URI: %w", ref, err)
	}
	if r.Default.URI(name) != ref {
		return nil, "", fmt.Errorf("checkpoint %q: %w (%s)", ref, ErrForeignStore, r.Default.URI(""))
	}
	return r.Default, name, nil
}

// Fetch reads the checkpoint ref names (a manifest CID or URI), writes its
// files into destDir and verifies every byte against its CID. A tampered or
// truncated object fails with ErrCIDMismatch and leaves no file behind.
func (r Resolver) Fetch(ctx context.Context, ref, destDir string) (Manifest, error) {
	st, name, err := r.storeFor(ref)
	if err != nil {
		return Manifest{}, err
	}
	mc, err := ParseCID(name)
	if err != nil {
		return Manifest{}, fmt.Errorf("checkpoint %q: %w", ref, err)
	}
	rc, err := GetVerified(ctx, st, mc)
	if err != nil {
		return Manifest{}, fmt.Errorf("checkpoint %q: %w", ref, err)
	}
	body, err := io.ReadAll(io.LimitReader(rc, maxManifestBytes+1))
	rc.Close()
	if err != nil {
		return Manifest{}, fmt.Errorf("checkpoint %q manifest: %w", ref, err)
	}
	if len(body) > maxManifestBytes {
		return Manifest{}, fmt.Errorf("checkpoint %q: %w: over %d bytes", ref, ErrInvalidManifest, maxManifestBytes)
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Manifest{}, fmt.Errorf("checkpoint %q: %w: %w", ref, ErrInvalidManifest, err)
	}
	if err := m.Validate(); err != nil {
		return Manifest{}, fmt.Errorf("checkpoint %q: %w", ref, err)
	}
	var total int64
	for _, f := range m.Files {
		total += f.Size
		if total > maxCheckpointBytes {
			return Manifest{}, fmt.Errorf("checkpoint %q: %w: files over %d bytes", ref, ErrInvalidManifest, int64(maxCheckpointBytes))
		}
	}
	// destDir is the caller's (a fresh temporary directory): reading never
	// creates directories.
	if st, err := os.Stat(destDir); err != nil || !st.IsDir() {
		return Manifest{}, fmt.Errorf("checkpoint %q: destination %s is not a directory", ref, destDir)
	}
	for _, f := range m.Files {
		if err := fetchFile(ctx, st, f, filepath.Join(destDir, f.Name)); err != nil {
			return Manifest{}, fmt.Errorf("checkpoint %q file %s: %w", ref, f.Name, err)
		}
	}
	return m, nil
}

func fetchFile(ctx context.Context, st Store, f ManifestFile, dest string) (err error) {
	c, err := ParseCID(f.CID)
	if err != nil {
		return err
	}
	rc, err := GetVerified(ctx, st, c)
	if err != nil {
		return err
	}
	defer rc.Close()
	out, err := os.Create(dest)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dest)
		}
	}()
	// Stop at the manifest's size: one byte more already proves the object
	// wrong, and a stranger's object may be endless.
	n, err := io.Copy(out, io.LimitReader(ctxReader{ctx, rc}, f.Size+1))
	if err != nil {
		return err
	}
	if n != f.Size {
		return fmt.Errorf("%w: %d bytes, manifest says %d", ErrCIDMismatch, n, f.Size)
	}
	return nil
}

// IsVerifyError reports whether err means stored bytes failed verification.
func IsVerifyError(err error) bool {
	return errors.Is(err, ErrCIDMismatch) || errors.Is(err, ErrInvalidManifest)
}
