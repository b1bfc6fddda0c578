package coordinator

import (
	"context"
	"regexp"
	"strconv"
	"testing"
	"time"
)

// TestMetricsApplyTimeByCommand: every member's /metrics shows how long
// its FSM took over each type of command it applied.
func TestMetricsApplyTimeByCommand(t *testing.T) {
	cs := startCluster(t, 2, nil)
	l := leaderOf(cs)
	mintAccount(t, l, "acct", 1)
	for i := 0; i < 3; i++ {
		if _, err := l.propose(context.Background(), cmdMint, mintCmd{Account: "acct", Amount: 1}); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range cs {
		waitFor(t, 10*time.Second, c.ID()+" applies the mints", func() bool { return balanceOn(c, "acct") == 4 })
		body := do(t, "GET", c.URL()+"/metrics", "", nil).body
		for cmd, least := range map[string]int{"create_key": 1, "mint": 3, "put_member": 1} {
			re := regexp.MustCompile(`(?m)^signal_raft_apply_seconds_count\{command="` + cmd + `"\} (\d+)$`)
			m := re.FindSubmatch(body)
			if m == nil {
				t.Fatalf("%s: /metrics has no apply time for %s:\n%.3000s", c.ID(), cmd, body)
			}
			if n, _ := strconv.Atoi(string(m[1])); n < least {
				t.Errorf("%s: %d %s commands timed, want at least %d", c.ID(), n, cmd, least)
			}
		}
		if regexp.MustCompile(`command="batch"`).Match(body) {
			t.Errorf("%s: a batch is timed as a command", c.ID())
		}
	}
}
