// Package retry is Signal's one policy for trying again: exponential
// backoff with jitter (github.com/cenkalti/backoff), capped, and bounded by
// the caller's context rather than by a count or a deadline of its own.
// Members and tools that wait for one another (a member joining the
// cluster, the testnet waiting for an election or for nodes to list) use
// it, so none hammers a peer that is still starting and none sleeps much
// more than a second past the moment it could go on.
package retry

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// The schedule: the first wait is about FirstWait, each later one half as
// long again, up to MaxWait; each is jittered ±50% (so a wait is at most
// 1.5 × MaxWait) so that callers started together spread out.
const (
	FirstWait = 50 * time.Millisecond
	MaxWait   = time.Second
)

// Do calls op until it returns nil or an error wrapped by Permanent, or
// until ctx ends. It returns nil, the permanent error (unwrapped), or ctx's
// error joined with op's last error, both matchable with errors.Is.
// notify, when not nil, sees every failure and the wait before the next
// try (to log it, say).
func Do(ctx context.Context, op func() error, notify func(err error, wait time.Duration)) error {
	var last error
	err := backoff.RetryNotify(func() error {
		last = op()
		return last
	}, backoff.WithContext(schedule(), ctx), notify)
	if err != nil && ctx.Err() != nil && last != nil && !errors.Is(err, last) {
		return fmt.Errorf("%w (last: %w)", err, last)
	}
	return err
}

// Permanent marks err as not worth another try: Do returns it at once.
func Permanent(err error) error { return backoff.Permanent(err) }

func schedule() *backoff.ExponentialBackOff {
	return backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(FirstWait),
		backoff.WithMaxInterval(MaxWait),
		backoff.WithMaxElapsedTime(0), // the caller's context decides
	)
}
