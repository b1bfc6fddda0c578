package coordinator

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestHTTPAuthenticatesBeforeReadingTheBody is issue 13's seventh attack:
// a 33 MiB POST without a key is answered 401 from its headers alone, and
// a keyed one over a route's limit 413.
func TestHTTPAuthenticatesBeforeReadingTheBody(t *testing.T) {
	c, _ := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 1000)
	big := bytes.Repeat([]byte("x"), 33<<20)
	r := do(t, "POST", base+"/v1/runs", "", big)
	mustStatus(t, r, http.StatusUnauthorized)
	r = do(t, "POST", base+"/v1/runs", "sk-sig-wrong", big)
	mustStatus(t, r, http.StatusUnauthorized)
	// create_run takes small bodies: 2 MiB is over its limit.
	r = do(t, "POST", base+"/v1/runs", key, bytes.Repeat([]byte(" "), 2<<20))
	mustStatus(t, r, http.StatusRequestEntityTooLarge)
	if r.header.Get("X-Request-Id") == "" {
		t.Fatal("an error without X-Request-Id")
	}
}

// TestHTTPSlowBodiesAndConnectionFloods: a body dribbled slower than the
// read timeout loses its connection, and one address cannot hold more
// than MaxConnsPerIP connections.
func TestHTTPSlowBodiesAndConnectionFloods(t *testing.T) {
	c, _ := startOne(t, func(cfg *Config) {
		cfg.ReadTimeout = 500 * time.Millisecond
		cfg.MaxConnsPerIP = 4
	})
	key, _ := createKey(t, c.URL(), 1000)

	slow, err := net.Dial("tcp", c.HTTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	fmt.Fprintf(slow, "POST /v1/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 100000\r\n\r\n{", key)
	start := time.Now()
	_ = slow.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		if _, err := slow.Write([]byte(" ")); err != nil {
			break
		}
		one := make([]byte, 1)
		_ = slow.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := slow.Read(one); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				if time.Since(start) > 10*time.Second {
					t.Fatal("a dribbled body held its connection for 10 s")
				}
				continue
			}
			break // answered or closed: the server let go
		}
		break
	}
	slow.Close()

	// Four idle connections are the cap; the fifth is closed unread.
	var held []net.Conn
	defer func() {
		for _, h := range held {
			h.Close()
		}
	}()
	for i := 0; i < 4; i++ {
		h, err := net.Dial("tcp", c.HTTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, h)
	}
	waitFor(t, 5*time.Second, "a fifth connection refused", func() bool {
		extra, err := net.Dial("tcp", c.HTTPAddr())
		if err != nil {
			return true
		}
		defer extra.Close()
		_, _ = io.WriteString(extra, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
		_ = extra.SetReadDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(extra).ReadString('\n')
		return err != nil && !strings.HasPrefix(line, "HTTP/1.1 200")
	})
	// Freed slots serve again.
	for _, h := range held {
		h.Close()
	}
	held = nil
	waitFor(t, 5*time.Second, "health after the flood", func() bool {
		resp, err := http.Get(c.URL() + "/v1/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

type countingTokenizer struct{}

func (countingTokenizer) Encode(text string, _ bool) []int { return make([]int, len(text)/4) }

// TestTokenizeIsBounded is issue 13's twelfth attack: a text over 1 MiB is
// refused before it is tokenized, and a follower tokenizes on its own
// instead of forwarding to the leader.
func TestTokenizeIsBounded(t *testing.T) {
	cs := startCluster(t, 2, func(cfg *Config) {
		cfg.Models[0].Path = t.TempDir()
		cfg.LoadTokenizer = func(string) (Tokenizer, error) { return countingTokenizer{}, nil }
	})
	leader := leaderOf(cs)
	key, _ := createKey(t, leader.URL(), 1000)
	r := do(t, "POST", leader.URL()+"/v1/tokenize", key, map[string]any{"base_model": "tiny", "text": strings.Repeat("x", maxTokenizeBytes+1)})
	mustStatus(t, r, http.StatusBadRequest)
	if !strings.Contains(r.errMessage(t), "field text") {
		t.Fatalf("message %q does not name the field", r.errMessage(t))
	}
	for _, c := range cs {
		if c == leader {
			continue
		}
		waitFor(t, 5*time.Second, "the key on the follower", func() bool {
			return do(t, "POST", c.URL()+"/v1/tokenize", key, map[string]any{"base_model": "tiny", "text": "abcdefgh"}).status == 200
		})
		// Without the leader (and with it, quorum) the follower still
		// answers: it tokenized on its own.
		_ = leader.Stop()
		var out struct {
			Tokens []int `json:"tokens"`
		}
		r := do(t, "POST", c.URL()+"/v1/tokenize", key, map[string]any{"base_model": "tiny", "text": "abcdefgh"})
		r.decode(t, &out)
		if len(out.Tokens) != 2 {
			t.Fatalf("follower tokenized %v", out.Tokens)
		}
	}
}

// lockedBuffer is a log sink the HTTP server's goroutines share.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestRequestIDIsLogged: the request id an answer carries (in an error's
// body for a 500, in X-Request-Id always) is in that request's audit line,
// so a user's report finds it.
func TestRequestIDIsLogged(t *testing.T) {
	var logs lockedBuffer
	c, _ := startOne(t, func(cfg *Config) { cfg.Logger = slog.New(slog.NewJSONHandler(&logs, nil)) })
	key, _ := createKey(t, c.URL(), 1000)
	r := do(t, "GET", c.URL()+"/v1/runs/run_absent", key, nil)
	mustStatus(t, r, http.StatusNotFound)
	id := r.header.Get("X-Request-Id")
	if id == "" {
		t.Fatal("no X-Request-Id")
	}
	waitFor(t, 2*time.Second, "the audit line", func() bool { return strings.Contains(logs.String(), `"request_id":"`+id+`"`) })
}
