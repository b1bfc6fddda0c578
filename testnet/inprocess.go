package testnet

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// InProcess is a testnet whose members all run inside this process.
type InProcess struct {
	info   *Info
	plan   *plan
	cancel context.CancelFunc

	mu     sync.Mutex
	coords []*Coordinator
	nodes  []*Node
	killed map[int]bool
	// stopped refuses members that finish starting after Stop began.
	stopped bool
}

// StartInProcess starts a testnet inside this process and returns once
// every coordinator lists every node. It writes cfg.Dir/testnet.json.
// Stop (or cancelling ctx and then Stop) tears it down.
func StartInProcess(ctx context.Context, cfg Config) (*InProcess, error) {
	p, err := prepare(cfg)
	if err != nil {
		return nil, err
	}
	// Members live until Stop, not until the start-up deadline.
	life, cancel := context.WithCancel(context.WithoutCancel(ctx))
	t := &InProcess{plan: p, cancel: cancel, killed: map[int]bool{}}
	stopOnCancel := context.AfterFunc(ctx, func() { _ = t.Stop() })
	info, err := bringUp(ctx, p, &inProcLauncher{t: t, life: life})
	stopOnCancel()
	if err != nil {
		_ = t.Stop()
		return nil, err
	}
	t.info = info
	if err := WriteInfo(p.dir, info); err != nil {
		_ = t.Stop()
		return nil, err
	}
	return t, nil
}

type inProcLauncher struct {
	t    *InProcess
	life context.Context
}

func (l *inProcLauncher) coordinator(_ context.Context, _ int, spec CoordinatorSpec) (string, []string, error) {
	c, err := StartCoordinator(l.life, spec, l.t.plan.log.With("member", spec.ID))
	if err != nil {
		return "", nil, err
	}
	l.t.mu.Lock()
	defer l.t.mu.Unlock()
	if l.t.stopped {
		_ = c.Stop()
		return "", nil, errStopped
	}
	l.t.coords = append(l.t.coords, c)
	return c.URL(), c.P2PAddrs(), nil
}

func (l *inProcLauncher) node(_ context.Context, j int, spec NodeSpec) (string, error) {
	n, err := StartNode(l.life, spec, l.t.plan.log.With("member", fmt.Sprintf("n%d", j+1)))
	if err != nil {
		return "", err
	}
	l.t.mu.Lock()
	defer l.t.mu.Unlock()
	if l.t.stopped {
		_ = n.Stop()
		return "", errStopped
	}
	l.t.nodes = append(l.t.nodes, n)
	return n.PeerID(), nil
}

// Info is what testnet.json holds.
func (t *InProcess) Info() Info { return *t.info }

// Coordinators are the running coordinator members, c1 first.
func (t *InProcess) Coordinators() []*Coordinator {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]*Coordinator(nil), t.coords...)
}

// Nodes are the node members, n1 first (killed ones included).
func (t *InProcess) Nodes() []*Node {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]*Node(nil), t.nodes...)
}

// NodeIndex returns the index of the node with this peer ID, or -1.
func (t *InProcess) NodeIndex(peerID string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, n := range t.nodes {
		if n.PeerID() == peerID {
			return i
		}
	}
	return -1
}

// KillNode crashes node i: its host closes without draining or
// checkpointing, as if the process died.
func (t *InProcess) KillNode(i int) error {
	n, err := t.takeNode(i)
	if n != nil {
		n.Kill()
	}
	return err
}

// StopNode stops node i gracefully: its running calls finish, its open
// sessions are checkpointed and reported to the coordinators, and it leaves.
func (t *InProcess) StopNode(i int) error {
	n, err := t.takeNode(i)
	if n == nil {
		return err
	}
	return n.Stop()
}

// takeNode marks node i as gone (Stop skips it) and returns it, or nil when
// it was gone already.
func (t *InProcess) takeNode(i int) (*Node, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i < 0 || i >= len(t.nodes) {
		return nil, fmt.Errorf("%w: node index %d: have %d nodes", ErrInvalidConfig, i, len(t.nodes))
	}
	if t.killed[i] {
		return nil, nil
	}
	t.killed[i] = true
	return t.nodes[i], nil
}

// Stop stops nodes (gracefully, except killed ones) and then coordinators.
func (t *InProcess) Stop() error {
	t.mu.Lock()
	nodes, coords := t.nodes, t.coords
	t.nodes, t.coords = nil, nil
	t.stopped = true
	killed := t.killed
	t.mu.Unlock()
	var errs []error
	var wg sync.WaitGroup
	var emu sync.Mutex
	for i, n := range nodes {
		if killed[i] {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := n.Stop(); err != nil {
				emu.Lock()
				errs = append(errs, fmt.Errorf("stop node n%d: %w", i+1, err))
				emu.Unlock()
			}
		}()
	}
	wg.Wait()
	for i := len(coords) - 1; i >= 0; i-- {
		if err := coords[i].Stop(); err != nil {
			errs = append(errs, fmt.Errorf("stop coordinator c%d: %w", i+1, err))
		}
	}
	t.cancel()
	t.plan.lock.release()
	return errors.Join(errs...)
}
