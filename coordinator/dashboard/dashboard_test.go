package dashboard

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
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
	models  func(key string) ([]protocol.Model, error)
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
func (f *fakeSource) Models(_ context.Context, key string) ([]protocol.Model, error) {
	return f.models(key)
}

const goodKey = "sk-good"

func loss(v float64) *float64 { return &v }

// stepTime is when the world's run_a took step i: one step a second,
// the last (step 5) at worldNow minus 10 s.
func stepTime(i int) string {
	return worldNow.Add(time.Duration(i-5)*time.Second - 10*time.Second).Format(time.RFC3339Nano)
}

var worldNow = time.Date(2026, 1, 1, 10, 1, 0, 0, time.UTC)

// world is one account with two nodes, a run of five steps, a run
// without steps, charges and one model.
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
				{ID: "run_c", BaseModel: "signal-tiny", LoRARank: 8, Status: "ready", SpentMicroCredits: 2_000}, // sampled, never stepped
			}, nil
		},
		metrics: func(key, runID string) ([]protocol.Metrics, error) {
			if err := auth(key); err != nil {
				return nil, err
			}
			if runID != "run_a" {
				return nil, fmt.Errorf("metrics of %s read: it has no step", runID)
			}
			return []protocol.Metrics{
				{Step: 1, LossMean: loss(10), LearningRate: loss(1e-4), GradNorm: loss(3), Time: stepTime(1)},
				{Step: 2, LossMean: loss(8), LearningRate: loss(2e-4), Time: stepTime(2)},
				{Step: 3, LossMean: loss(5), LearningRate: loss(2e-4), Time: stepTime(3)},
				{Step: 4, Time: stepTime(4)}, {Step: 5, LossMean: loss(2), GradNorm: loss(math.NaN()), Time: stepTime(5)},
			}, nil
		},
		models: func(key string) ([]protocol.Model, error) {
			if err := auth(key); err != nil {
				return nil, err
			}
			return []protocol.Model{{Name: "signal-tiny", ContextLength: 512, MemoryBytes: 3 << 20, Prices: protocol.Prices{
				TrainMicroCreditsPer1K: 30, PrefillMicroCreditsPer1K: 10, SampleMicroCreditsPer1K: 20, StorageMicroCreditsPerGBHour: 1_500}}}, nil
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

func newWorld(opts Options) *Handler {
	h := New(world(), opts)
	h.now = func() time.Time { return worldNow }
	return h
}

// data reads /dashboard/data.json as the viewer.
func data(t *testing.T, h http.Handler, target string) view {
	t.Helper()
	w := get(t, h, target, withCookie(goodKey))
	if w.Code != http.StatusOK || !strings.HasPrefix(w.Header().Get("Content-Type"), "application/json") {
		t.Fatalf("GET %s: status %d: %s", target, w.Code, w.Body)
	}
	var v view
	if err := json.Unmarshal(w.Body.Bytes(), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestPageIsAShellWithItsData(t *testing.T) {
	h := newWorld(Options{Title: "Test"})
	w := get(t, h, "/dashboard", withCookie(goodKey))
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	body := w.Body.String()
	for _, want := range []string{
		`<meta name="viewport"`, `<script src="/dashboard/app.js"></script>`, `<script type="application/json" id="data">`,
		`"balance_credits":"12.345678"`, `"refresh_seconds":5`, "12D3KooWnodeBBBBBBBBBBBBBBBB",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	// The run name is escaped inside the embedded JSON, not executed; the
	// page does not reload itself (the script fetches).
	if strings.Contains(body, "<script>alert") || strings.Contains(body, `http-equiv="refresh"`) {
		t.Error("run name not escaped, or a full-page refresh")
	}
	csp := w.Header().Get("Content-Security-Policy")
	for _, want := range []string{"default-src 'none'", "script-src 'self'", "connect-src 'self'"} {
		if !strings.Contains(csp, want) || strings.Contains(csp, "unsafe-eval") || strings.Contains(csp, "script-src 'self' 'unsafe-inline'") {
			t.Errorf("CSP = %q, want %q and no inline script", csp, want)
		}
	}
	js := get(t, h, "/dashboard/app.js", nil)
	if js.Code != http.StatusOK || !strings.HasPrefix(js.Header().Get("Content-Type"), "text/javascript") || !strings.Contains(js.Body.String(), "data.json") {
		t.Fatalf("app.js: %d %q", js.Code, js.Header().Get("Content-Type"))
	}
}

func TestData(t *testing.T) {
	h := newWorld(Options{})
	v := data(t, h, "/dashboard/data.json")
	if v.Account.Account != "acct_1" || v.Account.Balance != "12.345678" || v.Account.BalanceMicroCredits != 12_345_678 {
		t.Errorf("account = %+v", v.Account)
	}
	// Nodes sorted by peer ID, devices described, capacity summed.
	if len(v.Nodes) != 2 || v.Nodes[0].PeerID != "12D3KooWnodeAAAAAAAAAAAAAAAA" || v.Nodes[0].Devices[0] != "CPU · 16 cores · 64.0 GiB" ||
		v.Nodes[1].Devices[0] != "NVIDIA H200 · 100.0 GiB free of 140.0 GiB · 37% busy" || v.Sessions != 1 || v.Capacity != 12 {
		t.Errorf("nodes = %+v", v.Nodes)
	}
	// Models with prices in credits, and how many nodes serve each.
	if len(v.Models) != 1 || v.Models[0].Train != "0.000030" || v.Models[0].Storage != "0.001500" || v.Models[0].Serving != 2 {
		t.Errorf("models = %+v", v.Models)
	}
	// Runs without steps fold away (their metrics are never read).
	if len(v.Runs) != 1 || v.Folded != 2 || v.Runs[0].ID != "run_a" {
		t.Fatalf("runs = %+v, folded %d", v.Runs, v.Folded)
	}
	r := v.Runs[0]
	if r.Name != "<script>alert(1)</script>" || *r.FirstLoss != 10 || *r.LastLoss != 2 || len(r.Metrics) != 5 ||
		r.Metrics[3].Loss != nil || r.Metrics[4].GradNorm != nil || *r.Metrics[0].LR != 1e-4 || r.Checkpoint.URI != "s3://bucket/ck1" {
		t.Errorf("run = %+v", r)
	}
	// Four steps in four seconds, the last 10 s ago: training.
	if r.Activity != "training" || diff(r.StepsPerSecond, 1) > 1e-9 || r.LastActivityAgo != "10s ago" {
		t.Errorf("activity %q, %v steps/s, last %q", r.Activity, r.StepsPerSecond, r.LastActivityAgo)
	}
	// Charges: newest first, totalled per call (the costliest first) and
	// per run.
	if len(v.Charges) != 2 || v.Charges[0].Clock != "10:00:09" || v.Charges[0].Credits != "0.000003" {
		t.Errorf("charges = %+v", v.Charges)
	}
	want := []callTotal{{Call: "forward_backward", Count: 1, MicroCredits: 26, Credits: "0.000026"}, {Call: "save_state", Count: 1, MicroCredits: 3, Credits: "0.000003"}}
	if fmt.Sprint(v.Calls) != fmt.Sprint(want) || fmt.Sprint(r.Calls) != fmt.Sprint(want) || r.Spent != "0.001500" {
		t.Errorf("calls = %+v, run's %+v, spent %s", v.Calls, r.Calls, r.Spent)
	}

	// Every run's spend, folded runs too.
	if len(v.Spend) != 2 || v.Spend[0].ID != "run_c" || v.Spend[0].Credits != "0.002000" || v.Spend[1].ID != "run_a" {
		t.Errorf("spend = %+v", v.Spend)
	}

	if v.RefreshSeconds != 5 {
		t.Errorf("refresh_seconds = %d", v.RefreshSeconds)
	}
	if never := data(t, New(world(), Options{RefreshSeconds: -1}), "/dashboard/data.json"); never.RefreshSeconds != 0 {
		t.Errorf("RefreshSeconds -1: refresh_seconds = %d", never.RefreshSeconds)
	}

	all := data(t, h, "/dashboard/data.json?all=1")
	if len(all.Runs) != 3 || all.Folded != 0 || all.Runs[0].ID != "run_c" || all.Runs[2].ID != "run_a" || all.Runs[0].Activity != "ready" {
		t.Errorf("?all=1: %d runs, folded %d", len(all.Runs), all.Folded)
	}
	capped := data(t, New(world(), Options{MaxRuns: 1}), "/dashboard/data.json?all=1")
	if len(capped.Runs) != 3 {
		t.Errorf("?all=1 with MaxRuns 1: %d runs", len(capped.Runs))
	}
	many := world()
	runs := many.runs
	many.runs = func(key string) ([]protocol.Run, error) {
		rs, err := runs(key)
		for i := 0; err == nil && i < 30; i++ {
			rs = append(rs, protocol.Run{ID: fmt.Sprintf("run_%d", i), Status: "ended"})
		}
		return rs, err
	}
	if v := data(t, New(many, Options{MaxRuns: 2}), "/dashboard/data.json?all=1"); len(v.Runs) != 20 || v.Folded != 13 {
		t.Errorf("?all=1 with MaxRuns 2 of 33 runs: %d runs, %d folded", len(v.Runs), v.Folded)
	}

	// A step long ago is not training.
	h.now = func() time.Time { return worldNow.Add(time.Hour) }
	if r := data(t, h, "/dashboard/data.json").Runs[0]; r.Activity != "ready" {
		t.Errorf("an hour later: %q", r.Activity)
	}
}

func TestRunPage(t *testing.T) {
	h := newWorld(Options{})
	w := get(t, h, "/dashboard/runs/run_a", withCookie(goodKey))
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `"run":"run_a"`) {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	v := data(t, h, "/dashboard/data.json?run=run_a")
	if len(v.Runs) != 1 || v.Runs[0].ID != "run_a" || len(v.Runs[0].Checkpoints) != 1 || len(v.Charges) != 2 {
		t.Fatalf("run page data = %+v", v)
	}
	if w := get(t, h, "/dashboard/runs/run_x", withCookie(goodKey)); w.Code != http.StatusNotFound {
		t.Errorf("unknown run: %d", w.Code)
	}
	if w := get(t, h, "/dashboard/data.json?run=run_x", withCookie(goodKey)); w.Code != http.StatusNotFound {
		t.Errorf("unknown run's data: %d", w.Code)
	}
	// Many steps are thinned on the overview, never on the run's page.
	ps := make([]metricPoint, 1000)
	for i := range ps {
		ps[i].Step = i
	}
	th := thin(ps, overviewPoints)
	if len(th) != overviewPoints || th[0].Step != 0 || th[len(th)-1].Step != 999 {
		t.Errorf("thin: %d points, %d..%d", len(th), th[0].Step, th[len(th)-1].Step)
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
	t.Run("data needs a key", func(t *testing.T) {
		if w := get(t, h, "/dashboard/data.json", nil); w.Code != http.StatusUnauthorized {
			t.Errorf("no key: %d", w.Code)
		}
		if w := get(t, h, "/dashboard/data.json", withCookie("sk-bad")); w.Code != http.StatusUnauthorized {
			t.Errorf("unknown key: %d", w.Code)
		}
		// ?key= is no sign-in here: only the page takes it, and redirects.
		if w := get(t, h, "/dashboard/data.json?key="+goodKey, nil); w.Code != http.StatusUnauthorized || len(w.Result().Cookies()) != 0 {
			t.Errorf("?key= on data.json: %d", w.Code)
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
	w = get(t, New(src, Options{}), "/dashboard/data.json", withCookie(goodKey))
	if w.Code != http.StatusServiceUnavailable || !strings.Contains(w.Body.String(), "no raft leader elected") {
		t.Fatalf("data: status %d: %s", w.Code, w.Body)
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
	api.HandleFunc("GET /v1/models", func(w http.ResponseWriter, r *http.Request) {
		if auth(w, r) {
			_ = json.NewEncoder(w).Encode(protocol.ModelList{Models: []protocol.Model{{Name: "signal-tiny"}}})
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
	if m, err := s.Models(ctx, goodKey); err != nil || len(m) != 1 || m[0].Name != "signal-tiny" {
		t.Fatalf("Models = %+v, %v", m, err)
	}
	srv.Close()
	if _, err := s.Runs(ctx, goodKey); !errorsIs(err, ErrUnavailable) {
		t.Fatalf("server down: %v", err)
	}
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }

// TestMetricsReadOncePerStep: an idle run's metrics are read once, not at
// every refresh; a new step reads them again; each viewer reads its own.
func TestMetricsReadOncePerStep(t *testing.T) {
	src := world()
	reads := 0
	metrics, runs := src.metrics, src.runs
	src.metrics = func(key, runID string) ([]protocol.Metrics, error) {
		reads++
		return metrics(key, runID)
	}
	step := 5
	src.runs = func(key string) ([]protocol.Run, error) {
		rs, err := runs(key)
		if err == nil {
			rs[0].Step = step
		}
		return rs, err
	}
	h := New(src, Options{})
	for range 3 {
		data(t, h, "/dashboard/data.json")
	}
	if reads != 1 {
		t.Fatalf("three refreshes of an idle run: %d reads", reads)
	}
	step = 6
	data(t, h, "/dashboard/data.json")
	data(t, h, "/dashboard/data.json?run=run_a")
	if reads != 2 {
		t.Fatalf("after a step: %d reads", reads)
	}
	// Another viewer asks the source, which refuses it: nothing cached
	// answers in its place.
	if _, err := h.runMetrics(context.Background(), "sk-other", protocol.Run{ID: "run_a", Step: 6}); !errors.Is(err, ErrUnauthorized) || reads != 3 {
		t.Fatalf("another viewer: %v, %d reads", err, reads)
	}
}
