package coordinator

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// Downloads through the Tinker door: the tinker SDK's
// get_external_weights_urls answers one URL per file, signed and
// short-lived, which any member serves by streaming the file from the
// network's store, verified against its CID on the way (the bytes a user
// gets are the bytes the checkpoint names).

// fileURLTTL is how long a signed download URL stays valid.
const fileURLTTL = 15 * time.Minute

// fileKey is the signing key of download URLs: every member derives the
// same one from the cluster's admin token, so any member serves them.
func (c *Coordinator) fileKey() []byte {
	k := sha256.Sum256([]byte("signal tinker file urls\x00" + c.cfg.AdminToken))
	return k[:]
}

// signFile makes the token of one file's URL: path, file and expiry,
// and their MAC.
func (c *Coordinator) signFile(path, file string, exp time.Time) string {
	payload := path + "\n" + file + "\n" + strconv.FormatInt(exp.Unix(), 10)
	m := hmac.New(sha256.New, c.fileKey())
	m.Write([]byte(payload))
	return base64.RawURLEncoding.EncodeToString([]byte(payload)) + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

var errBadFileToken = errors.New("bad file token")

func (c *Coordinator) verifyFile(token string, at time.Time) (path, file string, err error) {
	p64, mac64, ok := strings.Cut(token, ".")
	payload, err1 := base64.RawURLEncoding.DecodeString(p64)
	mac, err2 := base64.RawURLEncoding.DecodeString(mac64)
	if !ok || err1 != nil || err2 != nil {
		return "", "", errBadFileToken
	}
	m := hmac.New(sha256.New, c.fileKey())
	m.Write(payload)
	if !hmac.Equal(mac, m.Sum(nil)) {
		return "", "", errBadFileToken
	}
	parts := strings.Split(string(payload), "\n")
	if len(parts) != 3 {
		return "", "", errBadFileToken
	}
	exp, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil || at.Unix() > exp {
		return "", "", fmt.Errorf("%w: expired", errBadFileToken)
	}
	return parts[0], parts[1], nil
}

// tinkerCheckpointAt resolves the checkpoint of a REST path
// (training_runs/{id}/checkpoints/{kind}/{name}).
func (c *Coordinator) tinkerCheckpointAt(cl *call) (TinkerCheckpoint, *RunRecord, error) {
	rec, err := c.tinkerRunOf(cl.account, cl.r.PathValue("id"))
	if err != nil {
		return TinkerCheckpoint{}, nil, err
	}
	path := fmt.Sprintf("tinker://%s/%s/%s", rec.Run.ID, cl.r.PathValue("kind"), cl.r.PathValue("name"))
	return c.tinkerCheckpointOf(cl.account, path, "checkpoint")
}

// checkpointFiles lists a Tinker checkpoint's stored files.
func (c *Coordinator) checkpointFiles(tc TinkerCheckpoint) ([]protocol.CheckpointFile, error) {
	var files []protocol.CheckpointFile
	var found bool
	c.fsm.read(func(s *State) {
		if r, ok := s.Run(tc.RunID); ok {
			for _, cp := range r.Run.Checkpoints {
				if cp.ID == tc.Checkpoint {
					files, found = cp.Files, true
				}
			}
		}
	})
	if !found {
		return nil, protocol.UserErrorf(ErrNotFound, "the files of %s are gone (its run's checkpoints were collected)", tc.Path)
	}
	return files, nil
}

// tinkerFileURLs answers signed download URLs, one per file. Tinker
// serves them for external weights; Signal for every checkpoint kind.
func (c *Coordinator) tinkerFileURLs(cl *call) (any, error) {
	tc, _, err := c.tinkerCheckpointAt(cl)
	if err != nil {
		return nil, err
	}
	if c.cfg.OpenCheckpointFile == nil {
		return nil, protocol.UserErrorf(ErrUnavailable, "this coordinator has no checkpoint store configured: start it with --storage to serve downloads")
	}
	files, err := c.checkpointFiles(tc)
	if err != nil {
		return nil, err
	}
	exp := time.Now().Add(fileURLTTL).UTC()
	urls := map[string]string{}
	for _, f := range files {
		urls[f.Name] = "http://" + cl.r.Host + "/api/v1/checkpoint_files/" + c.signFile(tc.Path, f.Name, exp)
	}
	return map[string]any{"urls": urls, "expires": exp.Format(time.RFC3339)}, nil
}

// tinkerFile streams one file of a signed URL; the token is the
// credential, as a presigned store URL's is.
func (c *Coordinator) tinkerFile(w http.ResponseWriter, r *http.Request) {
	path, file, err := c.verifyFile(r.PathValue("token"), time.Now())
	if err != nil {
		writeError(w, http.StatusForbidden, protocol.CodeForbidden, "this download URL is not valid or has expired: ask get_external_weights_urls for a new one", "")
		return
	}
	var tc TinkerCheckpoint
	var ok bool
	c.fsm.read(func(s *State) { tc, ok = s.TinkerCheckpoint(path) })
	var files []protocol.CheckpointFile
	if ok {
		files, err = c.checkpointFiles(tc)
	}
	if !ok || err != nil || c.cfg.OpenCheckpointFile == nil {
		writeError(w, http.StatusNotFound, protocol.CodeNotFound, "the checkpoint of this download URL is gone", "")
		return
	}
	for _, f := range files {
		if f.Name != file {
			continue
		}
		rc, err := c.cfg.OpenCheckpointFile(r.Context(), f)
		if err != nil {
			c.log.Warn("open checkpoint file", "category", "infrastructure", "path", path, "file", file, "err", err)
			writeError(w, http.StatusServiceUnavailable, protocol.CodeUnavailable, "the checkpoint store cannot be read now; retry", "")
			return
		}
		defer rc.Close()
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(f.Size, 10))
		if _, err := io.Copy(w, rc); err != nil {
			// The length was promised: a body cut short (or failing its
			// CID check at the end) is a failed download, not a short file.
			c.log.Warn("stream checkpoint file", "category", "infrastructure", "path", path, "file", file, "err", err)
		}
		return
	}
	writeError(w, http.StatusNotFound, protocol.CodeNotFound, "the checkpoint of this download URL has no file "+file, "")
}

// tinkerSetTTL sets a checkpoint's time to live: past it the tinker://
// name is forgotten (tinkerExpire); null keeps it.
func (c *Coordinator) tinkerSetTTL(cl *call) (any, error) {
	tc, _, err := c.tinkerCheckpointAt(cl)
	if err != nil {
		return nil, err
	}
	var req struct {
		TTLSeconds *int64 `json:"ttl_seconds"`
	}
	if err := decodeTinker(cl.body, &req); err != nil {
		return nil, err
	}
	tc.Expires, err = expiry(req.TTLSeconds)
	if err != nil {
		return nil, err
	}
	if _, err := c.propose(cl.r.Context(), cmdTinker, tinkerCmd{Checkpoints: []TinkerCheckpoint{tc}}); err != nil {
		return nil, err
	}
	return map[string]any{}, nil
}

// expiry is the RFC 3339 time ttl seconds from now ("" for none).
func expiry(ttl *int64) (string, error) {
	if ttl == nil {
		return "", nil
	}
	if *ttl <= 0 || *ttl > 10*365*24*3600 {
		return "", protocol.UserErrorf(ErrInvalidRequest, "ttl_seconds %d is out of range: give 1 second to 10 years, or null to keep the checkpoint", *ttl)
	}
	return time.Now().Add(time.Duration(*ttl) * time.Second).UTC().Format(time.RFC3339), nil
}

// tinkerExpire forgets the tinker:// names whose time to live passed.
func (c *Coordinator) tinkerExpired() []string {
	now := time.Now().UTC().Format(time.RFC3339)
	var gone []string
	c.fsm.read(func(s *State) {
		for p, tc := range s.tinker.checkpoints {
			if tc.Expires != "" && tc.Expires < now {
				gone = append(gone, p)
			}
		}
	})
	return gone
}
