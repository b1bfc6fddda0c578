package client

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"unicode"

	"github.com/signal-p2p/signal/protocol"
)

// Health asks the coordinator whether it is up and whether it leads raft.
func (c *Client) Health(ctx context.Context) (*protocol.Health, error) {
	var out protocol.Health
	if err := c.do(ctx, call{method: http.MethodGet, path: "/health", out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}

// CreateRun starts a training run (POST /v1/runs) and returns its handle.
func (c *Client) CreateRun(ctx context.Context, req protocol.CreateRunRequest) (*Run, error) {
	if req.BaseModel == "" {
		return nil, fmt.Errorf("%w: base_model is empty", ErrInvalidArgument)
	}
	var out protocol.Run
	if err := c.do(ctx, call{method: http.MethodPost, path: "/runs", in: req, out: &out}); err != nil {
		return nil, err
	}
	return &Run{c: c, info: out}, nil
}

// ListRuns lists the caller's own runs.
func (c *Client) ListRuns(ctx context.Context) ([]protocol.Run, error) {
	var out protocol.RunList
	if err := c.do(ctx, call{method: http.MethodGet, path: "/runs", out: &out}); err != nil {
		return nil, err
	}
	return out.Runs, nil
}

// GetRun fetches a run and returns its handle.
func (c *Client) GetRun(ctx context.Context, id string) (*Run, error) {
	r := &Run{c: c, info: protocol.Run{ID: id}}
	if err := r.Refresh(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// DeleteRun ends a run and frees its node's session; it returns the ended run.
func (c *Client) DeleteRun(ctx context.Context, id string) (*protocol.Run, error) {
	p, err := runPath(id, "")
	if err != nil {
		return nil, err
	}
	var out protocol.Run
	if err := c.do(ctx, call{method: http.MethodDelete, path: p, out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}

// RunMetrics returns a run's per-step metrics.
func (c *Client) RunMetrics(ctx context.Context, id string) ([]protocol.Metrics, error) {
	p, err := runPath(id, "/metrics")
	if err != nil {
		return nil, err
	}
	var out protocol.MetricsResponse
	if err := c.do(ctx, call{method: http.MethodGet, path: p, out: &out}); err != nil {
		return nil, err
	}
	return out.Metrics, nil
}

// Account returns the caller's balance, total spent and recent charges.
func (c *Client) Account(ctx context.Context) (*protocol.Account, error) {
	var out protocol.Account
	if err := c.do(ctx, call{method: http.MethodGet, path: "/account", out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}

// Models lists the base models the network serves, with their prices.
func (c *Client) Models(ctx context.Context) ([]protocol.Model, error) {
	var out protocol.ModelList
	if err := c.do(ctx, call{method: http.MethodGet, path: "/models", out: &out}); err != nil {
		return nil, err
	}
	return out.Models, nil
}

// Nodes lists the live nodes and their capacity.
func (c *Client) Nodes(ctx context.Context) ([]protocol.Node, error) {
	var out protocol.NodeList
	if err := c.do(ctx, call{method: http.MethodGet, path: "/nodes", out: &out}); err != nil {
		return nil, err
	}
	return out.Nodes, nil
}

// Tokenize turns text into token ids with a base model's tokenizer, on the server.
func (c *Client) Tokenize(ctx context.Context, req protocol.TokenizeRequest) ([]int, error) {
	if req.BaseModel == "" {
		return nil, fmt.Errorf("%w: base_model is empty", ErrInvalidArgument)
	}
	var out protocol.TokenizeResponse
	if err := c.do(ctx, call{method: http.MethodPost, path: "/tokenize", in: req, out: &out}); err != nil {
		return nil, err
	}
	return out.Tokens, nil
}

// CreateKey mints an API key for a new account funded with
// req.MicroCredits (protocol.ParseCredits reads a number of credits into
// it). It takes the cluster's admin token.
func (c *Client) CreateKey(ctx context.Context, adminToken string, req protocol.CreateKeyRequest) (*protocol.CreateKeyResponse, error) {
	if adminToken == "" {
		return nil, fmt.Errorf("%w: admin token is empty", ErrInvalidArgument)
	}
	var out protocol.CreateKeyResponse
	if err := c.do(ctx, call{method: http.MethodPost, path: "/admin/keys", token: adminToken, in: req, out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}

// ListKeys lists the API keys (never their secrets), of account alone when
// it is set. It takes the admin token.
func (c *Client) ListKeys(ctx context.Context, adminToken, account string) ([]protocol.Key, error) {
	if adminToken == "" {
		return nil, fmt.Errorf("%w: admin token is empty", ErrInvalidArgument)
	}
	p := "/admin/keys"
	if account != "" {
		p += "?account=" + url.QueryEscape(account)
	}
	var out protocol.KeyList
	if err := c.do(ctx, call{method: http.MethodGet, path: p, token: adminToken, out: &out}); err != nil {
		return nil, err
	}
	return out.Keys, nil
}

// RevokeKey deletes the API key keyID names (protocol.Key.ID, or
// CreateKeyResponse.KeyID): calls with it are refused from then on; its
// account and balance stay. It takes the admin token.
func (c *Client) RevokeKey(ctx context.Context, adminToken, keyID string) (*protocol.Key, error) {
	if adminToken == "" {
		return nil, fmt.Errorf("%w: admin token is empty", ErrInvalidArgument)
	}
	if keyID == "" || strings.ContainsAny(keyID, "/?#") {
		return nil, fmt.Errorf("%w: key id %q: want one path segment", ErrInvalidArgument, keyID)
	}
	var out protocol.Key
	if err := c.do(ctx, call{method: http.MethodDelete, path: "/admin/keys/" + keyID, token: adminToken, out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}

// Credit adds req.MicroCredits to an account. It takes the admin token.
func (c *Client) Credit(ctx context.Context, adminToken string, req protocol.CreditRequest) (*protocol.CreditResponse, error) {
	if adminToken == "" {
		return nil, fmt.Errorf("%w: admin token is empty", ErrInvalidArgument)
	}
	var out protocol.CreditResponse
	if err := c.do(ctx, call{method: http.MethodPost, path: "/admin/credit", token: adminToken, in: req, out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}

// CreateJoinToken issues a token a node presents to join the network. It
// takes the admin token.
func (c *Client) CreateJoinToken(ctx context.Context, adminToken string, req protocol.JoinTokenRequest) (*protocol.JoinTokenResponse, error) {
	if adminToken == "" {
		return nil, fmt.Errorf("%w: admin token is empty", ErrInvalidArgument)
	}
	var out protocol.JoinTokenResponse
	if err := c.do(ctx, call{method: http.MethodPost, path: "/admin/join_tokens", token: adminToken, in: req, out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}

// runPath is "/runs/{id}" + suffix. The id must be one path segment; the
// URL's encoder escapes anything else it holds.
func runPath(id, suffix string) (string, error) {
	if id == "" {
		return "", fmt.Errorf("%w: run id is empty", ErrInvalidArgument)
	}
	if strings.ContainsAny(id, "/?#") || strings.IndexFunc(id, unicode.IsControl) >= 0 || id == "." || id == ".." {
		return "", fmt.Errorf("%w: run id %q: want one path segment", ErrInvalidArgument, id)
	}
	return "/runs/" + id + suffix, nil
}

// LiftQuarantine ends a node's quarantine (admin): it may take runs again
// and its operator's new nodes may join; reason is recorded with it.
func (c *Client) LiftQuarantine(ctx context.Context, adminToken, peerID, reason string) (*protocol.NodeAudits, error) {
	if adminToken == "" {
		return nil, fmt.Errorf("%w: admin token is empty", ErrInvalidArgument)
	}
	if peerID == "" || strings.ContainsAny(peerID, "/?#") {
		return nil, fmt.Errorf("%w: peer id %q: want one path segment", ErrInvalidArgument, peerID)
	}
	var out protocol.NodeAudits
	if err := c.do(ctx, call{method: http.MethodPost, path: "/admin/nodes/" + peerID + "/lift_quarantine", token: adminToken,
		in: protocol.LiftQuarantineRequest{Reason: reason}, out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}
