package coordinator

import (
	"fmt"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// The Tinker door's checkpoint REST calls beyond list and delete: signed
// download URLs (checkpointfiles.go serves them) and TTLs.

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

// tinkerFileURLs answers signed download URLs, one per file (Tinker serves
// them for external weights; Signal for every checkpoint kind).
func (c *Coordinator) tinkerFileURLs(cl *call) (any, error) {
	tc, rec, err := c.tinkerCheckpointAt(cl)
	if err != nil {
		return nil, err
	}
	for _, cp := range rec.Run.Checkpoints {
		if cp.ID != tc.Checkpoint {
			continue
		}
		files, exp, err := c.checkpointFileURLs(cl.r, cl.account, cp)
		if err != nil {
			return nil, err
		}
		urls := map[string]string{}
		for _, f := range files {
			urls[f.Name] = f.URL
		}
		return map[string]any{"urls": urls, "expires": exp.Format(time.RFC3339)}, nil
	}
	return nil, protocol.UserErrorf(ErrNotFound, "the files of %s are gone (its run's checkpoints were collected)", tc.Path)
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
