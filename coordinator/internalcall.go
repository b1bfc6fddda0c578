package coordinator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
)

// internalCall runs one /v1 handler on the caller's behalf (a queued
// Tinker call, one call of a pipeline) under an idempotency key of its own
// (scoped to the account): the key's record answers a retry, on this
// leader or the next, with what the first try did and was charged, and the
// node, which dedups by the request id derived from it, does the work once.
func (c *Coordinator) internalCall(ctx context.Context, account, key, method, path, id string, body any, h handlerFunc) ([]byte, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, method, path, nil)
	if err != nil {
		return nil, err
	}
	req.SetPathValue("id", id)
	cl := &call{r: req, body: b, account: account, reqID: newID(6)}
	sum := sha256.Sum256([]byte(method + " " + path + "\n" + string(b)))
	cl.idem = &IdemTag{Scope: account + "\x00" + key, BodyHash: hex.EncodeToString(sum[:])}
	// The same step serve takes: a recorded answer, or the key marked in
	// flight so that a concurrent duplicate waits for this one.
	release, rec, err := c.beginIdem(req, cl.idem)
	if err != nil {
		return nil, err
	}
	if rec != nil {
		return rec.Body, nil
	}
	defer release()
	v, err := h(cl)
	if err != nil {
		return nil, err
	}
	out, err := c.answer(cl, v)
	if err != nil {
		return nil, err
	}
	if out.status >= 300 {
		return nil, fmt.Errorf("%s %s answered %d: %w", method, path, out.status, errors.New(string(out.body)))
	}
	return out.body, nil
}
