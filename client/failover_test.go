package client

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// deadURL is a loopback address nothing listens on.
func deadURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return "http://" + addr
}

// TestFailoverAcrossCoordinators: a coordinator that cannot be reached, or
// answers 503, or dies mid-call, costs a reconnect to the next one; the
// call keeps its idempotency key, and later calls stay on the one that
// answered.
func TestFailoverAcrossCoordinators(t *testing.T) {
	good := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, protocol.OptimStepResponse{Step: 1})
	})
	busy := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, 503, protocol.CodeUnavailable, "the coordinators have no raft leader yet; retry in a moment")
	})
	// dying accepts the call and drops the connection before answering,
	// as a coordinator killed mid-call does.
	dying := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			_ = conn.Close()
		}
	})
	for _, tc := range []struct {
		name  string
		first string
	}{{"unreachable", deadURL(t)}, {"503", busy.srv.URL}, {"died mid-call", dying.srv.URL}} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := NewCluster([]string{tc.first, good.srv.URL}, testKey)
			if err != nil {
				t.Fatal(err)
			}
			s := &sleeps{}
			c.sleep = s.sleep
			before, beforeBusy, beforeDying := len(good.requests()), len(busy.requests()), len(dying.requests())
			if _, err := c.NewRunHandle("run-1").OptimStep(context.Background(), protocol.OptimStepRequest{}); err != nil {
				t.Fatalf("call with a live coordinator second: %v", err)
			}
			if len(s.waits()) != 0 {
				t.Errorf("waited %v before trying the next coordinator", s.waits())
			}
			if c.BaseURL() != good.srv.URL {
				t.Errorf("BaseURL() = %s, want the coordinator that answered", c.BaseURL())
			}
			reqs := good.requests()[before:]
			if len(reqs) != 1 || reqs[0].idemKey == "" {
				t.Fatalf("the live coordinator got %+v", reqs)
			}
			for _, r := range append(busy.requests()[beforeBusy:], dying.requests()[beforeDying:]...) {
				if r.path == reqs[0].path && r.idemKey != "" && r.idemKey != reqs[0].idemKey {
					t.Errorf("the retry carried another idempotency key: %s vs %s", r.idemKey, reqs[0].idemKey)
				}
			}
		})
	}

	// Every coordinator down: the call fails after the usual retries (4
	// attempts: 2 rounds of 2), waiting only between full rounds.
	c, err := NewCluster([]string{deadURL(t), deadURL(t)}, testKey, WithRetries(3, time.Millisecond, time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	s := &sleeps{}
	c.sleep = s.sleep
	if _, err := c.Nodes(context.Background()); err == nil {
		t.Fatal("a call with no coordinator up succeeded")
	}
	if n := len(s.waits()); n != 1 {
		t.Errorf("waits %v: want one per round of 2 coordinators", s.waits())
	}
	// One coordinator: a call cut off mid-flight is not sent again (it may
	// still run there; the caller decides).
	one, _ := New(dying.srv.URL, testKey)
	n := len(dying.requests())
	if _, err := one.NewRunHandle("run-1").OptimStep(context.Background(), protocol.OptimStepRequest{}); err == nil {
		t.Fatal("a call cut off mid-flight succeeded")
	}
	if got := len(dying.requests()) - n; got != 1 {
		t.Errorf("sent %d times to a single coordinator, want 1", got)
	}
}

func TestFromTestnet(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, TestnetFileName), []byte(`{"coordinators":["http://127.0.0.1:7001","http://127.0.0.1:7002"],"api_key":"sk","storage":"file:///ck"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dir, filepath.Join(dir, TestnetFileName)} {
		c, err := FromTestnet(p)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.BaseURLs(); len(got) != 2 || got[1] != "http://127.0.0.1:7002" || c.apiKey != "sk" {
			t.Fatalf("FromTestnet(%s): %v", p, got)
		}
	}
	if tf, err := ReadTestnetFile(dir); err != nil || tf.StorageURL != "file:///ck" {
		t.Fatalf("ReadTestnetFile(dir) = %+v, %v", tf, err)
	}
	if _, err := NewCluster(nil, "k"); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("NewCluster(nil) = %v", err)
	}
}

// TestOlderServerMoneyNames: an answer with only the deprecated names
// (a server a release older) still fills the new fields.
func TestOlderServerMoneyNames(t *testing.T) {
	f := newFakeAPI(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"step":2,"learning_rate":0.001,"grad_norm":1,"cost":{"credits":40},"balance":960}`))
	})
	c, _ := mustClient(t, f)
	r := c.NewRunHandle("run-1")
	st, err := r.OptimStep(context.Background(), protocol.OptimStepRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Cost.MicroCredits != 40 || st.BalanceMicroCredits == nil || *st.BalanceMicroCredits != 960 || r.Info().SpentMicroCredits != 40 {
		t.Fatalf("answer %+v (balance %v), spent %d", st, st.BalanceMicroCredits, r.Info().SpentMicroCredits)
	}
}
