package testnet

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// TestBodyOverLimitIsTooLarge sends a forward_backward body over the
// coordinator's limit through the Go SDK: the caller must see the typed 413
// with the limit in its message, not a broken connection.
func TestBodyOverLimitIsTooLarge(t *testing.T) {
	tn := startTestnet(t, func(c *Config) { c.Coordinators, c.Nodes = 1, 1 })
	info := tn.Info()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := client.New(info.Coordinators[0], info.APIKey)
	if err != nil {
		t.Fatal(err)
	}
	rank := 8
	r, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: DefaultModelName, LoRARank: &rank})
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.ForwardBackward(ctx, protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{{Text: strings.Repeat("x", 40<<20)}}})
	if !errors.Is(err, client.ErrTooLarge) {
		t.Fatalf("40 MiB body: got %v, want ErrTooLarge", err)
	}
	if !strings.Contains(err.Error(), "limit") {
		t.Fatalf("413 message does not give the limit: %v", err)
	}
}
