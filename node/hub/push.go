package hub

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"path"
	"sort"
	"strconv"
	"strings"
)

// Errors of a push, besides ErrInvalidRepo and ErrNotFound.
var (
	// ErrDenied means the hub refused the token (401) or its rights on the
	// repository (403).
	ErrDenied = errors.New("the hub refused the token")
	// ErrRejected means the hub refused the push for another reason of the
	// caller's (a 4xx: a bad file name, a repository name taken, ...).
	ErrRejected = errors.New("the hub rejected the push")
	// ErrUnavailable means the hub (or its storage) failed or could not be
	// reached: a later push resumes where this one stopped.
	ErrUnavailable = errors.New("the hub is unavailable")
)

// StatusError is a push step the hub answered with an error status, or
// did not answer (Status 0); a push refused before the hub is asked (a
// malformed repository name, a checkpoint without its PEFT files) carries
// the status the hub would answer. It wraps ErrDenied, ErrNotFound,
// ErrRejected or ErrUnavailable by the status; Message is the hub's own
// error text. It never holds the request, so it never holds the token.
type StatusError struct {
	Op      string // the step: "create repository", "preupload", "lfs batch", "upload FILE", "verify FILE", "commit"
	Status  int
	Message string
	Err     error // the transport error when Status is 0
}

func (e *StatusError) Error() string {
	switch {
	case e.Status == 0:
		return fmt.Sprintf("hub %s: %v", e.Op, e.Err)
	case e.Message != "":
		return fmt.Sprintf("hub %s: %d %s: %s", e.Op, e.Status, http.StatusText(e.Status), e.Message)
	}
	return fmt.Sprintf("hub %s: %d %s", e.Op, e.Status, http.StatusText(e.Status))
}

// Unwrap gives the sentinel of the status, and the transport error.
func (e *StatusError) Unwrap() []error {
	var s error
	switch {
	case e.Status == http.StatusUnauthorized || e.Status == http.StatusForbidden:
		s = ErrDenied
	case e.Status == http.StatusNotFound:
		s = ErrNotFound
	case e.Status >= 400 && e.Status < 500 && e.Status != http.StatusTooManyRequests && e.Status != http.StatusRequestTimeout:
		s = ErrRejected
	default:
		s = ErrUnavailable
	}
	if e.Err != nil {
		return []error{s, e.Err}
	}
	return []error{s}
}

// HTTPStatus is the hub's status (0: no answer came), for callers that
// map a push's failure to their own answer without importing this package.
func (e *StatusError) HTTPStatus() int { return e.Status }

// Upload is one file of a push.
type Upload struct {
	// Path is the file's path in the repository.
	Path string
	Size int64
	// SHA256 is the content's sha256 in hex: the file's LFS object id,
	// which the hub checks the uploaded bytes against.
	SHA256 string
	// Open reads the content from its start. It is called once for the
	// preupload sample and once more to send the file.
	Open func(ctx context.Context) (io.ReadCloser, error)
}

// PushOptions shape one push.
type PushOptions struct {
	// Private makes a repository the push creates private; an existing
	// repository keeps its visibility.
	Private bool
	// Revision is the branch committed to (default "main").
	Revision string
	// Message and Description are the commit's summary and body.
	Message     string
	Description string
}

// Commit is the hub's record of a push.
type Commit struct {
	Repo string `json:"repo"`
	URL  string `json:"commit_url"`
	OID  string `json:"commit_oid"`
	// Sent are the files whose bytes this push sent; Kept the LFS files
	// the hub already held (sent by an earlier, failed push of the same
	// content, or by another commit), which it did not send again.
	Sent []string `json:"sent"`
	Kept []string `json:"kept"`
}

// maxRegularBytes bounds a file the hub asks for inline in the commit
// (base64 in the NDJSON body): the hub asks that only of small text files.
const maxRegularBytes = 32 << 20

// sampleBytes is the head of each file the preupload call sees.
const sampleBytes = 512

// Push commits files to the model repository repo on the hub, creating the
// repository if it does not exist, as the Hub's HTTP commit API takes a
// commit (huggingface_hub's create_commit speaks the same): the preupload
// call says which files go through git LFS; the LFS batch call says which
// of those the hub does not hold yet and where to upload them (one PUT, or
// parts); then one commit call names every file, inline or by LFS object
// id. A push that failed is resumed by pushing again: the batch call
// leaves out the objects already uploaded, so only the rest is sent.
//
// The token (c.Token, or $HF_TOKEN) goes only to the hub's own API; the
// upload URLs the hub hands out are pre-signed and get no token.
func (c *Client) Push(ctx context.Context, repo string, opts PushOptions, files []Upload) (Commit, error) {
	if err := checkRepo(repo); err != nil {
		return Commit{}, err
	}
	rev := opts.Revision
	if rev == "" {
		rev = "main"
	}
	if opts.Message == "" {
		opts.Message = "Upload with Signal"
	}
	seen := map[string]bool{}
	for _, f := range files {
		if f.Path == "" || path.Clean(f.Path) != f.Path || path.IsAbs(f.Path) || strings.HasPrefix(f.Path, "../") || f.Path == ".." ||
			strings.ContainsAny(f.Path, "\\\x00") || seen[f.Path] {
			return Commit{}, fmt.Errorf("%w: file path %q", ErrInvalidRepo, f.Path)
		}
		if _, err := hex.DecodeString(f.SHA256); err != nil || len(f.SHA256) != 64 || f.Size < 0 || f.Open == nil {
			return Commit{}, fmt.Errorf("push %s: file %s: want a size, a sha256 in hex and an opener", repo, f.Path)
		}
		seen[f.Path] = true
	}
	if err := c.createRepo(ctx, repo, opts.Private); err != nil {
		return Commit{}, err
	}
	modes, err := c.preupload(ctx, repo, rev, files)
	if err != nil {
		return Commit{}, err
	}
	out := Commit{Repo: repo}
	var lfs []Upload
	for _, f := range files {
		if modes[f.Path] == "lfs" && f.Size > 0 {
			lfs = append(lfs, f)
		}
	}
	if len(lfs) > 0 {
		sent, kept, err := c.uploadLFS(ctx, repo, rev, lfs)
		if err != nil {
			return Commit{}, err
		}
		out.Sent, out.Kept = sent, kept
	}
	var body bytes.Buffer
	enc := json.NewEncoder(&body) // one JSON value per line: NDJSON
	header := map[string]string{"summary": opts.Message, "description": opts.Description}
	if err := enc.Encode(map[string]any{"key": "header", "value": header}); err != nil {
		return Commit{}, err
	}
	for _, f := range files {
		if modes[f.Path] == "lfs" && f.Size > 0 {
			_ = enc.Encode(map[string]any{"key": "lfsFile", "value": map[string]any{
				"path": f.Path, "algo": "sha256", "oid": f.SHA256, "size": f.Size}})
			continue
		}
		content, err := readAll(ctx, f, maxRegularBytes)
		if err != nil {
			return Commit{}, fmt.Errorf("push %s: %w", repo, err)
		}
		_ = enc.Encode(map[string]any{"key": "file", "value": map[string]any{
			"path": f.Path, "encoding": "base64", "content": base64.StdEncoding.EncodeToString(content)}})
		out.Sent = append(out.Sent, f.Path)
	}
	var ans struct {
		URL string `json:"commitUrl"`
		OID string `json:"commitOid"`
	}
	u := c.base() + "/api/models/" + repo + "/commit/" + url.PathEscape(rev)
	if err := c.call(ctx, "commit", http.MethodPost, u, "application/x-ndjson", body.Bytes(), &ans); err != nil {
		return Commit{}, err
	}
	out.URL, out.OID = ans.URL, ans.OID
	return out, nil
}

// createRepo creates repo; one that exists already (409) is no error.
func (c *Client) createRepo(ctx context.Context, repo string, private bool) error {
	org, name, ok := strings.Cut(repo, "/")
	if !ok {
		org, name = "", repo
	}
	req := map[string]any{"name": name, "type": "model", "private": private}
	if org != "" {
		req["organization"] = org
	}
	b, _ := json.Marshal(req)
	err := c.call(ctx, "create repository", http.MethodPost, c.base()+"/api/repos/create", "application/json", b, nil)
	var se *StatusError
	if errors.As(err, &se) && se.Status == http.StatusConflict {
		return nil
	}
	return err
}

// preupload asks how each file is uploaded: "lfs" or "regular" (inline).
// Files the repository's .gitattributes or .gitignore exclude are refused:
// a push that silently left out the weights would be worse than none.
func (c *Client) preupload(ctx context.Context, repo, rev string, files []Upload) (map[string]string, error) {
	type entry struct {
		Path   string `json:"path"`
		Sample string `json:"sample"`
		Size   int64  `json:"size"`
	}
	modes := map[string]string{}
	for start := 0; start < len(files); start += 256 { // the hub's limit per call
		var req struct {
			Files []entry `json:"files"`
		}
		for _, f := range files[start:min(start+256, len(files))] {
			head, err := readHead(ctx, f, sampleBytes)
			if err != nil {
				return nil, fmt.Errorf("push %s: %w", repo, err)
			}
			req.Files = append(req.Files, entry{Path: f.Path, Sample: base64.StdEncoding.EncodeToString(head), Size: f.Size})
		}
		b, _ := json.Marshal(req)
		var ans struct {
			Files []struct {
				Path         string `json:"path"`
				UploadMode   string `json:"uploadMode"`
				ShouldIgnore bool   `json:"shouldIgnore"`
			} `json:"files"`
		}
		u := c.base() + "/api/models/" + repo + "/preupload/" + url.PathEscape(rev)
		if err := c.call(ctx, "preupload", http.MethodPost, u, "application/json", b, &ans); err != nil {
			return nil, err
		}
		for _, f := range ans.Files {
			if f.ShouldIgnore {
				return nil, &StatusError{Op: "preupload", Status: http.StatusUnprocessableEntity, Message: f.Path + " is ignored by the repository's .gitignore"}
			}
			modes[f.Path] = f.UploadMode
		}
	}
	for _, f := range files {
		if m := modes[f.Path]; m != "lfs" && m != "regular" {
			return nil, &StatusError{Op: "preupload", Status: http.StatusBadGateway, Message: fmt.Sprintf("upload mode %q for %s (this client speaks lfs and regular)", m, f.Path)}
		}
	}
	return modes, nil
}

// lfsAction is one action of an LFS batch answer.
type lfsAction struct {
	Href   string            `json:"href"`
	Header map[string]string `json:"header"`
}

// uploadLFS sends the LFS objects the hub does not hold yet.
func (c *Client) uploadLFS(ctx context.Context, repo, rev string, files []Upload) (sent, kept []string, err error) {
	type object struct {
		OID  string `json:"oid"`
		Size int64  `json:"size"`
	}
	req := map[string]any{
		"operation": "upload", "transfers": []string{"basic", "multipart"}, "hash_algo": "sha256",
		"ref": map[string]string{"name": rev},
	}
	var objs []object
	byOID := map[string]Upload{}
	for _, f := range files {
		if _, dup := byOID[f.SHA256]; !dup {
			objs = append(objs, object{f.SHA256, f.Size})
		}
		byOID[f.SHA256] = f
	}
	req["objects"] = objs
	b, _ := json.Marshal(req)
	var ans struct {
		Objects []struct {
			OID     string `json:"oid"`
			Size    int64  `json:"size"`
			Actions *struct {
				Upload *lfsAction `json:"upload"`
				Verify *lfsAction `json:"verify"`
			} `json:"actions"`
			Error *struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		} `json:"objects"`
	}
	if err := c.call(ctx, "lfs batch", http.MethodPost, c.base()+"/"+repo+".git/info/lfs/objects/batch", "application/vnd.git-lfs+json", b, &ans); err != nil {
		return nil, nil, err
	}
	answered := map[string]bool{}
	for _, o := range ans.Objects {
		f, ok := byOID[o.OID]
		if !ok {
			return nil, nil, &StatusError{Op: "lfs batch", Status: http.StatusBadGateway, Message: "an answer for an object not asked about: " + o.OID}
		}
		answered[o.OID] = true
		switch {
		case o.Error != nil:
			return nil, nil, &StatusError{Op: "lfs batch " + f.Path, Status: o.Error.Code, Message: o.Error.Message}
		case o.Actions == nil || o.Actions.Upload == nil:
			kept = append(kept, f.Path) // the hub holds it already
			continue
		}
		if err := c.uploadObject(ctx, f, *o.Actions.Upload); err != nil {
			return nil, nil, err
		}
		if v := o.Actions.Verify; v != nil {
			vb, _ := json.Marshal(object{f.SHA256, f.Size})
			if err := c.call(ctx, "verify "+f.Path, http.MethodPost, v.Href, "application/vnd.git-lfs+json", vb, nil); err != nil {
				return nil, nil, err
			}
		}
		sent = append(sent, f.Path)
	}
	for _, o := range objs {
		if !answered[o.OID] {
			return nil, nil, &StatusError{Op: "lfs batch", Status: http.StatusBadGateway, Message: "no answer for " + byOID[o.OID].Path}
		}
	}
	return sent, kept, nil
}

// uploadObject sends one LFS object: a single PUT, or, when the action
// carries a chunk_size, one PUT per part to the numbered URLs and a
// completion call listing the parts' ETags.
func (c *Client) uploadObject(ctx context.Context, f Upload, a lfsAction) error {
	op := "upload " + f.Path
	cs, multipart := a.Header["chunk_size"]
	if !multipart {
		rc, err := f.Open(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		defer rc.Close()
		hdr := map[string]string{}
		for k, v := range a.Header {
			hdr[k] = v
		}
		// The transport reads the body to its end (it checks for bytes past
		// the length), where a verifying reader fails on content that does
		// not match its checksum: that failure must fail the push even
		// when the upload server took the bytes.
		body := &readTrap{r: rc}
		if _, err := c.send(ctx, op, http.MethodPut, a.Href, body, f.Size, hdr); err != nil {
			return errors.Join(err, body.err)
		}
		if body.err != nil {
			return fmt.Errorf("%s: %w", op, body.err)
		}
		return nil
	}
	chunk, err := strconv.ParseInt(cs, 10, 64)
	if err != nil || chunk <= 0 {
		return &StatusError{Op: op, Status: http.StatusBadGateway, Message: fmt.Sprintf("chunk_size %q", cs)}
	}
	// The part URLs are under numbered keys ("00001", ...), the rest of
	// the header being chunk_size.
	type partURL struct {
		n   int
		url string
	}
	var parts []partURL
	for k, v := range a.Header {
		if n, err := strconv.Atoi(k); err == nil && n > 0 {
			parts = append(parts, partURL{n, v})
		}
	}
	sort.Slice(parts, func(i, j int) bool { return parts[i].n < parts[j].n })
	if want := int64(math.Ceil(float64(f.Size) / float64(chunk))); int64(len(parts)) != want {
		return &StatusError{Op: op, Status: http.StatusBadGateway, Message: fmt.Sprintf("%d part URLs for %d bytes in parts of %d", len(parts), f.Size, chunk)}
	}
	rc, err := f.Open(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer rc.Close()
	type part struct {
		N    int    `json:"partNumber"`
		ETag string `json:"etag"`
	}
	var done []part
	for i, p := range parts {
		size := min(chunk, f.Size-int64(i)*chunk)
		pop := fmt.Sprintf("%s part %d", op, i+1)
		hdrs, err := c.send(ctx, pop, http.MethodPut, p.url, io.LimitReader(rc, size), size, nil)
		if err != nil {
			return err
		}
		etag := hdrs.Get("ETag")
		if etag == "" {
			return &StatusError{Op: pop, Status: http.StatusBadGateway, Message: "no ETag in the answer"}
		}
		done = append(done, part{i + 1, etag})
	}
	// The content must end where the size said: a longer source is not
	// the object the hub was told of; reading to the end also lets a
	// verifying reader check the whole content before it is committed.
	if n, err := io.Copy(io.Discard, io.LimitReader(rc, 1)); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	} else if n > 0 {
		return fmt.Errorf("%s: the content is longer than its %d bytes", op, f.Size)
	}
	b, _ := json.Marshal(map[string]any{"oid": f.SHA256, "parts": done})
	_, err = c.send(ctx, op+" completion", http.MethodPost, a.Href, bytes.NewReader(b), int64(len(b)), map[string]string{
		"Content-Type": "application/vnd.git-lfs+json", "Accept": "application/vnd.git-lfs+json"})
	return err
}

// call sends a JSON (or NDJSON) request with the token to the hub's API
// and decodes the answer into out (nil: discard).
func (c *Client) call(ctx context.Context, op, method, u, contentType string, body []byte, out any) error {
	hdr := map[string]string{"Content-Type": contentType, "Accept": "application/json"}
	if strings.HasPrefix(contentType, "application/vnd.git-lfs") {
		hdr["Accept"] = contentType
	}
	if t := c.token(); t != "" && c.sameOrigin(u) {
		hdr["Authorization"] = "Bearer " + t
	}
	req, err := http.NewRequestWithContext(ctx, method, u, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("hub %s: %w", op, err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.http().Do(req)
	if err != nil {
		return &StatusError{Op: op, Err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return statusError(op, resp)
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(out); err != nil {
		return &StatusError{Op: op, Status: http.StatusBadGateway, Message: "malformed answer: " + err.Error()}
	}
	return nil
}

// send streams size bytes of r to an upload URL. The token goes along only
// to the hub's own origin: upload URLs elsewhere are pre-signed.
func (c *Client) send(ctx context.Context, op, method, u string, r io.Reader, size int64, hdr map[string]string) (http.Header, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, r)
	if err != nil {
		return nil, fmt.Errorf("hub %s: %w", op, err)
	}
	req.ContentLength = size
	if size == 0 {
		req.Body = http.NoBody
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	if t := c.token(); t != "" && c.sameOrigin(u) {
		req.Header.Set("Authorization", "Bearer "+t)
	}
	resp, err := c.http().Do(req)
	if err != nil {
		return nil, &StatusError{Op: op, Err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return nil, statusError(op, resp)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	return resp.Header, nil
}

// sameOrigin reports whether u is on the hub's own scheme and host.
func (c *Client) sameOrigin(u string) bool {
	a, err1 := url.Parse(u)
	b, err2 := url.Parse(c.base())
	return err1 == nil && err2 == nil && a.Scheme == b.Scheme && a.Host == b.Host
}

// statusError reads the hub's error message: {"error": "..."}, or the
// body's first line.
func statusError(op string, resp *http.Response) error {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	var j struct {
		Error any `json:"error"`
	}
	msg := ""
	if json.Unmarshal(raw, &j) == nil && j.Error != nil {
		switch e := j.Error.(type) {
		case string:
			msg = e
		default:
			b, _ := json.Marshal(e)
			msg = string(b)
		}
	} else {
		line, _, _ := bufio.NewReader(bytes.NewReader(raw)).ReadLine()
		msg = strings.TrimSpace(string(line))
	}
	if len(msg) > 300 {
		msg = msg[:300] + "..."
	}
	return &StatusError{Op: op, Status: resp.StatusCode, Message: msg}
}

func readHead(ctx context.Context, f Upload, n int64) ([]byte, error) {
	rc, err := f.Open(ctx)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", f.Path, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, n))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", f.Path, err)
	}
	return b, nil
}

// readAll reads a whole file, to its end (where a verifying reader
// checks it), refusing one over limit or not of its stated size.
func readAll(ctx context.Context, f Upload, limit int64) ([]byte, error) {
	if f.Size > limit {
		return nil, fmt.Errorf("file %s: %d bytes inline, over the %d-byte limit", f.Path, f.Size, limit)
	}
	rc, err := f.Open(ctx)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", f.Path, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", f.Path, err)
	}
	if int64(len(b)) != f.Size {
		return nil, fmt.Errorf("read %s: %d bytes, want %d", f.Path, len(b), f.Size)
	}
	return b, nil
}

// readTrap keeps the first error its reader returned other than EOF.
type readTrap struct {
	r   io.Reader
	err error
}

func (t *readTrap) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err != nil && err != io.EOF && t.err == nil {
		t.err = err
	}
	return n, err
}
