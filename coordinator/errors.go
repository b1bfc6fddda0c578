package coordinator

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/signal-p2p/signal/coordinator/p2p"
	"github.com/signal-p2p/signal/ledger"
	"github.com/signal-p2p/signal/protocol"
)

// Sentinel errors. Handlers and state rules wrap them with the field or id
// involved; httpStatus maps them to statuses in one place.
var (
	// ErrNodeLost means a node is unreachable or its stream broke; the run it
	// served moves to another node. It is the node network's own sentinel
	// (p2p.ErrNodeLost), so a Backend's error matches it with errors.Is
	// whichever name the caller knows.
	ErrNodeLost = p2p.ErrNodeLost
	// ErrNoCapacity means no live node can take a run.
	ErrNoCapacity = errors.New("no node has capacity")
	// errNodeOutOfMemory is a node's answer that a session's model does
	// not fit it (protocol.CodeOutOfMemory): unavailable there, placed
	// elsewhere, and noted (noteMemory).
	errNodeOutOfMemory = fmt.Errorf("%w: out of memory", ErrUnavailable)
	// ErrInvalidRequest is a malformed or out-of-range request.
	ErrInvalidRequest = errors.New("invalid request")
	// ErrUnknownModel is a base model the registry does not list.
	ErrUnknownModel = errors.New("unknown model")
	// ErrUnauthorized is a missing, malformed or unknown API key or token.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrForbidden is a call on another user's run, or an admin call without the admin token.
	ErrForbidden = errors.New("forbidden")
	// ErrNotFound is an unknown run or checkpoint.
	ErrNotFound = errors.New("not found")
	// ErrConflict is a run in the wrong state or a reused idempotency key.
	ErrConflict = errors.New("conflict")
	// ErrTooLarge is a request body over the limit.
	ErrTooLarge = errors.New("request too large")
	// ErrRateLimited is a key over its rate limit.
	ErrRateLimited = errors.New("rate limited")
	// ErrUnavailable is a temporary condition: no leader, run moving, node lost.
	ErrUnavailable = errors.New("unavailable")
	// ErrNotLeader means a write reached a member that is not the raft leader.
	ErrNotLeader = errors.New("not the raft leader")
	// ErrTooManyRuns is an account at its quota of open runs (429: it
	// clears when the account ends a run).
	ErrTooManyRuns = errors.New("too many open runs")
	// ErrBadNodeAnswer is a node's answer the coordinator refuses to believe
	// (a checkpoint of another run or outside the store, a step that skips):
	// nothing of it is recorded, and the caller may retry (503).
	ErrBadNodeAnswer = errors.New("node answer refused")
	// errGone is a future the Tinker door no longer holds (410: the SDK
	// sends its call again).
	errGone = errors.New("gone")
	// ErrInsufficientBalance is an estimate above the balance (402).
	ErrInsufficientBalance = ledger.ErrInsufficientBalance
)

// retryError carries the Retry-After a 429 or 503 response must send.
type retryError struct {
	err   error
	after time.Duration
}

func (e *retryError) Error() string { return e.err.Error() }
func (e *retryError) Unwrap() error { return e.err }

// retryAfter wraps err so that its response carries Retry-After.
func retryAfter(err error, after time.Duration) error {
	return &retryError{err: err, after: after}
}

// retrySeconds is the Retry-After header value for err: at least 1 second.
func retrySeconds(err error) string {
	var re *retryError
	d := time.Second
	if errors.As(err, &re) && re.after > d {
		d = re.after
	}
	return strconv.Itoa(int((d + time.Second - 1) / time.Second))
}

// httpStatus maps an error to the API's status and error code. It is the
// only place that does so.
func httpStatus(err error) (int, string) {
	switch {
	case errors.Is(err, ErrTooLarge):
		return http.StatusRequestEntityTooLarge, protocol.CodeTooLarge
	case errors.Is(err, ErrUnknownModel):
		return http.StatusBadRequest, protocol.CodeUnknownModel
	case errors.Is(err, ErrInvalidRequest), errors.Is(err, ledger.ErrInvalidAmount),
		errors.Is(err, ledger.ErrInvalidAccount), errors.Is(err, ledger.ErrOverflow):
		return http.StatusBadRequest, protocol.CodeInvalidRequest
	case errors.Is(err, ErrUnauthorized):
		return http.StatusUnauthorized, protocol.CodeUnauthorized
	case errors.Is(err, ErrInsufficientBalance):
		return http.StatusPaymentRequired, protocol.CodeInsufficientBalance
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden, protocol.CodeForbidden
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound, protocol.CodeNotFound
	case errors.Is(err, errGone):
		return http.StatusGone, protocol.CodeNotFound
	case errors.Is(err, ErrConflict):
		return http.StatusConflict, protocol.CodeConflict
	case errors.Is(err, ErrRateLimited), errors.Is(err, ErrTooManyRuns):
		return http.StatusTooManyRequests, protocol.CodeRateLimited
	case errors.Is(err, ErrUnavailable), errors.Is(err, ErrNoCapacity), errors.Is(err, ErrNodeLost),
		errors.Is(err, ErrNotLeader), errors.Is(err, ErrBadNodeAnswer):
		return http.StatusServiceUnavailable, protocol.CodeUnavailable
	default:
		return http.StatusInternalServerError, protocol.CodeInternal
	}
}

// auditCategory names the audit log category of an outcome.
func auditCategory(status int) string {
	switch {
	case status < 400:
		return "success"
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return "security"
	case status == http.StatusTooManyRequests:
		return "rate_limit"
	case status == http.StatusPaymentRequired:
		return "billing"
	case status == http.StatusServiceUnavailable:
		return "infrastructure"
	case status >= 500:
		return "processing"
	default:
		return "validation"
	}
}

// nodeError turns an error a node returned in a SessionResponse into one of
// the coordinator's sentinels, so that the node's 400s stay 400s. The
// node's message is a sentence for the user (node.errorResponse): it is
// what the user reads, without the coordinator's context around it.
func nodeError(e *protocol.ErrorBody) error {
	var base error
	switch e.Code {
	case protocol.CodeInvalidRequest:
		base = ErrInvalidRequest
	case protocol.CodeUnknownModel:
		// The registry lists the model but this node does not serve it:
		// another node may (placement tries one), and none is a 503.
		base = ErrUnavailable
	case protocol.CodeNotFound:
		base = ErrNotFound
	case protocol.CodeConflict:
		base = ErrConflict
	case protocol.CodeUnavailable:
		base = ErrUnavailable
	case protocol.CodeOutOfMemory:
		base = errNodeOutOfMemory
	case protocol.CodeTooLarge:
		base = ErrTooLarge
	default:
		return fmt.Errorf("node error %s: %s", e.Code, e.Message)
	}
	return fmt.Errorf("node: %w", &protocol.UserError{Msg: e.Message, Err: base})
}

// remoteError maps another member's error answer back to the sentinel it
// was made from (httpStatus in reverse), so an error keeps its meaning across
// a hop: a join token the leader refused is ErrUnauthorized on the follower
// too, and the node stops instead of retrying. The body's code decides; the
// status alone is used when the body is not ours (a proxy's page). Anything
// unrecognised, and every 5xx, is ErrUnavailable: worth a retry.
func remoteError(status int, code string) error {
	switch code {
	case protocol.CodeInvalidRequest:
		return ErrInvalidRequest
	case protocol.CodeUnknownModel:
		return ErrUnknownModel
	case protocol.CodeUnauthorized:
		return ErrUnauthorized
	case protocol.CodeInsufficientBalance:
		return ErrInsufficientBalance
	case protocol.CodeForbidden:
		return ErrForbidden
	case protocol.CodeNotFound:
		return ErrNotFound
	case protocol.CodeConflict:
		return ErrConflict
	case protocol.CodeTooLarge:
		return ErrTooLarge
	case protocol.CodeRateLimited:
		return ErrRateLimited
	case protocol.CodeUnavailable, protocol.CodeInternal:
		return ErrUnavailable
	}
	switch status {
	case http.StatusBadRequest:
		return ErrInvalidRequest
	case http.StatusUnauthorized:
		return ErrUnauthorized
	case http.StatusForbidden:
		return ErrForbidden
	case http.StatusNotFound:
		return ErrNotFound
	case http.StatusConflict:
		return ErrConflict
	default:
		return ErrUnavailable
	}
}

// tinkerStatus adapts an error status for the tinker SDK, whose transport
// retries 408, 409, 429 and 5xx: a conflict on the Tinker door is a run in
// a state the call cannot change (400, not retried), and every other 4xx
// but 408 and 429 says x-should-retry: false, so no retry loop meets a
// permanent error.
func tinkerStatus(w http.ResponseWriter, status int) int {
	if status == http.StatusConflict {
		status = http.StatusBadRequest
	}
	if status >= 400 && status < 500 && status != http.StatusRequestTimeout && status != http.StatusTooManyRequests && status != http.StatusGone {
		w.Header().Set("X-Should-Retry", "false")
	}
	return status
}
