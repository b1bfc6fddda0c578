package coordinator

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// A node that shows a bad join token to a follower must be refused with
// ErrUnauthorized, the sentinel the p2p adapters turn into
// p2p.ErrInvalidJoinToken so that the node stops instead of retrying; a
// good token through the same follower still joins.
func TestAdmitNodeThroughFollowerRefusesBadToken(t *testing.T) {
	cs := startCluster(t, 3, nil)
	leader := leaderOf(cs)
	var follower *Coordinator
	for _, c := range cs {
		if c != leader {
			follower = c
			break
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := follower.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	r := do(t, "POST", leader.URL()+"/v1/admin/join_tokens", testAdmin, protocol.JoinTokenRequest{OperatorAccount: "op"})
	mustStatus(t, r, 200)
	var jt protocol.JoinTokenResponse
	r.decode(t, &jt)

	for _, tc := range []struct{ name, token string }{
		{"unknown token", "not-a-join-token"},
		{"empty token", ""},
	} {
		_, err := follower.AdmitNode(ctx, "peer-bad", tc.token)
		if !errors.Is(err, ErrUnauthorized) {
			t.Fatalf("%s through a follower: err %v, want ErrUnauthorized", tc.name, err)
		}
		if errors.Is(err, ErrUnavailable) {
			t.Fatalf("%s through a follower: err %v also says unavailable (the node would retry)", tc.name, err)
		}
		// The leader answers the same way, so where the node lands does not matter.
		if _, err := leader.AdmitNode(ctx, "peer-bad", tc.token); !errors.Is(err, ErrUnauthorized) {
			t.Fatalf("%s on the leader: err %v, want ErrUnauthorized", tc.name, err)
		}
	}
	if follower.IsJoined("peer-bad") || leader.IsJoined("peer-bad") {
		t.Fatal("a refused peer is recorded as joined")
	}
	op, err := follower.AdmitNode(ctx, "peer-good", jt.JoinToken)
	if err != nil || op != "op" {
		t.Fatalf("good token through a follower: operator %q err %v", op, err)
	}
	waitFor(t, 5*time.Second, "peer-good joined on the follower", func() bool { return follower.IsJoined("peer-good") })
}

// postAdmin maps the answer of the member it asked back to the sentinel
// that answer was made from, so errors keep their meaning across a hop: a
// refused token stays ErrUnauthorized, a cluster whose members disagree on
// the admin token is ErrForbidden (not a bad join token), a 400 stays a
// 400, and only 5xx and unknown answers are "unavailable, retry".
func TestPostAdminMapsAnswersToSentinels(t *testing.T) {
	cases := []struct {
		status int
		code   string
		want   error
	}{
		{http.StatusUnauthorized, protocol.CodeUnauthorized, ErrUnauthorized},
		{http.StatusForbidden, protocol.CodeForbidden, ErrForbidden},
		{http.StatusBadRequest, protocol.CodeInvalidRequest, ErrInvalidRequest},
		{http.StatusNotFound, protocol.CodeNotFound, ErrNotFound},
		{http.StatusConflict, protocol.CodeConflict, ErrConflict},
		{http.StatusServiceUnavailable, protocol.CodeUnavailable, ErrUnavailable},
		{http.StatusInternalServerError, protocol.CodeInternal, ErrUnavailable},
		{http.StatusBadGateway, "", ErrUnavailable},
		// A body that is not ours: the status alone decides.
		{http.StatusUnauthorized, "", ErrUnauthorized},
	}
	c := &Coordinator{cfg: Config{AdminToken: testAdmin}, client: &http.Client{Timeout: 5 * time.Second}}
	for _, tc := range cases {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if tc.code == "" {
				w.WriteHeader(tc.status)
				_, _ = w.Write([]byte("<html>proxy error</html>"))
				return
			}
			writeError(w, tc.status, tc.code, "refused by test", "")
		}))
		err := c.postAdmin(context.Background(), srv.URL+"/v1/cluster/register_node", []byte(`{}`), nil)
		srv.Close()
		if !errors.Is(err, tc.want) {
			t.Errorf("status %d code %q: err %v, want %v", tc.status, tc.code, err, tc.want)
		}
		for _, other := range []error{ErrUnauthorized, ErrForbidden, ErrInvalidRequest, ErrUnavailable} {
			if other != tc.want && errors.Is(err, other) {
				t.Errorf("status %d code %q: err %v also wraps %v", tc.status, tc.code, err, other)
			}
		}
	}
}

// TestJoinFloodWritesNoRaftEntries is issue 13's thirteenth attack: 500
// joins with bogus tokens, and 500 repeated joins of a joined node, write
// no raft entry; new peers under one token are rate limited.
func TestJoinFloodWritesNoRaftEntries(t *testing.T) {
	c, _ := startOne(t, nil)
	ctx := context.Background()
	r := do(t, "POST", c.URL()+"/v1/admin/join_tokens", testAdmin, protocol.JoinTokenRequest{OperatorAccount: "op-flood"})
	mustStatus(t, r, 200)
	var jt protocol.JoinTokenResponse
	r.decode(t, &jt)
	if _, err := c.AdmitNode(ctx, "peer-real", jt.JoinToken); err != nil {
		t.Fatal(err)
	}
	before := c.raft.LastIndex()
	for i := 0; i < 500; i++ {
		if _, err := c.AdmitNode(ctx, "peer-fake-"+itoa(i), "jt-bogus-"+itoa(i)); !errors.Is(err, ErrUnauthorized) {
			t.Fatalf("bogus join %d: %v", i, err)
		}
		if _, err := c.AdmitNode(ctx, "peer-real", jt.JoinToken); err != nil {
			t.Fatalf("repeated join %d: %v", i, err)
		}
	}
	if after := c.raft.LastIndex(); after != before {
		t.Fatalf("the flood wrote %d raft entries", after-before)
	}
	limited := 0
	for i := 0; i < 2*joinBurst; i++ {
		if _, err := c.AdmitNode(ctx, "peer-new-"+itoa(i), jt.JoinToken); errors.Is(err, ErrRateLimited) {
			limited++
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if limited == 0 {
		t.Fatalf("%d new peers under one token in a burst were all written", 2*joinBurst)
	}
}
