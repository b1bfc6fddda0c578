package dashboard

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// Errors a Source returns; the dashboard maps them to pages.
var (
	// ErrUnauthorized means the credential is missing or unknown: the
	// dashboard shows its sign-in form.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrUnavailable means the data could not be read now (no leader, the
	// coordinator is down): the page says so and refreshes.
	ErrUnavailable = errors.New("unavailable")
)

// Source is what the dashboard reads, each call on behalf of one API key.
// APISource implements it over the public HTTP API; a coordinator may
// implement it directly over its state.
type Source interface {
	// Account is the key's account: balance, spent, recent charges.
	Account(ctx context.Context, key string) (protocol.Account, error)
	// Nodes are the live nodes and their capacity.
	Nodes(ctx context.Context, key string) ([]protocol.Node, error)
	// Runs are the key's runs, oldest first.
	Runs(ctx context.Context, key string) ([]protocol.Run, error)
	// Metrics are one run's per-step figures.
	Metrics(ctx context.Context, key, runID string) ([]protocol.Metrics, error)
	// Models are the base models and their prices.
	Models(ctx context.Context, key string) ([]protocol.Model, error)
}

// APISource reads through a coordinator's public API with the viewer's
// own key, so the dashboard can show nothing the API would not.
type APISource struct {
	BaseURL string
	// URL, when set, is asked for the base URL at each read instead of
	// BaseURL: a coordinator that mounts the dashboard itself learns its
	// own address only once it listens (port 0).
	URL  func() string
	HTTP *http.Client
}

var _ Source = (*APISource)(nil)

// NewAPISource reads from the coordinator at baseURL (http://host:port).
func NewAPISource(baseURL string) *APISource {
	return &APISource{BaseURL: strings.TrimRight(baseURL, "/"), HTTP: &http.Client{Timeout: 10 * time.Second}}
}

// NewSelfSource reads from the coordinator whose base URL baseURL returns
// when a page is served (see APISource.URL).
func NewSelfSource(baseURL func() string) *APISource {
	return &APISource{URL: baseURL, HTTP: &http.Client{Timeout: 10 * time.Second}}
}

func (s *APISource) get(ctx context.Context, key, path string, out any) error {
	base := s.BaseURL
	if s.URL != nil {
		base = strings.TrimRight(s.URL(), "/")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
	if err != nil {
		return fmt.Errorf("dashboard: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := s.HTTP.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w: %w", path, ErrUnavailable, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return fmt.Errorf("GET %s: %w: %w", path, ErrUnavailable, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e protocol.ErrorResponse
		_ = json.Unmarshal(body, &e)
		switch resp.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			return fmt.Errorf("GET %s: %s: %w", path, e.Error.Message, ErrUnauthorized)
		default:
			return fmt.Errorf("GET %s: status %d %s: %w", path, resp.StatusCode, e.Error.Message, ErrUnavailable)
		}
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("GET %s: decode: %w: %w", path, ErrUnavailable, err)
	}
	return nil
}

// Account reads GET /v1/account.
func (s *APISource) Account(ctx context.Context, key string) (protocol.Account, error) {
	var a protocol.Account
	err := s.get(ctx, key, "/v1/account", &a)
	return a, err
}

// Nodes reads GET /v1/nodes.
func (s *APISource) Nodes(ctx context.Context, key string) ([]protocol.Node, error) {
	var l protocol.NodeList
	err := s.get(ctx, key, "/v1/nodes", &l)
	return l.Nodes, err
}

// Runs reads GET /v1/runs.
func (s *APISource) Runs(ctx context.Context, key string) ([]protocol.Run, error) {
	var l protocol.RunList
	err := s.get(ctx, key, "/v1/runs", &l)
	return l.Runs, err
}

// Metrics reads GET /v1/runs/{id}/metrics.
func (s *APISource) Metrics(ctx context.Context, key, runID string) ([]protocol.Metrics, error) {
	var m protocol.MetricsResponse
	err := s.get(ctx, key, "/v1/runs/"+url.PathEscape(runID)+"/metrics", &m)
	return m.Metrics, err
}

// Models reads GET /v1/models.
func (s *APISource) Models(ctx context.Context, key string) ([]protocol.Model, error) {
	var l protocol.ModelList
	err := s.get(ctx, key, "/v1/models", &l)
	return l.Models, err
}
