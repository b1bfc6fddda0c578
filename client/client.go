// Package client is Signal's Go SDK: a Client for the public HTTP API
// (../shared/API.md) and a Run handle for one training run's calls.
//
// Every call takes a context. Calls answered 429 or 503 are retried with
// jittered exponential backoff that honours Retry-After; every mutating call
// carries an Idempotency-Key generated once per logical call and reused on
// each retry, so the server executes and charges it at most once. A call that
// still fails returns an *APIError that errors.Is matches against the
// sentinels in errors.go.
//
// A Client may know several coordinators of one cluster (NewCluster,
// FromTestnet): a call that cannot reach one, or that one answers 503, goes
// on to the next, so a dead coordinator costs a reconnect, not the call.
// The idempotency key travels with the call, so a call cut off mid-flight
// and sent again through another coordinator still runs and is charged once.
//
// A Run's *Async calls return a Future at once and run in submission order
// (async.go); TrainStep sends a step's forward_backward and optim_step in
// one round trip (a pipeline). NewSampler opens a run on a checkpoint's
// adapter or the base model to sample; DownloadCheckpoint fetches a
// checkpoint's files through the coordinator, verified by CID
// (checkpoints.go).
package client

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/signal-p2p/signal/internal/version"
	"github.com/signal-p2p/signal/protocol"
)

// Defaults of a Client; each has an Option.
const (
	// DefaultMaxRetries is how many times a 429/503 call is retried.
	DefaultMaxRetries = 5
	// DefaultMinBackoff is the first wait when the server sends no Retry-After.
	DefaultMinBackoff = 250 * time.Millisecond
	// DefaultMaxBackoff caps every wait, Retry-After included, so that a
	// confused server cannot park a client for hours.
	DefaultMaxBackoff = 30 * time.Second
	// DefaultTimeout bounds one HTTP attempt. It is long because a
	// forward_backward on a CPU node can take minutes; use a context for a
	// tighter deadline on the whole call.
	DefaultTimeout = 15 * time.Minute
	// DefaultMaxResponseBytes bounds a response body (logprobs of a big batch
	// are the largest legitimate answers, tens of MiB).
	DefaultMaxResponseBytes = 256 << 20
	// maxErrorBodyBytes bounds how much of an error body is read.
	maxErrorBodyBytes = 64 << 10
)

// IdempotencyHeader is the header that makes a mutating call safe to retry.
const IdempotencyHeader = "Idempotency-Key"

// RequestIDHeader is the header a server may name a call by in its log.
const RequestIDHeader = "X-Request-Id"

// Client calls the coordinators of one Signal cluster (any member: a
// follower forwards writes to the leader), failing over between them when
// it knows several. It is safe for concurrent use.
type Client struct {
	bases []*url.URL
	// cur is the index in bases of the coordinator calls go to: the last
	// one that answered.
	cur        atomic.Int32
	apiKey     string
	hc         *http.Client
	userAgent  string
	maxRetries int
	minBackoff time.Duration
	maxBackoff time.Duration
	maxResp    int64
	// sleep waits d or until ctx is done; tests replace it to observe waits.
	sleep func(ctx context.Context, d time.Duration) error
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient uses hc instead of the default client (whose Timeout is
// DefaultTimeout). Its Timeout bounds each attempt.
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.hc = hc } }

// WithTimeout bounds each HTTP attempt; 0 means no bound but the context's.
func WithTimeout(d time.Duration) Option {
	return func(c *Client) {
		hc := *c.hc
		hc.Timeout = d
		c.hc = &hc
	}
}

// WithRetries sets how many times a 429/503 call (or one whose connection
// could not be made) is retried, and the bounds of the wait between tries.
// maxRetries 0 disables retries.
func WithRetries(maxRetries int, minBackoff, maxBackoff time.Duration) Option {
	return func(c *Client) {
		c.maxRetries, c.minBackoff, c.maxBackoff = maxRetries, minBackoff, maxBackoff
	}
}

// WithUserAgent sets the User-Agent header.
func WithUserAgent(ua string) Option { return func(c *Client) { c.userAgent = ua } }

// WithMaxResponseBytes bounds a response body.
func WithMaxResponseBytes(n int64) Option { return func(c *Client) { c.maxResp = n } }

// New returns a Client for the coordinator at baseURL (e.g.
// "http://127.0.0.1:8080"; a trailing "/v1" is accepted) that authenticates
// with apiKey. apiKey may be empty for calls that need none (Health) or
// that take the admin token explicitly.
func New(baseURL, apiKey string, opts ...Option) (*Client, error) {
	return NewCluster([]string{baseURL}, apiKey, opts...)
}

// NewCluster returns a Client for the coordinators at baseURLs, members of
// one raft cluster: calls go to the first until it cannot be reached or
// answers 503, then to the next (see the package doc).
func NewCluster(baseURLs []string, apiKey string, opts ...Option) (*Client, error) {
	if len(baseURLs) == 0 {
		return nil, fmt.Errorf("%w: no coordinator URL", ErrInvalidArgument)
	}
	bases := make([]*url.URL, 0, len(baseURLs))
	for _, baseURL := range baseURLs {
		u, err := url.Parse(strings.TrimSpace(baseURL))
		if err != nil {
			return nil, fmt.Errorf("%w: base url %q: %w", ErrInvalidArgument, baseURL, err)
		}
		if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("%w: base url %q: want http://host:port or https://host", ErrInvalidArgument, baseURL)
		}
		u.Path = strings.TrimSuffix(strings.TrimSuffix(u.Path, "/"), protocol.APIVersionPrefix)
		u.RawQuery, u.Fragment = "", ""
		bases = append(bases, u)
	}
	if strings.ContainsAny(apiKey, "\r\n") {
		return nil, fmt.Errorf("%w: api key contains a line break", ErrInvalidArgument)
	}
	c := &Client{
		bases:      bases,
		apiKey:     apiKey,
		hc:         &http.Client{Timeout: DefaultTimeout, Transport: defaultTransport()},
		userAgent:  "signal-go/" + version.Version,
		maxRetries: DefaultMaxRetries,
		minBackoff: DefaultMinBackoff,
		maxBackoff: DefaultMaxBackoff,
		maxResp:    DefaultMaxResponseBytes,
		sleep:      sleepCtx,
	}
	for _, o := range opts {
		o(c)
	}
	if c.maxRetries < 0 || c.minBackoff < 0 || c.maxBackoff < c.minBackoff {
		return nil, fmt.Errorf("%w: retries %d, backoff %v..%v: want retries ≥ 0 and 0 ≤ min ≤ max",
			ErrInvalidArgument, c.maxRetries, c.minBackoff, c.maxBackoff)
	}
	if c.maxResp <= 0 {
		return nil, fmt.Errorf("%w: max response bytes %d: want > 0", ErrInvalidArgument, c.maxResp)
	}
	return c, nil
}

// defaultTransport bounds connecting, not the call: a call's length is the
// node's compute time.
func defaultTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.DialContext = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	t.TLSHandshakeTimeout = 10 * time.Second
	t.MaxIdleConnsPerHost = 16
	return t
}

// BaseURL is the URL (without the /v1 prefix) of the coordinator calls go
// to now: the last one that answered.
func (c *Client) BaseURL() string { return c.bases[c.cur.Load()].String() }

// BaseURLs are every coordinator the client knows, in the order given.
func (c *Client) BaseURLs() []string {
	out := make([]string, len(c.bases))
	for i, u := range c.bases {
		out[i] = u.String()
	}
	return out
}

// call is one logical API call.
type call struct {
	method string
	path   string // below /v1, e.g. "/runs"
	token  string // bearer token; the client's API key when empty
	in     any    // request body, nil for none
	out    any    // decoded response, nil to discard
}

// newIdempotencyKey returns 128 random bits in hex.
func newIdempotencyKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go ≥ 1.24)
	return hex.EncodeToString(b[:])
}

// do sends a call, retrying 429/503 and unreachable-server failures.
func (c *Client) do(ctx context.Context, k call) error {
	var body []byte
	if k.in != nil {
		var err error
		if body, err = json.Marshal(k.in); err != nil {
			return fmt.Errorf("encode %s %s request: %w", k.method, k.path, err)
		}
	}
	// One key per logical call, reused by every retry: the server answers a
	// repeat from its first result and charges once.
	idemKey := ""
	if k.method != http.MethodGet {
		idemKey = newIdempotencyKey()
	}
	token := k.token
	if token == "" {
		token = c.apiKey
	}
	path := protocol.APIVersionPrefix + k.path
	// tried counts the coordinators that failed in a row: while some of
	// them are untried, the next is tried at once, without a wait.
	tried := 0
	for attempt := 1; ; attempt++ {
		i := c.cur.Load()
		wait, err := c.attempt(ctx, c.bases[i], k, path, token, idemKey, body)
		if err == nil {
			return nil
		}
		var apiErr *APIError
		if errors.As(err, &apiErr) {
			apiErr.Attempts = attempt
		}
		failover := len(c.bases) > 1 && ctx.Err() == nil && (isConnError(err) || errors.Is(err, ErrUnavailable))
		if failover {
			// The next coordinator, unless another call moved on already.
			c.cur.CompareAndSwap(i, (i+1)%int32(len(c.bases)))
			wait = max(wait, 0) // cut off mid-flight: the idempotency key makes it safe
		}
		if wait < 0 || attempt > c.maxRetries || ctx.Err() != nil {
			return err
		}
		if tried++; failover && tried < len(c.bases) {
			continue
		}
		tried = 0
		if wait == 0 {
			wait = c.backoff(attempt)
		}
		if serr := c.sleep(ctx, min(wait, c.maxBackoff)); serr != nil {
			// Both stay matchable: the cancellation and what was being retried.
			return fmt.Errorf("%w while waiting to retry: %w", serr, err)
		}
	}
}

// isConnError reports whether err is a connection that failed, before or
// during the call (refused, reset, closed mid-answer): what a coordinator
// that died looks like.
func isConnError(err error) bool {
	var apiErr *APIError
	if errors.As(err, &apiErr) {
		return false
	}
	return isDialError(err) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE)
}

// attempt sends one HTTP request. wait < 0 means the error is final; 0 means
// retry after the usual backoff; > 0 is the server's Retry-After.
func (c *Client) attempt(ctx context.Context, base *url.URL, k call, path, token, idemKey string, body []byte) (wait time.Duration, err error) {
	u := *base
	p, query, _ := strings.Cut(path, "?")
	u.Path += p
	u.RawQuery = query
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, k.method, u.String(), rd)
	if err != nil {
		return -1, fmt.Errorf("build %s %s request: %w", k.method, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", c.userAgent)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if idemKey != "" {
		req.Header.Set(IdempotencyHeader, idemKey)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return -1, fmt.Errorf("%s %s: %w", k.method, path, ctx.Err())
		}
		// Only a connection that was never made is retried: the server cannot
		// have started the call. A call cut off mid-flight may still be
		// running there, so it is the caller's decision (its retry with a
		// fresh call would carry a fresh idempotency key).
		if isDialError(err) {
			return 0, fmt.Errorf("%s %s: %w", k.method, path, err)
		}
		return -1, fmt.Errorf("%s %s: %w", k.method, path, err)
	}
	defer func() { _ = resp.Body.Close() }()

	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		data, err := readLimited(resp.Body, c.maxResp)
		if err != nil {
			return -1, fmt.Errorf("%s %s: read response: %w", k.method, path, err)
		}
		if k.out == nil || len(bytes.TrimSpace(data)) == 0 {
			return 0, nil
		}
		if err := json.Unmarshal(data, k.out); err != nil {
			return -1, fmt.Errorf("%s %s: decode response: %w", k.method, path, err)
		}
		return 0, nil
	}

	data, _ := readLimited(resp.Body, maxErrorBodyBytes) // a truncated error body still has a status
	apiErr := newAPIError(resp, data, k.method, path)
	if apiErr.Temporary() {
		return apiErr.RetryAfter, apiErr
	}
	return -1, apiErr
}

// newAPIError builds the typed error of a non-2xx response.
func newAPIError(resp *http.Response, body []byte, method, path string) *APIError {
	e := &APIError{
		Status:     resp.StatusCode,
		Method:     method,
		Path:       path,
		RequestID:  resp.Header.Get(RequestIDHeader),
		RetryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()),
	}
	var er protocol.ErrorResponse
	if err := json.Unmarshal(body, &er); err == nil && er.Error.Code != "" {
		e.Code, e.Message = er.Error.Code, er.Error.Message
	} else {
		// Not the API's shape (a proxy, a crash): keep the status's code and
		// show what came back, briefly.
		e.Code = statusCodes[resp.StatusCode]
		if e.Code == "" {
			e.Code = http.StatusText(resp.StatusCode)
		}
		msg := strings.TrimSpace(string(body))
		if len(msg) > 200 {
			msg = msg[:200] + "…"
		}
		e.Message = msg
	}
	if e.RequestID == "" {
		if m := requestIDInMessage.FindStringSubmatch(e.Message); m != nil {
			e.RequestID = strings.TrimRight(m[1], ".")
		}
	}
	return e
}

// readLimited reads at most limit bytes and fails if there are more.
func readLimited(r io.Reader, limit int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return data, err
	}
	if int64(len(data)) > limit {
		return data[:limit], fmt.Errorf("%w: over %d bytes", ErrResponseTooLarge, limit)
	}
	return data, nil
}

// isDialError reports whether err is a failure to connect.
func isDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// backoff is full-jitter exponential: uniform in [min, min·2^(attempt-1)],
// capped by maxBackoff.
func (c *Client) backoff(attempt int) time.Duration {
	hi := float64(c.minBackoff) * math.Pow(2, float64(attempt-1))
	if hi > float64(c.maxBackoff) {
		hi = float64(c.maxBackoff)
	}
	lo := float64(c.minBackoff)
	if hi <= lo {
		return c.minBackoff
	}
	return time.Duration(lo + mrand.Float64()*(hi-lo))
}

// sleepCtx waits d, or until ctx is done.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
