package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/signal-p2p/signal/protocol"
)

// PushFunc commits a checkpoint's adapter to a Hugging Face Hub repository
// (Config.PushCheckpoint; node/hub.Pusher is the network's). Its errors
// that carry HTTPStatus() int are the Hub's answers, or the answers it
// would give: 401/403 are the token's, other 4xx the request's, 5xx and 0
// (no answer) the Hub's, which a later push resumes. Any other error is
// the network's own (a file that fails its CID).
type PushFunc func(ctx context.Context, run protocol.Run, cp protocol.Checkpoint, req protocol.PushRequest) (protocol.PushResponse, error)

// hubStatus is what a PushFunc's error may say of the Hub's answer.
type hubStatus interface{ HTTPStatus() int }

// maxPushes bounds the pushes one member runs at once: each streams a
// checkpoint from the store to the Hub.
const maxPushes = 4

// handlePushCheckpoint is POST /v1/checkpoints/{id}/push. The member that
// leads raft reads the checkpoint's record, and the push streams its files
// from the network's store to the Hub, each verified by its CID. The token
// in the body is used for this call only: the route records no
// idempotency answer (whose tag hashes the body) and proposes nothing to
// raft, and no log line or error carries the body.
func (c *Coordinator) handlePushCheckpoint(cl *call) (any, error) {
	id := cl.r.PathValue("id")
	var req protocol.PushRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	switch {
	case strings.TrimSpace(req.Repo) == "":
		return nil, protocol.UserErrorf(ErrInvalidRequest, "field repo is empty: name the Hub repository as owner/name")
	case req.Token == "":
		return nil, protocol.UserErrorf(ErrInvalidRequest, "field token is empty: send a Hugging Face token with write access to %s", req.Repo)
	}
	var cp protocol.Checkpoint
	var run protocol.Run
	var ok bool
	c.fsm.read(func(s *State) {
		var rec *RunRecord
		if cp, rec, ok = s.OwnedCheckpoint(cl.account, id); ok {
			run = rec.Run
			run.Checkpoints = nil
		}
	})
	if !ok {
		return nil, protocol.UserErrorf(ErrNotFound, "checkpoint %q is not one of your runs' (GET /v1/runs/{id} lists a run's checkpoints)", id)
	}
	if c.cfg.PushCheckpoint == nil {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "this network's coordinators keep no checkpoint store (--storage), so they cannot push: download checkpoint %s and push its files yourself", cp.ID)
	}
	select {
	case c.pushSlots <- struct{}{}:
		defer func() { <-c.pushSlots }()
	default:
		return nil, retryAfter(protocol.UserErrorf(ErrUnavailable, "this coordinator is running %d pushes already: retry in a moment", maxPushes), c.cfg.RetryAfter)
	}
	res, err := c.cfg.PushCheckpoint(cl.r.Context(), run, cp, req)
	if err != nil {
		return nil, c.pushError(req.Repo, err)
	}
	c.log.Info("checkpoint pushed", "category", "success", "account", cl.account, "run", run.ID,
		"checkpoint", cp.ID, "repo", res.Repo, "commit", res.CommitOID)
	return res, nil
}

// pushError maps a push's failure to the API's answer.
func (c *Coordinator) pushError(repo string, err error) error {
	var hs hubStatus
	if !errors.As(err, &hs) {
		return fmt.Errorf("push to %s: %w", repo, err)
	}
	switch st := hs.HTTPStatus(); {
	case st == http.StatusUnauthorized || st == http.StatusForbidden:
		return protocol.UserErrorf(ErrForbidden, "the Hugging Face Hub refused the token for %s (%v): send a token with write access to it", repo, err)
	case st >= 400 && st < 500 && st != http.StatusRequestTimeout && st != http.StatusTooManyRequests:
		return protocol.UserErrorf(ErrInvalidRequest, "the Hugging Face Hub refused the push to %s (%v)", repo, err)
	default:
		return retryAfter(protocol.UserErrorf(ErrUnavailable, "the push to %s failed at the Hugging Face Hub (%v): push again, and it resumes with what the Hub does not hold yet", repo, err), c.cfg.RetryAfter)
	}
}
