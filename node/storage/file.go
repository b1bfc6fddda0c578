package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// fileStore keeps objects as files in one directory.
type fileStore struct {
	dir string
}

func openFile(u *url.URL) (*fileStore, error) {
	if u.Host != "" && u.Host != "localhost" {
		return nil, fmt.Errorf("%w: %q: file URLs name a local directory (file:///abs/dir)", ErrInvalidURL, u.String())
	}
	if u.Path == "" || !filepath.IsAbs(u.Path) {
		return nil, fmt.Errorf("%w: %q: directory must be an absolute path", ErrInvalidURL, u.String())
	}
	dir := filepath.Clean(u.Path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create storage dir %s: %w", dir, err)
	}
	return &fileStore{dir: dir}, nil
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, `/\`) {
		return fmt.Errorf("%w: object name %q", ErrInvalidURL, name)
	}
	return nil
}

func (s *fileStore) URI(name string) string {
	return (&url.URL{Scheme: "file", Path: filepath.ToSlash(filepath.Join(s.dir, name))}).String()
}

// Put writes to a temporary file and renames it into place, so a reader
// never sees a partial object and a crash leaves no half-written one.
func (s *fileStore) Put(ctx context.Context, name string, r io.Reader, size int64) (string, error) {
	if err := checkName(name); err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(s.dir, ".put-*")
	if err != nil {
		return "", fmt.Errorf("put %s: %w", name, err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	n, err := io.Copy(tmp, ctxReader{ctx, r})
	if err == nil && size >= 0 && n != size {
		err = fmt.Errorf("short object: wrote %d of %d bytes", n, size)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), filepath.Join(s.dir, name))
	}
	if err != nil {
		return "", fmt.Errorf("put %s: %w", name, err)
	}
	return s.URI(name), nil
}

func (s *fileStore) Get(_ context.Context, name string) (io.ReadCloser, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	f, err := os.Open(filepath.Join(s.dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, s.URI(name))
	}
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", name, err)
	}
	return f, nil
}

func (s *fileStore) Delete(_ context.Context, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(s.dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// ctxReader stops a long copy when its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
