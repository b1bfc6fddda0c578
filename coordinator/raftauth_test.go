package coordinator

import (
	"crypto/tls"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// forgedMint is the AppendEntries an outsider would send: one batch entry
// minting 10^15 micro-credits into the account it names.
func forgedMint(t *testing.T, term, prevIndex, prevTerm uint64, acct string) *raft.AppendEntriesRequest {
	t.Helper()
	m, err := newCommand(cmdMint, mintCmd{Account: acct, Amount: 1_000_000_000_000_000})
	if err != nil {
		t.Fatal(err)
	}
	return &raft.AppendEntriesRequest{
		RPCHeader: raft.RPCHeader{ID: []byte("outsider"), Addr: []byte("127.0.0.1:1")},
		Term:      term, PrevLogEntry: prevIndex, PrevLogTerm: prevTerm,
		Entries:           []*raft.Log{{Index: prevIndex + 1, Term: term, Type: raft.LogCommand, Data: encodeBatch([]command{m})}},
		LeaderCommitIndex: prevIndex + 1,
	}
}

// TestRaftOutsiderCannotWriteTheLedger is issue 13's first attack: a
// process that reaches a member's raft port speaks raft with hashicorp's
// own TCP transport and forges AppendEntries (higher terms, the member's
// real last index). Every attempt fails at the handshake and no member's
// state changes.
func TestRaftOutsiderCannotWriteTheLedger(t *testing.T) {
	cs := startCluster(t, 3, nil)
	l := leaderOf(cs)
	_, acct := createKey(t, l.URL(), 1000)
	termBefore := termOf(t, l)
	out, err := raft.NewTCPTransport("127.0.0.1:0", nil, 1, 2*time.Second, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	for _, c := range cs {
		last := c.raft.LastIndex()
		term := termOf(t, c)
		for _, forgedTerm := range []uint64{term, term + 100} {
			var resp raft.AppendEntriesResponse
			err := out.AppendEntries(raft.ServerID(c.cfg.ID), raft.ServerAddress(c.RaftAddr()), forgedMint(t, forgedTerm, last, term, acct), &resp)
			if err == nil {
				t.Fatalf("member %s answered a forged AppendEntries: %+v", c.cfg.ID, resp)
			}
		}
		var vote raft.RequestVoteResponse
		if err := out.RequestVote(raft.ServerID(c.cfg.ID), raft.ServerAddress(c.RaftAddr()), &raft.RequestVoteRequest{RPCHeader: raft.RPCHeader{ID: []byte("outsider"), Addr: []byte("127.0.0.1:1")}, Term: term + 1000, LastLogIndex: last + 1000, LastLogTerm: term + 1000}, &vote); err == nil {
			t.Fatalf("member %s answered a forged RequestVote: %+v", c.cfg.ID, vote)
		}
	}
	// The cluster still has its leader and every member the true balance.
	mintAccount(t, leaderOf(cs), acct, 1)
	waitFor(t, 5*time.Second, "members agree", func() bool {
		for _, c := range cs {
			if balanceOn(c, acct) != 1001 {
				return false
			}
		}
		return true
	})
	for _, c := range cs {
		if got := termOf(t, c); got >= termBefore+100 {
			t.Errorf("member %s reached term %d from %d: the forged RPCs moved it", c.cfg.ID, got, termBefore)
		}
	}
}

func termOf(t *testing.T, c *Coordinator) uint64 {
	t.Helper()
	term, err := strconv.ParseUint(c.raft.Stats()["term"], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return term
}

// TestRaftTransportRefusesWrongSecret: a TLS client that presents no
// certificate, or one made from another cluster secret, is refused in the
// handshake; a member's own configuration is accepted.
func TestRaftTransportRefusesWrongSecret(t *testing.T) {
	cs := startCluster(t, 1, nil)
	addr := cs[0].RaftAddr()
	dial := func(cfg *tls.Config) error {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, cfg)
		if err != nil {
			return err
		}
		defer c.Close()
		// TLS 1.3 reports a refused client certificate on the first read.
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Read(make([]byte, 1))
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return nil // the server kept the connection: accepted
		}
		return err
	}
	_, other, err := clusterTLS("another cluster's secret", "x")
	if err != nil {
		t.Fatal(err)
	}
	noCert := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	otherCert := other.Clone()
	otherCert.InsecureSkipVerify = true // it does not trust our CA either; see whether we trust its cert
	for name, cfg := range map[string]*tls.Config{"no certificate": noCert, "another secret": otherCert} {
		if err := dial(cfg); err == nil {
			t.Errorf("%s: handshake accepted", name)
		}
	}
	_, mine, err := clusterTLS(testConfig(t, "y").clusterSecret(), "y")
	if err != nil {
		t.Fatal(err)
	}
	if err := dial(mine); err != nil {
		t.Errorf("a member's certificate was refused: %v", err)
	}
}
