package coordinator

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

func TestStorageCost(t *testing.T) {
	for _, c := range []struct {
		bytes, price int64
		d            time.Duration
		want         int64
	}{
		{1_000_000_000, 100, time.Hour, 100},
		{1_000_000_000, 100, 2 * time.Hour, 200},
		{1, 100, time.Second, 1}, // rounds up
		{0, 100, time.Hour, 0},
		{1 << 62, 1 << 40, 1 << 40, 1<<63 - 1},
	} {
		if got := storageCost(c.bytes, c.price, c.d); got != c.want {
			t.Errorf("storageCost(%d, %d, %v) = %d, want %d", c.bytes, c.price, c.d, got, c.want)
		}
	}
}

// TestStorageBilledOverTimeAndCollected is issue 13's eleventh attack:
// save_state is refused at balance 0, storage is billed for as long as a
// checkpoint is kept, and an ended run's checkpoints are collected after
// the retention, then its record pruned.
func TestStorageBilledOverTimeAndCollected(t *testing.T) {
	var mu sync.Mutex
	var deleted []string
	c, _ := startLying(t, func(req protocol.SessionRequest, resp *protocol.SessionResponse) {
		if req.Call == protocol.CallSaveState && resp.Checkpoint != nil {
			resp.Checkpoint.Files = []protocol.CheckpointFile{{Name: "adapter_model.safetensors", CID: "bafk", Size: 1_000_000_000, URI: "file:///ck/bafk"}}
		}
	}, func(cfg *Config) {
		cfg.DeleteCheckpointFiles = func(_ context.Context, uris []string) error {
			mu.Lock()
			defer mu.Unlock()
			deleted = append(deleted, uris...)
			return nil
		}
	})
	base := c.URL()
	broke, _ := createKey(t, base, 1)
	run := createRun(t, base, broke, map[string]any{"base_model": "tiny", "lora_rank": 1, "checkpoint_every": 0})
	mustStatus(t, do(t, "POST", base+"/v1/runs/"+run.ID+"/save_state", broke, map[string]any{"mode": "adapter"}), 402)

	key, _ := createKey(t, base, 100_000_000)
	run = createRun(t, base, key, map[string]any{"base_model": "tiny", "lora_rank": 1, "checkpoint_every": 0})
	mustStatus(t, do(t, "POST", base+"/v1/runs/"+run.ID+"/save_state", key, map[string]any{"mode": "adapter"}), 200)
	t0 := time.Now()
	spent := func() int64 { return accountOf(t, base, key).SpentMicroCredits }
	afterSave := spent()

	ctx := context.Background()
	c.storageTick(ctx, t0.Add(30*time.Minute))
	if got := spent(); got != afterSave {
		t.Fatalf("storage billed inside the first hour: %d", got-afterSave)
	}
	// 1 GB at 100 µc per GB-hour, hours 1 to 3: 200 (+1 for the seconds
	// between the save and t0).
	c.storageTick(ctx, t0.Add(3*time.Hour))
	if got := spent() - afterSave; got < 200 || got > 201 {
		t.Fatalf("storage for hours 1-3 billed %d, want 200", got)
	}
	c.storageTick(ctx, t0.Add(4*time.Hour))
	if got := spent() - afterSave; got < 300 || got > 302 {
		t.Fatalf("storage for hours 1-4 billed %d, want 300", got)
	}

	mustStatus(t, do(t, "DELETE", base+"/v1/runs/"+run.ID, key, nil), 200)
	c.storageTick(ctx, time.Now().Add(c.cfg.CheckpointRetention+time.Hour))
	var got protocol.Run
	do(t, "GET", base+"/v1/runs/"+run.ID, key, nil).decode(t, &got)
	if len(got.Checkpoints) != 0 {
		t.Fatalf("an ended run's checkpoints outlived the retention: %+v", got.Checkpoints)
	}
	mu.Lock()
	n := len(deleted)
	mu.Unlock()
	if n != 2 { // the manifest and its one file
		t.Fatalf("deleted %v, want the checkpoint's manifest and file", deleted)
	}
	c.storageTick(ctx, time.Now().Add(c.cfg.CheckpointRetention+c.cfg.RunRetention+time.Hour))
	mustStatus(t, do(t, "GET", base+"/v1/runs/"+run.ID, key, nil), 404)
}
