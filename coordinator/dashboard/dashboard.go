// Package dashboard is the coordinator's web page: nodes and their capacity,
// the viewer's runs with loss curves (inline SVG), balance and recent
// charges. It is server-rendered with html/template — no JavaScript, no
// build step — and reads its data through a Source.
//
// Who is viewing is an API key, the same credential the API takes, so the
// page shows exactly what the API would show that key. The key arrives in
// one of three ways: a sign-in form (POST, the key never enters the URL),
// ?key= in a link (for scripts and headless browsers; the dashboard then
// sets the cookie and redirects to the same page without the key, so it
// does not stay in the address bar), or HTTP Basic auth with the key as
// the password (curl -u :sk-...). The cookie is HttpOnly and SameSite=Strict.
// The admin token is not accepted: the API has no admin-wide listing of
// runs or accounts for a page to show.
package dashboard

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"math"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// loginCSRF refuses cross-origin browser posts to the sign-in form.
var loginCSRF = http.NewCrossOriginProtection()

// CookieName holds the viewer's API key.
const CookieName = "signal_key"

// Options tune the page.
type Options struct {
	// Title heads the page.
	Title string
	// RefreshSeconds makes the browser reload the page (0: 10 s; <0: never).
	RefreshSeconds int
	// MaxRuns bounds the runs drawn, newest first (0: 20).
	MaxRuns int
	// MaxCharges bounds the charges listed, newest first (0: 25).
	MaxCharges int
	// Logger receives read errors.
	Logger *slog.Logger
}

//go:embed templates/*.html
var templates embed.FS

var pageTmpl = template.Must(template.New("page.html").Funcs(template.FuncMap{
	"credits":  formatCredits,
	"bytes":    formatBytes,
	"short":    shortID,
	"clock":    clock,
	"join":     strings.Join,
	"f4":       func(v float64) string { return fmt.Sprintf("%.4f", v) },
	"deref":    func(p *float64) float64 { return *p },
	"derefInt": func(p *int) int { return *p },
}).ParseFS(templates, "templates/page.html"))

// Handler serves the dashboard.
type Handler struct {
	src  Source
	opts Options
	log  *slog.Logger
	now  func() time.Time
}

// New builds the dashboard over src. Mount it at "/" (it answers "/" and
// "/dashboard", "/dashboard/login" and "/dashboard/logout").
func New(src Source, opts Options) *Handler {
	if opts.Title == "" {
		opts.Title = "Signal"
	}
	if opts.RefreshSeconds == 0 {
		opts.RefreshSeconds = 10
	}
	if opts.MaxRuns <= 0 {
		opts.MaxRuns = 20
	}
	if opts.MaxCharges <= 0 {
		opts.MaxCharges = 25
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Handler{src: src, opts: opts, log: log, now: time.Now}
}

// ServeHTTP routes the dashboard's few paths.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("X-Frame-Options", "DENY")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'")
	switch r.URL.Path {
	case "/", "/dashboard", "/dashboard/":
	case "/dashboard/login":
		// Login CSRF: another site's form must not sign the viewer in
		// under the attacker's key.
		if err := loginCSRF.Check(r); err != nil {
			http.Error(w, "cross-origin sign-in refused", http.StatusForbidden)
			return
		}
		h.login(w, r)
		return
	case "/dashboard/logout":
		http.SetCookie(w, &http.Cookie{Name: CookieName, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, SameSite: http.SameSiteStrictMode})
		http.Redirect(w, r, "/dashboard", http.StatusSeeOther)
		return
	default:
		http.NotFound(w, r)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if key := r.URL.Query().Get("key"); key != "" {
		// A ?key= link opened from another site is the same login CSRF;
		// typed, pasted or scripted ones carry no cross-site marker.
		if site := r.Header.Get("Sec-Fetch-Site"); site == "cross-site" || site == "same-site" {
			h.render(w, http.StatusForbidden, &page{Title: h.opts.Title, SignIn: true, Error: "A sign-in link from another site was refused; sign in here."})
			return
		}
		setKey(w, key)
		q := r.URL.Query()
		q.Del("key")
		u := *r.URL
		u.RawQuery = q.Encode()
		http.Redirect(w, r, u.RequestURI(), http.StatusSeeOther)
		return
	}
	key := credential(r)
	if key == "" {
		h.render(w, http.StatusUnauthorized, &page{Title: h.opts.Title, SignIn: true})
		return
	}
	p, err := h.load(r.Context(), key)
	switch {
	case errors.Is(err, ErrUnauthorized):
		h.render(w, http.StatusUnauthorized, &page{Title: h.opts.Title, SignIn: true, Error: "That API key is not known to this coordinator."})
		return
	case err != nil:
		h.log.Warn("dashboard read", "err", err)
		p = &page{Title: h.opts.Title, Error: "The coordinator cannot answer right now (" + err.Error() + "); this page retries.", Refresh: 3}
		h.render(w, http.StatusServiceUnavailable, p)
		return
	}
	h.render(w, http.StatusOK, p)
}

func (h *Handler) login(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 4096)
	if err := r.ParseForm(); err != nil {
		http.Error(w, "bad form: "+err.Error(), http.StatusBadRequest)
		return
	}
	key := strings.TrimSpace(r.PostForm.Get("key"))
	if key == "" {
		h.render(w, http.StatusBadRequest, &page{Title: h.opts.Title, SignIn: true, Error: "Enter an API key."})
		return
	}
	setKey(w, key)
	http.Redirect(w, r, "/dashboard", http.StatusSeeOther)
}

func setKey(w http.ResponseWriter, key string) {
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: key, Path: "/", HttpOnly: true, SameSite: http.SameSiteStrictMode, MaxAge: 12 * 3600})
}

// credential is the viewer's key: Basic auth's password, else the cookie.
func credential(r *http.Request) string {
	if _, pw, ok := r.BasicAuth(); ok && pw != "" {
		return pw
	}
	if c, err := r.Cookie(CookieName); err == nil {
		return c.Value
	}
	return ""
}

func (h *Handler) render(w http.ResponseWriter, status int, p *page) {
	if p.Refresh == 0 && !p.SignIn && h.opts.RefreshSeconds > 0 {
		p.Refresh = h.opts.RefreshSeconds
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if err := pageTmpl.Execute(w, p); err != nil {
		h.log.Warn("dashboard render", "err", err)
	}
}

// page is what the template draws.
type page struct {
	Title   string
	SignIn  bool
	Error   string
	Refresh int
	Now     string

	Account  protocol.Account
	Charges  []protocol.Charge
	Nodes    []nodeView
	Runs     []runView
	Sessions int
	Capacity int
}

type nodeView struct {
	protocol.Node
	Seen string
}

type runView struct {
	protocol.Run
	Curve     *curve
	LastLoss  *float64
	FirstLoss *float64
	Latest    *protocol.Checkpoint
}

func (h *Handler) load(ctx context.Context, key string) (*page, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	acct, err := h.src.Account(ctx, key)
	if err != nil {
		return nil, err
	}
	nodes, err := h.src.Nodes(ctx, key)
	if err != nil {
		return nil, err
	}
	runs, err := h.src.Runs(ctx, key)
	if err != nil {
		return nil, err
	}
	now := h.now()
	p := &page{Title: h.opts.Title, Account: acct, Now: now.UTC().Format("2006-01-02 15:04:05 MST")}
	// Newest charges first.
	ch := append([]protocol.Charge(nil), acct.Charges...)
	sort.SliceStable(ch, func(i, j int) bool { return ch[i].Time > ch[j].Time })
	if len(ch) > h.opts.MaxCharges {
		ch = ch[:h.opts.MaxCharges]
	}
	p.Charges = ch
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].PeerID < nodes[j].PeerID })
	for _, n := range nodes {
		p.Nodes = append(p.Nodes, nodeView{Node: n, Seen: ago(n.LastSeen, now)})
		p.Sessions += n.Sessions
		p.Capacity += n.MaxSessions
	}
	// Newest runs first, bounded.
	for i := len(runs) - 1; i >= 0 && len(p.Runs) < h.opts.MaxRuns; i-- {
		rv := runView{Run: runs[i]}
		ms, err := h.src.Metrics(ctx, key, runs[i].ID)
		if err != nil {
			return nil, err
		}
		rv.Curve = lossCurve(ms)
		for k := range ms {
			if ms[k].LossMean != nil {
				if rv.FirstLoss == nil {
					rv.FirstLoss = ms[k].LossMean
				}
				rv.LastLoss = ms[k].LossMean
			}
		}
		if n := len(runs[i].Checkpoints); n > 0 {
			rv.Latest = &runs[i].Checkpoints[n-1]
		}
		p.Runs = append(p.Runs, rv)
	}
	return p, nil
}

// curve is a loss curve drawn as an SVG polyline in a fixed viewBox.
type curve struct {
	W, H                   int
	Points                 string
	Dots                   []point
	MinLoss, MaxLoss       float64
	FirstStep, LastStep    int
	PlotX0, PlotX1, PlotY0 int
	PlotY1                 int
}

type point struct{ X, Y float64 }

// lossCurve scales the steps that report a loss into the plot area; nil
// when fewer than one step has a loss.
func lossCurve(ms []protocol.Metrics) *curve {
	var xs []int
	var ys []float64
	for _, m := range ms {
		if m.LossMean != nil && !math.IsNaN(*m.LossMean) && !math.IsInf(*m.LossMean, 0) {
			xs = append(xs, m.Step)
			ys = append(ys, *m.LossMean)
		}
	}
	if len(xs) == 0 {
		return nil
	}
	c := &curve{W: 420, H: 160, PlotX0: 48, PlotX1: 410, PlotY0: 12, PlotY1: 138}
	c.MinLoss, c.MaxLoss = ys[0], ys[0]
	for _, y := range ys {
		c.MinLoss = math.Min(c.MinLoss, y)
		c.MaxLoss = math.Max(c.MaxLoss, y)
	}
	c.FirstStep, c.LastStep = xs[0], xs[len(xs)-1]
	spanX := float64(c.LastStep - c.FirstStep)
	spanY := c.MaxLoss - c.MinLoss
	var b strings.Builder
	for i := range xs {
		x := float64(c.PlotX0+c.PlotX1) / 2
		if spanX > 0 {
			x = float64(c.PlotX0) + float64(xs[i]-c.FirstStep)/spanX*float64(c.PlotX1-c.PlotX0)
		}
		y := float64(c.PlotY0+c.PlotY1) / 2
		if spanY > 0 {
			y = float64(c.PlotY0) + (c.MaxLoss-ys[i])/spanY*float64(c.PlotY1-c.PlotY0)
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%.1f,%.1f", x, y)
		c.Dots = append(c.Dots, point{X: math.Round(x*10) / 10, Y: math.Round(y*10) / 10})
	}
	c.Points = b.String()
	return c
}

func formatCredits(micro int64) string {
	sign := ""
	if micro < 0 {
		sign, micro = "-", -micro
	}
	return fmt.Sprintf("%s%d.%06d", sign, micro/1_000_000, micro%1_000_000)
}

func formatBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func shortID(s string) string {
	if len(s) <= 14 {
		return s
	}
	return s[:6] + "…" + s[len(s)-6:]
}

// clock shows an RFC 3339 time as UTC hours:minutes:seconds.
func clock(ts string) string {
	t, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return ts
	}
	return t.UTC().Format("15:04:05")
}

// ago renders an RFC 3339 time as a distance from now ("3s ago").
func ago(ts string, now time.Time) string {
	t, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return ts
	}
	d := now.Sub(t)
	switch {
	case d < 0:
		return "just now"
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	}
	return t.UTC().Format("2006-01-02 15:04")
}
