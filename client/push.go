package client

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"unicode"

	"github.com/signal-p2p/signal/protocol"
)

// PushCheckpoint commits one of the caller's checkpoints (by id) to a
// Hugging Face Hub model repository: its PEFT files and a model card
// naming the base model, rank, steps and CIDs (POST /v1/checkpoints/{id}/push).
// An empty req.Token is taken from $HF_TOKEN. The coordinator uses the
// token for this call only. A push that failed (a 503 the client retries,
// or an error) resumes when pushed again: files the Hub holds already are
// not sent twice.
func (c *Client) PushCheckpoint(ctx context.Context, checkpointID string, req protocol.PushRequest) (*protocol.PushResponse, error) {
	if checkpointID == "" || strings.ContainsAny(checkpointID, "/?#") || strings.IndexFunc(checkpointID, unicode.IsControl) >= 0 {
		return nil, fmt.Errorf("%w: checkpoint id %q: want a checkpoint's id (signal checkpoints list)", ErrInvalidArgument, checkpointID)
	}
	if req.Repo == "" {
		return nil, fmt.Errorf("%w: repo is empty: name the Hub repository as owner/name", ErrInvalidArgument)
	}
	if req.Token == "" {
		req.Token = os.Getenv("HF_TOKEN")
	}
	if req.Token == "" {
		return nil, fmt.Errorf("%w: no Hub token: set HF_TOKEN to a token with write access to %s", ErrInvalidArgument, req.Repo)
	}
	var out protocol.PushResponse
	if err := c.do(ctx, call{method: http.MethodPost, path: "/checkpoints/" + checkpointID + "/push", in: req, out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}

// SaveAndPush saves the run's adapter (save_state) and pushes the
// checkpoint to the Hub: the Go form of the Python SDK's
// save_state(push_to_hub=...).
func (r *Run) SaveAndPush(ctx context.Context, save protocol.SaveStateRequest, push protocol.PushRequest) (*protocol.SaveStateResponse, *protocol.PushResponse, error) {
	saved, err := r.SaveState(ctx, save)
	if err != nil {
		return nil, nil, err
	}
	pushed, err := r.c.PushCheckpoint(ctx, saved.Checkpoint.ID, push)
	if err != nil {
		return saved, nil, fmt.Errorf("push checkpoint %s (saved): %w", saved.Checkpoint.ID, err)
	}
	return saved, pushed, nil
}
