package coordinator

import (
	"net"
	"sync"
)

// perIPListener caps the connections one client address holds open at
// once: beyond the cap a new connection is closed as soon as it is
// accepted, before a byte of it is read, so one host cannot hold every
// server goroutine with slow requests (issue 13, item 7).
type perIPListener struct {
	net.Listener
	max int

	mu    sync.Mutex
	conns map[string]int
}

func newPerIPListener(ln net.Listener, max int) *perIPListener {
	return &perIPListener{Listener: ln, max: max, conns: map[string]int{}}
}

// Accept returns the next connection whose address is under its cap.
func (l *perIPListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := hostOf(c.RemoteAddr())
		l.mu.Lock()
		if l.conns[ip] >= l.max {
			l.mu.Unlock()
			_ = c.Close()
			continue
		}
		l.conns[ip]++
		l.mu.Unlock()
		return &countedConn{Conn: c, l: l, ip: ip}, nil
	}
}

func (l *perIPListener) done(ip string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conns[ip]--; l.conns[ip] <= 0 {
		delete(l.conns, ip)
	}
}

func hostOf(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

type countedConn struct {
	net.Conn
	l    *perIPListener
	ip   string
	once sync.Once
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.done(c.ip) })
	return err
}
