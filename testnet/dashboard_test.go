package testnet

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/internal/browsertest"
)

// TestDashboardInChromium trains a real run on a testnet and checks, in a
// real browser, that the coordinator's page shows it: the nodes, the run
// training with its loss curve, the balance, charges and models, and the
// run's own page with its three charts. It keeps screenshots of both
// pages, wide and 375 px narrow (testnet-dashboard*.png, in
// $SIGNAL_ARTIFACTS when set, for CI to publish).
func TestDashboardInChromium(t *testing.T) {
	bin := browsertest.Chromium(t)
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

	dom := string(browsertest.Headless(ctx, t, bin, url, "1280,900", "--dump-dom"))
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

	// The run's own page charts the loss, learning rate and grad norm the
	// run reported.
	runURL := info.Dashboard + "/runs/" + r.ID() + "?key=" + info.APIKey
	dom = string(browsertest.Headless(ctx, t, bin, runURL, "1280,900", "--dump-dom"))
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
		browsertest.Screenshot(ctx, t, bin, s.url, s.size, s.name)
	}
}
