package dashboard

import (
	"bytes"
	"context"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// chromium finds Debian's chromium; it skips the test without it locally
// and fails it in CI, where the Makefile installs it.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{os.Getenv("SIGNAL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"} {
		if name == "" {
			continue
		}
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium not found: install Debian's chromium (APT_PKGS) or set SIGNAL_CHROMIUM")
	}
	t.Skip("chromium not found; install it (apt-get install chromium) to run the dashboard's browser tests")
	return ""
}

// artifacts is where screenshots go: $SIGNAL_ARTIFACTS when set (CI
// publishes it), else the test's temporary directory.
func artifacts(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("SIGNAL_ARTIFACTS")
	if dir == "" {
		return t.TempDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// headless runs Chromium on url at a window width×height and returns its
// stdout.
func headless(ctx context.Context, t *testing.T, bin, url, size string, args ...string) []byte {
	t.Helper()
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
		"--user-data-dir=" + t.TempDir(), "--window-size=" + size}
	cmd := exec.CommandContext(ctx, bin, append(append(base, args...), url)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %v: %v\n%s", args, err, errb.String())
	}
	return out.Bytes()
}

func screenshot(ctx context.Context, t *testing.T, bin, url, size, name string) {
	t.Helper()
	shot := filepath.Join(artifacts(t), name)
	headless(ctx, t, bin, url, size, "--screenshot="+shot)
	png, err := os.ReadFile(shot)
	if err != nil {
		t.Fatal(err)
	}
	if len(png) < 10_000 || !bytes.HasPrefix(png, []byte("\x89PNG")) {
		t.Fatalf("screenshot %s: %d bytes, not a rendered page", shot, len(png))
	}
	t.Logf("screenshot: %s", shot)
}

// TestPagesInChromium draws the overview and a run's page in a real
// browser, wide and 375 px narrow, over the fake world, and checks what
// the script drew; the screenshots are kept (dashboard-*.png).
func TestPagesInChromium(t *testing.T) {
	bin := chromium(t)
	h := New(world(), Options{Title: "Signal test"})
	h.now = func() time.Time { return worldNow }
	srv := httptest.NewServer(h)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	overview := srv.URL + "/dashboard?key=" + goodKey
	dom := string(headless(ctx, t, bin, overview, "1280,900", "--dump-dom"))
	for _, want := range []string{
		`id="run-run_a"`, `<polyline class="raw"`, `href="/dashboard/runs/run_a"`, "2.0000", // the run, its loss chart, its last loss
		`training</span>`, "1.00 steps/s", "last activity",
		`id="more-runs"`, "2 more runs",
		"forward_backward", "0.000026", // charges per call
		"12.345678", "credits", // balance, with its unit
		`id="models"`, "0.000030", // models and prices
		"12D3KooWnodeAAAAAAAAAAAAAAAA", "NVIDIA H200",
		"&lt;script&gt;alert(1)&lt;/script&gt;",
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("overview in Chromium lacks %q", want)
		}
	}
	if strings.Contains(dom, "Loading…") || strings.Contains(dom, "<script>alert") {
		t.Error("the script did not draw the page, or drew the run's name as markup")
	}

	run := srv.URL + "/dashboard/runs/run_a?key=" + goodKey
	dom = string(headless(ctx, t, bin, run, "1280,900", "--dump-dom"))
	for _, want := range []string{
		`id="loss-run_a"`, `id="lr-run_a"`, `id="gn-run_a"`, `tabindex="0"`, "Learning rate", "Grad norm",
		`id="smooth"`, "s3://bucket/ck1", "← All runs",
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("run page in Chromium lacks %q", want)
		}
	}

	screenshot(ctx, t, bin, overview, "1280,1600", "dashboard-overview.png")
	screenshot(ctx, t, bin, run, "1280,1100", "dashboard-run.png")
	screenshot(ctx, t, bin, overview, "375,1800", "dashboard-overview-375.png")
	screenshot(ctx, t, bin, run, "375,1800", "dashboard-run-375.png")
}
