package testnet

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
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
	t.Skip("chromium not found; install it (apt-get install chromium) to run the dashboard's browser test")
	return ""
}

// runChromium runs headless Chromium on url with extra arguments and
// returns its stdout.
func runChromium(ctx context.Context, t *testing.T, bin, url string, args ...string) []byte {
	t.Helper()
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-dev-shm-usage", "--user-data-dir=" + t.TempDir(), "--window-size=1280,900"}
	cmd := exec.CommandContext(ctx, bin, append(append(base, args...), url)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %v: %v\n%s", args, err, errb.String())
	}
	return out.Bytes()
}

// TestDashboardInChromium trains a real run on a testnet and checks, in a
// real browser, that the coordinator's page shows it: the nodes, the run
// training with its loss curve, the balance, charges and models, and the
// run's own page with its three charts. It keeps screenshots of both
// pages, wide and 375 px narrow (testnet-dashboard*.png, in
// $SIGNAL_ARTIFACTS when set, for CI to publish).
func TestDashboardInChromium(t *testing.T) {
	bin := chromium(t)
	tn := startTestnet(t, func(c *Config) { c.Coordinators, c.Nodes = 1, 2 })
	info := tn.Info()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := client.New(info.Coordinators[0], info.APIKey)
	if err != nil {
		t.Fatal(err)
	}
	r, losses := trainRun(ctx, t, c, 12)
	url := info.Dashboard + "?key=" + info.APIKey

	dom := string(runChromium(ctx, t, bin, url, "--dump-dom"))
	for _, want := range []string{`id="run-` + r.ID() + `"`, "<polyline", "signal-tiny", info.Account, "forward_backward", "native",
		`training</span>`, "steps/s", `id="models"`} {
		if !strings.Contains(dom, want) {
			t.Errorf("the page in Chromium lacks %q", want)
		}
	}
	// The page prints the run's last loss as the metrics API reports it.
	ms, err := r.Metrics(ctx)
	if err != nil || len(ms) != len(losses) || ms[len(ms)-1].LossMean == nil {
		t.Fatalf("metrics = %+v, %v", ms, err)
	}
	if last := *ms[len(ms)-1].LossMean; !strings.Contains(dom, fmt.Sprintf("%.4f", last)) {
		t.Errorf("the page lacks the last loss %.4f", last)
	}
	// Both nodes are listed.
	for _, id := range info.Nodes {
		if !strings.Contains(dom, id) {
			t.Errorf("the page lacks node %s", id)
		}
	}

	dir := os.Getenv("SIGNAL_ARTIFACTS")
	if dir == "" {
		dir = t.TempDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The run's own page charts the loss, learning rate and grad norm the
	// run reported.
	runURL := info.Dashboard + "/runs/" + r.ID() + "?key=" + info.APIKey
	dom = string(runChromium(ctx, t, bin, runURL, "--dump-dom"))
	for _, want := range []string{`id="loss-` + r.ID() + `"`, `id="lr-` + r.ID() + `"`, `id="gn-` + r.ID() + `"`, "0.005", "Checkpoints"} {
		if !strings.Contains(dom, want) {
			t.Errorf("the run's page in Chromium lacks %q", want)
		}
	}

	for _, s := range []struct{ name, url, size string }{
		{"testnet-dashboard.png", url, "1280,1500"},
		{"testnet-dashboard-run.png", runURL, "1280,1300"},
		{"testnet-dashboard-375.png", url, "375,2200"},
		{"testnet-dashboard-run-375.png", runURL, "375,2200"},
	} {
		shot := filepath.Join(dir, s.name)
		// The later --window-size wins over runChromium's.
		runChromium(ctx, t, bin, s.url, "--screenshot="+shot, "--hide-scrollbars", "--window-size="+s.size)
		png, err := os.ReadFile(shot)
		if err != nil {
			t.Fatal(err)
		}
		if len(png) < 10_000 || !bytes.HasPrefix(png, []byte("\x89PNG")) {
			t.Fatalf("screenshot %s: %d bytes, not a rendered page", shot, len(png))
		}
		t.Logf("dashboard screenshot: %s (%d bytes)", shot, len(png))
	}
}
