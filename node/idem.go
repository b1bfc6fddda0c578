package node

import (
	"container/list"
	"context"
	"sync"

	"github.com/signal-p2p/signal/protocol"
)

// idemCache remembers the responses to recent request ids so that a
// retried call (the coordinator retries after a broken stream) runs once.
// A repeat that arrives while the first is still running waits for it.
type idemCache struct {
	mu      sync.Mutex
	max     int
	entries map[string]*idemEntry
	order   *list.List // completed request ids, oldest first
}

type idemEntry struct {
	done chan struct{}
	resp protocol.SessionResponse
	elem *list.Element
}

func newIdemCache(max int) *idemCache {
	return &idemCache{max: max, entries: make(map[string]*idemEntry), order: list.New()}
}

// begin returns (entry, true) when the caller must execute the request and
// then call finish; (entry, false) when another call owns it: wait on done.
func (c *idemCache) begin(id string) (*idemEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[id]; ok {
		return e, false
	}
	e := &idemEntry{done: make(chan struct{})}
	c.entries[id] = e
	return e, true
}

// finish records the response and evicts the oldest completed entries
// beyond the bound. Errors that a retry could cure (node busy, shutting
// down) are not remembered.
func (c *idemCache) finish(id string, e *idemEntry, resp protocol.SessionResponse) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e.resp = resp
	close(e.done)
	if resp.Error != nil && resp.Error.Code == protocol.CodeUnavailable {
		delete(c.entries, id)
		return
	}
	e.elem = c.order.PushBack(id)
	for c.order.Len() > c.max {
		old := c.order.Remove(c.order.Front()).(string)
		delete(c.entries, old)
	}
}

// wait returns the owner's response once it is done.
func (e *idemEntry) wait(ctx context.Context) (protocol.SessionResponse, error) {
	select {
	case <-e.done:
		return e.resp, nil
	case <-ctx.Done():
		return protocol.SessionResponse{}, ctx.Err()
	}
}

func (c *idemCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
