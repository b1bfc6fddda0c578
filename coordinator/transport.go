package coordinator

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// errPartitioned is what a partitioned stream layer's Dial returns.
var errPartitioned = errors.New("raft transport partitioned (test)")

// Bounds on connections that have not proved membership yet: a stranger
// who reaches the raft port holds at most maxPendingHandshakes goroutines
// for at most handshakeTimeout each, and is never read by raft.
const (
	handshakeTimeout     = 5 * time.Second
	maxPendingHandshakes = 64
)

// tcpStream is raft's stream layer: TCP under mutual TLS with the cluster's
// certificates (clusterTLS), so only members reach raft's RPCs, with a
// switch tests throw to partition a member over real sockets.
type tcpStream struct {
	ln        net.Listener
	serverTLS *tls.Config
	clientTLS *tls.Config

	accepted chan net.Conn
	pending  chan struct{} // one slot per handshake in progress
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu          sync.Mutex
	partitioned bool
	conns       map[net.Conn]struct{}
}

var _ raft.StreamLayer = (*tcpStream)(nil)

func newTCPStream(bind string, serverTLS, clientTLS *tls.Config) (*tcpStream, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, err
	}
	if a, ok := ln.Addr().(*net.TCPAddr); !ok || a.IP.IsUnspecified() {
		_ = ln.Close()
		return nil, fmt.Errorf("raft address %s is not advertisable; bind a specific IP", bind)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t := &tcpStream{ln: ln, serverTLS: serverTLS, clientTLS: clientTLS, accepted: make(chan net.Conn),
		pending: make(chan struct{}, maxPendingHandshakes), ctx: ctx, cancel: cancel, conns: map[net.Conn]struct{}{}}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		t.acceptLoop()
	}()
	return t, nil
}

// acceptLoop takes TCP connections and proves each in a goroutine of its
// own, so one slow stranger cannot stall members' connections.
func (t *tcpStream) acceptLoop() {
	for {
		c, err := t.ln.Accept()
		if err != nil {
			return
		}
		select {
		case t.pending <- struct{}{}:
		default:
			_ = c.Close() // too many strangers at once
			continue
		}
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			defer func() { <-t.pending }()
			tc := tls.Server(c, t.serverTLS)
			hctx, cancel := context.WithTimeout(t.ctx, handshakeTimeout)
			err := tc.HandshakeContext(hctx)
			cancel()
			if err != nil {
				_ = c.Close()
				return
			}
			tracked, err := t.track(tc)
			if err != nil {
				return
			}
			select {
			case t.accepted <- tracked:
			case <-t.ctx.Done():
				_ = tracked.Close()
			}
		}()
	}
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

// Dial implements raft.StreamLayer: TCP, then the TLS handshake that proves
// both ends are members.
func (t *tcpStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	t.mu.Lock()
	p := t.partitioned
	t.mu.Unlock()
	if p {
		return nil, errPartitioned
	}
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: timeout}, Config: t.clientTLS}
	ctx, cancel := context.WithTimeout(t.ctx, timeout)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", string(addr))
	if err != nil {
		return nil, fmt.Errorf("raft dial %s: %w", addr, err)
	}
	return t.track(c)
}

// Accept implements net.Listener: the next connection that proved itself a
// member.
func (t *tcpStream) Accept() (net.Conn, error) {
	select {
	case c := <-t.accepted:
		return c, nil
	case <-t.ctx.Done():
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener; it stops the accept loop and waits for
// handshakes in progress.
func (t *tcpStream) Close() error {
	t.cancel()
	err := t.ln.Close()
	t.wg.Wait()
	return err
}

// Addr implements net.Listener.
func (t *tcpStream) Addr() net.Addr { return t.ln.Addr() }

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
