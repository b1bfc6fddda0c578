// Package dashboard is the coordinator's web page: the viewer's runs with
// loss, learning-rate and grad-norm charts, what each run and each kind of
// call cost, the models and their prices, the live nodes and their
// capacity. The page is a shell of html/template plus one small embedded
// script (app.js) that draws everything, charts included as inline SVG,
// from the dashboard's JSON (/dashboard/data.json) and fetches it again
// every few seconds: no framework, no build step, nothing downloaded at
// run time. It reads its data through a Source.
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
	"crypto/sha256"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"math"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// loginCSRF refuses cross-origin browser posts to the sign-in form.
var loginCSRF = http.NewCrossOriginProtection()

// CookieName holds the viewer's API key.
const CookieName = "signal_key"

// csp lets the page run its own script and fetch its own JSON, nothing
// else: no inline script, no other origin.
const csp = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"

// trainingWindow is how recent a run's last step must be for the page to
// call it training rather than ready.
const trainingWindow = 90 * time.Second

// rateSteps is how many of the last steps the steps-per-second figure
// averages over.
const rateSteps = 20

// allRuns bounds the runs ?all=1 draws, in MaxRuns: each is a metrics
// read at every refresh while it steps.
const allRuns = 10

// overviewPoints bounds the points a run's overview chart carries; the
// run's own page has them all.
const overviewPoints = 300

// Options tune the page.
type Options struct {
	// Title heads the page.
	Title string
	// RefreshSeconds is how often the page fetches its data again, without
	// reloading (0: 5 s; <0: never).
	RefreshSeconds int
	// MaxRuns bounds the runs drawn, newest first (0: 20); ?all=1 shows
	// those without steps too, up to ten times as many.
	MaxRuns int
	// MaxCharges bounds the charges listed, newest first (0: 25).
	MaxCharges int
	// Logger receives read errors.
	Logger *slog.Logger
}

//go:embed templates/*.html templates/app.js
var templates embed.FS

var pageTmpl = template.Must(template.New("page.html").ParseFS(templates, "templates/page.html"))

var appJS = func() []byte {
	b, err := templates.ReadFile("templates/app.js")
	if err != nil {
		panic(err)
	}
	return b
}()

// Handler serves the dashboard.
type Handler struct {
	src  Source
	opts Options
	log  *slog.Logger
	now  func() time.Time

	// metrics keeps the last metrics read of each run, per viewer, while
	// the run has taken no new step: a page open on twenty idle runs
	// would otherwise read every step of each every few seconds.
	mu      sync.Mutex
	metrics map[metricsKey]cachedMetrics
}

// maxCachedRuns bounds Handler.metrics.
const maxCachedRuns = 256

type metricsKey struct {
	viewer [sha256.Size]byte // the API key's hash: no key is kept
	run    string
}

type cachedMetrics struct {
	version string // the run's step and last step's time
	ms      []protocol.Metrics
}

// New builds the dashboard over src. Mount it at "/" (it answers "/" and
// "/dashboard", "/dashboard/runs/{id}", "/dashboard/data.json",
// "/dashboard/app.js", "/dashboard/login" and "/dashboard/logout").
func New(src Source, opts Options) *Handler {
	if opts.Title == "" {
		opts.Title = "Signal"
	}
	if opts.RefreshSeconds == 0 {
		opts.RefreshSeconds = 5
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
	return &Handler{src: src, opts: opts, log: log, now: time.Now, metrics: map[metricsKey]cachedMetrics{}}
}

// ServeHTTP routes the dashboard's few paths.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("X-Frame-Options", "DENY")
	w.Header().Set("Content-Security-Policy", csp)
	w.Header().Set("Referrer-Policy", "same-origin")
	var runID string
	switch path := r.URL.Path; {
	case path == "/", path == "/dashboard", path == "/dashboard/":
	case strings.HasPrefix(path, "/dashboard/runs/") && len(path) > len("/dashboard/runs/") && !strings.Contains(path[len("/dashboard/runs/"):], "/"):
		runID = path[len("/dashboard/runs/"):]
	case path == "/dashboard/app.js":
		if !h.readOnly(w, r) {
			return
		}
		w.Header().Set("Content-Type", "text/javascript; charset=utf-8")
		w.Header().Set("Cache-Control", "no-cache")
		_, _ = w.Write(appJS)
		return
	case path == "/dashboard/data.json":
		if h.readOnly(w, r) {
			h.serveData(w, r)
		}
		return
	case path == "/dashboard/login":
		// Login CSRF: another site's form must not sign the viewer in
		// under the attacker's key.
		if err := loginCSRF.Check(r); err != nil {
			http.Error(w, "cross-origin sign-in refused", http.StatusForbidden)
			return
		}
		h.login(w, r)
		return
	case path == "/dashboard/logout":
		http.SetCookie(w, &http.Cookie{Name: CookieName, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, SameSite: http.SameSiteStrictMode})
		http.Redirect(w, r, "/dashboard", http.StatusSeeOther)
		return
	default:
		http.NotFound(w, r)
		return
	}
	if !h.readOnly(w, r) {
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
	v, err := h.load(r.Context(), key, query{run: runID, all: r.URL.Query().Get("all") == "1"})
	switch {
	case errors.Is(err, ErrUnauthorized):
		h.render(w, http.StatusUnauthorized, &page{Title: h.opts.Title, SignIn: true, Error: "That API key is not known to this coordinator."})
		return
	case errors.Is(err, errNoRun):
		h.render(w, http.StatusNotFound, &page{Title: h.opts.Title, Error: "No run " + runID + " among this key's runs.", Back: true})
		return
	case err != nil:
		h.log.Warn("dashboard read", "err", err)
		h.render(w, http.StatusServiceUnavailable, &page{Title: h.opts.Title, Error: "The coordinator cannot answer right now (" + err.Error() + "); this page retries.", Refresh: 3})
		return
	}
	h.render(w, http.StatusOK, &page{Title: h.opts.Title, Data: v, Back: runID != ""})
}

// readOnly answers 405 to anything but GET and HEAD.
func (h *Handler) readOnly(w http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true
	}
	w.Header().Set("Allow", "GET, HEAD")
	http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	return false
}

// serveData is GET /dashboard/data.json[?run=ID][&all=1]: what the page
// draws, for its script to fetch again without reloading.
func (h *Handler) serveData(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	fail := func(status int, msg string) {
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
	}
	key := credential(r)
	if key == "" {
		fail(http.StatusUnauthorized, "sign in")
		return
	}
	q := r.URL.Query()
	v, err := h.load(r.Context(), key, query{run: q.Get("run"), all: q.Get("all") == "1"})
	switch {
	case errors.Is(err, ErrUnauthorized):
		fail(http.StatusUnauthorized, "That API key is not known to this coordinator.")
	case errors.Is(err, errNoRun):
		fail(http.StatusNotFound, "No run "+q.Get("run")+" among this key's runs.")
	case err != nil:
		h.log.Warn("dashboard read", "err", err)
		fail(http.StatusServiceUnavailable, "The coordinator cannot answer right now ("+err.Error()+"); retrying.")
	default:
		_ = json.NewEncoder(w).Encode(v)
	}
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
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if err := pageTmpl.Execute(w, p); err != nil {
		h.log.Warn("dashboard render", "err", err)
	}
}

// page is what the template draws: a sign-in form, an error, or the shell
// the script fills from Data.
type page struct {
	Title   string
	SignIn  bool
	Error   string
	Refresh int // seconds before an error page reloads itself
	Back    bool
	Data    *view
}

// errNoRun means the viewer has no run of the ID a run's page names: 404.
var errNoRun = errors.New("no such run")

type query struct {
	run string // one run's page, with every step
	all bool   // every run, those without steps too
}

// view is the page's data, as /dashboard/data.json answers it. Money is
// integer micro-credits (the API's unit, in names that say so) beside the
// same amount as a decimal number of credits.
type view struct {
	Title          string `json:"title"`
	Now            string `json:"now"`
	RefreshSeconds int    `json:"refresh_seconds"`

	Account  accountView `json:"account"`
	Nodes    []nodeView  `json:"nodes"`
	Sessions int         `json:"sessions"`
	Capacity int         `json:"capacity"`
	Models   []modelView `json:"models"`

	// Runs are the runs drawn, newest first; on a run's page, that run.
	Runs []runView `json:"runs"`
	// Folded counts the runs not drawn: those without a step (unless
	// ?all=1) and those past MaxRuns.
	Folded int  `json:"folded"`
	All    bool `json:"all"`
	// Run is set on a run's page.
	Run string `json:"run,omitempty"`

	// Charges are the newest charges (of this run on its page).
	Charges []chargeView `json:"charges"`
	// Calls total the account's listed charges per kind of call.
	Calls []callTotal `json:"calls"`
	// ChargesListed is how many charges the totals cover: the API lists
	// an account's latest ones.
	ChargesListed int `json:"charges_listed"`
	// Spend is what each run cost, all its calls, folded runs too: the
	// costliest first, at most MaxRuns.
	Spend []runSpend `json:"spend"`
}

type runSpend struct {
	ID           string `json:"id"`
	Name         string `json:"name,omitempty"`
	MicroCredits int64  `json:"micro_credits"`
	Credits      string `json:"credits"`
}

type accountView struct {
	Account             string `json:"account"`
	BalanceMicroCredits int64  `json:"balance_micro_credits"`
	Balance             string `json:"balance_credits"`
	SpentMicroCredits   int64  `json:"spent_micro_credits"`
	Spent               string `json:"spent_credits"`
}

type nodeView struct {
	PeerID      string   `json:"peer_id"`
	Backends    []string `json:"backends"`
	Devices     []string `json:"devices"`
	Models      []string `json:"models"`
	Sessions    int      `json:"sessions"`
	MaxSessions int      `json:"max_sessions"`
	Seen        string   `json:"seen"`
}

type modelView struct {
	Name          string `json:"name"`
	ContextLength int    `json:"context_length"`
	Memory        string `json:"memory"`
	// Prices in credits: per 1K tokens, and per GB-hour stored.
	Train   string `json:"train_credits_per_1k"`
	Prefill string `json:"prefill_credits_per_1k"`
	Sample  string `json:"sample_credits_per_1k"`
	Storage string `json:"storage_credits_per_gb_hour"`
	Serving int    `json:"serving_nodes"`
}

type chargeView struct {
	Time         string `json:"time"`
	Clock        string `json:"clock"`
	RunID        string `json:"run_id"`
	Call         string `json:"call"`
	MicroCredits int64  `json:"micro_credits"`
	Credits      string `json:"credits"`
}

type callTotal struct {
	Call         string `json:"call"`
	Count        int    `json:"count"`
	MicroCredits int64  `json:"micro_credits"`
	Credits      string `json:"credits"`
}

type runView struct {
	ID        string `json:"id"`
	Name      string `json:"name,omitempty"`
	BaseModel string `json:"base_model"`
	LoRARank  int    `json:"lora_rank"`
	Status    string `json:"status"`
	// Activity is the status the page shows: "training" for a ready run
	// whose last step is within trainingWindow, else Status.
	Activity        string               `json:"activity"`
	Reason          string               `json:"status_reason,omitempty"`
	Step            int                  `json:"step"`
	Node            string               `json:"node,omitempty"`
	ResumedFromStep *int                 `json:"resumed_from_step,omitempty"`
	Checkpoint      *protocol.Checkpoint `json:"checkpoint,omitempty"`
	Checkpoints     []checkpointView     `json:"checkpoints,omitempty"`
	CreatedAt       string               `json:"created_at"`

	SpentMicroCredits int64       `json:"spent_micro_credits"`
	Spent             string      `json:"spent_credits"`
	Calls             []callTotal `json:"calls"`

	FirstLoss       *float64      `json:"first_loss,omitempty"`
	LastLoss        *float64      `json:"last_loss,omitempty"`
	StepsPerSecond  float64       `json:"steps_per_second,omitempty"`
	LastActivity    string        `json:"last_activity,omitempty"`
	LastActivityAgo string        `json:"last_activity_ago,omitempty"`
	Metrics         []metricPoint `json:"metrics"`
}

type checkpointView struct {
	ID   string `json:"id"`
	Step int    `json:"step"`
	Mode string `json:"mode"`
	URI  string `json:"uri"`
	Time string `json:"time"`
}

// metricPoint is one step's figures; a figure the step lacks is null.
type metricPoint struct {
	Step     int      `json:"step"`
	Loss     *float64 `json:"loss"`
	LR       *float64 `json:"lr"`
	GradNorm *float64 `json:"grad_norm"`
	Time     string   `json:"time,omitempty"`
}

func (h *Handler) load(ctx context.Context, key string, q query) (*view, error) {
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
	models, err := h.src.Models(ctx, key)
	if err != nil {
		return nil, err
	}
	now := h.now()
	v := &view{Title: h.opts.Title, Now: now.UTC().Format("2006-01-02 15:04:05 MST"), Run: q.run, All: q.all, RefreshSeconds: max(0, h.opts.RefreshSeconds),
		Account: accountView{Account: acct.Account,
			BalanceMicroCredits: acct.BalanceMicroCredits, Balance: protocol.FormatCredits(acct.BalanceMicroCredits),
			SpentMicroCredits: acct.SpentMicroCredits, Spent: protocol.FormatCredits(acct.SpentMicroCredits)},
		Nodes: []nodeView{}, Models: []modelView{}, Runs: []runView{}, Charges: []chargeView{}, ChargesListed: len(acct.Charges)}

	// Newest charges first.
	ch := append([]protocol.Charge(nil), acct.Charges...)
	sort.SliceStable(ch, func(i, j int) bool { return ch[i].Time > ch[j].Time })
	v.Calls = totals(ch, "")
	lastCharge := map[string]string{}
	for _, c := range ch {
		if _, ok := lastCharge[c.RunID]; !ok {
			lastCharge[c.RunID] = c.Time
		}
		if (q.run == "" || c.RunID == q.run) && len(v.Charges) < h.opts.MaxCharges {
			v.Charges = append(v.Charges, chargeView{Time: c.Time, Clock: clock(c.Time), RunID: c.RunID, Call: c.Call, MicroCredits: c.MicroCredits, Credits: protocol.FormatCredits(c.MicroCredits)})
		}
	}

	sort.Slice(nodes, func(i, j int) bool { return nodes[i].PeerID < nodes[j].PeerID })
	serving := map[string]int{}
	for _, n := range nodes {
		nv := nodeView{PeerID: n.PeerID, Backends: n.Backends, Models: n.Models, Sessions: n.Sessions, MaxSessions: n.MaxSessions, Seen: ago(n.LastSeen, now)}
		for _, g := range n.GPUs {
			nv.Devices = append(nv.Devices, fmt.Sprintf("%s · %s free of %s · %.0f%% busy", g.Name, formatBytes(g.MemoryFree), formatBytes(g.MemoryTotal), g.Utilization))
		}
		if len(n.GPUs) == 0 {
			nv.Devices = []string{fmt.Sprintf("CPU · %d cores · %s", n.CPU.Cores, formatBytes(n.CPU.MemoryTotal))}
		}
		v.Nodes = append(v.Nodes, nv)
		v.Sessions += n.Sessions
		v.Capacity += n.MaxSessions
		for _, m := range n.Models {
			serving[m]++
		}
	}
	for _, m := range models {
		v.Models = append(v.Models, modelView{Name: m.Name, ContextLength: m.ContextLength, Memory: formatBytes(m.MemoryBytes),
			Train: protocol.FormatCredits(m.Prices.TrainMicroCreditsPer1K), Prefill: protocol.FormatCredits(m.Prices.PrefillMicroCreditsPer1K),
			Sample: protocol.FormatCredits(m.Prices.SampleMicroCreditsPer1K), Storage: protocol.FormatCredits(m.Prices.StorageMicroCreditsPerGBHour),
			Serving: serving[m.Name]})
	}

	// Newest runs first; runs without a step fold away unless asked for.
	found := false
	for i := len(runs) - 1; i >= 0; i-- {
		r := runs[i]
		if q.run != "" {
			if r.ID != q.run {
				continue
			}
			found = true
		} else if (!q.all && r.Step == 0 && r.LastMetrics == nil) || len(v.Runs) >= h.opts.MaxRuns && !q.all || len(v.Runs) >= allRuns*h.opts.MaxRuns {
			v.Folded++
			continue
		}
		rv := runView{ID: r.ID, Name: r.Name, BaseModel: r.BaseModel, LoRARank: r.LoRARank, Status: r.Status, Activity: r.Status,
			Reason: r.StatusReason, Step: r.Step, Node: r.Node, ResumedFromStep: r.ResumedFromStep, CreatedAt: r.CreatedAt,
			SpentMicroCredits: r.SpentMicroCredits, Spent: protocol.FormatCredits(r.SpentMicroCredits), Calls: totals(ch, r.ID), Metrics: []metricPoint{}}
		if n := len(r.Checkpoints); n > 0 {
			rv.Checkpoint = &r.Checkpoints[n-1]
			if q.run != "" {
				for _, c := range r.Checkpoints {
					rv.Checkpoints = append(rv.Checkpoints, checkpointView{ID: c.ID, Step: c.Step, Mode: c.Mode, URI: c.URI, Time: c.CreatedAt})
				}
			}
		}
		var ms []protocol.Metrics
		if r.Step > 0 || r.LastMetrics != nil {
			if ms, err = h.runMetrics(ctx, key, r); err != nil {
				return nil, err
			}
		}
		describe(&rv, ms, lastCharge[r.ID], now)
		if q.run == "" {
			rv.Metrics = thin(rv.Metrics, overviewPoints)
		}
		v.Runs = append(v.Runs, rv)
	}
	if q.run != "" && !found {
		return nil, errNoRun
	}
	v.Spend = []runSpend{}
	for _, r := range runs {
		if r.SpentMicroCredits > 0 {
			v.Spend = append(v.Spend, runSpend{ID: r.ID, Name: r.Name, MicroCredits: r.SpentMicroCredits, Credits: protocol.FormatCredits(r.SpentMicroCredits)})
		}
	}
	sort.SliceStable(v.Spend, func(i, j int) bool { return v.Spend[i].MicroCredits > v.Spend[j].MicroCredits })
	if len(v.Spend) > h.opts.MaxRuns {
		v.Spend = v.Spend[:h.opts.MaxRuns]
	}
	return v, nil
}

// runMetrics reads a run's metrics, or reuses the last read while the
// run has taken no step since.
func (h *Handler) runMetrics(ctx context.Context, key string, r protocol.Run) ([]protocol.Metrics, error) {
	version := fmt.Sprint(r.Step)
	if r.LastMetrics != nil {
		version += " " + r.LastMetrics.Time
	}
	k := metricsKey{viewer: sha256.Sum256([]byte(key)), run: r.ID}
	h.mu.Lock()
	c, ok := h.metrics[k]
	h.mu.Unlock()
	if ok && c.version == version {
		return c.ms, nil
	}
	ms, err := h.src.Metrics(ctx, key, r.ID)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.metrics) >= maxCachedRuns {
		for old := range h.metrics { // any one: a bound, not an LRU
			delete(h.metrics, old)
			break
		}
	}
	h.metrics[k] = cachedMetrics{version: version, ms: ms}
	return ms, nil
}

// describe fills a run's figures from its metrics: losses, the chart
// points, steps per second, last activity and whether it is training.
func describe(rv *runView, ms []protocol.Metrics, lastCharge string, now time.Time) {
	for _, m := range ms {
		p := metricPoint{Step: m.Step, Loss: finite(m.LossMean), LR: finite(m.LearningRate), GradNorm: finite(m.GradNorm), Time: m.Time}
		if p.Loss != nil {
			if rv.FirstLoss == nil {
				rv.FirstLoss = p.Loss
			}
			rv.LastLoss = p.Loss
		}
		rv.Metrics = append(rv.Metrics, p)
	}
	last := parseTime(rv.CreatedAt)
	var lastStep time.Time
	if n := len(ms); n > 0 {
		lastStep = parseTime(ms[n-1].Time)
		first := ms[max(0, n-rateSteps)]
		t0 := parseTime(first.Time)
		if dt := lastStep.Sub(t0).Seconds(); dt > 0 && ms[n-1].Step > first.Step {
			rv.StepsPerSecond = float64(ms[n-1].Step-first.Step) / dt
		}
	}
	for _, t := range []time.Time{lastStep, parseTime(lastCharge)} {
		if t.After(last) {
			last = t
		}
	}
	if !last.IsZero() {
		rv.LastActivity = last.UTC().Format(time.RFC3339)
		rv.LastActivityAgo = ago(rv.LastActivity, now)
	}
	if rv.Status == protocol.RunReady && !lastStep.IsZero() && now.Sub(lastStep) <= trainingWindow {
		rv.Activity = "training"
	}
}

// totals sums charges per kind of call, of one run (or all when runID is
// empty), the costliest first.
func totals(ch []protocol.Charge, runID string) []callTotal {
	by := map[string]*callTotal{}
	out := []callTotal{}
	for _, c := range ch {
		if runID != "" && c.RunID != runID {
			continue
		}
		t := by[c.Call]
		if t == nil {
			t = &callTotal{Call: c.Call}
			by[c.Call] = t
		}
		t.Count++
		t.MicroCredits += c.MicroCredits
	}
	for _, t := range by {
		t.Credits = protocol.FormatCredits(t.MicroCredits)
		out = append(out, *t)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].MicroCredits != out[j].MicroCredits {
			return out[i].MicroCredits > out[j].MicroCredits
		}
		return out[i].Call < out[j].Call
	})
	return out
}

// thin keeps at most n points, evenly spaced, the first and last always.
func thin(ps []metricPoint, n int) []metricPoint {
	if len(ps) <= n || n < 2 {
		return ps
	}
	out := make([]metricPoint, 0, n)
	for i := 0; i < n; i++ {
		out = append(out, ps[i*(len(ps)-1)/(n-1)])
	}
	return out
}

func finite(p *float64) *float64 {
	if p == nil || math.IsNaN(*p) || math.IsInf(*p, 0) {
		return nil
	}
	return p
}

func parseTime(ts string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return time.Time{}
	}
	return t
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
