package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

const testKey = "sk-test-123"

// fakeAPI is an httptest server that records what it was sent.
type fakeAPI struct {
	t   *testing.T
	srv *httptest.Server

	mu   sync.Mutex
	reqs []recorded
}

type recorded struct {
	method, path, auth, idemKey string
	body                        []byte
}

func (f *fakeAPI) requests() []recorded {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]recorded(nil), f.reqs...)
}

// newFakeAPI serves h, recording every request first.
func newFakeAPI(t *testing.T, h http.HandlerFunc) *fakeAPI {
	t.Helper()
	f := &fakeAPI{t: t}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		f.mu.Lock()
		f.reqs = append(f.reqs, recorded{r.Method, r.URL.Path, r.Header.Get("Authorization"), r.Header.Get(IdempotencyHeader), body})
		f.mu.Unlock()
		r.Body = io.NopCloser(strings.NewReader(string(body)))
		h(w, r)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

// sleeps records the waits of a client's retry loop instead of sleeping.
type sleeps struct {
	mu sync.Mutex
	ds []time.Duration
}

func (s *sleeps) sleep(ctx context.Context, d time.Duration) error {
	s.mu.Lock()
	s.ds = append(s.ds, d)
	s.mu.Unlock()
	return ctx.Err()
}

func (s *sleeps) waits() []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Duration(nil), s.ds...)
}

// mustClient returns a client of f whose retry waits are recorded, not slept.
func mustClient(t *testing.T, f *fakeAPI, opts ...Option) (*Client, *sleeps) {
	t.Helper()
	c, err := New(f.srv.URL, testKey, opts...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	s := &sleeps{}
	c.sleep = s.sleep
	return c, s
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, protocol.ErrorResponse{Error: protocol.ErrorBody{Code: code, Message: msg}})
}

// decodeStrict decodes a request body as the server does: unknown fields are errors.
func decodeStrict(t *testing.T, body []byte, v any) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Errorf("request body %s does not decode as %T: %v", body, v, err)
	}
}

func TestNewValidatesArguments(t *testing.T) {
	for _, tc := range []struct {
		name, url, key string
		opts           []Option
		want           string
	}{
		{"empty url", "", "k", nil, "base url"},
		{"no scheme", "127.0.0.1:8080", "k", nil, "base url"},
		{"ftp", "ftp://host", "k", nil, "want http"},
		{"key with newline", "http://h", "k\nX-Evil: 1", nil, "line break"},
		{"negative retries", "http://h", "k", []Option{WithRetries(-1, 0, 0)}, "retries -1"},
		{"min over max", "http://h", "k", []Option{WithRetries(1, time.Second, time.Millisecond)}, "backoff"},
		{"zero response limit", "http://h", "k", []Option{WithMaxResponseBytes(0)}, "max response bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.url, tc.key, tc.opts...)
			if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New(%q) = %v, want ErrInvalidArgument mentioning %q", tc.url, err, tc.want)
			}
		})
	}
	c, err := New("http://127.0.0.1:9/v1/", "k")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.BaseURL(); got != "http://127.0.0.1:9" {
		t.Errorf("BaseURL() = %q, want the /v1 suffix trimmed", got)
	}
}

// TestErrorStatuses plays every status of API.md and checks the typed error.
func TestErrorStatuses(t *testing.T) {
	all := []error{ErrInvalidRequest, ErrUnknownModel, ErrUnauthorized, ErrInsufficientBalance,
		ErrForbidden, ErrNotFound, ErrConflict, ErrTooLarge, ErrRateLimited, ErrUnavailable, ErrInternal}
	for _, tc := range []struct {
		status     int
		code, msg  string
		retryAfter string
		want       []error // sentinels the error must match; it must match no other
	}{
		{400, protocol.CodeInvalidRequest, "lora_rank 0 out of range [1, 256]", "", []error{ErrInvalidRequest}},
		{400, protocol.CodeUnknownModel, `unknown base_model "gpt-9"; supported: signal-tiny`, "", []error{ErrUnknownModel, ErrInvalidRequest}},
		{401, protocol.CodeUnauthorized, "unknown API key", "", []error{ErrUnauthorized}},
		{402, protocol.CodeInsufficientBalance, "balance 10 below estimated cost 500", "", []error{ErrInsufficientBalance}},
		{403, protocol.CodeForbidden, "run r-1 belongs to another account", "", []error{ErrForbidden}},
		{404, protocol.CodeNotFound, "run r-404 not found", "", []error{ErrNotFound}},
		{409, protocol.CodeConflict, "run r-1 is moving", "", []error{ErrConflict}},
		{413, protocol.CodeTooLarge, "body over 32 MiB", "", []error{ErrTooLarge}},
		{429, protocol.CodeRateLimited, "slow down", "7", []error{ErrRateLimited}},
		{503, protocol.CodeUnavailable, "no node can take model signal-tiny", "3", []error{ErrUnavailable}},
		{500, protocol.CodeInternal, "internal error, request id req-42", "", []error{ErrInternal}},
	} {
		t.Run(fmt.Sprint(tc.status, "_", tc.code), func(t *testing.T) {
			f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
				if tc.retryAfter != "" {
					w.Header().Set("Retry-After", tc.retryAfter)
				}
				writeErr(w, tc.status, tc.code, tc.msg)
			})
			c, _ := mustClient(t, f, WithRetries(0, 0, 0))
			_, err := c.CreateRun(context.Background(), protocol.CreateRunRequest{BaseModel: "signal-tiny"})
			var apiErr *APIError
			if !errors.As(err, &apiErr) {
				t.Fatalf("err = %v (%T), want *APIError", err, err)
			}
			if apiErr.Status != tc.status || apiErr.Code != tc.code || apiErr.Message != tc.msg {
				t.Errorf("APIError = {%d %q %q}, want {%d %q %q}", apiErr.Status, apiErr.Code, apiErr.Message, tc.status, tc.code, tc.msg)
			}
			for _, s := range all {
				want := false
				for _, w := range tc.want {
					want = want || w == s
				}
				if got := errors.Is(err, s); got != want {
					t.Errorf("errors.Is(err, %v) = %v, want %v", s, got, want)
				}
			}
			for _, part := range []string{"POST /v1/runs", fmt.Sprint(tc.status), tc.code, tc.msg} {
				if !strings.Contains(err.Error(), part) {
					t.Errorf("Error() = %q, want it to contain %q", err.Error(), part)
				}
			}
			if tc.retryAfter != "" {
				want, _ := time.ParseDuration(tc.retryAfter + "s")
				if apiErr.RetryAfter != want {
					t.Errorf("RetryAfter = %v, want %v", apiErr.RetryAfter, want)
				}
			}
			if tc.status == 500 && apiErr.RequestID != "req-42" {
				t.Errorf("RequestID = %q, want req-42 from the message", apiErr.RequestID)
			}
		})
	}
}

func TestErrorNotAPIShaped(t *testing.T) {
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(RequestIDHeader, "hdr-7")
		w.WriteHeader(http.StatusBadGateway)
		_, _ = io.WriteString(w, "<html>bad gateway</html>")
	})
	c, _ := mustClient(t, f)
	_, err := c.Account(context.Background())
	var apiErr *APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("err = %v, want *APIError", err)
	}
	if apiErr.Status != 502 || apiErr.Message != "<html>bad gateway</html>" || apiErr.RequestID != "hdr-7" {
		t.Errorf("APIError = %+v", apiErr)
	}
	if !errors.Is(err, ErrInternal) || apiErr.Attempts != 1 {
		t.Errorf("502: Is(ErrInternal) = %v, attempts %d; want true, 1 (502 is not retried)", errors.Is(err, ErrInternal), apiErr.Attempts)
	}
	if !strings.Contains(err.Error(), "request id hdr-7") {
		t.Errorf("Error() = %q, want the request id", err.Error())
	}
}

// TestRetryHonoursRetryAfterAndReusesKey: two 429/503 answers, then success;
// the waits are the server's Retry-After and every attempt carries one key.
func TestRetryHonoursRetryAfterAndReusesKey(t *testing.T) {
	var n int
	var mu sync.Mutex
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		n++
		i := n
		mu.Unlock()
		switch i {
		case 1:
			w.Header().Set("Retry-After", "2")
			writeErr(w, 429, protocol.CodeRateLimited, "slow down")
		case 2:
			w.Header().Set("Retry-After", "5")
			writeErr(w, 503, protocol.CodeUnavailable, "run is moving")
		default:
			writeJSON(w, 200, protocol.OptimStepResponse{Step: 3, LearningRate: 1e-4})
		}
	})
	c, s := mustClient(t, f)
	run := c.NewRunHandle("r-1")
	out, err := run.OptimStep(context.Background(), protocol.OptimStepRequest{})
	if err != nil {
		t.Fatalf("OptimStep: %v", err)
	}
	if out.Step != 3 || run.Info().Step != 3 {
		t.Errorf("step = %d, Info().Step = %d, want 3", out.Step, run.Info().Step)
	}
	if got, want := s.waits(), []time.Duration{2 * time.Second, 5 * time.Second}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("waits = %v, want %v (the Retry-After values)", got, want)
	}
	reqs := f.requests()
	if len(reqs) != 3 {
		t.Fatalf("%d requests, want 3", len(reqs))
	}
	key := reqs[0].idemKey
	if len(key) != 32 {
		t.Errorf("idempotency key %q, want 32 hex characters", key)
	}
	for i, r := range reqs {
		if r.idemKey != key || string(r.body) != string(reqs[0].body) {
			t.Errorf("attempt %d: key %q body %s, want the first attempt's %q %s", i+1, r.idemKey, r.body, key, reqs[0].body)
		}
	}
	// A second logical call gets a fresh key.
	if _, err := run.OptimStep(context.Background(), protocol.OptimStepRequest{}); err != nil {
		t.Fatal(err)
	}
	reqs = f.requests()
	if last := reqs[len(reqs)-1].idemKey; last == key || last == "" {
		t.Errorf("second call key %q, want a new non-empty key", last)
	}
}

func TestRetryBackoffWithoutRetryAfterAndCap(t *testing.T) {
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/models" {
			w.Header().Set("Retry-After", "3600")
		}
		writeErr(w, 503, protocol.CodeUnavailable, "no leader yet")
	})
	c, s := mustClient(t, f, WithRetries(4, 100*time.Millisecond, time.Second))
	_, err := c.Account(context.Background())
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Attempts != 5 || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable after 5 attempts", err)
	}
	if !strings.Contains(err.Error(), "after 5 attempts") {
		t.Errorf("Error() = %q, want the attempt count", err.Error())
	}
	waits := s.waits()
	if len(waits) != 4 {
		t.Fatalf("waits = %v, want 4", waits)
	}
	for i, d := range waits {
		hi := min(100*time.Millisecond<<i, time.Second)
		if d < 100*time.Millisecond || d > hi {
			t.Errorf("wait %d = %v, want in [100ms, %v]", i+1, d, hi)
		}
	}
	// A huge Retry-After is capped by the max backoff.
	s2 := &sleeps{}
	c.sleep = s2.sleep
	if _, err := c.Models(context.Background()); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Models err = %v", err)
	}
	for _, d := range s2.waits() {
		if d != time.Second {
			t.Errorf("wait %v, want Retry-After 3600s capped to 1s", d)
		}
	}
}

func TestNoRetryOnFinalErrors(t *testing.T) {
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, 402, protocol.CodeInsufficientBalance, "balance 1 below 9")
	})
	c, s := mustClient(t, f)
	_, err := c.NewRunHandle("r-1").ForwardBackward(context.Background(), protocol.ForwardBackwardRequest{
		Examples: []protocol.TextExample{{Text: "hi"}}})
	if !errors.Is(err, ErrInsufficientBalance) {
		t.Fatalf("err = %v", err)
	}
	if n := len(f.requests()); n != 1 || len(s.waits()) != 0 {
		t.Errorf("%d requests, %d waits; want 1, 0", n, len(s.waits()))
	}
}

// TestRetryRealSleep runs the real timer once, so the wiring of the wait is
// tested too, not only its computation.
func TestRetryRealSleep(t *testing.T) {
	var n int
	var mu sync.Mutex
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		n++
		first := n == 1
		mu.Unlock()
		if first {
			w.Header().Set("Retry-After", "0.2")
			writeErr(w, 429, protocol.CodeRateLimited, "slow down")
			return
		}
		writeJSON(w, 200, protocol.Health{Status: "ok", Leader: true})
	})
	c, err := New(f.srv.URL, testKey)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	h, err := c.Health(context.Background())
	if err != nil || h.Status != "ok" {
		t.Fatalf("Health = %+v, %v", h, err)
	}
	// A timer never fires early, so this lower bound is exact, not a timing guess.
	if el := time.Since(start); el < 200*time.Millisecond {
		t.Errorf("returned after %v, before the 200ms Retry-After", el)
	}
}

func TestContextCancelledDuringCall(t *testing.T) {
	inside := make(chan struct{})
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		close(inside)
		<-r.Context().Done() // the client hangs up
	})
	c, _ := mustClient(t, f)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-inside; cancel() }()
	_, err := c.NewRunHandle("r-1").Sample(ctx, protocol.SampleRequest{
		Prompts: []protocol.Prompt{{Text: "Once"}}, SamplingParams: protocol.SamplingParams{MaxTokens: 4}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if n := len(f.requests()); n != 1 {
		t.Errorf("%d requests, want 1: a cancelled call is not retried", n)
	}
}

func TestContextCancelledDuringRetryWait(t *testing.T) {
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "10")
		writeErr(w, 503, protocol.CodeUnavailable, "run is moving")
	})
	c, err := New(f.srv.URL, testKey) // real sleep
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = c.NewRunHandle("r-1").SaveState(ctx, protocol.SaveStateRequest{})
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want both DeadlineExceeded and ErrUnavailable", err)
	}
	if n := len(f.requests()); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

func TestDialErrorRetried(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // nothing listens there now
	c, err := New("http://"+addr, testKey, WithRetries(2, time.Millisecond, time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	s := &sleeps{}
	c.sleep = s.sleep
	_, err = c.Nodes(context.Background())
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		t.Fatalf("err = %v, want a dial error", err)
	}
	if len(s.waits()) != 2 {
		t.Errorf("waits = %v, want 2 retries of a refused connection", s.waits())
	}
}

func TestResponseTooLarge(t *testing.T) {
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, protocol.ModelList{Models: []protocol.Model{{Name: strings.Repeat("x", 500)}}})
	})
	c, _ := mustClient(t, f, WithMaxResponseBytes(100))
	if _, err := c.Models(context.Background()); !errors.Is(err, ErrResponseTooLarge) {
		t.Fatalf("err = %v, want ErrResponseTooLarge", err)
	}
}

func TestBadResponseJSON(t *testing.T) {
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, `{"runs": 5}`)
	})
	c, _ := mustClient(t, f)
	if _, err := c.ListRuns(context.Background()); err == nil || !strings.Contains(err.Error(), "decode response") {
		t.Fatalf("err = %v, want a decode error", err)
	}
}

func TestClientSideValidation(t *testing.T) {
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) { t.Errorf("unexpected request %s", r.URL) })
	c, _ := mustClient(t, f)
	ctx := context.Background()
	run := c.NewRunHandle("r-1")
	checks := map[string]error{}
	_, checks["empty batch"] = run.ForwardBackward(ctx, protocol.ForwardBackwardRequest{})
	_, checks["both kinds"] = run.Forward(ctx, protocol.ForwardBackwardRequest{
		Data: []protocol.Datum{{}}, Examples: []protocol.TextExample{{Text: "x"}}})
	_, checks["no prompts"] = run.Sample(ctx, protocol.SampleRequest{})
	_, checks["no checkpoint"] = run.LoadState(ctx, "")
	_, checks["no model"] = c.CreateRun(ctx, protocol.CreateRunRequest{})
	_, checks["no admin token"] = c.CreateKey(ctx, "", protocol.CreateKeyRequest{MicroCredits: 1})
	_, checks["slash in id"] = c.GetRun(ctx, "a/b")
	_, checks["empty id"] = c.DeleteRun(ctx, "")
	for name, err := range checks {
		if !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument", name, err)
		}
	}
}

func TestDatumFromTokens(t *testing.T) {
	d, err := DatumFromTokens([]int{1, 10, 11}, []int{20, 21})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(d.ModelInput.Tokens) != "[1 10 11 20]" ||
		fmt.Sprint(d.LossFnInputs.TargetTokens) != "[10 11 20 21]" ||
		fmt.Sprint(d.LossFnInputs.Weights) != "[0 0 1 1]" {
		t.Errorf("datum = %+v", d)
	}
	// Text only (no prompt): every predicted token is trained.
	d, err = DatumFromTokens(nil, []int{1, 5, 6})
	if err != nil || fmt.Sprint(d.LossFnInputs.Weights) != "[1 1]" {
		t.Errorf("datum = %+v, %v", d, err)
	}
	for _, bad := range [][2][]int{{nil, nil}, {{1, 2}, nil}, {nil, {7}}} {
		if _, err := DatumFromTokens(bad[0], bad[1]); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("DatumFromTokens(%v, %v) err = %v, want ErrInvalidArgument", bad[0], bad[1], err)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"3":                             3 * time.Second,
		" 10 ":                          10 * time.Second,
		"0.25":                          250 * time.Millisecond,
		"-4":                            0,
		"soon":                          0,
		"NaN":                           0,
		"1e300":                         86400 * time.Second,
		"Sun, 01 Mar 2026 12:00:30 GMT": 30 * time.Second,
		"Sun, 01 Mar 2026 11:00:00 GMT": 0,
	} {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", in, got, want)
		}
	}
}

func FuzzNewAPIError(f *testing.F) {
	f.Add(400, []byte(`{"error":{"code":"invalid_request","message":"x"}}`), "1")
	f.Add(500, []byte(`{"error":{"code":"internal","message":"request id abc"}}`), "")
	f.Add(503, []byte(`<html>`), "Sun, 01 Mar 2026 12:00:30 GMT")
	f.Add(429, []byte(`{"error":null}`), "1e400")
	f.Fuzz(func(t *testing.T, status int, body []byte, retryAfter string) {
		resp := &http.Response{StatusCode: status, Header: http.Header{}}
		resp.Header.Set("Retry-After", retryAfter)
		e := newAPIError(resp, body, "POST", "/v1/runs")
		if e.RetryAfter < 0 {
			t.Fatalf("negative RetryAfter %v", e.RetryAfter)
		}
		_ = e.Error()
		_ = errors.Is(e, ErrInternal)
		_ = e.Temporary()
	})
}

func TestReadTestnetFile(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := dir + "/testnet.json"
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tf, err := ReadTestnetFile(write(`{"coordinators":["http://127.0.0.1:7001"],"admin_token":"adm","api_key":"sk","models":[{"name":"signal-tiny"}],"nodes":[]}`))
	if err != nil || tf.Coordinators[0] != "http://127.0.0.1:7001" || tf.APIKey != "sk" || tf.AdminToken != "adm" {
		t.Fatalf("ReadTestnetFile = %+v, %v", tf, err)
	}
	for _, bad := range []string{`{"api_key":"sk"}`, `{"coordinators":["http://x"]}`, `not json`} {
		if _, err := ReadTestnetFile(write(bad)); err == nil {
			t.Errorf("ReadTestnetFile(%s) succeeded", bad)
		}
	}
	if _, err := ReadTestnetFile(dir + "/missing.json"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file err = %v", err)
	}
}
