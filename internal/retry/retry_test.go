package retry_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/signal-p2p/signal/internal/retry"
)

var errNotYet = errors.New("not yet")

func TestDoRetriesUntilSuccess(t *testing.T) {
	tries := 0
	var waits []time.Duration
	err := retry.Do(context.Background(), func() error {
		if tries++; tries < 4 {
			return errNotYet
		}
		return nil
	}, func(err error, wait time.Duration) {
		if !errors.Is(err, errNotYet) {
			t.Errorf("notified of %v, want errNotYet", err)
		}
		waits = append(waits, wait)
	})
	if err != nil || tries != 4 {
		t.Fatalf("Do = %v after %d tries, want nil after 4", err, tries)
	}
	if len(waits) != 3 {
		t.Fatalf("waits = %v, want 3", waits)
	}
	for i, w := range waits {
		if w <= 0 || w > retry.MaxWait*3/2 {
			t.Errorf("wait %d = %v, want in (0, 1.5 × %v]", i, w, retry.MaxWait)
		}
	}
}

func TestDoStopsOnPermanent(t *testing.T) {
	refused := errors.New("refused")
	tries := 0
	err := retry.Do(context.Background(), func() error {
		tries++
		return retry.Permanent(refused)
	}, nil)
	if !errors.Is(err, refused) || tries != 1 {
		t.Fatalf("Do = %v after %d tries, want refused after 1", err, tries)
	}
}

func TestDoEndsWithContextAndKeepsTheLastError(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := retry.Do(ctx, func() error { return errNotYet }, nil)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, errNotYet) {
		t.Fatalf("Do = %v, want the deadline and the last error", err)
	}
}
