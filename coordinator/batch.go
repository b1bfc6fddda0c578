package coordinator

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// proposal is one command waiting for its batch to commit.
type proposal struct {
	cmd  command
	done chan cmdResult
}

// batcher groups concurrent commands into one raft entry. While a batch is
// in flight, new proposals queue; the next batch takes all of them, so under
// load one fsync and one replication round trip commit many commands, and
// with a single client it adds no waiting at all.
type batcher struct {
	r        *raft.Raft
	in       chan *proposal
	maxBatch int
	inflight chan struct{} // semaphore: batches in flight at once
	timeout  time.Duration
	observe  func(size int)
	quit     <-chan struct{} // closed when the loop's context ends

	wg sync.WaitGroup
}

func newBatcher(r *raft.Raft, maxBatch, maxInflight int, timeout time.Duration, observe func(int)) *batcher {
	return &batcher{
		r:        r,
		in:       make(chan *proposal, maxBatch*maxInflight),
		maxBatch: maxBatch,
		inflight: make(chan struct{}, maxInflight),
		timeout:  timeout,
		observe:  observe,
	}
}

// Start runs the batching loop until ctx ends.
func (b *batcher) Start(ctx context.Context) {
	b.quit = ctx.Done()
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.loop(ctx)
	}()
}

// Wait waits for the loop and every in-flight batch to finish.
func (b *batcher) Wait() { b.wg.Wait() }

func (b *batcher) loop(ctx context.Context) {
	for {
		var first *proposal
		select {
		case <-ctx.Done():
			b.drain(ctx.Err())
			return
		case first = <-b.in:
		}
		// Wait for a free slot before draining, so proposals that arrive
		// meanwhile join this batch.
		select {
		case <-ctx.Done():
			first.done <- cmdResult{Err: ctx.Err()}
			b.drain(ctx.Err())
			return
		case b.inflight <- struct{}{}:
		}
		batch := []*proposal{first}
	fill:
		for len(batch) < b.maxBatch {
			select {
			case p := <-b.in:
				batch = append(batch, p)
			default:
				break fill
			}
		}
		cmds := make([]command, len(batch))
		for i, p := range batch {
			cmds[i] = p.cmd
		}
		if b.observe != nil {
			b.observe(len(batch))
		}
		f := b.r.Apply(encodeBatch(cmds), b.timeout)
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer func() { <-b.inflight }()
			b.finish(f, batch)
		}()
	}
}

func (b *batcher) finish(f raft.ApplyFuture, batch []*proposal) {
	if err := f.Error(); err != nil {
		err = raftError(err)
		for _, p := range batch {
			p.done <- cmdResult{Err: err}
		}
		return
	}
	results, ok := f.Response().([]cmdResult)
	if !ok || len(results) != len(batch) {
		err := fmt.Errorf("batch of %d got response %T: %w", len(batch), f.Response(), errBadEntry)
		for _, p := range batch {
			p.done <- cmdResult{Err: err}
		}
		return
	}
	for i, p := range batch {
		p.done <- results[i]
	}
}

func (b *batcher) drain(err error) {
	for {
		select {
		case p := <-b.in:
			p.done <- cmdResult{Err: err}
		default:
			return
		}
	}
}

// propose submits a command and waits for its result.
func (b *batcher) propose(ctx context.Context, c command) (any, error) {
	p := &proposal{cmd: c, done: make(chan cmdResult, 1)}
	unavailable := retryAfter(fmt.Errorf("coordinator stopping: %w", ErrUnavailable), time.Second)
	select {
	case b.in <- p:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-b.quit:
		return nil, unavailable
	}
	select {
	case res := <-p.done:
		return res.Value, res.Err
	case <-b.quit:
		return nil, unavailable
	case <-ctx.Done():
		// The command may still commit; idempotency keys make a retry safe.
		return nil, ctx.Err()
	}
}

// raftError maps raft's errors to the coordinator's sentinels.
func raftError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipLost),
		errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return retryAfter(fmt.Errorf("%w: %w", ErrNotLeader, err), time.Second)
	case errors.Is(err, raft.ErrRaftShutdown), errors.Is(err, raft.ErrEnqueueTimeout):
		return retryAfter(fmt.Errorf("%w: %w", ErrUnavailable, err), time.Second)
	default:
		return err
	}
}
