// Package hub speaks the Hugging Face Hub's HTTP API (or any server's that
// speaks it, such as hubtest's). It downloads model repositories: the file
// list from /api/models/{repo}[/revision/{rev}]?blobs=true, each file from
// /{repo}/resolve/{rev}/{file}, resuming partial downloads with Range
// requests and verifying every file (sha256 for LFS files, the git blob
// SHA-1 otherwise) before it is renamed into place. And it pushes: a
// commit of files through the commit API (push.go), and a checkpoint's
// adapter with a model card (checkpoint.go).
package hub

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/signal-p2p/signal/trainer"
)

// DefaultBaseURL is the Hugging Face Hub.
const DefaultBaseURL = "https://huggingface.co"

// Errors callers tell apart.
var (
	// ErrNotFound means the repository, revision or file does not exist (or is gated).
	ErrNotFound = errors.New("not found on the hub")
	// ErrChecksum means a downloaded file does not match the hub's checksum.
	ErrChecksum = errors.New("checksum mismatch")
	// ErrInvalidRepo means a repository id or file name is malformed.
	ErrInvalidRepo = errors.New("invalid repository")
)

// Client talks to a hub.
type Client struct {
	// BaseURL defaults to $HF_ENDPOINT (as Hugging Face's own tools
	// read it), then DefaultBaseURL.
	BaseURL string
	// Token is sent as a bearer token (gated models); default $HF_TOKEN.
	Token string
	// HTTP defaults to http.DefaultClient.
	HTTP *http.Client
}

// File is one file of a repository as the hub lists it.
type File struct {
	Name string `json:"rfilename"`
	Size int64  `json:"size"`
	// BlobID is the git blob SHA-1 of the file (of the LFS pointer for LFS files).
	BlobID string `json:"blobId"`
	LFS    *struct {
		SHA256 string `json:"sha256"`
		Size   int64  `json:"size"`
	} `json:"lfs,omitempty"`
}

// Info is a repository's metadata.
type Info struct {
	ID    string `json:"id"`
	SHA   string `json:"sha"`
	Files []File `json:"siblings"`
}

func (c *Client) base() string {
	if c.BaseURL != "" {
		return strings.TrimRight(c.BaseURL, "/")
	}
	if e := os.Getenv("HF_ENDPOINT"); e != "" {
		return strings.TrimRight(e, "/")
	}
	return DefaultBaseURL
}

func (c *Client) http() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	return http.DefaultClient
}

func (c *Client) token() string {
	if c.Token != "" {
		return c.Token
	}
	return os.Getenv("HF_TOKEN")
}

func checkRepo(repo string) error {
	parts := strings.Split(repo, "/")
	if len(parts) > 2 || repo == "" {
		return fmt.Errorf("%w: %q: want owner/name", ErrInvalidRepo, repo)
	}
	for _, p := range parts {
		if p == "" || p == "." || p == ".." || strings.ContainsAny(p, "?#%\\ ") {
			return fmt.Errorf("%w: %q", ErrInvalidRepo, repo)
		}
	}
	return nil
}

func (c *Client) get(ctx context.Context, u string, hdr map[string]string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	if t := c.token(); t != "" {
		req.Header.Set("Authorization", "Bearer "+t)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.http().Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", u, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		resp.Body.Close()
		return nil, fmt.Errorf("%w: GET %s: %s", ErrNotFound, u, resp.Status)
	case resp.StatusCode >= 300 && resp.StatusCode != http.StatusRequestedRangeNotSatisfiable:
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return resp, nil
}

// ModelInfo fetches a repository's file list at rev ("" = main).
func (c *Client) ModelInfo(ctx context.Context, repo, rev string) (Info, error) {
	if err := checkRepo(repo); err != nil {
		return Info{}, err
	}
	u := c.base() + "/api/models/" + repo
	if rev != "" && rev != "main" {
		u += "/revision/" + url.PathEscape(rev)
	}
	resp, err := c.get(ctx, u+"?blobs=true", nil)
	if err != nil {
		return Info{}, err
	}
	defer resp.Body.Close()
	var info Info
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(&info); err != nil {
		return Info{}, fmt.Errorf("model info %s: %w", repo, err)
	}
	return info, nil
}

// ModelFiles selects the files a node needs to load a model.
func ModelFiles(name string) bool {
	switch name {
	case "config.json", "generation_config.json", "model.safetensors.index.json",
		"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json":
		return true
	}
	return strings.HasSuffix(name, ".safetensors") && !strings.Contains(name, "/")
}

// Download fetches the files of repo at rev that keep selects (nil:
// ModelFiles) into dir. Files already present and verified are kept; a
// partial file (name + ".incomplete") is resumed.
func (c *Client) Download(ctx context.Context, repo, rev, dir string, keep func(string) bool) (Info, error) {
	if keep == nil {
		keep = ModelFiles
	}
	info, err := c.ModelInfo(ctx, repo, rev)
	if err != nil {
		return Info{}, err
	}
	// Pin the revision to the commit the listing came from, so that every
	// file is of the same version even if the branch moves meanwhile.
	pinned := info.SHA
	if pinned == "" {
		pinned = rev
	}
	if pinned == "" {
		pinned = "main"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Info{}, fmt.Errorf("download %s: %w", repo, err)
	}
	for _, f := range info.Files {
		if !keep(f.Name) {
			continue
		}
		if f.Name != path.Base(f.Name) || f.Name == "." || f.Name == ".." || strings.Contains(f.Name, `\`) {
			return Info{}, fmt.Errorf("%w: file name %q", ErrInvalidRepo, f.Name)
		}
		if err := c.downloadFile(ctx, repo, pinned, dir, f); err != nil {
			return Info{}, fmt.Errorf("download %s/%s: %w", repo, f.Name, err)
		}
	}
	// Adapters trained on this directory name the repository as their base
	// model, as PEFT's own do.
	if err := trainer.WriteSource(dir, trainer.Source{Repo: repo, Revision: pinned}); err != nil {
		return Info{}, fmt.Errorf("download %s: %w", repo, err)
	}
	return info, nil
}

// expected returns the hasher and the digest the file must have.
func expected(f File) (hash.Hash, string, int64, error) {
	if f.LFS != nil && f.LFS.SHA256 != "" {
		return sha256.New(), strings.ToLower(f.LFS.SHA256), f.LFS.Size, nil
	}
	if f.BlobID == "" {
		return nil, "", 0, fmt.Errorf("%w: the hub gives no checksum", ErrChecksum)
	}
	// git's blob id: sha1("blob <size>\x00" + content); the header is
	// written once the size is known (see verifyFile).
	return sha1.New(), strings.ToLower(f.BlobID), f.Size, nil
}

func verifyFile(p string, f File) error {
	h, want, size, err := expected(f)
	if err != nil {
		return err
	}
	file, err := os.Open(p)
	if err != nil {
		return err
	}
	defer file.Close()
	fi, err := file.Stat()
	if err != nil {
		return err
	}
	if size > 0 && fi.Size() != size {
		return fmt.Errorf("%w: %d bytes, want %d", ErrChecksum, fi.Size(), size)
	}
	if f.LFS == nil || f.LFS.SHA256 == "" {
		fmt.Fprintf(h, "blob %d\x00", fi.Size())
	}
	if _, err := io.Copy(h, file); err != nil {
		return err
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		return fmt.Errorf("%w: got %s, want %s", ErrChecksum, got, want)
	}
	return nil
}

func (c *Client) downloadFile(ctx context.Context, repo, rev, dir string, f File) error {
	dest := filepath.Join(dir, f.Name)
	if _, err := os.Stat(dest); err == nil {
		if verifyFile(dest, f) == nil {
			return nil
		}
		// A stale or corrupt copy: fetch it again.
	}
	part := dest + ".incomplete"
	var offset int64
	if fi, err := os.Stat(part); err == nil {
		offset = fi.Size()
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	hdr := map[string]string{}
	if offset > 0 {
		hdr["Range"] = "bytes=" + strconv.FormatInt(offset, 10) + "-"
	}
	u := c.base() + "/" + repo + "/resolve/" + url.PathEscape(rev) + "/" + url.PathEscape(f.Name)
	resp, err := c.get(ctx, u, hdr)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	flags := os.O_CREATE | os.O_WRONLY
	switch resp.StatusCode {
	case http.StatusPartialContent:
		flags |= os.O_APPEND
	case http.StatusRequestedRangeNotSatisfiable:
		// The partial file is already complete (or longer than the file):
		// verification below decides.
		flags |= os.O_APPEND
		resp.Body = http.NoBody
	default: // 200: the server ignored the range; start over.
		flags |= os.O_TRUNC
	}
	out, err := os.OpenFile(part, flags, 0o644)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, resp.Body)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s (kept for resuming): %w", part, err)
	}
	if err := verifyFile(part, f); err != nil {
		os.Remove(part) // a corrupt partial file must not be resumed
		return err
	}
	return os.Rename(part, dest)
}
