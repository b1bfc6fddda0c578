package coordinator

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/signal-p2p/signal/coordinator/p2p"
)

// Member is one coordinator member as `signal coordinator` and the testnet
// run it: the coordinator and, with a node network, the libp2p host its
// nodes bootstrap to. It is the one place that assembles the two, which
// need each other: the host verifies joins through the coordinator (its
// Registry), and the coordinator reaches nodes through the host (its
// Backend).
type Member struct {
	coord *Coordinator
	host  *p2p.Host // nil: no node network (placement answers 503)
}

// NewMember builds a member from the coordinator's cfg and, unless it is
// nil, the host's pcfg. The host's data dir defaults to DataDir/p2p and
// its logger to cfg.Logger. The host becomes the coordinator's backend
// here, before either runs, so nothing ever sees it change.
func NewMember(cfg Config, pcfg *p2p.Config) (*Member, error) {
	c, err := New(cfg)
	if err != nil {
		return nil, err
	}
	m := &Member{coord: c}
	if pcfg == nil {
		return m, nil
	}
	hc := *pcfg
	if hc.DataDir == "" {
		hc.DataDir = filepath.Join(cfg.DataDir, "p2p")
	}
	if hc.Logger == nil {
		hc.Logger = c.cfg.Logger
	}
	if m.host, err = p2p.New(hc, c.NodeRegistry()); err != nil {
		return nil, fmt.Errorf("coordinator %s p2p host: %w", cfg.ID, err)
	}
	c.backend = m.host
	return m, nil
}

// Start starts the coordinator, then the host: the host answers joins
// only once the coordinator it asks is running.
func (m *Member) Start(ctx context.Context) error {
	if err := m.coord.Start(ctx); err != nil {
		if m.host != nil {
			_ = m.host.Stop()
		}
		return err
	}
	if m.host == nil {
		return nil
	}
	if err := m.host.Start(ctx); err != nil {
		return errors.Join(fmt.Errorf("coordinator %s p2p host: %w", m.coord.ID(), err), m.host.Stop(), m.coord.Stop())
	}
	return nil
}

// Stop stops the coordinator, then the host: calls still in flight finish
// on their nodes, and no node looks lost to a member still serving.
func (m *Member) Stop() error {
	err := m.coord.Stop()
	if m.host != nil {
		err = errors.Join(err, m.host.Stop())
	}
	return err
}

// Coordinator is the member's coordinator (raft state, leadership, API).
func (m *Member) Coordinator() *Coordinator { return m.coord }

// URL is the member's public base URL.
func (m *Member) URL() string { return m.coord.URL() }

// P2PAddrs are the multiaddrs nodes bootstrap to; none without a node
// network.
func (m *Member) P2PAddrs() []string {
	if m.host == nil {
		return nil
	}
	return m.host.Addrs()
}
