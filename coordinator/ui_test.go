package coordinator

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/coordinator/dashboard"
	"github.com/signal-p2p/signal/protocol"
)

// TestUIMountedBesideTheAPI: Config.UI serves / and /dashboard… on the
// API's own address, reading through that API; other paths keep the API's
// JSON 404, and without a UI / is such a 404 too.
func TestUIMountedBesideTheAPI(t *testing.T) {
	var c *Coordinator
	c, _ = startOne(t, func(cfg *Config) {
		cfg.UI = dashboard.New(dashboard.NewSelfSource(func() string { return c.URL() }), dashboard.Options{Title: "Signal · solo"})
	})
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	createRun(t, base, key, map[string]any{"base_model": "tiny", "name": "ui-run"})

	page := func(path, key string) (int, string) {
		t.Helper()
		req, err := http.NewRequest("GET", base+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if key != "" {
			req.SetBasicAuth("", key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	// A run without steps is folded away but for ?all=1.
	for _, path := range []string{"/?all=1", "/dashboard?all=1", "/dashboard/?all=1"} {
		status, body := page(path, key)
		if status != 200 || !strings.Contains(body, "Signal · solo") || !strings.Contains(body, "ui-run") {
			t.Fatalf("GET %s: status %d, page without the title or the run:\n%.500s", path, status, body)
		}
	}
	if status, body := page("/dashboard/data.json", key); status != 200 || !strings.Contains(body, `"folded":1`) {
		t.Fatalf("GET /dashboard/data.json: status %d:\n%.500s", status, body)
	}
	if status, body := page("/dashboard", ""); status != 401 || !strings.Contains(body, "<form") {
		t.Fatalf("GET /dashboard without a key: status %d:\n%.300s", status, body)
	}
	r := do(t, "GET", base+"/no/such/page", "", nil)
	if r.status != 404 || r.errCode(t) != protocol.CodeNotFound {
		t.Fatalf("unknown path: %d %s", r.status, r.body)
	}
	mustStatus(t, do(t, "GET", base+"/v1/health", "", nil), 200)

	bare, _ := startOne(t, nil)
	r = do(t, "GET", bare.URL()+"/", "", nil)
	if r.status != 404 || r.errCode(t) != protocol.CodeNotFound {
		t.Fatalf("GET / without a UI: %d %s", r.status, r.body)
	}
}
