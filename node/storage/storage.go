// Package storage keeps checkpoint files in content-addressed storage: a
// local directory (file:///dir, the embedded default) or an S3-compatible
// bucket (s3://bucket/prefix, through minio-go). Every object is named by
// its CID (CIDv1, raw codec, sha2-256), so any reader can verify the bytes
// it fetched, and a checkpoint is one manifest object (also named by its CID)
// that lists the checkpoint's files.
package storage

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"

	"github.com/signal-p2p/signal/protocol"
)

// Errors callers tell apart with errors.Is.
var (
	// ErrInvalidURL means a storage or checkpoint URL is malformed or of an unsupported scheme.
	ErrInvalidURL = errors.New("invalid storage url")
	// ErrNotFound means the object does not exist in the store.
	ErrNotFound = errors.New("object not found")
	// ErrCIDMismatch means an object's bytes do not hash to the CID it is named by.
	ErrCIDMismatch = errors.New("content does not match its cid")
	// ErrInvalidManifest means a checkpoint manifest is malformed.
	ErrInvalidManifest = errors.New("invalid checkpoint manifest")
)

// Store holds objects named by CID strings.
type Store interface {
	// Put stores size bytes read from r under name and returns the object's URI.
	Put(ctx context.Context, name string, r io.Reader, size int64) (uri string, err error)
	// Get opens the object called name; ErrNotFound when absent.
	Get(ctx context.Context, name string) (io.ReadCloser, error)
	// URI is the URI an object called name has in this store.
	URI(name string) string
	// Delete removes the object called name; an absent one is no error.
	Delete(ctx context.Context, name string) error
}

// Prefix is the URI prefix every object of st shares: what a coordinator
// checks a node's checkpoint URIs against.
func Prefix(st Store) string { return strings.TrimSuffix(st.URI("x"), "x") }

// DeleteURIs deletes the objects of st that uris name; a URI of another
// store is an error, and nothing of it is touched.
func DeleteURIs(ctx context.Context, st Store, uris []string) error {
	var errs []error
	for _, u := range uris {
		_, name, err := splitObjectURI(u)
		if err != nil || st.URI(name) != u {
			errs = append(errs, fmt.Errorf("delete %q: %w", u, ErrForeignStore))
			continue
		}
		if err := st.Delete(ctx, name); err != nil {
			errs = append(errs, fmt.Errorf("delete %q: %w", u, err))
		}
	}
	return errors.Join(errs...)
}

// Credentials for S3-compatible stores. Empty fields fall back to the
// environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
type Credentials struct {
	AccessKey string
	SecretKey string
}

func (c Credentials) withEnv() Credentials {
	if c.AccessKey == "" {
		c.AccessKey = os.Getenv("AWS_ACCESS_KEY_ID")
	}
	if c.SecretKey == "" {
		c.SecretKey = os.Getenv("AWS_SECRET_ACCESS_KEY")
	}
	return c
}

// Open returns the store a URL names: file:///abs/dir, or
// s3://bucket/prefix?endpoint=host:port&secure=false[&region=R].
func Open(rawURL string, creds Credentials) (Store, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrInvalidURL, rawURL, err)
	}
	switch u.Scheme {
	case "file":
		return openFile(u)
	case "s3":
		return openS3(u, creds.withEnv())
	}
	return nil, fmt.Errorf("%w: %q: scheme must be file or s3", ErrInvalidURL, rawURL)
}

// NewCID returns the CID of data: CIDv1, raw codec, sha2-256.
func NewCID(data []byte) cid.Cid {
	sum := sha256.Sum256(data)
	return cidFromDigest(sum[:])
}

func cidFromDigest(digest []byte) cid.Cid {
	mh, err := multihash.Encode(digest, multihash.SHA2_256)
	if err != nil {
		// Encode fails only for an unknown code or a digest of the wrong
		// length; sha256 digests are always 32 bytes.
		panic(fmt.Sprintf("storage: encode sha2-256 multihash: %v", err))
	}
	return cid.NewCidV1(cid.Raw, mh)
}

// CIDOf hashes r to its end and returns its CID and length.
func CIDOf(r io.Reader) (cid.Cid, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		return cid.Undef, n, fmt.Errorf("hash content: %w", err)
	}
	return cidFromDigest(h.Sum(nil)), n, nil
}

// ParseCID parses a CID string and checks it is one this package writes
// (raw codec, sha2-256): those are the only ones it can verify.
func ParseCID(s string) (cid.Cid, error) {
	c, err := cid.Decode(s)
	if err != nil {
		return cid.Undef, fmt.Errorf("parse cid %q: %w", s, err)
	}
	p := c.Prefix()
	if p.MhType != multihash.SHA2_256 {
		return cid.Undef, fmt.Errorf("cid %q: hash %s, only sha2-256 is supported", s, multihash.Codes[p.MhType])
	}
	return c, nil
}

// verifyingReader hashes what it reads and, at EOF, fails unless the
// content matched the expected CID: a reader never sees a clean EOF on
// tampered bytes.
type verifyingReader struct {
	r    io.Reader
	want cid.Cid
	h    interface {
		io.Writer
		Sum([]byte) []byte
	}
	n int64
}

func newVerifyingReader(r io.Reader, want cid.Cid) *verifyingReader {
	return &verifyingReader{r: r, want: want, h: sha256.New()}
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.n += int64(n)
	_, _ = v.h.Write(p[:n])
	if errors.Is(err, io.EOF) {
		if got := cidFromDigest(v.h.Sum(nil)); !got.Equals(v.want) {
			return n, fmt.Errorf("%w: want %s, got %s (%d bytes)", ErrCIDMismatch, v.want, got, v.n)
		}
	}
	return n, err
}

// GetVerified opens the object named by c and returns a reader that fails
// at its end when the bytes do not match c.
func GetVerified(ctx context.Context, st Store, c cid.Cid) (io.ReadCloser, error) {
	rc, err := st.Get(ctx, c.String())
	if err != nil {
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{newVerifyingReader(rc, c), rc}, nil
}

// splitObjectURI splits an object URI into its store URL and object name
// (the last path element).
func splitObjectURI(uri string) (storeURL, name string, err error) {
	u, err := url.Parse(uri)
	if err != nil || (u.Scheme != "file" && u.Scheme != "s3") {
		return "", "", fmt.Errorf("%w: %q: want file:///dir/CID or s3://bucket/prefix/CID", ErrInvalidURL, uri)
	}
	i := strings.LastIndex(u.Path, "/")
	if i < 0 || i == len(u.Path)-1 {
		return "", "", fmt.Errorf("%w: %q: no object name", ErrInvalidURL, uri)
	}
	name = u.Path[i+1:]
	u.Path = u.Path[:i]
	return u.String(), name, nil
}

// Network is what a coordinator needs of the network's checkpoint store:
// the prefix a node's checkpoint URIs must carry, a way to delete
// collected files, and the store itself, which pushes to the Hub read.
type Network struct {
	Prefix string
	Delete func(ctx context.Context, uris []string) error
	Store  Store
}

// OpenNetwork opens the store a URL names for a coordinator.
func OpenNetwork(rawURL string, creds Credentials) (Network, error) {
	st, err := Open(rawURL, creds)
	if err != nil {
		return Network{}, err
	}
	return Network{
		Prefix: Prefix(st),
		Delete: func(ctx context.Context, uris []string) error { return DeleteURIs(ctx, st, uris) },
		Store:  st,
	}, nil
}

// FileOpener returns a reader of a checkpoint's stored files out of st:
// the file's object, verified against its CID as it is read (the reader
// fails at its end on a mismatch), and refused when the file's URI names
// another store.
func FileOpener(st Store) func(context.Context, protocol.CheckpointFile) (io.ReadCloser, error) {
	return func(ctx context.Context, f protocol.CheckpointFile) (io.ReadCloser, error) {
		c, err := ParseCID(f.CID)
		if err != nil {
			return nil, fmt.Errorf("file %s: %w", f.Name, err)
		}
		if f.URI != "" && st.URI(c.String()) != f.URI {
			return nil, fmt.Errorf("file %s at %s: %w", f.Name, f.URI, ErrForeignStore)
		}
		return GetVerified(ctx, st, c)
	}
}
