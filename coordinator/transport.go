package coordinator

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// errPartitioned is what a partitioned stream layer's Dial returns.
var errPartitioned = errors.New("raft transport partitioned (test)")

// tcpStream is raft's TCP stream layer with a switch that cuts it off, so
// tests can partition a member over real sockets. In production the switch
// is never thrown and it behaves as raft.TCPStreamLayer.
type tcpStream struct {
	net.Listener
	mu          sync.Mutex
	partitioned bool
	conns       map[net.Conn]struct{}
}

var _ raft.StreamLayer = (*tcpStream)(nil)

func newTCPStream(bind string) (*tcpStream, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, err
	}
	if a, ok := ln.Addr().(*net.TCPAddr); !ok || a.IP.IsUnspecified() {
		_ = ln.Close()
		return nil, fmt.Errorf("raft address %s is not advertisable; bind a specific IP", bind)
	}
	return &tcpStream{Listener: ln, conns: map[net.Conn]struct{}{}}, nil
}

func (t *tcpStream) track(c net.Conn) (net.Conn, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.partitioned {
		_ = c.Close()
		return nil, errPartitioned
	}
	t.conns[c] = struct{}{}
	return &trackedConn{Conn: c, t: t}, nil
}

// Dial implements raft.StreamLayer.
func (t *tcpStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	t.mu.Lock()
	p := t.partitioned
	t.mu.Unlock()
	if p {
		return nil, errPartitioned
	}
	c, err := net.DialTimeout("tcp", string(addr), timeout)
	if err != nil {
		return nil, err
	}
	return t.track(c)
}

// Accept implements net.Listener; connections arriving while partitioned are dropped.
func (t *tcpStream) Accept() (net.Conn, error) {
	for {
		c, err := t.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if tc, err := t.track(c); err == nil {
			return tc, nil
		}
	}
}

// setPartitioned cuts (true) or restores (false) every raft connection.
func (t *tcpStream) setPartitioned(p bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.partitioned = p
	if p {
		for c := range t.conns {
			_ = c.Close()
		}
		t.conns = map[net.Conn]struct{}{}
	}
}

type trackedConn struct {
	net.Conn
	t *tcpStream
}

func (c *trackedConn) Close() error {
	c.t.mu.Lock()
	delete(c.t.conns, c.Conn)
	c.t.mu.Unlock()
	return c.Conn.Close()
}
