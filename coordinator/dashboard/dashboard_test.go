package dashboard

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// fakeSource is a Source built from function fields.
type fakeSource struct {
	account func(key string) (protocol.Account, error)
	nodes   func(key string) ([]protocol.Node, error)
	runs    func(key string) ([]protocol.Run, error)
	metrics func(key, runID string) ([]protocol.Metrics, error)
}

var _ Source = (*fakeSource)(nil)

func (f *fakeSource) Account(_ context.Context, key string) (protocol.Account, error) {
	return f.account(key)
}
func (f *fakeSource) Nodes(_ context.Context, key string) ([]protocol.Node, error) {
	return f.nodes(key)
}
func (f *fakeSource) Runs(_ context.Context, key string) ([]protocol.Run, error) { return f.runs(key) }
func (f *fakeSource) Metrics(_ context.Context, key, runID string) ([]protocol.Metrics, error) {
	return f.metrics(key, runID)
}

const goodKey = "sk-good"

func loss(v float64) *float64 { return &v }

// world is one account with two nodes, one run of five steps and charges.
func world() *fakeSource {
	auth := func(key string) error {
		if key != goodKey {
			return fmt.Errorf("unknown API key: %w", ErrUnauthorized)
		}
		return nil
	}
	return &fakeSource{
		account: func(key string) (protocol.Account, error) {
			if err := auth(key); err != nil {
				return protocol.Account{}, err
			}
			return protocol.Account{Account: "acct_1", BalanceMicroCredits: 12_345_678, SpentMicroCredits: 1_500, Charges: []protocol.Charge{
				{RunID: "run_a", Call: "forward_backward", MicroCredits: 26, Time: "2026-01-01T10:00:01Z"},
				{RunID: "run_a", Call: "save_state", MicroCredits: 3, Time: "2026-01-01T10:00:09Z"},
			}}, nil
		},
		nodes: func(key string) ([]protocol.Node, error) {
			if err := auth(key); err != nil {
				return nil, err
			}
			return []protocol.Node{
				{PeerID: "12D3KooWnodeBBBBBBBBBBBBBBBB", Backends: []string{"cuda"}, GPUs: []protocol.GPU{{Name: "NVIDIA H200", MemoryTotal: 140 << 30, MemoryFree: 100 << 30, Utilization: 37}}, Models: []string{"signal-tiny"}, Sessions: 1, MaxSessions: 8, LastSeen: time.Now().Add(-2 * time.Second).UTC().Format(time.RFC3339Nano)},
				{PeerID: "12D3KooWnodeAAAAAAAAAAAAAAAA", Backends: []string{"native"}, CPU: protocol.CPU{Cores: 16, MemoryTotal: 64 << 30}, Models: []string{"signal-tiny"}, MaxSessions: 4, LastSeen: time.Now().UTC().Format(time.RFC3339Nano)},
			}, nil
		},
		runs: func(key string) ([]protocol.Run, error) {
			if err := auth(key); err != nil {
				return nil, err
			}
			resumed := 10
			return []protocol.Run{
				{ID: "run_a", Name: "<script>alert(1)</script>", BaseModel: "signal-tiny", LoRARank: 8, Status: "ready", Step: 5, SpentMicroCredits: 1_500, ResumedFromStep: &resumed,
					Checkpoints: []protocol.Checkpoint{{ID: "ck1", Step: 5, Mode: "adapter", URI: "s3://bucket/ck1"}}},
				{ID: "run_b", BaseModel: "signal-tiny", LoRARank: 8, Status: "starting"},
			}, nil
		},
		metrics: func(key, runID string) ([]protocol.Metrics, error) {
			if err := auth(key); err != nil {
				return nil, err
			}
			if runID != "run_a" {
				return nil, nil
			}
			return []protocol.Metrics{
				{Step: 1, LossMean: loss(10)}, {Step: 2, LossMean: loss(8)}, {Step: 3, LossMean: loss(5)},
				{Step: 4}, {Step: 5, LossMean: loss(2)},
			}, nil
		},
	}
}

func get(t *testing.T, h http.Handler, target string, mod func(*http.Request)) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, target, nil)
	if mod != nil {
		mod(req)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w
}

func withCookie(key string) func(*http.Request) {
	return func(r *http.Request) { r.AddCookie(&http.Cookie{Name: CookieName, Value: key}) }
}

func TestPageShowsNodesRunsAndCharges(t *testing.T) {
	h := New(world(), Options{Title: "Test"})
	w := get(t, h, "/dashboard", withCookie(goodKey))
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	body := w.Body.String()
	for _, want := range []string{
		"acct_1", "12.345678", // balance in credits
		"NVIDIA H200", "100.0 GiB free of 140.0 GiB", "CPU · 16 cores · 64.0 GiB", "1 / 8",
		`id="run-run_a"`, "resumed from step 10", "s3://bucket/ck1",
		`<polyline fill="none"`, "10.0000", "2.0000", // curve and its axis labels
		"save_state", "10:00:09",
		"No optimizer step with a loss yet.", // run_b
		`<meta http-equiv="refresh" content="10">`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	// The run name is escaped, not executed.
	if strings.Contains(body, "<script>alert") || !strings.Contains(body, "&lt;script&gt;") {
		t.Error("run name not HTML-escaped")
	}
	// Newest run first; newest charge first; nodes sorted by peer ID.
	if strings.Index(body, "run-run_b") > strings.Index(body, "run-run_a") {
		t.Error("runs not newest first")
	}
	if strings.Index(body, "10:00:09") > strings.Index(body, "10:00:01") {
		t.Error("charges not newest first")
	}
	if strings.Index(body, "12D3Ko…AAAAAA") > strings.Index(body, "12D3Ko…BBBBBB") {
		t.Error("nodes not sorted")
	}
	if got := w.Header().Get("Content-Security-Policy"); !strings.Contains(got, "default-src 'none'") {
		t.Errorf("CSP = %q", got)
	}
}

func TestLossCurveScales(t *testing.T) {
	c := lossCurve([]protocol.Metrics{{Step: 0, LossMean: loss(4)}, {Step: 5}, {Step: 10, LossMean: loss(1)}, {Step: 20, LossMean: loss(2)}})
	if c == nil || len(c.Dots) != 3 {
		t.Fatalf("curve = %+v", c)
	}
	// Highest loss at the top-left, lowest at the bottom, x by step.
	want := []point{{float64(c.PlotX0), float64(c.PlotY0)}, {float64(c.PlotX0+c.PlotX1) / 2, float64(c.PlotY1)}, {float64(c.PlotX1), float64(c.PlotY0) + float64(c.PlotY1-c.PlotY0)*2/3}}
	for i, d := range c.Dots {
		if diff(d.X, want[i].X) > 0.1 || diff(d.Y, want[i].Y) > 0.1 {
			t.Errorf("dot %d = %+v, want %+v", i, d, want[i])
		}
	}
	if c.MinLoss != 1 || c.MaxLoss != 4 || c.FirstStep != 0 || c.LastStep != 20 {
		t.Errorf("axes = %+v", c)
	}
	if lossCurve(nil) != nil || lossCurve([]protocol.Metrics{{Step: 1}}) != nil {
		t.Error("a curve without losses")
	}
	// One point, or all equal: drawn mid-plot, not divided by zero.
	one := lossCurve([]protocol.Metrics{{Step: 3, LossMean: loss(2)}})
	if one == nil || one.Dots[0].X != float64(one.PlotX0+one.PlotX1)/2 {
		t.Errorf("single point = %+v", one)
	}
}

func diff(a, b float64) float64 {
	if a > b {
		return a - b
	}
	return b - a
}

func TestCredentials(t *testing.T) {
	h := New(world(), Options{})
	t.Run("none: sign-in form", func(t *testing.T) {
		w := get(t, h, "/", nil)
		if w.Code != http.StatusUnauthorized || !strings.Contains(w.Body.String(), `action="/dashboard/login"`) {
			t.Fatalf("status %d: %s", w.Code, w.Body)
		}
	})
	t.Run("unknown key", func(t *testing.T) {
		w := get(t, h, "/dashboard", withCookie("sk-bad"))
		if w.Code != http.StatusUnauthorized || !strings.Contains(w.Body.String(), "not known") {
			t.Fatalf("status %d: %s", w.Code, w.Body)
		}
	})
	t.Run("basic auth", func(t *testing.T) {
		w := get(t, h, "/dashboard", func(r *http.Request) { r.SetBasicAuth("", goodKey) })
		if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), "acct_1") {
			t.Fatalf("status %d", w.Code)
		}
	})
	t.Run("key in the URL becomes a cookie", func(t *testing.T) {
		w := get(t, h, "/dashboard?key="+goodKey+"&x=1", nil)
		if w.Code != http.StatusSeeOther {
			t.Fatalf("status %d", w.Code)
		}
		loc := w.Header().Get("Location")
		if strings.Contains(loc, goodKey) || !strings.HasPrefix(loc, "/dashboard") || !strings.Contains(loc, "x=1") {
			t.Fatalf("redirect to %q", loc)
		}
		c := w.Result().Cookies()
		if len(c) != 1 || c[0].Value != goodKey || !c[0].HttpOnly || c[0].SameSite != http.SameSiteStrictMode {
			t.Fatalf("cookies %+v", c)
		}
	})
	t.Run("login form", func(t *testing.T) {
		req := httptest.NewRequest(http.MethodPost, "/dashboard/login", strings.NewReader(url.Values{"key": {goodKey}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusSeeOther || len(w.Result().Cookies()) != 1 || w.Result().Cookies()[0].Value != goodKey {
			t.Fatalf("status %d cookies %+v", w.Code, w.Result().Cookies())
		}
		req = httptest.NewRequest(http.MethodPost, "/dashboard/login", strings.NewReader("key="))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		w = httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "Enter an API key") {
			t.Fatalf("empty key: status %d", w.Code)
		}
		if w := get(t, h, "/dashboard/login", nil); w.Code != http.StatusMethodNotAllowed {
			t.Fatalf("GET login: status %d", w.Code)
		}
	})
	t.Run("cross-site sign-in refused", func(t *testing.T) {
		req := httptest.NewRequest(http.MethodPost, "/dashboard/login", strings.NewReader(url.Values{"key": {goodKey}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Sec-Fetch-Site", "cross-site")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusForbidden || len(w.Result().Cookies()) != 0 {
			t.Fatalf("cross-site login form: status %d cookies %+v", w.Code, w.Result().Cookies())
		}
		req = httptest.NewRequest(http.MethodPost, "/dashboard/login", strings.NewReader(url.Values{"key": {goodKey}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Origin", "https://evil.example")
		w = httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusForbidden {
			t.Fatalf("foreign-origin login form: status %d", w.Code)
		}
		w = get(t, h, "/dashboard?key="+goodKey, func(r *http.Request) { r.Header.Set("Sec-Fetch-Site", "cross-site") })
		if w.Code != http.StatusForbidden || len(w.Result().Cookies()) != 0 {
			t.Fatalf("cross-site ?key= link: status %d cookies %+v", w.Code, w.Result().Cookies())
		}
	})
	t.Run("logout clears the cookie", func(t *testing.T) {
		w := get(t, h, "/dashboard/logout", withCookie(goodKey))
		c := w.Result().Cookies()
		if w.Code != http.StatusSeeOther || len(c) != 1 || c[0].MaxAge >= 0 {
			t.Fatalf("status %d cookies %+v", w.Code, c)
		}
	})
	t.Run("other paths and methods", func(t *testing.T) {
		if w := get(t, h, "/nope", nil); w.Code != http.StatusNotFound {
			t.Errorf("/nope: %d", w.Code)
		}
		req := httptest.NewRequest(http.MethodDelete, "/dashboard", nil)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusMethodNotAllowed {
			t.Errorf("DELETE: %d", w.Code)
		}
	})
}

func TestSourceDown(t *testing.T) {
	src := world()
	src.nodes = func(string) ([]protocol.Node, error) {
		return nil, fmt.Errorf("GET /v1/nodes: status 503 no raft leader elected: %w", ErrUnavailable)
	}
	w := get(t, New(src, Options{}), "/dashboard", withCookie(goodKey))
	if w.Code != http.StatusServiceUnavailable || !strings.Contains(w.Body.String(), "no raft leader elected") || !strings.Contains(w.Body.String(), `content="3"`) {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
}

// TestAPISource reads through a fake coordinator API and checks the key
// travels as a bearer token and errors map to the sentinels.
func TestAPISource(t *testing.T) {
	api := http.NewServeMux()
	auth := func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Authorization") != "Bearer "+goodKey {
			w.WriteHeader(http.StatusUnauthorized)
			_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "unauthorized", Message: "unknown API key"}})
			return false
		}
		return true
	}
	api.HandleFunc("GET /v1/account", func(w http.ResponseWriter, r *http.Request) {
		if auth(w, r) {
			_ = json.NewEncoder(w).Encode(protocol.Account{Account: "acct_1", BalanceMicroCredits: 7})
		}
	})
	api.HandleFunc("GET /v1/nodes", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "unavailable", Message: "no leader"}})
	})
	api.HandleFunc("GET /v1/runs/{id}/metrics", func(w http.ResponseWriter, r *http.Request) {
		if auth(w, r) {
			_ = json.NewEncoder(w).Encode(protocol.MetricsResponse{Metrics: []protocol.Metrics{{Step: 1, LossMean: loss(3)}, {Step: 2, LossMean: loss(1)}}})
		}
	})
	srv := httptest.NewServer(api)
	defer srv.Close()
	s := NewAPISource(srv.URL + "/")
	ctx := context.Background()
	a, err := s.Account(ctx, goodKey)
	if err != nil || a.Account != "acct_1" || a.BalanceMicroCredits != 7 {
		t.Fatalf("Account = %+v, %v", a, err)
	}
	if _, err := s.Account(ctx, "sk-bad"); !errorsIs(err, ErrUnauthorized) || !strings.Contains(err.Error(), "unknown API key") {
		t.Fatalf("bad key: %v", err)
	}
	if _, err := s.Nodes(ctx, goodKey); !errorsIs(err, ErrUnavailable) || !strings.Contains(err.Error(), "no leader") {
		t.Fatalf("503: %v", err)
	}
	ms, err := s.Metrics(ctx, goodKey, "run/x")
	if err != nil || len(ms) != 2 || *ms[1].LossMean != 1 {
		t.Fatalf("Metrics = %+v, %v", ms, err)
	}
	srv.Close()
	if _, err := s.Runs(ctx, goodKey); !errorsIs(err, ErrUnavailable) {
		t.Fatalf("server down: %v", err)
	}
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }
