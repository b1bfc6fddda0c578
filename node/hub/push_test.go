package hub

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/signal-p2p/signal/node/hub/hubtest"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

const pushToken = "hf_write_0123456789"

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func memUpload(name string, b []byte) Upload {
	sum := sha256.Sum256(b)
	return Upload{Path: name, Size: int64(len(b)), SHA256: hex.EncodeToString(sum[:]),
		Open: func(context.Context) (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }}
}

func oidOf(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// pushFiles are a small text file (inline), a safetensors file (one LFS
// PUT) and a larger binary (multipart when the hub's ChunkBytes is set).
func pushFiles(t *testing.T) map[string][]byte {
	return map[string][]byte{
		"adapter_config.json":       []byte(`{"r": 8, "lora_alpha": 16}`),
		"adapter_model.safetensors": randomBytes(t, 300<<10),
		"weights.bin":               randomBytes(t, 1<<20+17),
	}
}

func uploadsOf(files map[string][]byte) []Upload {
	var out []Upload
	for _, name := range []string{"adapter_config.json", "adapter_model.safetensors", "weights.bin"} {
		out = append(out, memUpload(name, files[name]))
	}
	return out
}

// checkTokenOnlyToAPI: every API call carried the token, and no upload to
// the storage server did.
func checkTokenOnlyToAPI(t *testing.T, h *hubtest.Server) {
	t.Helper()
	for _, r := range h.Requests() {
		if r.Storage && r.Auth != "" {
			t.Errorf("the token went to the upload server: %s %s", r.Method, r.Path)
		}
		if !r.Storage && r.Method == http.MethodPost && !strings.HasPrefix(r.Path, "/lfs-complete/") && r.Auth != "Bearer "+pushToken {
			t.Errorf("%s %s without the token", r.Method, r.Path)
		}
	}
}

func storageBytes(h *hubtest.Server) int64 {
	var n int64
	for _, r := range h.Requests() {
		if r.Storage {
			n += r.Bytes
		}
	}
	return n
}

// TestPushRoundTrip pushes inline, single-PUT and multipart files to a new
// private repository and downloads them back with the downloader.
func TestPushRoundTrip(t *testing.T) {
	h := hubtest.Start(t)
	h.Token, h.ChunkBytes = pushToken, 512<<10
	files := pushFiles(t)
	c := &Client{BaseURL: h.URL, Token: pushToken}
	commit, err := c.Push(context.Background(), "alice/tiny-lora", PushOptions{Private: true, Message: "first"}, uploadsOf(files))
	if err != nil {
		t.Fatal(err)
	}
	if commit.OID == "" || !strings.Contains(commit.URL, commit.OID) || len(commit.Sent) != 3 || len(commit.Kept) != 0 {
		t.Fatalf("commit %+v", commit)
	}
	repo := h.Repo("alice/tiny-lora")
	if repo == nil || !repo.Private || len(repo.Commits) != 1 || repo.Messages[0] != "first" {
		t.Fatalf("repo %+v", repo)
	}
	multipart := false
	for _, r := range h.Requests() {
		multipart = multipart || strings.HasPrefix(r.Path, "/part/")
	}
	if !multipart {
		t.Fatal("no multipart upload: the test does not exercise it")
	}
	checkTokenOnlyToAPI(t, h)

	dir := t.TempDir()
	if _, err := c.Download(context.Background(), "alice/tiny-lora", "", dir, func(string) bool { return true }); err != nil {
		t.Fatal(err)
	}
	for name, want := range files {
		if got, err := os.ReadFile(filepath.Join(dir, name)); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s differs after the round trip (err %v)", name, err)
		}
	}
	// A private repository is not listed without the token.
	if _, err := (&Client{BaseURL: h.URL, Token: "-"}).ModelInfo(context.Background(), "alice/tiny-lora", ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("private repo read without the token: %v", err)
	}

	// Pushing the same files again sends no LFS bytes: the hub holds them.
	before := storageBytes(h)
	again, err := c.Push(context.Background(), "alice/tiny-lora", PushOptions{}, uploadsOf(files))
	if err != nil {
		t.Fatal(err)
	}
	if len(again.Kept) != 2 || storageBytes(h) != before {
		t.Fatalf("second push kept %v and sent %d more bytes", again.Kept, storageBytes(h)-before)
	}
}

// TestPushFailsAndResumes: storage breaks in the middle of an upload (a
// single PUT, then a part of a multipart one), then the commit call fails;
// each push fails with ErrUnavailable and commits nothing, and the next
// one sends only what the hub does not hold yet.
func TestPushFailsAndResumes(t *testing.T) {
	h := hubtest.Start(t)
	h.Token, h.ChunkBytes = pushToken, 512<<10
	files := pushFiles(t)
	var mu sync.Mutex
	failing := map[string]int{oidOf(files["adapter_model.safetensors"]) + "/0": 1}
	h.FailUpload = func(oid string, part int) bool {
		mu.Lock()
		defer mu.Unlock()
		k := oid + "/" + string(rune('0'+part))
		if failing[k] > 0 {
			failing[k]--
			return true
		}
		return false
	}
	c := &Client{BaseURL: h.URL, Token: pushToken}
	ctx := context.Background()
	push := func() (Commit, error) {
		return c.Push(ctx, "alice/tiny-lora", PushOptions{Private: true}, uploadsOf(files))
	}
	noCommit := func(stage string) {
		t.Helper()
		if r := h.Repo("alice/tiny-lora"); r == nil || len(r.Commits) != 0 {
			t.Fatalf("%s: repo %+v: a failed push committed", stage, r)
		}
	}

	// 1. The safetensors file's PUT breaks halfway.
	_, err := push()
	var se *StatusError
	if !errors.Is(err, ErrUnavailable) || !errors.As(err, &se) || se.Status != http.StatusInternalServerError || !strings.Contains(err.Error(), "adapter_model.safetensors") {
		t.Fatalf("push 1 err = %v, want a 500 from uploading adapter_model.safetensors", err)
	}
	noCommit("after a failed upload")

	// 2. The safetensors file goes through; the multipart file's second
	// part breaks.
	mu.Lock()
	failing[oidOf(files["weights.bin"])+"/2"] = 1
	mu.Unlock()
	if _, err := push(); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "weights.bin part 2") {
		t.Fatalf("push 2 err = %v, want part 2 of weights.bin failing", err)
	}
	noCommit("after a failed part")

	// 3. Every object is uploaded, but the commit call fails.
	fails := 1
	h.FailCommit = func() bool { fails--; return fails >= 0 }
	if _, err := push(); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "commit") {
		t.Fatalf("push 3 err = %v, want the commit failing", err)
	}
	noCommit("after a failed commit")

	// 4. The resumed push sends no LFS bytes and commits every file.
	before := storageBytes(h)
	commit, err := push()
	if err != nil {
		t.Fatal(err)
	}
	if storageBytes(h) != before || len(commit.Kept) != 2 || len(commit.Sent) != 1 || commit.Sent[0] != "adapter_config.json" {
		t.Fatalf("resumed push sent %d LFS bytes, kept %v, sent %v", storageBytes(h)-before, commit.Kept, commit.Sent)
	}
	repo := h.Repo("alice/tiny-lora")
	for name, want := range files {
		if !bytes.Equal(repo.Files[name], want) {
			t.Fatalf("%s differs in the commit", name)
		}
	}
	checkTokenOnlyToAPI(t, h)
}

func TestPushRefusals(t *testing.T) {
	h := hubtest.Start(t)
	h.Token = pushToken
	files := uploadsOf(pushFiles(t))
	ctx := context.Background()
	_, err := (&Client{BaseURL: h.URL, Token: "hf_wrong"}).Push(ctx, "alice/x", PushOptions{}, files)
	var se *StatusError
	if !errors.Is(err, ErrDenied) || !errors.As(err, &se) || se.HTTPStatus() != http.StatusUnauthorized {
		t.Fatalf("wrong token: %v", err)
	}
	if strings.Contains(err.Error(), "hf_wrong") {
		t.Fatalf("the error shows the token: %v", err)
	}
	c := &Client{BaseURL: h.URL, Token: pushToken}
	for _, repo := range []string{"", "a/b/c", "../x", "a b"} {
		if _, err := c.Push(ctx, repo, PushOptions{}, files); !errors.Is(err, ErrInvalidRepo) {
			t.Errorf("repo %q: %v", repo, err)
		}
	}
	for _, p := range []string{"../x", "/abs", "a/../b", ""} {
		bad := append([]Upload{}, files...)
		bad[0].Path = p
		if _, err := c.Push(ctx, "alice/x", PushOptions{}, bad); !errors.Is(err, ErrInvalidRepo) {
			t.Errorf("path %q: %v", p, err)
		}
	}
	// Content that is not what its sha256 says fails the push, even
	// where the hub took the bytes: nothing is committed.
	lying := files[1]
	lying.SHA256 = oidOf([]byte("something else"))
	if _, err := c.Push(ctx, "alice/y", PushOptions{}, []Upload{files[0], lying}); err == nil {
		t.Fatal("a push of content that does not match its sha256 succeeded")
	}
	if r := h.Repo("alice/y"); r != nil && len(r.Commits) != 0 {
		t.Fatal("a push of mismatched content committed")
	}
}

// saveCheckpoint stores a "full" checkpoint's files in a file store.
func saveCheckpoint(t *testing.T) (storage.Store, protocol.Checkpoint, map[string][]byte) {
	t.Helper()
	st, err := storage.Open("file://"+t.TempDir(), storage.Credentials{})
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		"adapter_config.json":       []byte(`{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "HuggingFaceTB/SmolLM-135M"}`),
		"adapter_model.safetensors": randomBytes(t, 64<<10),
		"optimizer.safetensors":     randomBytes(t, 128<<10),
		"trainer_state.json":        []byte(`{"step": 20}`),
	}
	dir := t.TempDir()
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cp, _, err := storage.SaveDir(context.Background(), st, dir, "run-1", 20, "full")
	if err != nil {
		t.Fatal(err)
	}
	return st, cp, files
}

// TestPushCheckpoint pushes a stored checkpoint: the PEFT files (not the
// optimizer state) and a model card naming the base model, rank, steps and
// every CID; a file altered in the store fails the push.
func TestPushCheckpoint(t *testing.T) {
	h := hubtest.Start(t)
	h.Token = pushToken
	st, cp, files := saveCheckpoint(t)
	run := protocol.Run{ID: "run-1", BaseModel: "smollm-135m"}
	ctx := context.Background()
	c := &Client{BaseURL: h.URL}
	ans, err := PushCheckpoint(ctx, c, st, run, cp, protocol.PushRequest{Repo: "alice/smol-lora", Token: pushToken})
	if err != nil {
		t.Fatal(err)
	}
	repo := h.Repo("alice/smol-lora")
	if repo == nil || !repo.Private || len(repo.Files) != 3 {
		t.Fatalf("repo %+v", repo)
	}
	for _, name := range []string{"adapter_config.json", "adapter_model.safetensors"} {
		if !bytes.Equal(repo.Files[name], files[name]) {
			t.Fatalf("%s differs", name)
		}
	}
	card := string(repo.Files["README.md"])
	want := []string{"library_name: peft", "base_model: HuggingFaceTB/SmolLM-135M", "smollm-135m", "| rank | 8 (alpha 16", "| steps | 20 |", cp.ID, "q_proj, v_proj"}
	for _, f := range cp.Files {
		if f.Name == "adapter_model.safetensors" || f.Name == "adapter_config.json" {
			want = append(want, f.CID)
		}
	}
	for _, w := range want {
		if !strings.Contains(card, w) {
			t.Errorf("the model card lacks %q:\n%s", w, card)
		}
	}
	if ans.Checkpoint != cp.ID || ans.CommitOID != repo.Commits[0] || len(ans.Files) != 3 || ans.URL != h.URL+"/alice/smol-lora" {
		t.Fatalf("answer %+v", ans)
	}
	for _, f := range ans.Files {
		if !f.Sent || (f.Name != "README.md" && f.CID == "") {
			t.Errorf("answer file %+v", f)
		}
	}

	// No token: refused before the hub is asked, never $HF_TOKEN.
	t.Setenv("HF_TOKEN", pushToken)
	if _, err := PushCheckpoint(ctx, c, st, run, cp, protocol.PushRequest{Repo: "alice/other"}); !errors.Is(err, ErrDenied) {
		t.Fatalf("no token: %v", err)
	}
	if h.Repo("alice/other") != nil {
		t.Fatal("a push without a token used $HF_TOKEN")
	}

	// A file altered in the store: the CID check fails the push.
	for _, f := range cp.Files {
		if f.Name == "adapter_model.safetensors" {
			p := strings.TrimPrefix(f.URI, "file://")
			b := append([]byte(nil), files[f.Name]...)
			b[100] ^= 1
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	// (A fresh hub: this one holds the object already, by its sha256, and
	// would commit its own, correct copy without reading the store's.)
	h = hubtest.Start(t)
	c = &Client{BaseURL: h.URL}
	_, err = PushCheckpoint(ctx, c, st, run, cp, protocol.PushRequest{Repo: "alice/tampered", Token: pushToken})
	if !errors.Is(err, storage.ErrCIDMismatch) {
		t.Fatalf("altered file: %v, want ErrCIDMismatch", err)
	}
	if r := h.Repo("alice/tampered"); r != nil && len(r.Commits) != 0 {
		t.Fatal("an altered file was committed")
	}
}

func TestModelCardBaseModel(t *testing.T) {
	for _, c := range []struct {
		id   string
		meta bool
	}{{"HuggingFaceTB/SmolLM-135M", true}, {"signal-tiny", false}, {"/models/x", false}, {"a/b/c", false}, {"", false}} {
		card := string(ModelCard(CardInfo{Repo: "a/b", BaseModel: "m", BaseModelID: c.id}))
		if got := strings.Contains(card, "base_model: "); got != c.meta {
			t.Errorf("base_model_name_or_path %q: base_model in the metadata %v, want %v", c.id, got, c.meta)
		}
	}
}
