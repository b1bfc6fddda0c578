package client

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// Sentinel errors. Every error the API answers is an *APIError, and
// errors.Is matches it against the sentinel of its code (or, for a code this
// SDK does not know, of its HTTP status). ErrUnknownModel also matches
// ErrInvalidRequest: it is a 400 like any other bad input.
var (
	// ErrInvalidRequest is 400 invalid_request: bad JSON, unknown field, out-of-range value.
	ErrInvalidRequest = errors.New("invalid request")
	// ErrUnknownModel is 400 unknown_model: the base model is not served.
	ErrUnknownModel = errors.New("unknown model")
	// ErrUnauthorized is 401: missing, malformed or unknown API key.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrInsufficientBalance is 402: the call's estimated cost is above the balance.
	ErrInsufficientBalance = errors.New("insufficient balance")
	// ErrForbidden is 403: another user's run, or an admin call without the admin token.
	ErrForbidden = errors.New("forbidden")
	// ErrNotFound is 404: unknown run or checkpoint.
	ErrNotFound = errors.New("not found")
	// ErrConflict is 409: run not ready, or an idempotency key reused with another body.
	ErrConflict = errors.New("conflict")
	// ErrTooLarge is 413: the request body is over the server's limit.
	ErrTooLarge = errors.New("request too large")
	// ErrRateLimited is 429: too many calls; RetryAfter says when to come back.
	ErrRateLimited = errors.New("rate limited")
	// ErrUnavailable is 503: no node can take the run, node lost, or no raft leader yet.
	ErrUnavailable = errors.New("unavailable")
	// ErrInternal is 500: a server bug; the APIError's RequestID names it in the server's log.
	ErrInternal = errors.New("internal server error")

	// ErrInvalidArgument is a bad argument caught by the SDK before any request is sent.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrResponseTooLarge is a response body over the client's MaxResponseBytes.
	ErrResponseTooLarge = errors.New("response too large")
)

// codeSentinels maps the API's error codes (protocol.Code*) to sentinels.
var codeSentinels = map[string]error{
	protocol.CodeInvalidRequest:      ErrInvalidRequest,
	protocol.CodeUnknownModel:        ErrUnknownModel,
	protocol.CodeUnauthorized:        ErrUnauthorized,
	protocol.CodeInsufficientBalance: ErrInsufficientBalance,
	protocol.CodeForbidden:           ErrForbidden,
	protocol.CodeNotFound:            ErrNotFound,
	protocol.CodeConflict:            ErrConflict,
	protocol.CodeTooLarge:            ErrTooLarge,
	protocol.CodeRateLimited:         ErrRateLimited,
	protocol.CodeUnavailable:         ErrUnavailable,
	protocol.CodeInternal:            ErrInternal,
}

// statusCodes gives the code a status implies when a body carries none
// (e.g. a proxy's HTML error page).
var statusCodes = map[int]string{
	http.StatusBadRequest:            protocol.CodeInvalidRequest,
	http.StatusUnauthorized:          protocol.CodeUnauthorized,
	http.StatusPaymentRequired:       protocol.CodeInsufficientBalance,
	http.StatusForbidden:             protocol.CodeForbidden,
	http.StatusNotFound:              protocol.CodeNotFound,
	http.StatusConflict:              protocol.CodeConflict,
	http.StatusRequestEntityTooLarge: protocol.CodeTooLarge,
	http.StatusTooManyRequests:       protocol.CodeRateLimited,
	http.StatusServiceUnavailable:    protocol.CodeUnavailable,
	http.StatusInternalServerError:   protocol.CodeInternal,
}

// APIError is a non-2xx answer of the API.
type APIError struct {
	// Status is the HTTP status code.
	Status int
	// Code is the API's error.code (protocol.Code*).
	Code string
	// Message is the API's error.message, meant for people.
	Message string
	// RequestID identifies the call in the server's log (X-Request-Id header,
	// or the id a 500's message repeats).
	RequestID string
	// RetryAfter is the server's Retry-After, zero when it sent none.
	RetryAfter time.Duration
	// Method and Path name the call that failed.
	Method, Path string
	// Attempts is how many times the call was sent (retries included).
	Attempts int
}

// Error reads like "POST /v1/runs: 402 insufficient_balance: balance 5 below estimate 9".
func (e *APIError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s: %d %s", e.Method, e.Path, e.Status, e.Code)
	if e.Message != "" {
		b.WriteString(": ")
		b.WriteString(e.Message)
	}
	if e.RequestID != "" && !strings.Contains(e.Message, e.RequestID) {
		fmt.Fprintf(&b, " (request id %s)", e.RequestID)
	}
	if e.Attempts > 1 {
		fmt.Fprintf(&b, " (after %d attempts)", e.Attempts)
	}
	return b.String()
}

// Is matches the sentinel of the error's code, or of its status when the
// code is not one this SDK knows.
func (e *APIError) Is(target error) bool {
	s, ok := codeSentinels[e.Code]
	if !ok {
		s = codeSentinels[statusCodes[e.Status]]
		if s == nil && e.Status >= 500 {
			s = ErrInternal
		}
	}
	if s == nil {
		return false
	}
	if target == s {
		return true
	}
	return s == ErrUnknownModel && target == ErrInvalidRequest
}

// Temporary reports whether the same call may succeed later (429, 503).
func (e *APIError) Temporary() bool {
	return errors.Is(e, ErrRateLimited) || errors.Is(e, ErrUnavailable)
}

// requestIDInMessage finds the id a 500's message repeats ("... request id abc123").
var requestIDInMessage = regexp.MustCompile(`(?i)request[ _-]?id[:= ]+([A-Za-z0-9._-]+)`)

// maxRetryAfterSeconds bounds a parsed Retry-After so that the conversion
// to a Duration cannot overflow; the retry loop caps the wait far lower.
const maxRetryAfterSeconds = 86400

// parseRetryAfter reads a Retry-After header: delay-seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	// Whole seconds per RFC 9110; a fraction is accepted too, as some
	// servers (and tests) send one.
	if secs, err := strconv.ParseFloat(v, 64); err == nil {
		if secs <= 0 || math.IsNaN(secs) {
			return 0
		}
		return time.Duration(math.Min(secs, maxRetryAfterSeconds) * float64(time.Second))
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := t.Sub(now); d > 0 {
			return d
		}
	}
	return 0
}
