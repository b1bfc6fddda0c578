package coordinator

import (
	"context"
	"testing"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// TestDrainedCheckpointIsResumedFrom: a node that stops gracefully reports
// the checkpoint it saved while draining; the coordinator records it only
// for a run still on that node and not older than the run's step (once),
// and failover then resumes the run from it instead of from the last
// automatic checkpoint.
func TestDrainedCheckpointIsResumedFrom(t *testing.T) {
	c, fnet := startOne(t, nil)
	base := c.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "checkpoint_every": 4})
	url := base + "/v1/runs/" + run.ID
	for i := 0; i < 7; i++ { // steps 1..7: automatic checkpoint at 4, 3 steps past it
		mustStatus(t, do(t, "POST", url+"/optim_step", key, nil), 200)
	}
	do(t, "GET", url, key, nil).decode(t, &run)
	if run.Step != 7 || len(run.Checkpoints) != 1 || run.Checkpoints[0].Step != 4 {
		t.Fatalf("run before drain: step %d, checkpoints %+v; want step 7, one checkpoint at 4", run.Step, run.Checkpoints)
	}
	lost := run.Node
	other := "nodeA"
	if lost == other {
		other = "nodeB"
	}
	drained := func(id string, step int) protocol.Checkpoint {
		return protocol.Checkpoint{ID: id, RunID: run.ID, Step: step, Mode: "full", URI: "file:///ck/" + id}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, tc := range []struct {
		name string
		peer string
		cps  []protocol.Checkpoint
		want int
	}{
		{"from a node the run is not on", other, []protocol.Checkpoint{drained("ck-other", 7)}, 0},
		{"older than the run's step", lost, []protocol.Checkpoint{drained("ck-old", 6)}, 0},
		{"unknown run", lost, []protocol.Checkpoint{{ID: "ck-x", RunID: "run-missing", Step: 9, Mode: "full", URI: "file:///x"}}, 0},
		{"the drain checkpoint", lost, []protocol.Checkpoint{drained("ck-drain", 7)}, 1},
		{"the same report again (another coordinator forwarded it)", lost, []protocol.Checkpoint{drained("ck-drain", 7)}, 0},
	} {
		n, err := c.RecordDrained(ctx, tc.peer, tc.cps)
		if err != nil || n != tc.want {
			t.Fatalf("%s: recorded %d, err %v; want %d, nil", tc.name, n, err, tc.want)
		}
	}
	if _, err := c.RecordDrained(ctx, "never-joined", []protocol.Checkpoint{drained("ck-j", 7)}); err == nil {
		t.Fatal("a drain report from a peer that never joined was accepted")
	}
	if _, err := c.RecordDrained(ctx, lost, []protocol.Checkpoint{{RunID: run.ID, Step: 7}}); err == nil {
		t.Fatal("a checkpoint without id and uri was accepted")
	}
	do(t, "GET", url, key, nil).decode(t, &run)
	if len(run.Checkpoints) != 2 || run.Checkpoints[1].ID != "ck-drain" {
		t.Fatalf("checkpoints after the reports: %+v, want the automatic one then ck-drain", run.Checkpoints)
	}

	fnet.setDown(lost, true)
	waitFor(t, 10*time.Second, "run moved", func() bool {
		var cur protocol.Run
		do(t, "GET", url, key, nil).decode(t, &cur)
		run = cur
		return cur.Status == protocol.RunReady && cur.Node != lost
	})
	if run.ResumedFromStep == nil || *run.ResumedFromStep != 7 || run.Step != 7 {
		t.Fatalf("moved run %+v, want resumed from the drained step 7", run)
	}
	mustStatus(t, do(t, "POST", url+"/optim_step", key, nil), 200)
	do(t, "GET", url, key, nil).decode(t, &run)
	if run.Step != 8 {
		t.Fatalf("step after the move and one optim_step: %d, want 8", run.Step)
	}
}

// TestDrainedCheckpointThroughFollower: a follower forwards the report to
// the leader, as it does a node's join.
func TestDrainedCheckpointThroughFollower(t *testing.T) {
	fnet := newFakeNet("nodeA", "nodeB")
	cs := startCluster(t, 3, func(cfg *Config) { cfg.Backend = fnet.backend() })
	leader := leaderOf(cs)
	joinNodes(t, leader, "operator-1", "nodeA", "nodeB")
	base := leader.URL()
	key, _ := createKey(t, base, 1_000_000)
	run := createRun(t, base, key, map[string]any{"base_model": "tiny", "checkpoint_every": 0})
	url := base + "/v1/runs/" + run.ID
	for i := 0; i < 3; i++ {
		mustStatus(t, do(t, "POST", url+"/optim_step", key, nil), 200)
	}
	var follower *Coordinator
	for _, c := range cs {
		if c != leader {
			follower = c
			break
		}
	}
	waitFor(t, 10*time.Second, "follower sees the join", func() bool { return follower.IsJoined(run.Node) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cp := protocol.Checkpoint{ID: "ck-f", RunID: run.ID, Step: 3, Mode: "full", URI: "file:///ck/f"}
	n, err := follower.RecordDrained(ctx, run.Node, []protocol.Checkpoint{cp})
	if err != nil || n != 1 {
		t.Fatalf("through a follower: recorded %d, err %v; want 1", n, err)
	}
	do(t, "GET", url, key, nil).decode(t, &run)
	if len(run.Checkpoints) != 1 || run.Checkpoints[0].ID != "ck-f" {
		t.Fatalf("checkpoints %+v, want ck-f", run.Checkpoints)
	}
}
