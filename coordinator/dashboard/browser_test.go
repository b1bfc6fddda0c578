package dashboard

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/signal-p2p/signal/internal/browsertest"
	"github.com/signal-p2p/signal/protocol"
)

// TestPagesInChromium draws the overview and a run's page in a real
// browser, wide and 375 px narrow, over the fake world, and checks what
// the script drew; the screenshots are kept (dashboard-*.png).
func TestPagesInChromium(t *testing.T) {
	bin := browsertest.Chromium(t)
	h := New(world(), Options{Title: "Signal test"})
	h.now = func() time.Time { return worldNow }
	srv := httptest.NewServer(h)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	overview := srv.URL + "/dashboard?key=" + goodKey
	dom := string(browsertest.Headless(ctx, t, bin, overview, "1280,900", "--dump-dom"))
	for _, want := range []string{
		`id="run-run_a"`, `<polyline class="raw"`, `href="/dashboard/runs/run_a"`, "2.0000", // the run, its loss chart, its last loss
		`training</span>`, "1.00 steps/s", "last activity",
		`id="more-runs"`, "2 more runs",
		"forward_backward", "0.000026", // charges per call
		`href="/dashboard/runs/run_c"`, "0.002000", // per run, a folded one too
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
	dom = string(browsertest.Headless(ctx, t, bin, run, "1280,900", "--dump-dom"))
	for _, want := range []string{
		`id="loss-run_a"`, `id="lr-run_a"`, `id="gn-run_a"`, `tabindex="0"`, "Learning rate", "Grad norm",
		`id="smooth"`, "s3://bucket/ck1", "← All runs",
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("run page in Chromium lacks %q", want)
		}
	}

	browsertest.Screenshot(ctx, t, bin, overview, "1280,1600", "dashboard-overview.png")
	browsertest.Screenshot(ctx, t, bin, run, "1280,1100", "dashboard-run.png")
	browsertest.Screenshot(ctx, t, bin, overview, "375,1800", "dashboard-overview-375.png")
	browsertest.Screenshot(ctx, t, bin, run, "375,1800", "dashboard-run-375.png")
}

// browser is headless Chromium driven over the DevTools protocol on a
// pipe (--remote-debugging-pipe: it reads commands on fd 3 and writes on
// fd 4, each message JSON ended by a NUL), one page attached.
type browser struct {
	t       *testing.T
	cmd     *exec.Cmd
	in      *os.File // to Chromium
	mu      sync.Mutex
	nextID  int
	waiting map[int]chan cdpMessage
	events  chan cdpMessage
	session string
}

type cdpMessage struct {
	ID        int             `json:"id,omitempty"`
	Method    string          `json:"method,omitempty"`
	Params    any             `json:"params,omitempty"`
	SessionID string          `json:"sessionId,omitempty"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     *struct {
		Message string `json:"message"`
	} `json:"error,omitempty"`
}

// startBrowser starts Chromium and attaches to a blank page of
// width×height CSS pixels.
func startBrowser(ctx context.Context, t *testing.T, bin string, width, height int) *browser {
	t.Helper()
	toR, toW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	fromR, fromW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, bin, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--hide-scrollbars", "--remote-debugging-pipe", "--user-data-dir="+t.TempDir(), "about:blank")
	cmd.ExtraFiles = []*os.File{toR, fromW}
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	toR.Close()
	fromW.Close()
	b := &browser{t: t, cmd: cmd, in: toW, waiting: map[int]chan cdpMessage{}, events: make(chan cdpMessage, 256)}
	t.Cleanup(func() {
		toW.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			var keep []string
			for _, l := range strings.Split(errb.String(), "\n") {
				if !strings.Contains(l, "dbus") {
					keep = append(keep, l)
				}
			}
			t.Logf("chromium's stderr:\n%s", strings.Join(keep, "\n"))
		}
	})
	go b.read(bufio.NewReader(fromR))
	var target struct {
		TargetID string `json:"targetId"`
	}
	b.call("", "Target.createTarget", map[string]any{"url": "about:blank"}, &target)
	var att struct {
		SessionID string `json:"sessionId"`
	}
	b.call("", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}, &att)
	b.session = att.SessionID
	b.do("Page.enable", nil, nil)
	b.do("Emulation.setDeviceMetricsOverride", map[string]any{"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}, nil)
	return b
}

func (b *browser) read(r *bufio.Reader) {
	for {
		raw, err := r.ReadBytes(0)
		if err != nil {
			return
		}
		var m cdpMessage
		if json.Unmarshal(raw[:len(raw)-1], &m) != nil {
			continue
		}
		if m.ID == 0 {
			select {
			case b.events <- m:
			default:
			}
			continue
		}
		b.mu.Lock()
		ch := b.waiting[m.ID]
		delete(b.waiting, m.ID)
		b.mu.Unlock()
		if ch != nil {
			ch <- m
		}
	}
}

func (b *browser) call(session, method string, params, out any) {
	b.t.Helper()
	b.mu.Lock()
	b.nextID++
	id := b.nextID
	ch := make(chan cdpMessage, 1)
	b.waiting[id] = ch
	b.mu.Unlock()
	msg, err := json.Marshal(cdpMessage{ID: id, Method: method, Params: params, SessionID: session})
	if err != nil {
		b.t.Fatal(err)
	}
	if _, err := b.in.Write(append(msg, 0)); err != nil {
		b.t.Fatalf("%s: %v", method, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			b.t.Fatalf("%s: %s", method, m.Error.Message)
		}
		if out != nil {
			if err := json.Unmarshal(m.Result, out); err != nil {
				b.t.Fatalf("%s: %v", method, err)
			}
		}
	case <-time.After(30 * time.Second):
		b.t.Fatalf("%s: no answer from chromium", method)
	}
}

// do calls a method of the attached page.
func (b *browser) do(method string, params, out any) {
	b.t.Helper()
	b.call(b.session, method, params, out)
}

// eval evaluates a JavaScript expression in the page into out.
func (b *browser) eval(expr string, out any) {
	b.t.Helper()
	var r struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text      string `json:"text"`
			Exception struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	b.do("Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true, "awaitPromise": true}, &r)
	if r.ExceptionDetails != nil {
		b.t.Fatalf("eval %s: %s %s", expr, r.ExceptionDetails.Text, r.ExceptionDetails.Exception.Description)
	}
	if out != nil {
		if err := json.Unmarshal(r.Result.Value, out); err != nil {
			b.t.Fatalf("eval %s = %s: %v", expr, r.Result.Value, err)
		}
	}
}

func (b *browser) text(expr string) string {
	b.t.Helper()
	var s string
	b.eval(expr, &s)
	return s
}

// navigate opens url and waits until the page's script has drawn it.
func (b *browser) navigate(url string) {
	b.t.Helper()
	b.do("Page.navigate", map[string]any{"url": url}, nil)
	b.waitFor(`document.readyState === "complete" && !!document.querySelector("#app section")`)
}

// waitFor polls a JavaScript condition for up to 10 s.
func (b *browser) waitFor(cond string) {
	b.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var ok bool
		b.eval("!!("+cond+")", &ok)
		if ok {
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("waited 10 s for %s", cond)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// key presses a key (Tab, Enter, ArrowLeft, ArrowRight, Home, End, " ").
func (b *browser) key(name string) {
	b.t.Helper()
	codes := map[string]int{"Tab": 9, "Enter": 13, "ArrowLeft": 37, "ArrowRight": 39, "Home": 36, "End": 35, " ": 32}
	code := map[string]string{" ": "Space"}[name]
	if code == "" {
		code = name
	}
	p := map[string]any{"type": "rawKeyDown", "key": name, "code": code, "windowsVirtualKeyCode": codes[name]}
	b.do("Input.dispatchKeyEvent", p, nil)
	if text := map[string]string{" ": " ", "Enter": "\r"}[name]; text != "" {
		b.do("Input.dispatchKeyEvent", map[string]any{"type": "char", "text": text, "key": name, "code": code}, nil)
	}
	p["type"] = "keyUp"
	b.do("Input.dispatchKeyEvent", p, nil)
}

// mouse moves the pointer to (x, y) in CSS pixels.
func (b *browser) mouse(x, y float64) {
	b.t.Helper()
	b.do("Input.dispatchMouseEvent", map[string]any{"type": "mouseMoved", "x": x, "y": y}, nil)
}

// screenshot keeps the whole page as a PNG in the artifacts directory.
func (b *browser) screenshot(name string) {
	b.t.Helper()
	var r struct {
		Data []byte `json:"data"` // base64 in JSON
	}
	b.do("Page.captureScreenshot", map[string]any{"format": "png", "captureBeyondViewport": true}, &r)
	if len(r.Data) < 10_000 || !bytes.HasPrefix(r.Data, []byte("\x89PNG")) {
		b.t.Fatalf("screenshot %s: %d bytes, not a rendered page", name, len(r.Data))
	}
	path := filepath.Join(browsertest.Artifacts(b.t), name)
	if err := os.WriteFile(path, r.Data, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("screenshot: %s", path)
}

// TestChartsKeyboardAndUpdatesInChromium drives a real browser: hovering
// a chart reads a step's value, Tab reaches the controls and the arrow
// keys walk a chart, Space toggles smoothing, and the page takes new
// steps from the coordinator without reloading.
func TestChartsKeyboardAndUpdatesInChromium(t *testing.T) {
	bin := browsertest.Chromium(t)
	src := world()
	var extra atomic.Int32 // steps taken after the first five
	runs, metrics := src.runs, src.metrics
	src.runs = func(key string) ([]protocol.Run, error) {
		rs, err := runs(key)
		if err == nil {
			rs[0].Step += int(extra.Load())
		}
		return rs, err
	}
	src.metrics = func(key, runID string) ([]protocol.Metrics, error) {
		ms, err := metrics(key, runID)
		for i := 1; err == nil && i <= int(extra.Load()); i++ {
			ms = append(ms, protocol.Metrics{Step: 5 + i, LossMean: loss(1.5 / float64(i)), LearningRate: loss(2e-4), Time: stepTime(5 + i)})
		}
		return ms, err
	}
	var down atomic.Bool // the coordinator cannot answer
	nodes := src.nodes
	src.nodes = func(key string) ([]protocol.Node, error) {
		if down.Load() {
			return nil, fmt.Errorf("GET /v1/nodes: status 503 no raft leader elected: %w", ErrUnavailable)
		}
		return nodes(key)
	}
	h := New(src, Options{Title: "Signal test", RefreshSeconds: 1})
	h.now = func() time.Time { return worldNow }
	srv := httptest.NewServer(h)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	b := startBrowser(ctx, t, bin, 1280, 900)
	b.navigate(srv.URL + "/dashboard/runs/run_a?key=" + goodKey)

	// Hover: the pointer over step 3 of the loss chart reads its loss.
	var box struct{ X, Y, W, H float64 }
	b.eval(`(() => { const r = document.getElementById("loss-run_a").getBoundingClientRect(); return {X: r.x, Y: r.y, W: r.width, H: r.height}; })()`, &box)
	// The plot spans viewBox x 50..468 of 480 for steps 1..5.
	b.mouse(box.X+(50+(468-50)*0.5)*box.W/480, box.Y+box.H/2)
	if got := b.text(`document.getElementById("loss-run_a-readout").textContent`); got != "step 3 · loss 5" {
		t.Errorf("hover readout = %q", got)
	}
	if v := b.text(`document.querySelector("#loss-run_a .hover").getAttribute("visibility")`); v != "visible" {
		t.Errorf("hover cursor %q", v)
	}
	if got := b.text(`document.querySelector("#loss-run_a text.tip").textContent`); got != "step 3: 5" {
		t.Errorf("hover label %q", got)
	}
	b.screenshot("dashboard-run-hover.png")
	b.mouse(5, 5)

	// Keyboard: Tab walks the header's links, the back link, the
	// smoothing box, then the loss chart; the arrow keys move along its
	// steps.
	var order []string
	for range 5 {
		b.key("Tab")
		order = append(order, b.text(`document.activeElement.getAttribute("data-focus") || document.activeElement.textContent`))
	}
	want := []string{"Signal test", "sign out", "back", "smooth", "loss-run_a"}
	if fmt.Sprint(order) != fmt.Sprint(want) {
		t.Fatalf("Tab order %q, want %q", order, want)
	}
	if got := b.text(`document.getElementById("loss-run_a-readout").textContent`); got != "step 5 · loss 2" {
		t.Errorf("focused chart reads %q", got)
	}
	b.key("ArrowLeft")
	b.key("ArrowLeft")
	if got := b.text(`document.getElementById("loss-run_a-readout").textContent`); got != "step 2 · loss 8" {
		t.Errorf("after two ArrowLefts (step 4 has no loss): %q", got)
	}
	b.key("Home")
	if got := b.text(`document.getElementById("loss-run_a-readout").textContent`); got != "step 1 · loss 10" {
		t.Errorf("after Home: %q", got)
	}

	// Smoothing: Space on the focused box draws a smoothed line too.
	b.eval(`document.getElementById("smooth").focus(), 0`, nil)
	b.key(" ")
	b.waitFor(`document.querySelector("#loss-run_a polyline.smooth") && document.getElementById("smooth").checked`)
	if got := b.text(`document.activeElement.id`); got != "smooth" {
		t.Errorf("focus after toggling smoothing: %q", got)
	}
	b.screenshot("dashboard-run-smoothed.png")

	// Updates: new steps arrive on the page without a reload.
	b.eval(`window.notReloaded = true`, nil)
	extra.Store(3)
	b.waitFor(`document.getElementById("step").textContent === "8"`)
	var kept bool
	b.eval(`window.notReloaded === true`, &kept)
	if !kept {
		t.Error("the page reloaded to update")
	}
	if got := b.text(`document.getElementById("updated").textContent`); !strings.HasSuffix(got, "updates every 1s") {
		t.Errorf("header after an update: %q", got)
	}
	if got := b.text(`document.querySelector(".last-loss").textContent`); got != "0.5000" {
		t.Errorf("last loss after the update: %q", got)
	}
	if got := b.text(`document.activeElement.id`); got != "smooth" {
		t.Errorf("focus after an update: %q", got)
	}

	// The coordinator down: the page says so, keeps its figures, and
	// recovers by itself.
	down.Store(true)
	b.waitFor(`!document.getElementById("problem").hidden`)
	if got := b.text(`document.getElementById("problem").textContent`); !strings.Contains(got, "no raft leader elected") || !strings.Contains(got, "retrying") {
		t.Errorf("problem banner: %q", got)
	}
	if got := b.text(`document.getElementById("step").textContent`); got != "8" {
		t.Errorf("step while the coordinator is down: %q", got)
	}
	down.Store(false)
	b.waitFor(`document.getElementById("problem").hidden`)

	// The overview at 375 px: nothing wider than the screen, not even a
	// table, and the "N more" link reachable by keyboard.
	n := startBrowser(ctx, t, bin, 375, 812)
	// Signing in by keyboard: Tab to the key, type it, Enter.
	n.do("Page.navigate", map[string]any{"url": srv.URL + "/dashboard"}, nil)
	n.waitFor(`document.readyState === "complete" && document.querySelector("form input[name=key]")`)
	n.screenshot("dashboard-sign-in-375.png")
	for range 4 {
		n.key("Tab")
		if n.text(`document.activeElement.name || ""`) == "key" {
			break
		}
	}
	n.do("Input.insertText", map[string]any{"text": goodKey}, nil)
	n.key("Enter")
	n.waitFor(`document.readyState === "complete" && document.querySelector("#app section")`)
	if got := n.text(`location.pathname`); got != "/dashboard" {
		t.Errorf("signed in at %q", got)
	}
	var wide []string
	n.eval(`[document.documentElement, ...document.querySelectorAll(".scroll")].filter(e => e.scrollWidth > e.clientWidth).map(e => e.id || e.firstElementChild.id || e.tagName)`, &wide)
	if len(wide) > 0 {
		t.Errorf("wider than 375 px: %q", wide)
	}
	found := false
	for range 12 {
		n.key("Tab")
		if n.text(`document.activeElement.id`) == "more-runs" {
			found = true
			break
		}
	}
	if !found {
		t.Error(`Tab never reached the "N more" link`)
	}
	n.key("Enter")
	n.waitFor(`location.search === "?all=1" && document.getElementById("run-run_c")`)
	n.screenshot("dashboard-overview-all-375.png")
	n.navigate(srv.URL + "/dashboard/runs/run_a")
	n.eval(`[document.documentElement, ...document.querySelectorAll(".scroll")].filter(e => e.scrollWidth > e.clientWidth).map(e => e.id || e.firstElementChild.id || e.tagName)`, &wide)
	if len(wide) > 0 {
		t.Errorf("the run's page wider than 375 px: %q", wide)
	}
}
