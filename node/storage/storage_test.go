package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/signal-p2p/signal/node/miniotest"
	"github.com/signal-p2p/signal/protocol"
)

func TestCIDKnownValue(t *testing.T) {
	// The CIDv1 (raw, sha2-256) of the empty string, as `ipfs add --raw-leaves
	// --cid-version 1` prints it for an empty file.
	const emptyCID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
	if got := NewCID(nil).String(); got != emptyCID {
		t.Fatalf("CID of empty = %s, want %s", got, emptyCID)
	}
	c, n, err := CIDOf(strings.NewReader("hello"))
	if err != nil || n != 5 || !c.Equals(NewCID([]byte("hello"))) {
		t.Fatalf("CIDOf = %v %d %v", c, n, err)
	}
}

func writeCheckpointDir(t *testing.T, sizes map[string]int) string {
	t.Helper()
	dir := t.TempDir()
	for name, n := range sizes {
		b := make([]byte, n)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// testRoundTrip saves a directory, checks the CIDs of what the store holds,
// fetches by CID and by URI, and checks tampering is caught.
func testRoundTrip(t *testing.T, st Store, tamper func(name string, data []byte)) {
	ctx := context.Background()
	src := writeCheckpointDir(t, map[string]int{
		"adapter_config.json":       300,
		"adapter_model.safetensors": 40 << 20, // above one multipart part
		"optimizer.safetensors":     1 << 10,
	})
	cp, stored, err := SaveDir(ctx, st, src, "run-1", 7, "full")
	if err != nil {
		t.Fatal(err)
	}
	if cp.Step != 7 || cp.Mode != "full" || cp.RunID != "run-1" || len(cp.Files) != 3 || stored < 40<<20 {
		t.Fatalf("checkpoint = %+v, stored %d", cp, stored)
	}
	for _, f := range cp.Files {
		want, err := os.ReadFile(filepath.Join(src, f.Name))
		if err != nil {
			t.Fatal(err)
		}
		if f.CID != NewCID(want).String() || f.Size != int64(len(want)) || !strings.HasSuffix(f.URI, "/"+f.CID) {
			t.Fatalf("file %+v does not match its content", f)
		}
		rc, err := st.Get(ctx, f.CID)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("stored %s differs (err %v)", f.Name, err)
		}
	}
	r := Resolver{Default: st}
	for _, ref := range []string{cp.ID, cp.URI} {
		dst := t.TempDir()
		m, err := r.Fetch(ctx, ref, dst)
		if err != nil {
			t.Fatalf("Fetch(%s): %v", ref, err)
		}
		if m.Step != 7 || len(m.Files) != 3 {
			t.Fatalf("manifest = %+v", m)
		}
		for _, f := range cp.Files {
			a, _ := os.ReadFile(filepath.Join(src, f.Name))
			b, _ := os.ReadFile(filepath.Join(dst, f.Name))
			if !bytes.Equal(a, b) {
				t.Fatalf("fetched %s differs", f.Name)
			}
		}
	}
	// Tamper with one file: the fetch must fail with a verification error
	// and leave that file out of the destination.
	victim := cp.Files[0]
	data, _ := os.ReadFile(filepath.Join(src, victim.Name))
	data[len(data)/2] ^= 0xff
	tamper(victim.CID, data)
	dst := t.TempDir()
	_, err = r.Fetch(ctx, cp.ID, dst)
	if !errors.Is(err, ErrCIDMismatch) {
		t.Fatalf("Fetch of tampered checkpoint err = %v, want ErrCIDMismatch", err)
	}
	if !strings.Contains(err.Error(), victim.Name) {
		t.Fatalf("error %q does not name the file", err)
	}
	if _, err := os.Stat(filepath.Join(dst, victim.Name)); !os.IsNotExist(err) {
		t.Fatalf("tampered file left behind: %v", err)
	}
}

func TestFileStore(t *testing.T) {
	dir := t.TempDir()
	st, err := Open("file://"+dir, Credentials{})
	if err != nil {
		t.Fatal(err)
	}
	testRoundTrip(t, st, func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if _, err := st.Get(context.Background(), NewCID([]byte("absent")).String()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get absent err = %v", err)
	}
	cp, _, err := SaveDir(context.Background(), st, writeCheckpointDir(t, map[string]int{"a": 10}), "r", 1, "adapter")
	if err != nil {
		t.Fatal(err)
	}
	testDelete(t, st, cp)
}

func TestS3Store(t *testing.T) {
	srv := miniotest.Start(t, "ckpt")
	st, err := Open(srv.StorageURL("ckpt", "signal/runs"), Credentials{AccessKey: miniotest.AccessKey, SecretKey: miniotest.SecretKey})
	if err != nil {
		t.Fatal(err)
	}
	testRoundTrip(t, st, func(name string, data []byte) {
		_, err := srv.Client.PutObject(context.Background(), "ckpt", "signal/runs/"+name, bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
	})
	// The store's own s3:// URI (no endpoint in it) resolves in the store.
	cpDir := writeCheckpointDir(t, map[string]int{"a": 10})
	cp, _, err := SaveDir(context.Background(), st, cpDir, "r", 1, "adapter")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(cp.URI, "s3://ckpt/signal/runs/") {
		t.Fatalf("URI = %s", cp.URI)
	}
	if _, err := (Resolver{Default: st}).Fetch(context.Background(), cp.URI, t.TempDir()); err != nil {
		t.Fatal(err)
	}
	testDelete(t, st, cp)
}

// testDelete deletes a saved checkpoint's objects by URI; the fetch then
// fails, and URIs of another store are refused.
func testDelete(t *testing.T, st Store, cp protocol.Checkpoint) {
	t.Helper()
	ctx := context.Background()
	uris := []string{cp.URI}
	for _, f := range cp.Files {
		uris = append(uris, f.URI)
	}
	if err := DeleteURIs(ctx, st, uris); err != nil {
		t.Fatal(err)
	}
	if err := DeleteURIs(ctx, st, uris); err != nil {
		t.Fatalf("deleting absent objects: %v", err)
	}
	if _, err := (Resolver{Default: st}).Fetch(ctx, cp.ID, t.TempDir()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("fetch after delete: %v", err)
	}
	if err := DeleteURIs(ctx, st, []string{"file:///etc/" + cp.ID}); !errors.Is(err, ErrForeignStore) {
		t.Fatalf("delete of another store's URI: %v", err)
	}
	if !strings.HasPrefix(cp.URI, Prefix(st)) {
		t.Fatalf("URI %s outside the store's prefix %s", cp.URI, Prefix(st))
	}
}

func TestOpenErrors(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	for _, u := range []string{
		"ftp://x/y",
		"file://relative/dir",
		"file:relative",
		"s3:///prefix?endpoint=localhost:9000",
		"s3://bucket/p?endpoint=localhost:9000&secure=maybe",
		"s3://bucket/p?endpoint=localhost:9000", // no credentials
		"%zz",
	} {
		if _, err := Open(u, Credentials{}); !errors.Is(err, ErrInvalidURL) {
			t.Errorf("Open(%q) err = %v, want ErrInvalidURL", u, err)
		}
	}
	r := Resolver{}
	for _, ref := range []string{"not-a-cid", "file:///tmp/", "http://x/y/z"} {
		if _, err := r.Fetch(context.Background(), ref, t.TempDir()); err == nil {
			t.Errorf("Fetch(%q) succeeded", ref)
		}
	}
}

func TestManifestValidate(t *testing.T) {
	good := NewCID([]byte("x")).String()
	for _, m := range []Manifest{
		{Version: 2},
		{Version: 1, Files: []ManifestFile{{Name: "../etc", CID: good}}},
		{Version: 1, Files: []ManifestFile{{Name: "a", CID: good}, {Name: "a", CID: good}}},
		{Version: 1, Files: []ManifestFile{{Name: "a", CID: "zzz"}}},
		{Version: 1, Files: []ManifestFile{{Name: "a", CID: good, Size: -1}}},
	} {
		if err := m.Validate(); !errors.Is(err, ErrInvalidManifest) {
			t.Errorf("Validate(%+v) = %v", m, err)
		}
	}
}

// FuzzFetchManifest stores arbitrary bytes as a manifest object under their
// true CID: Fetch must reject or accept them without panicking and never
// write outside the destination directory.
func FuzzFetchManifest(f *testing.F) {
	f.Add([]byte(`{"version":1,"run_id":"r","step":1,"mode":"adapter","files":[]}`))
	f.Add([]byte(`{"version":1,"files":[{"name":"../x","cid":"bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku","size":0}]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		dir := t.TempDir()
		st, err := Open((&url.URL{Scheme: "file", Path: filepath.Join(dir, "store")}).String(), Credentials{})
		if err != nil {
			t.Fatal(err)
		}
		c := NewCID(body)
		if _, err := st.Put(context.Background(), c.String(), bytes.NewReader(body), int64(len(body))); err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(dir, "dst")
		_, _ = Resolver{Default: st}.Fetch(context.Background(), c.String(), dst)
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if e.Name() != "store" && e.Name() != "dst" {
				t.Fatalf("Fetch wrote %s outside its destination", e.Name())
			}
		}
	})
}

// TestResolverStaysInItsStore is issue 13's tenth attack: a checkpoint
// reference naming another directory or S3 endpoint is refused without
// creating a directory or dialling anything, and a download stops at the
// manifest's size.
func TestResolverStaysInItsStore(t *testing.T) {
	st, err := Open("file://"+t.TempDir(), Credentials{})
	if err != nil {
		t.Fatal(err)
	}
	r := Resolver{Default: st}
	elsewhere := filepath.Join(t.TempDir(), "made-by-attacker")
	c := NewCID([]byte("x")).String()
	for _, ref := range []string{
		"file://" + elsewhere + "/" + c,
		"s3://bucket/prefix/" + c + "?endpoint=127.0.0.1:1&secure=false",
		"s3://other-bucket/" + c,
	} {
		_, err := r.Fetch(context.Background(), ref, t.TempDir())
		if !errors.Is(err, ErrForeignStore) {
			t.Errorf("Fetch(%q) err = %v, want ErrForeignStore", ref, err)
		}
	}
	if _, err := os.Stat(elsewhere); !os.IsNotExist(err) {
		t.Fatalf("reading created %s: %v", elsewhere, err)
	}
	if _, err := r.Fetch(context.Background(), c, filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("Fetch into a missing directory succeeded")
	}

	// A manifest that lists 1 byte for a 1 MiB object: the copy stops at 2.
	big := bytes.Repeat([]byte("a"), 1<<20)
	bc := NewCID(big)
	if _, err := st.Put(context.Background(), bc.String(), bytes.NewReader(big), int64(len(big))); err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(Manifest{Version: ManifestVersion, RunID: "r", Mode: "adapter", Files: []ManifestFile{{Name: "f", CID: bc.String(), Size: 1}}})
	mc := NewCID(body)
	if _, err := st.Put(context.Background(), mc.String(), bytes.NewReader(body), int64(len(body))); err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	if _, err := r.Fetch(context.Background(), mc.String(), dst); err == nil {
		t.Fatal("a file longer than its manifest entry was accepted")
	}
	if _, err := os.Stat(filepath.Join(dst, "f")); !os.IsNotExist(err) {
		t.Fatalf("the oversized file was left behind: %v", err)
	}
}
