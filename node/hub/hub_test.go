package hub

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/signal-p2p/signal/trainer"
)

// fakeHub serves a model directory the way the Hugging Face Hub does: the
// listing with blob ids and LFS sha256s, and files with Range support.
type fakeHub struct {
	files   map[string][]byte
	corrupt string // file served with a flipped byte
	mu      sync.Mutex
	ranges  []string // Range headers seen
	gets    map[string]int
}

func newFakeHub(t *testing.T) (*fakeHub, *httptest.Server) {
	t.Helper()
	big := make([]byte, 3<<20)
	if _, err := rand.Read(big); err != nil {
		t.Fatal(err)
	}
	h := &fakeHub{gets: map[string]int{}, files: map[string][]byte{
		"config.json":       []byte(`{"model_type":"llama","hidden_size":64}`),
		"tokenizer.json":    []byte(`{"model":{"type":"BPE"}}`),
		"model.safetensors": big,
		"README.md":         []byte("# not needed"),
	}}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return h, srv
}

const repo = "signal/tiny"
const commit = "0123456789abcdef0123456789abcdef01234567"

func (h *fakeHub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/api/models/"+repo:
		if r.URL.Query().Get("blobs") != "true" {
			http.Error(w, "want blobs=true", 400)
			return
		}
		type lfs struct {
			SHA256 string `json:"sha256"`
			Size   int64  `json:"size"`
		}
		type sib struct {
			Name   string `json:"rfilename"`
			Size   int64  `json:"size"`
			BlobID string `json:"blobId"`
			LFS    *lfs   `json:"lfs,omitempty"`
		}
		var sibs []sib
		for name, b := range h.files {
			s := sib{Name: name, Size: int64(len(b))}
			if len(b) > 1<<20 {
				sum := sha256.Sum256(b)
				s.LFS = &lfs{SHA256: hex.EncodeToString(sum[:]), Size: int64(len(b))}
				s.BlobID = "ffffffffffffffffffffffffffffffffffffffff" // the pointer's blob
			} else {
				g := sha1.New()
				fmt.Fprintf(g, "blob %d\x00", len(b))
				g.Write(b)
				s.BlobID = hex.EncodeToString(g.Sum(nil))
			}
			sibs = append(sibs, s)
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"id": repo, "sha": commit, "siblings": sibs})
	case strings.HasPrefix(r.URL.Path, "/"+repo+"/resolve/"+commit+"/"):
		name := strings.TrimPrefix(r.URL.Path, "/"+repo+"/resolve/"+commit+"/")
		b, ok := h.files[name]
		if !ok {
			http.NotFound(w, r)
			return
		}
		h.mu.Lock()
		h.gets[name]++
		if rg := r.Header.Get("Range"); rg != "" {
			h.ranges = append(h.ranges, name+" "+rg)
		}
		h.mu.Unlock()
		if name == h.corrupt {
			b = append([]byte(nil), b...)
			b[len(b)/2] ^= 1
		}
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(b))
	default:
		http.NotFound(w, r)
	}
}

func TestDownloadVerifiesAndSkipsUnneeded(t *testing.T) {
	h, srv := newFakeHub(t)
	c := &Client{BaseURL: srv.URL, Token: "-"}
	dir := t.TempDir()
	info, err := c.Download(context.Background(), repo, "", dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if info.SHA != commit {
		t.Fatalf("info = %+v", info)
	}
	for _, name := range []string{"config.json", "tokenizer.json", "model.safetensors"} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !bytes.Equal(got, h.files[name]) {
			t.Fatalf("%s differs (err %v)", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "README.md")); !os.IsNotExist(err) {
		t.Fatalf("README.md downloaded: %v", err)
	}
	// The directory records its repository and commit, for the adapters
	// trained on it to name.
	var src trainer.Source
	if b, err := os.ReadFile(filepath.Join(dir, trainer.SourceFile)); err != nil || json.Unmarshal(b, &src) != nil || src.Repo != repo || src.Revision != commit {
		t.Fatalf("source record %+v (err %v)", src, err)
	}
	// A second download finds everything verified and fetches nothing.
	if _, err := c.Download(context.Background(), repo, "main", dir, nil); err != nil {
		t.Fatal(err)
	}
	if h.gets["model.safetensors"] != 1 {
		t.Fatalf("model fetched %d times", h.gets["model.safetensors"])
	}
}

func TestDownloadResumes(t *testing.T) {
	h, srv := newFakeHub(t)
	dir := t.TempDir()
	half := h.files["model.safetensors"][:1<<20+123]
	if err := os.WriteFile(filepath.Join(dir, "model.safetensors.incomplete"), half, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := (&Client{BaseURL: srv.URL}).Download(context.Background(), repo, "", dir, nil); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "model.safetensors"))
	if !bytes.Equal(got, h.files["model.safetensors"]) {
		t.Fatal("resumed file differs")
	}
	want := fmt.Sprintf("model.safetensors bytes=%d-", len(half))
	if len(h.ranges) != 1 || h.ranges[0] != want {
		t.Fatalf("range requests = %v, want [%s]", h.ranges, want)
	}
}

func TestDownloadChecksumMismatch(t *testing.T) {
	for _, name := range []string{"model.safetensors", "config.json"} { // LFS sha256, git blob sha1
		t.Run(name, func(t *testing.T) {
			h, srv := newFakeHub(t)
			h.corrupt = name
			dir := t.TempDir()
			_, err := (&Client{BaseURL: srv.URL}).Download(context.Background(), repo, "", dir, nil)
			if !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), name) {
				t.Fatalf("err = %v, want ErrChecksum naming %s", err, name)
			}
			for _, p := range []string{name, name + ".incomplete"} {
				if _, err := os.Stat(filepath.Join(dir, p)); !os.IsNotExist(err) {
					t.Fatalf("%s left behind", p)
				}
			}
		})
	}
}

func TestDownloadErrors(t *testing.T) {
	_, srv := newFakeHub(t)
	c := &Client{BaseURL: srv.URL}
	if _, err := c.Download(context.Background(), "signal/absent", "", t.TempDir(), nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("absent repo err = %v", err)
	}
	for _, r := range []string{"", "a/b/c", "../x", "a/..", "a b"} {
		if _, err := c.ModelInfo(context.Background(), r, ""); !errors.Is(err, ErrInvalidRepo) {
			t.Errorf("ModelInfo(%q) err = %v", r, err)
		}
	}
}
