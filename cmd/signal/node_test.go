package main

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/trainer"
)

// TestNodePrecisionFlag: a --precision the engine does not know is refused
// before anything loads, in one sentence naming the flag and its values.
func TestNodePrecisionFlag(t *testing.T) {
	_, _, err := openNodeEngine(context.Background(), "native", "f8", t.TempDir(), nil, nil)
	if !errors.Is(err, trainer.ErrInvalidInput) || !strings.Contains(err.Error(), `--precision "f8": use auto or f32`) {
		t.Fatalf("--precision f8: %v", err)
	}
	for _, p := range []string{"auto", "f32"} {
		eng, stop, err := openNodeEngine(context.Background(), "native", p, t.TempDir(), nil, nil)
		if err != nil || eng == nil {
			t.Fatalf("--precision %s: %v", p, err)
		}
		stop()
	}
}
