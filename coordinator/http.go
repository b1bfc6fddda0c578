package coordinator

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/signal-p2p/signal/protocol"
)

// forwardedHeader marks a request a follower forwarded; a member that is
// not leader answers such a request 503 instead of forwarding it again.
const forwardedHeader = "X-Signal-Forwarded"

// apiKeyHeader carries an API key in place of Authorization (the tinker
// SDK sends it); tinkerKeyPrefix is the prefix that SDK requires of keys.
const (
	apiKeyHeader    = "X-API-Key"
	tinkerKeyPrefix = "tml-"
)

// idempotencyHeader is the client's idempotency key header.
const idempotencyHeader = "Idempotency-Key"

// maxIdempotencyKeyLen bounds a client's key.
const maxIdempotencyKeyLen = 200

type authKind int

const (
	authNone authKind = iota
	authUser
	authAdmin
)

// routeOpts say how the wrapper treats a route.
type routeOpts struct {
	auth authKind
	// local routes answer on any member; the others run on the leader.
	local bool
	// mutating routes accept Idempotency-Key.
	mutating bool
	// maxBody is the route's body limit; 0 means smallBodyBytes.
	maxBody int64
	// tinker routes answer errors as the tinker SDK needs (tinkerError).
	tinker bool
}

// smallBodyBytes is the body limit of every route but the compute calls:
// their bodies are a few fields.
const smallBodyBytes = 1 << 20

// call is one request as handlers see it.
type call struct {
	r       *http.Request
	body    []byte
	account string // the caller's account (authUser)
	reqID   string
	// idem is set when the request carries an Idempotency-Key.
	idem *IdemTag
}

// handlerFunc is a thin handler: parse, call, return (value, error).
type handlerFunc func(c *call) (any, error)

// created makes the wrapper answer 201.
type created struct{ v any }

// rawResponse is a response already encoded (a recorded idempotent answer
// or a billed answer built by the FSM).
type rawResponse struct {
	status   int
	body     []byte
	replayed bool
	// contentType is set for a body that is not JSON (the Tinker door's
	// protobuf answers); writeRaw's JSON framing is skipped for it.
	contentType string
}

// Handler returns the coordinator's HTTP API.
func (c *Coordinator) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(c.metrics.reg, promhttp.HandlerOpts{}))
	c.route(mux, "GET /v1/health", "health", routeOpts{local: true}, c.handleHealth)
	c.route(mux, "GET /v1/cluster", "cluster", routeOpts{auth: authAdmin, local: true}, c.handleCluster)
	c.route(mux, "POST /v1/cluster/join", "cluster_join", routeOpts{auth: authAdmin}, c.handleJoin)
	c.route(mux, "POST /v1/cluster/register_node", "register_node", routeOpts{auth: authAdmin}, c.handleForwardedAdmission)
	c.route(mux, "POST /v1/cluster/record_drained", "record_drained", routeOpts{auth: authAdmin}, c.handleRecordDrained)
	c.route(mux, "POST /v1/admin/keys", "admin_keys", routeOpts{auth: authAdmin, mutating: true}, c.handleCreateKey)
	c.route(mux, "GET /v1/admin/keys", "admin_list_keys", routeOpts{auth: authAdmin}, c.handleListKeys)
	c.route(mux, "DELETE /v1/admin/keys/{id}", "admin_revoke_key", routeOpts{auth: authAdmin, mutating: true}, c.handleRevokeKey)
	c.route(mux, "POST /v1/admin/credit", "admin_credit", routeOpts{auth: authAdmin, mutating: true}, c.handleCredit)
	c.route(mux, "POST /v1/admin/join_tokens", "admin_join_tokens", routeOpts{auth: authAdmin}, c.handleJoinToken)
	c.route(mux, "POST /v1/admin/nodes/{peer}/lift_quarantine", "admin_lift_quarantine", routeOpts{auth: authAdmin, mutating: true}, c.handleLiftQuarantine)
	c.route(mux, "GET /v1/models", "models", routeOpts{auth: authUser}, c.handleModels)
	c.route(mux, "GET /v1/nodes", "nodes", routeOpts{auth: authUser}, c.handleNodes)
	c.route(mux, "GET /v1/account", "account", routeOpts{auth: authUser}, c.handleAccount)
	// Member-local: each member tokenizes on its own CPU, in bounded slots,
	// so a flood of texts cannot starve the leader's raft work.
	c.route(mux, "POST /v1/tokenize", "tokenize", routeOpts{auth: authUser, local: true, maxBody: 8 * maxTokenizeBytes}, c.handleTokenize)
	c.route(mux, "POST /v1/runs", "create_run", routeOpts{auth: authUser, mutating: true}, c.handleCreateRun)
	c.route(mux, "GET /v1/runs", "list_runs", routeOpts{auth: authUser}, c.handleListRuns)
	c.route(mux, "GET /v1/runs/{id}", "get_run", routeOpts{auth: authUser}, c.handleGetRun)
	c.route(mux, "DELETE /v1/runs/{id}", "end_run", routeOpts{auth: authUser, mutating: true}, c.handleEndRun)
	c.route(mux, "GET /v1/runs/{id}/metrics", "run_metrics", routeOpts{auth: authUser}, c.handleRunMetrics)
	c.route(mux, "POST /v1/runs/{id}/forward_backward", "forward_backward", routeOpts{auth: authUser, mutating: true, maxBody: c.cfg.MaxBodyBytes}, c.billed(protocol.CallForwardBackward))
	c.route(mux, "POST /v1/runs/{id}/forward", "forward", routeOpts{auth: authUser, mutating: true, maxBody: c.cfg.MaxBodyBytes}, c.billed(protocol.CallForward))
	c.route(mux, "POST /v1/runs/{id}/optim_step", "optim_step", routeOpts{auth: authUser, mutating: true}, c.billed(protocol.CallOptimStep))
	c.route(mux, "POST /v1/runs/{id}/sample", "sample", routeOpts{auth: authUser, mutating: true, maxBody: c.cfg.MaxBodyBytes}, c.billed(protocol.CallSample))
	c.route(mux, "POST /v1/runs/{id}/save_state", "save_state", routeOpts{auth: authUser, mutating: true}, c.billed(protocol.CallSaveState))
	// Not mutating as a whole: each of its calls is recorded under a key
	// derived from the request's Idempotency-Key (pipeline.go).
	c.route(mux, "POST /v1/runs/{id}/pipeline", "pipeline", routeOpts{auth: authUser, maxBody: c.cfg.MaxBodyBytes}, c.handlePipeline)
	c.route(mux, "POST /v1/runs/{id}/load_state", "load_state", routeOpts{auth: authUser, mutating: true}, c.handleLoadState)
	// Not mutating: no idempotency record may hash a body holding a token.
	c.route(mux, "POST /v1/checkpoints/{id}/push", "push_checkpoint", routeOpts{auth: authUser}, c.handlePushCheckpoint)
	c.route(mux, "GET /v1/checkpoints/{id}/files", "checkpoint_files", routeOpts{auth: authUser}, c.handleCheckpointFiles)
	// The signed URLs' files: the token is the credential; any member serves.
	mux.HandleFunc("GET /v1/checkpoint_files/{token}", c.serveCheckpointFile)
	c.tinkerRoutes(mux)
	if ui := c.cfg.UI; ui != nil {
		// Before the catch-all: "/{$}" is the root alone, so unknown paths
		// still get the API's JSON 404.
		mux.Handle("GET /{$}", ui)
		mux.Handle("/dashboard", ui)
		mux.Handle("/dashboard/", ui)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, protocol.CodeNotFound, fmt.Sprintf("no route %s %s", r.Method, r.URL.Path), "")
	})
	return mux
}

func (c *Coordinator) route(mux *http.ServeMux, pattern, name string, o routeOpts, h handlerFunc) {
	mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		status, account, err := c.serve(w, r, name, o, h)
		c.metrics.requests.WithLabelValues(name, strconv.Itoa(status)).Inc()
		c.metrics.duration.WithLabelValues(name).Observe(time.Since(start).Seconds())
		c.audit(r, name, status, account, w.Header().Get("X-Request-Id"), time.Since(start), err)
	})
}

// serve runs the common steps and writes the response; it returns what the
// audit log needs.
func (c *Coordinator) serve(w http.ResponseWriter, r *http.Request, name string, o routeOpts, h handlerFunc) (int, string, error) {
	cl := &call{r: r, reqID: newID(6)}
	// Every answer names its request id, and the audit log records it, so a
	// user's report of any error (a 500 above all) finds its log line.
	w.Header().Set("X-Request-Id", cl.reqID)
	fail := func(err error) (int, string, error) {
		status, code := httpStatus(err)
		// The user reads the sentence written for them; the chain around
		// it is for the audit log.
		msg := protocol.UserMessage(err)
		if status == http.StatusInternalServerError {
			msg = "internal error (request id " + cl.reqID + ")"
		}
		if status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", retrySeconds(err))
		}
		if o.tinker {
			status = tinkerStatus(w, status)
		}
		writeError(w, status, code, msg, cl.reqID)
		return status, cl.account, err
	}
	if !o.local && !c.IsLeader() {
		if r.Header.Get(forwardedHeader) != "" {
			return fail(retryAfter(protocol.UserErrorf(ErrUnavailable, "the coordinator that forwarded this call lost track of the raft leader; retry"), c.cfg.RetryAfter))
		}
		return c.forward(w, r)
	}
	// Authenticate from the headers before reading a byte of the body: a
	// stranger's upload costs this member nothing.
	switch o.auth {
	case authUser:
		acct, err := c.authenticate(r)
		if err != nil {
			return fail(err)
		}
		cl.account = acct
		if ok, wait := c.limits.allow(acct); !ok {
			return fail(retryAfter(protocol.UserErrorf(ErrRateLimited, "this key is over its rate limit of %.0f requests/s (burst %d): wait Retry-After seconds", c.cfg.RatePerSecond, c.cfg.RateBurst), wait))
		}
	case authAdmin:
		if err := c.authenticateAdmin(r); err != nil {
			return fail(err)
		}
		cl.account = "admin"
	}
	if r.Body != nil && r.Method != http.MethodGet {
		limit := o.maxBody
		if limit == 0 {
			limit = smallBodyBytes
		}
		if r.ContentLength > limit {
			// Read (and drop) up to the limit before answering, as an
			// oversized chunked body is: a client that reads its answer only
			// after sending (urllib) would otherwise meet a reset mid-upload
			// instead of the 413. The caller is authenticated; this costs
			// the route's limit in bandwidth and nothing in memory.
			_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, limit))
			return fail(protocol.UserErrorf(ErrTooLarge, "the request body of %d bytes is over this route's limit of %d bytes: split it into smaller calls", r.ContentLength, limit))
		}
		b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				return fail(protocol.UserErrorf(ErrTooLarge, "the request body is over this route's limit of %d bytes: split it into smaller calls", limit))
			}
			return fail(protocol.UserErrorf(ErrInvalidRequest, "the request body could not be read: %v", err))
		}
		cl.body = b
	}
	if key := r.Header.Get(idempotencyHeader); key != "" && o.mutating {
		if len(key) > maxIdempotencyKeyLen {
			return fail(protocol.UserErrorf(ErrInvalidRequest, "the Idempotency-Key header is longer than %d characters: use a shorter key", maxIdempotencyKeyLen))
		}
		sum := sha256.Sum256([]byte(r.Method + " " + r.URL.Path + "\n" + string(cl.body)))
		cl.idem = &IdemTag{Scope: cl.account + "\x00" + key, BodyHash: hex.EncodeToString(sum[:])}
		release, rec, err := c.beginIdem(r, cl.idem)
		if err != nil {
			return fail(err)
		}
		if rec != nil {
			w.Header().Set("Idempotent-Replayed", "true")
			writeRaw(w, rec.Status, rec.Body)
			return rec.Status, cl.account, nil
		}
		defer release()
	}
	v, err := h(cl)
	if err != nil {
		return fail(err)
	}
	out, err := c.answer(cl, v)
	if err != nil {
		return fail(err)
	}
	if out.replayed {
		w.Header().Set("Idempotent-Replayed", "true")
	}
	if out.contentType != "" {
		w.Header().Set("Content-Type", out.contentType)
		w.WriteHeader(out.status)
		_, _ = w.Write(out.body)
		return out.status, cl.account, nil
	}
	writeRaw(w, out.status, out.body)
	return out.status, cl.account, nil
}

// answer encodes a handler's value as the response, and records it under
// the call's Idempotency-Key when it has one: the one step the HTTP routes
// and the Tinker door's queued calls (which run handlers directly) share.
func (c *Coordinator) answer(cl *call, v any) (rawResponse, error) {
	status := http.StatusOK
	switch x := v.(type) {
	case created:
		status, v = http.StatusCreated, x.v
	case rawResponse:
		return x, nil
	}
	body, err := json.Marshal(v)
	if err != nil {
		return rawResponse{}, fmt.Errorf("encode response: %w", err)
	}
	if cl.idem != nil {
		// Record the answer so a retry gets it; if another request recorded
		// first, answer what it recorded.
		res, err := c.propose(cl.r.Context(), cmdPutIdem, putIdemCmd{Tag: *cl.idem, Status: status, Body: body, Time: now()})
		if err != nil {
			c.log.Warn("record idempotent response", "category", "infrastructure", "err", err)
		} else if rec, ok := res.(IdemRecord); ok {
			status, body = rec.Status, rec.Body
		}
	}
	return rawResponse{status: status, body: body}, nil
}

// beginIdem returns the recorded answer for tag, or marks tag in flight so
// that a concurrent duplicate waits for the first instead of running twice.
func (c *Coordinator) beginIdem(r *http.Request, tag *IdemTag) (release func(), rec *IdemRecord, err error) {
	for {
		var found IdemRecord
		var ok bool
		var cerr error
		c.fsm.read(func(s *State) { found, ok, cerr = s.checkIdem(tag) })
		if cerr != nil {
			return nil, nil, cerr
		}
		if ok {
			return nil, &found, nil
		}
		c.inflightMu.Lock()
		ch, busy := c.inflight[tag.Scope]
		if !busy {
			ch = make(chan struct{})
			c.inflight[tag.Scope] = ch
			c.inflightMu.Unlock()
			return func() {
				c.inflightMu.Lock()
				delete(c.inflight, tag.Scope)
				c.inflightMu.Unlock()
				close(ch)
			}, nil, nil
		}
		c.inflightMu.Unlock()
		select {
		case <-ch:
		case <-r.Context().Done():
			return nil, nil, r.Context().Err()
		}
	}
}

// forward proxies the whole request to the leader. Forwarding at the HTTP
// level keeps one code path: the leader authenticates, rate-limits, places,
// calls the node and bills, exactly as if the client had called it.
func (c *Coordinator) forward(w http.ResponseWriter, r *http.Request) (int, string, error) {
	leader, err := c.leaderURL()
	if err != nil {
		w.Header().Set("Retry-After", retrySeconds(err))
		writeError(w, http.StatusServiceUnavailable, protocol.CodeUnavailable, protocol.UserMessage(err), "")
		return http.StatusServiceUnavailable, "", err
	}
	target, _ := url.Parse(leader)
	status := http.StatusBadGateway
	var perr error
	p := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host
			pr.Out.Header.Set(forwardedHeader, c.cfg.ID)
		},
		ModifyResponse: func(resp *http.Response) error { status = resp.StatusCode; return nil },
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, err error) {
			perr = protocol.UserErrorf(ErrUnavailable, "the raft leader %s cannot be reached (%v); retry in a moment", leader, err)
			status = http.StatusServiceUnavailable
			w.Header().Set("Retry-After", retrySeconds(retryAfter(perr, c.cfg.RetryAfter)))
			writeError(w, status, protocol.CodeUnavailable, perr.Error(), "")
		},
	}
	// A member that stops cancels what it is still forwarding (a leader's
	// long poll above all): its graceful shutdown must not wait on another
	// member's answer; the client retries, elsewhere once this one is gone.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	if c.life != nil {
		defer context.AfterFunc(c.life, cancel)()
	}
	p.ServeHTTP(w, r.WithContext(ctx))
	return status, "", perr
}

// authenticate maps a bearer API key to its account.
//
// The key comes as "Authorization: Bearer KEY" or as "X-API-Key: KEY" (the
// tinker SDK's header). The tinker SDK refuses keys that do not start with
// "tml-", so "tml-" + a Signal key is that key's alias.
func (c *Coordinator) authenticate(r *http.Request) (string, error) {
	key := strings.TrimSpace(r.Header.Get(apiKeyHeader))
	if key == "" {
		var err error
		if key, err = bearer(r); err != nil {
			return "", err
		}
	}
	h := hashSecret(key)
	var rec KeyRecord
	var ok bool
	c.fsm.read(func(s *State) { rec, ok = s.KeyByHash(h) })
	if alias, isAlias := strings.CutPrefix(key, tinkerKeyPrefix); !ok && isAlias {
		h = hashSecret(alias)
		c.fsm.read(func(s *State) { rec, ok = s.KeyByHash(h) })
	}
	// The map lookup finds the candidate; the constant-time comparison of
	// the full hashes is what authorises.
	if !ok || subtle.ConstantTimeCompare([]byte(rec.Hash), []byte(h)) != 1 {
		return "", protocol.UserErrorf(ErrUnauthorized, "the API key is unknown: check SIGNAL_API_KEY (signal keys create makes one)")
	}
	return rec.Account, nil
}

func (c *Coordinator) authenticateAdmin(r *http.Request) error {
	tok, err := bearer(r)
	if err != nil {
		return err
	}
	want := sha256.Sum256([]byte(c.cfg.AdminToken))
	got := sha256.Sum256([]byte(tok))
	if subtle.ConstantTimeCompare(want[:], got[:]) != 1 {
		return protocol.UserErrorf(ErrForbidden, "this is an admin call: send the admin token, not an API key")
	}
	return nil
}

func bearer(r *http.Request) (string, error) {
	h := r.Header.Get("Authorization")
	if h == "" {
		return "", protocol.UserErrorf(ErrUnauthorized, "the Authorization header is missing: send \"Authorization: Bearer <API key>\"")
	}
	tok, ok := strings.CutPrefix(h, "Bearer ")
	if !ok || strings.TrimSpace(tok) == "" {
		return "", protocol.UserErrorf(ErrUnauthorized, "the Authorization header is malformed: send \"Authorization: Bearer <API key>\"")
	}
	return strings.TrimSpace(tok), nil
}

// hashSecret is how API keys and join tokens are stored.
func hashSecret(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// newID returns n random bytes, hex-encoded.
func newID(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// newSecret returns a random secret with a readable prefix.
func newSecret(prefix string) string {
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

func writeRaw(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
	_, _ = w.Write([]byte("\n"))
}

func writeError(w http.ResponseWriter, status int, code, msg, reqID string) {
	if reqID != "" {
		w.Header().Set("X-Request-Id", reqID)
	}
	b, _ := json.Marshal(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: code, Message: msg}})
	writeRaw(w, status, b)
}

// audit logs one outcome as a structured event in its category.
func (c *Coordinator) audit(r *http.Request, route string, status int, account, reqID string, d time.Duration, err error) {
	cat := auditCategory(status)
	attrs := []any{"category", cat, "route", route, "method", r.Method, "path", r.URL.Path, "status", status,
		"duration_ms", float64(d.Microseconds()) / 1000}
	if account != "" {
		attrs = append(attrs, "account", account)
	}
	if reqID != "" {
		attrs = append(attrs, "request_id", reqID)
	}
	if r.Header.Get(forwardedHeader) != "" {
		attrs = append(attrs, "forwarded_by", r.Header.Get(forwardedHeader))
	}
	level := slog.LevelInfo
	if err != nil {
		attrs = append(attrs, "err", err.Error())
		level = slog.LevelWarn
		if status >= 500 && status != http.StatusServiceUnavailable {
			level = slog.LevelError
		}
	}
	c.log.Log(r.Context(), level, "request", attrs...)
}

// jsonKind names a Go type as a JSON value of it, for a message.
func jsonKind(goType string) string {
	switch {
	case strings.HasPrefix(goType, "int"), strings.HasPrefix(goType, "uint"), strings.HasPrefix(goType, "float"),
		strings.HasPrefix(goType, "*int"), strings.HasPrefix(goType, "*float"):
		return "a number"
	case goType == "string" || goType == "*string":
		return "a string"
	case goType == "bool" || goType == "*bool":
		return "true or false"
	case strings.HasPrefix(goType, "[]"):
		return "a list"
	}
	return "an object"
}

// decodeJSON decodes a request body strictly: unknown fields, wrong types,
// trailing data and malformed JSON are ErrInvalidRequest naming the problem.
// An empty body decodes as {} when emptyOK.
func decodeJSON(body []byte, v any, emptyOK bool) error {
	if len(bytes.TrimSpace(body)) == 0 {
		if emptyOK {
			return nil
		}
		return protocol.UserErrorf(ErrInvalidRequest, "the request body is empty: send a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			return protocol.UserErrorf(ErrInvalidRequest, "the request body is not JSON (at byte %d: %v)", se.Offset, se)
		case errors.As(err, &te):
			field := te.Field
			if field == "" {
				field = "(body)"
			}
			want := jsonKind(te.Type.String())
			if num, ok := strings.CutPrefix(te.Value, "number "); ok && want == "a number" {
				return protocol.UserErrorf(ErrInvalidRequest, "field %s is %s: send a whole number in range for it", field, num)
			}
			return protocol.UserErrorf(ErrInvalidRequest, "field %s is a JSON %s: send %s", field, te.Value, want)
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			return protocol.UserErrorf(ErrInvalidRequest, "%s in the request body: check its spelling against the API", strings.TrimPrefix(err.Error(), "json: "))
		case errors.Is(err, io.ErrUnexpectedEOF):
			return protocol.UserErrorf(ErrInvalidRequest, "the request body is not JSON: it ends too early")
		default:
			return protocol.UserErrorf(ErrInvalidRequest, "the request body is not JSON (%v)", err)
		}
	}
	if dec.More() {
		return protocol.UserErrorf(ErrInvalidRequest, "the request body has data after the JSON object: send one object")
	}
	var extra json.RawMessage
	if err := dec.Decode(&extra); err != io.EOF {
		return protocol.UserErrorf(ErrInvalidRequest, "the request body has data after the JSON object: send one object")
	}
	return nil
}
