package coordinator

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

// TestRaftLogIsTheCoordinatorsLog: raft's hclog lines come out of the
// coordinator's slog handler, in its format, with component=raft, raft's
// key/value pairs as attributes, and raft's level filter.
func TestRaftLogIsTheCoordinatorsLog(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug - 4}))
	hl := newRaftLogger(log.With("coordinator", "c1"), hclog.Info).Named("snapshot")
	hl.Debug("below the level")
	hl.With("term", 3).Warn("heartbeat failed", "peer", "c2", "error", errors.New("dial: refused"))
	hl.Error("odd", "key")
	hl.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}).Print("[WARN] raft-net: failed to accept connection")
	var recs []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("line %q is not the handler's JSON: %v", line, err)
		}
		recs = append(recs, m)
	}
	if len(recs) != 3 {
		t.Fatalf("records %v: want 3 (the debug line filtered)", recs)
	}
	want := []map[string]any{
		{"level": "WARN", "msg": "heartbeat failed", "component": "raft", "coordinator": "c1", "raft_logger": "snapshot", "term": 3.0, "peer": "c2", "error": "dial: refused"},
		{"level": "ERROR", "msg": "odd", "extra": "key"},
		{"level": "WARN", "msg": "raft-net: failed to accept connection", "component": "raft"},
	}
	for i, w := range want {
		for k, v := range w {
			if recs[i][k] != v {
				t.Errorf("record %d: %s = %v, want %v (%v)", i, k, recs[i][k], v, recs[i])
			}
		}
	}
	if !hl.IsWarn() || hl.IsDebug() {
		t.Error("level checks disagree with the level")
	}
}
