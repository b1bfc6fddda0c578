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

// Checkpoint downloads through the coordinator: GET
// /v1/checkpoints/{id}/files (and the Tinker door's
// get_external_weights_urls) answer one URL per file, signed and
// short-lived, which any member serves by streaming the file from the
// network's store, verified against its CID on the way: the bytes a user
// gets are the bytes the checkpoint names, and a user needs no store
// credentials.

// fileURLTTL is how long a signed download URL stays valid.
const fileURLTTL = 15 * time.Minute

// fileKey is the signing key of download URLs: every member derives the
// same one from the cluster's admin token, so any member serves them.
func (c *Coordinator) fileKey() []byte {
	k := sha256.Sum256([]byte("signal checkpoint file urls\x00" + c.cfg.AdminToken))
	return k[:]
}

// fileToken is what a download URL grants: one file of one of an
// account's checkpoints, until Expires.
type fileToken struct {
	Account, Checkpoint, File string
	Expires                   time.Time
}

// signFile makes the token of one file's URL: what it grants and its MAC.
func (c *Coordinator) signFile(t fileToken) string {
	payload := strings.Join([]string{t.Account, t.Checkpoint, t.File, strconv.FormatInt(t.Expires.Unix(), 10)}, "\n")
	m := hmac.New(sha256.New, c.fileKey())
	m.Write([]byte(payload))
	return base64.RawURLEncoding.EncodeToString([]byte(payload)) + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

var errBadFileToken = errors.New("bad file token")

func (c *Coordinator) verifyFile(token string, at time.Time) (fileToken, error) {
	p64, mac64, ok := strings.Cut(token, ".")
	payload, err1 := base64.RawURLEncoding.DecodeString(p64)
	mac, err2 := base64.RawURLEncoding.DecodeString(mac64)
	if !ok || err1 != nil || err2 != nil {
		return fileToken{}, errBadFileToken
	}
	m := hmac.New(sha256.New, c.fileKey())
	m.Write(payload)
	if !hmac.Equal(mac, m.Sum(nil)) {
		return fileToken{}, errBadFileToken
	}
	parts := strings.Split(string(payload), "\n")
	if len(parts) != 4 {
		return fileToken{}, errBadFileToken
	}
	exp, err := strconv.ParseInt(parts[3], 10, 64)
	if err != nil || at.Unix() > exp {
		return fileToken{}, fmt.Errorf("%w: expired", errBadFileToken)
	}
	return fileToken{Account: parts[0], Checkpoint: parts[1], File: parts[2], Expires: time.Unix(exp, 0)}, nil
}

// checkpointFileURLs signs one URL per file of an account's checkpoint,
// on the host the caller reached.
func (c *Coordinator) checkpointFileURLs(r *http.Request, account string, cp protocol.Checkpoint) ([]protocol.CheckpointFileURL, time.Time, error) {
	if c.cfg.OpenCheckpointFile == nil {
		return nil, time.Time{}, protocol.UserErrorf(ErrUnavailable, "this coordinator has no checkpoint store configured: start it with --storage to serve downloads")
	}
	exp := time.Now().Add(fileURLTTL).UTC().Truncate(time.Second)
	out := make([]protocol.CheckpointFileURL, 0, len(cp.Files))
	for _, f := range cp.Files {
		tok := c.signFile(fileToken{Account: account, Checkpoint: cp.ID, File: f.Name, Expires: exp})
		out = append(out, protocol.CheckpointFileURL{Name: f.Name, CID: f.CID, Size: f.Size, URL: "http://" + r.Host + "/v1/checkpoint_files/" + tok})
	}
	return out, exp, nil
}

// handleCheckpointFiles is GET /v1/checkpoints/{id}/files.
func (c *Coordinator) handleCheckpointFiles(cl *call) (any, error) {
	ref := cl.r.PathValue("id")
	var cp protocol.Checkpoint
	var ok bool
	c.fsm.read(func(s *State) { cp, _, ok = s.OwnedCheckpoint(cl.account, ref) })
	if !ok {
		return nil, protocol.UserErrorf(ErrNotFound, "checkpoint %q is not one of your checkpoints (GET /v1/runs/{id} lists them)", ref)
	}
	files, exp, err := c.checkpointFileURLs(cl.r, cl.account, cp)
	if err != nil {
		return nil, err
	}
	return protocol.CheckpointFiles{Checkpoint: cp, Files: files, Expires: exp.Format(time.RFC3339)}, nil
}

// serveCheckpointFile streams the file of a signed URL; the token is the
// credential, as a presigned store URL's is, so any member serves it.
func (c *Coordinator) serveCheckpointFile(w http.ResponseWriter, r *http.Request) {
	t, err := c.verifyFile(r.PathValue("token"), time.Now())
	if err != nil {
		writeError(w, http.StatusForbidden, protocol.CodeForbidden, "this download URL is not valid or has expired: ask for new URLs (GET /v1/checkpoints/{id}/files)", "")
		return
	}
	var cp protocol.Checkpoint
	var ok bool
	c.fsm.read(func(s *State) { cp, _, ok = s.OwnedCheckpoint(t.Account, t.Checkpoint) })
	if !ok || c.cfg.OpenCheckpointFile == nil {
		writeError(w, http.StatusNotFound, protocol.CodeNotFound, "the checkpoint of this download URL is gone", "")
		return
	}
	for _, f := range cp.Files {
		if f.Name != t.File {
			continue
		}
		rc, err := c.cfg.OpenCheckpointFile(r.Context(), f)
		if err != nil {
			c.log.Warn("open checkpoint file", "category", "infrastructure", "checkpoint", cp.ID, "file", f.Name, "err", err)
			writeError(w, http.StatusServiceUnavailable, protocol.CodeUnavailable, "the checkpoint store cannot be read now; retry", "")
			return
		}
		defer rc.Close()
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(f.Size, 10))
		if _, err := io.Copy(w, rc); err != nil {
			// The length was promised: a body cut short (or failing its
			// CID check at its end) is a failed download, not a short file.
			c.log.Warn("stream checkpoint file", "category", "infrastructure", "checkpoint", cp.ID, "file", f.Name, "err", err)
		}
		return
	}
	writeError(w, http.StatusNotFound, protocol.CodeNotFound, "the checkpoint of this download URL has no file "+t.File, "")
}
