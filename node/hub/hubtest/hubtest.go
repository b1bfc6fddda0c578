// Package hubtest is a local server speaking the part of the Hugging Face
// Hub's HTTP API that Signal uses, for tests: repository creation, the
// commit API (preupload, the git LFS batch call with basic and multipart
// uploads and verification, the NDJSON commit) and the downloader's
// listing (/api/models/{repo}?blobs=true) and file reads (/{repo}/resolve/
// {rev}/{file}, with Range). LFS uploads go to a second server, as the
// Hub's go to pre-signed storage URLs, so a test sees what reached which.
// Faults are injected per upload or commit, for failed and resumed pushes.
package hubtest

import (
	"bufio"
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

// Server is a local hub. Its fields may be set before the first request.
type Server struct {
	// URL is the API's base URL (the client's BaseURL).
	URL string
	// StorageURL is where LFS uploads go.
	StorageURL string
	// Token is the one token with write access ("" accepts any).
	Token string
	// LFSMinBytes: files at least this large, or binary, or named like
	// the Hub's default .gitattributes (*.safetensors, *.bin, *.gguf),
	// go through LFS. Default 10 MiB, as the Hub's.
	LFSMinBytes int64
	// ChunkBytes, when > 0, makes LFS uploads of more than that many
	// bytes multipart, in parts of that size.
	ChunkBytes int64
	// FailUpload, when set, is asked before each LFS upload of the object
	// oid (the content's sha256, part 0) or of one of its parts (1, 2,
	// ...): true fails it with a 500 after reading half its body, as
	// storage that breaks mid-upload does.
	FailUpload func(oid string, part int) bool
	// FailCommit, when set, is asked before each commit: true answers 500.
	FailCommit func() bool

	mu       sync.Mutex
	repos    map[string]*Repo
	objects  map[string][]byte         // complete LFS objects by sha256
	parts    map[string]map[int][]byte // multipart uploads in progress
	requests []Request
}

// Repo is a repository's state.
type Repo struct {
	Private bool
	// Files are the latest commit's files.
	Files map[string][]byte
	// Commits are the commit ids, oldest first; Snapshots their files.
	Commits   []string
	Snapshots map[string]map[string][]byte
	// Messages are the commits' summaries.
	Messages []string
}

// Request is one request the servers received.
type Request struct {
	Method, Path string
	// Storage is true for the upload server.
	Storage bool
	// Auth is the Authorization header.
	Auth string
	// Bytes is how much body was read.
	Bytes int64
	// Status is the answer's status.
	Status int
}

// Start starts a hub and its upload server, stopped at the test's end.
func Start(t testing.TB) *Server {
	t.Helper()
	s := &Server{LFSMinBytes: 10 << 20, repos: map[string]*Repo{}, objects: map[string][]byte{},
		parts: map[string]map[int][]byte{}}
	api := httptest.NewServer(s.record(false, http.HandlerFunc(s.serveAPI)))
	store := httptest.NewServer(s.record(true, http.HandlerFunc(s.serveStorage)))
	t.Cleanup(api.Close)
	t.Cleanup(store.Close)
	s.URL, s.StorageURL = api.URL, store.URL
	return s
}

// Repo returns a copy of a repository's state, or nil.
func (s *Server) Repo(name string) *Repo {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.repos[name]
	if r == nil {
		return nil
	}
	cp := *r
	cp.Files = map[string][]byte{}
	for k, v := range r.Files {
		cp.Files[k] = v
	}
	cp.Commits = append([]string(nil), r.Commits...)
	cp.Messages = append([]string(nil), r.Messages...)
	return &cp
}

// Requests returns every request so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...)
}

type countingBody struct {
	io.ReadCloser
	n int64
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n += int64(n)
	return n, err
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(s int) {
	if w.status == 0 {
		w.status = s
	}
	w.ResponseWriter.WriteHeader(s)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (s *Server) record(storage bool, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body := &countingBody{ReadCloser: r.Body}
		r.Body = body
		sw := &statusWriter{ResponseWriter: w}
		h.ServeHTTP(sw, r)
		s.mu.Lock()
		s.requests = append(s.requests, Request{Method: r.Method, Path: r.URL.Path, Storage: storage,
			Auth: r.Header.Get("Authorization"), Bytes: body.n, Status: sw.status})
		s.mu.Unlock()
	})
}

func fail(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

func (s *Server) authorized(r *http.Request) bool {
	return s.Token == "" || r.Header.Get("Authorization") == "Bearer "+s.Token
}

func (s *Server) serveAPI(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	switch {
	case r.Method == http.MethodPost && p == "/api/repos/create":
		s.createRepo(w, r)
	case r.Method == http.MethodPost && strings.HasPrefix(p, "/api/models/") && strings.Contains(p, "/preupload/"):
		repo, _, _ := strings.Cut(strings.TrimPrefix(p, "/api/models/"), "/preupload/")
		s.preupload(w, r, repo)
	case r.Method == http.MethodPost && strings.HasPrefix(p, "/api/models/") && strings.Contains(p, "/commit/"):
		repo, _, _ := strings.Cut(strings.TrimPrefix(p, "/api/models/"), "/commit/")
		s.commit(w, r, repo)
	case r.Method == http.MethodPost && strings.HasSuffix(p, ".git/info/lfs/objects/batch"):
		s.batch(w, r, strings.TrimSuffix(strings.TrimPrefix(p, "/"), ".git/info/lfs/objects/batch"))
	case r.Method == http.MethodPost && strings.HasPrefix(p, "/lfs-verify/"):
		s.verify(w, r)
	case r.Method == http.MethodPost && strings.HasPrefix(p, "/lfs-complete/"):
		s.complete(w, r, strings.TrimPrefix(p, "/lfs-complete/"))
	case r.Method == http.MethodGet && strings.HasPrefix(p, "/api/models/"):
		s.info(w, r, strings.TrimPrefix(p, "/api/models/"))
	case r.Method == http.MethodGet && strings.Contains(p, "/resolve/"):
		repo, rest, _ := strings.Cut(strings.TrimPrefix(p, "/"), "/resolve/")
		rev, file, _ := strings.Cut(rest, "/")
		s.resolve(w, r, repo, rev, file)
	default:
		fail(w, http.StatusNotFound, "no route "+r.Method+" "+p)
	}
}

// repoFor returns the repository a request may read (write: may change).
func (s *Server) repoFor(w http.ResponseWriter, r *http.Request, name string, write bool) *Repo {
	repo := s.repos[name]
	switch {
	case write && !s.authorized(r):
		fail(w, http.StatusUnauthorized, "Invalid credentials in Authorization header")
	case repo == nil || (repo.Private && !s.authorized(r)):
		fail(w, http.StatusNotFound, "Repository not found")
	default:
		return repo
	}
	return nil
}

func (s *Server) createRepo(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Name         string `json:"name"`
		Organization string `json:"organization"`
		Type         string `json:"type"`
		Private      bool   `json:"private"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Name == "" || (req.Type != "" && req.Type != "model") {
		fail(w, http.StatusBadRequest, "bad create request")
		return
	}
	if !s.authorized(r) {
		fail(w, http.StatusUnauthorized, "Invalid credentials in Authorization header")
		return
	}
	name := req.Name
	if req.Organization != "" {
		name = req.Organization + "/" + req.Name
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.repos[name] != nil {
		fail(w, http.StatusConflict, "You already created this model repo")
		return
	}
	s.repos[name] = &Repo{Private: req.Private, Files: map[string][]byte{}, Snapshots: map[string]map[string][]byte{}}
	_ = json.NewEncoder(w).Encode(map[string]string{"url": s.URL + "/" + name, "name": name})
}

func (s *Server) isLFS(name string, size int64, sample []byte) bool {
	switch path.Ext(name) {
	case ".safetensors", ".bin", ".gguf", ".pt", ".pth":
		return true
	}
	return size >= s.LFSMinBytes || bytes.IndexByte(sample, 0) >= 0 || !utf8.Valid(sample)
}

func (s *Server) preupload(w http.ResponseWriter, r *http.Request, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.repoFor(w, r, name, true) == nil {
		return
	}
	var req struct {
		Files []struct {
			Path   string `json:"path"`
			Sample string `json:"sample"`
			Size   int64  `json:"size"`
		} `json:"files"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	type ans struct {
		Path         string `json:"path"`
		UploadMode   string `json:"uploadMode"`
		ShouldIgnore bool   `json:"shouldIgnore"`
	}
	var out []ans
	for _, f := range req.Files {
		sample, err := base64.StdEncoding.DecodeString(f.Sample)
		if err != nil || len(sample) > 512 {
			fail(w, http.StatusBadRequest, "bad sample for "+f.Path)
			return
		}
		mode := "regular"
		if s.isLFS(f.Path, f.Size, sample) {
			mode = "lfs"
		}
		out = append(out, ans{Path: f.Path, UploadMode: mode})
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"files": out})
}

func (s *Server) batch(w http.ResponseWriter, r *http.Request, name string) {
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/vnd.git-lfs+json") {
		fail(w, http.StatusUnsupportedMediaType, "want application/vnd.git-lfs+json, got "+ct)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.repoFor(w, r, name, true) == nil {
		return
	}
	var req struct {
		Operation string   `json:"operation"`
		Transfers []string `json:"transfers"`
		HashAlgo  string   `json:"hash_algo"`
		Objects   []struct {
			OID  string `json:"oid"`
			Size int64  `json:"size"`
		} `json:"objects"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Operation != "upload" || req.HashAlgo != "sha256" {
		fail(w, http.StatusBadRequest, "want an upload batch of sha256 objects")
		return
	}
	var objs []map[string]any
	for _, o := range req.Objects {
		obj := map[string]any{"oid": o.OID, "size": o.Size}
		if b, ok := s.objects[o.OID]; ok && int64(len(b)) == o.Size {
			objs = append(objs, obj) // held: no actions
			continue
		}
		if _, err := hex.DecodeString(o.OID); err != nil || len(o.OID) != 64 {
			obj["error"] = map[string]any{"code": 422, "message": "invalid oid"}
			objs = append(objs, obj)
			continue
		}
		upload := map[string]any{"href": s.StorageURL + "/put/" + o.OID + "?size=" + strconv.FormatInt(o.Size, 10)}
		if s.ChunkBytes > 0 && o.Size > s.ChunkBytes {
			hdr := map[string]string{"chunk_size": strconv.FormatInt(s.ChunkBytes, 10)}
			for i := int64(1); (i-1)*s.ChunkBytes < o.Size; i++ {
				hdr[fmt.Sprintf("%05d", i)] = fmt.Sprintf("%s/part/%s/%d", s.StorageURL, o.OID, i)
			}
			upload = map[string]any{"href": s.URL + "/lfs-complete/" + o.OID, "header": hdr}
		}
		obj["actions"] = map[string]any{
			"upload": upload,
			"verify": map[string]any{"href": s.URL + "/lfs-verify/" + o.OID},
		}
		objs = append(objs, obj)
	}
	w.Header().Set("Content-Type", "application/vnd.git-lfs+json")
	_ = json.NewEncoder(w).Encode(map[string]any{"transfer": "basic", "objects": objs})
}

// failMidway reads half of the body and answers 500.
func failMidway(w http.ResponseWriter, r *http.Request) {
	n := r.ContentLength / 2
	_, _ = io.CopyN(io.Discard, r.Body, n)
	fail(w, http.StatusInternalServerError, "storage failed mid-upload")
}

func (s *Server) serveStorage(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPut {
		fail(w, http.StatusMethodNotAllowed, "PUT only")
		return
	}
	p := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/")
	switch {
	case len(p) == 2 && p[0] == "put":
		oid := p[1]
		if s.FailUpload != nil && s.FailUpload(oid, 0) {
			failMidway(w, r)
			return
		}
		b, err := io.ReadAll(r.Body)
		if err != nil {
			fail(w, http.StatusBadRequest, err.Error())
			return
		}
		sum := sha256.Sum256(b)
		if hex.EncodeToString(sum[:]) != oid || strconv.Itoa(len(b)) != r.URL.Query().Get("size") {
			fail(w, http.StatusBadRequest, "content does not match its oid")
			return
		}
		s.mu.Lock()
		s.objects[oid] = b
		s.mu.Unlock()
	case len(p) == 3 && p[0] == "part":
		oid := p[1]
		n, err := strconv.Atoi(p[2])
		if err != nil {
			fail(w, http.StatusBadRequest, "part number")
			return
		}
		if s.FailUpload != nil && s.FailUpload(oid, n) {
			failMidway(w, r)
			return
		}
		b, err := io.ReadAll(r.Body)
		if err != nil {
			fail(w, http.StatusBadRequest, err.Error())
			return
		}
		sum := sha256.Sum256(b)
		s.mu.Lock()
		if s.parts[oid] == nil {
			s.parts[oid] = map[int][]byte{}
		}
		s.parts[oid][n] = b
		s.mu.Unlock()
		w.Header().Set("ETag", `"`+hex.EncodeToString(sum[:16])+`"`)
	default:
		fail(w, http.StatusNotFound, "no such upload")
	}
}

func (s *Server) complete(w http.ResponseWriter, r *http.Request, oid string) {
	var req struct {
		OID   string `json:"oid"`
		Parts []struct {
			N    int    `json:"partNumber"`
			ETag string `json:"etag"`
		} `json:"parts"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.OID != oid || len(req.Parts) == 0 {
		fail(w, http.StatusBadRequest, "bad completion")
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var all []byte
	for i, p := range req.Parts {
		b, ok := s.parts[oid][p.N]
		sum := sha256.Sum256(b)
		if !ok || p.N != i+1 || p.ETag != `"`+hex.EncodeToString(sum[:16])+`"` {
			fail(w, http.StatusBadRequest, fmt.Sprintf("part %d missing or its etag differs", p.N))
			return
		}
		all = append(all, b...)
	}
	sum := sha256.Sum256(all)
	if hex.EncodeToString(sum[:]) != oid {
		fail(w, http.StatusBadRequest, "parts do not make the object")
		return
	}
	s.objects[oid] = all
	delete(s.parts, oid)
	_ = json.NewEncoder(w).Encode(map[string]string{})
}

func (s *Server) verify(w http.ResponseWriter, r *http.Request) {
	if !s.authorized(r) {
		fail(w, http.StatusUnauthorized, "Invalid credentials in Authorization header")
		return
	}
	var req struct {
		OID  string `json:"oid"`
		Size int64  `json:"size"`
	}
	_ = json.NewDecoder(r.Body).Decode(&req)
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.objects[req.OID]; !ok || int64(len(b)) != req.Size || "/lfs-verify/"+req.OID != r.URL.Path {
		fail(w, http.StatusNotFound, "object not uploaded")
		return
	}
	_ = json.NewEncoder(w).Encode(map[string]string{})
}

func (s *Server) commit(w http.ResponseWriter, r *http.Request, name string) {
	if ct := r.Header.Get("Content-Type"); ct != "application/x-ndjson" {
		fail(w, http.StatusUnsupportedMediaType, "want application/x-ndjson, got "+ct)
		return
	}
	if s.FailCommit != nil && s.FailCommit() {
		_, _ = io.Copy(io.Discard, r.Body)
		fail(w, http.StatusInternalServerError, "commit failed")
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	repo := s.repoFor(w, r, name, true)
	if repo == nil {
		return
	}
	files := map[string][]byte{}
	for k, v := range repo.Files {
		files[k] = v
	}
	sc := bufio.NewScanner(r.Body)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	summary := ""
	for first := true; sc.Scan(); first = false {
		var line struct {
			Key   string `json:"key"`
			Value struct {
				Summary  string `json:"summary"`
				Path     string `json:"path"`
				Content  string `json:"content"`
				Encoding string `json:"encoding"`
				Algo     string `json:"algo"`
				OID      string `json:"oid"`
				Size     int64  `json:"size"`
			} `json:"value"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			fail(w, http.StatusBadRequest, "bad ndjson line: "+err.Error())
			return
		}
		v := line.Value
		switch {
		case first != (line.Key == "header"):
			fail(w, http.StatusBadRequest, "the header must come first, once")
			return
		case line.Key == "header":
			summary = v.Summary
		case line.Key == "file" && v.Encoding == "base64":
			b, err := base64.StdEncoding.DecodeString(v.Content)
			if err != nil {
				fail(w, http.StatusBadRequest, "bad base64 for "+v.Path)
				return
			}
			files[v.Path] = b
		case line.Key == "lfsFile" && v.Algo == "sha256":
			b, ok := s.objects[v.OID]
			if !ok || int64(len(b)) != v.Size {
				fail(w, http.StatusUnprocessableEntity, "LFS object "+v.OID+" of "+v.Path+" was not uploaded")
				return
			}
			files[v.Path] = b
		default:
			fail(w, http.StatusBadRequest, "unknown line "+line.Key)
			return
		}
	}
	if summary == "" {
		fail(w, http.StatusBadRequest, "no commit summary")
		return
	}
	h := sha1.New()
	fmt.Fprintf(h, "%s %d %d", name, len(repo.Commits), time.Now().UnixNano())
	oid := hex.EncodeToString(h.Sum(nil))
	repo.Files = files
	repo.Commits = append(repo.Commits, oid)
	repo.Messages = append(repo.Messages, summary)
	repo.Snapshots[oid] = files
	_ = json.NewEncoder(w).Encode(map[string]any{"commitUrl": s.URL + "/" + name + "/commit/" + oid, "commitOid": oid})
}

func (s *Server) info(w http.ResponseWriter, r *http.Request, name string) {
	name, rev, _ := strings.Cut(name, "/revision/")
	s.mu.Lock()
	defer s.mu.Unlock()
	repo := s.repoFor(w, r, name, false)
	if repo == nil {
		return
	}
	sha, files := s.snapshot(repo, rev)
	if files == nil {
		fail(w, http.StatusNotFound, "Revision not found")
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
	for name, b := range files {
		sb := sib{Name: name, Size: int64(len(b))}
		if s.isLFS(name, int64(len(b)), b[:min(len(b), 512)]) {
			sum := sha256.Sum256(b)
			sb.LFS = &lfs{SHA256: hex.EncodeToString(sum[:]), Size: int64(len(b))}
			sb.BlobID = strings.Repeat("f", 40)
		} else {
			g := sha1.New()
			fmt.Fprintf(g, "blob %d\x00", len(b))
			g.Write(b)
			sb.BlobID = hex.EncodeToString(g.Sum(nil))
		}
		sibs = append(sibs, sb)
	}
	sort.Slice(sibs, func(i, j int) bool { return sibs[i].Name < sibs[j].Name })
	_ = json.NewEncoder(w).Encode(map[string]any{"id": name, "sha": sha, "private": repo.Private, "siblings": sibs})
}

// snapshot is a repository's files at rev ("" or "main": the latest).
func (s *Server) snapshot(repo *Repo, rev string) (string, map[string][]byte) {
	if len(repo.Commits) == 0 {
		return "", nil
	}
	if rev == "" || rev == "main" {
		last := repo.Commits[len(repo.Commits)-1]
		return last, repo.Files
	}
	return rev, repo.Snapshots[rev]
}

func (s *Server) resolve(w http.ResponseWriter, r *http.Request, name, rev, file string) {
	s.mu.Lock()
	repo := s.repoFor(w, r, name, false)
	var b []byte
	var ok bool
	if repo != nil {
		_, files := s.snapshot(repo, rev)
		b, ok = files[file]
	}
	s.mu.Unlock()
	if repo == nil {
		return
	}
	if !ok {
		fail(w, http.StatusNotFound, "Entry not found")
		return
	}
	http.ServeContent(w, r, file, time.Time{}, bytes.NewReader(b))
}
