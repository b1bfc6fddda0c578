package export

import (
	"bytes"
	"context"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/node/hub"
	"github.com/signal-p2p/signal/node/hub/hubtest"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/testnet"
	"github.com/signal-p2p/signal/trainer"
)

// lockedBuffer collects the testnet's log lines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]byte(nil), l.b.Bytes()...)
}

// TestTestnetWeightsOut is issue 20's end to end: signal-tiny trained
// through a real (in-process) testnet — the SDK's text examples, 20 steps,
// save_state — leaves the network as a PEFT adapter pushed to a local Hub
// (and downloaded back from it), a merged Hugging Face directory, a GGUF
// pair (base + adapter) and a merged GGUF. Each is run by its real
// consumer — PEFT on the base and transformers on the merged directory
// (hf_ref.py), llama.cpp on the GGUF files — and must continue the prompt
// greedily as the network's own sample call at temperature 0 does. The
// Hub token must be in no raft log or snapshot, no log line and no file of
// the network.
func TestTestnetWeightsOut(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a testnet and trains for 20 steps")
	}
	py := hfPython(t)
	lc := llamaCpp(t)
	const token = "hf_testnet_push_token_5b1e"
	h := hubtest.Start(t)
	h.Token = token
	t.Setenv("HF_ENDPOINT", h.URL) // the coordinators' pushes go to the local Hub

	logs := &lockedBuffer{}
	cfg := testnet.DefaultConfig()
	cfg.Coordinators, cfg.Nodes = 1, 1
	cfg.Dir = t.TempDir()
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tn, err := testnet.StartInProcess(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tn.Stop() })
	info := tn.Info()
	c, err := client.NewCluster(info.Coordinators, info.APIKey)
	if err != nil {
		t.Fatal(err)
	}

	// Train as a testnet run trains (export's trainedAdapter does the same
	// locally): text examples, AdamW at 5e-3, 20 steps.
	alpha := 16.0
	run, err := c.CreateRun(ctx, protocol.CreateRunRequest{BaseModel: testnet.DefaultModelName, LoRARank: intp(8), LoRAAlpha: &alpha, CheckpointEvery: intp(0)})
	if err != nil {
		t.Fatal(err)
	}
	defer run.Close(context.Background())
	examples := []protocol.TextExample{
		{Text: "The cat sat on the mat."},
		{Prompt: "Q: Sky color?\nA:", Completion: " Blue."},
		{Text: "Once upon a time, in a land far away, there lived a quiet fox."},
	}
	lr := 5e-3
	for step := 0; step < 20; step++ {
		if _, err := run.ForwardBackward(ctx, protocol.ForwardBackwardRequest{Examples: examples, LossFn: "cross_entropy"}); err != nil {
			t.Fatal(err)
		}
		if _, err := run.OptimStep(ctx, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}); err != nil {
			t.Fatal(err)
		}
	}
	saved, pushed, err := run.SaveAndPush(ctx, protocol.SaveStateRequest{Mode: "adapter"},
		protocol.PushRequest{Repo: "alice/signal-tiny-lora", Token: token})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("checkpoint %s pushed: %s", saved.Checkpoint.ID, pushed.CommitURL)

	// The network's own greedy continuation.
	baseDir := filepath.Join(info.Dir, "models", testnet.DefaultModelName)
	m := mustLoad(t, baseDir)
	prompt := m.Tokenizer().Encode("Once upon a time, in a land far away", true)
	zero := 0.0
	sr, err := run.Sample(ctx, protocol.SampleRequest{Prompts: []protocol.Prompt{{Tokens: prompt}},
		SamplingParams: protocol.SamplingParams{MaxTokens: greedyTokens, Temperature: &zero}})
	if err != nil {
		t.Fatal(err)
	}
	network := sr.Samples[0][0].Tokens

	// The PEFT adapter, downloaded back from the Hub, is the checkpoint's.
	tmp := t.TempDir()
	adapterDir := filepath.Join(tmp, "hub-adapter")
	if _, err := (&hub.Client{Token: token}).Download(ctx, "alice/signal-tiny-lora", "", adapterDir, func(string) bool { return true }); err != nil {
		t.Fatal(err)
	}
	st, err := storage.Open(info.StorageURL, storage.Credentials{})
	if err != nil {
		t.Fatal(err)
	}
	storeDir := filepath.Join(tmp, "store-adapter")
	if err := os.MkdirAll(storeDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := (storage.Resolver{Default: st}).Fetch(ctx, saved.Checkpoint.URI, storeDir); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"adapter_config.json", "adapter_model.safetensors"} {
		a, _ := os.ReadFile(filepath.Join(adapterDir, name))
		b, _ := os.ReadFile(filepath.Join(storeDir, name))
		if len(a) == 0 || !bytes.Equal(a, b) {
			t.Fatalf("%s from the Hub differs from the checkpoint's", name)
		}
	}

	// The engine's margins for the comparisons, and a check that the
	// network's continuation is the engine's with this adapter.
	l, err := trainer.LoadAdapter(adapterDir, m)
	if err != nil {
		t.Fatal(err)
	}
	want, margins := greedy(t, m, prompt, greedyTokens, l)
	if !slices.Equal(want, network) {
		t.Fatalf("the network's greedy continuation %v is not the engine's with the pushed adapter %v", network, want)
	}
	if baseTok, _ := greedy(t, m, prompt, greedyTokens, nil); slices.Equal(baseTok, want) {
		t.Fatalf("the trained adapter leaves the continuation unchanged (%v): the checks prove nothing", want)
	}

	// The other three exports.
	mergedDir := filepath.Join(tmp, "merged")
	if err := Merge(m, l, mergedDir, MergeOptions{DType: F32}); err != nil {
		t.Fatal(err)
	}
	baseGGUF, adapterGGUF, mergedGGUF := filepath.Join(tmp, "base.gguf"), filepath.Join(tmp, "adapter.gguf"), filepath.Join(tmp, "merged.gguf")
	if err := WriteGGUF(m, baseGGUF, GGUFOptions{DType: F32}); err != nil {
		t.Fatal(err)
	}
	if err := WriteAdapterGGUF(m, l, adapterGGUF, GGUFOptions{DType: F32}); err != nil {
		t.Fatal(err)
	}
	if err := WriteGGUF(mustLoad(t, mergedDir), mergedGGUF, GGUFOptions{DType: F32}); err != nil {
		t.Fatal(err)
	}

	var hf struct {
		Answers []struct {
			Samples []struct{ Tokens []int }
		}
	}
	hfRef(t, py, map[string]any{"cmd": "batch", "requests": []map[string]any{
		{"cmd": "greedy", "model": baseDir, "adapter": adapterDir, "prompts": [][]int{prompt}, "max_tokens": greedyTokens},
		{"cmd": "greedy", "model": mergedDir, "prompts": [][]int{prompt}, "max_tokens": greedyTokens},
	}}, &hf)
	llama := runLlamaCpp(t, lc, []llamaJob{
		{Model: baseGGUF, Lora: adapterGGUF, Prompts: [][]int{prompt}, MaxTokens: greedyTokens},
		{Model: mergedGGUF, Prompts: [][]int{prompt}, MaxTokens: greedyTokens},
	})
	for _, c := range []struct {
		name string
		got  []int
	}{
		{"PEFT on the base, the adapter from the Hub", hf.Answers[0].Samples[0].Tokens},
		{"transformers on the merged directory", hf.Answers[1].Samples[0].Tokens},
		{"llama.cpp on the base and adapter GGUF", llama[0].Samples[0]},
		{"llama.cpp on the merged GGUF", llama[1].Samples[0]},
	} {
		t.Run(c.name, func(t *testing.T) { compareGreedy(t, network, margins, c.got, 1e-3, minAgree) })
	}

	// The token was used for the push and kept nowhere: not in the raft
	// log or a snapshot, the nodes' data, the checkpoint store, the logs.
	if bytes.Contains(logs.Bytes(), []byte(token)) {
		t.Error("the Hub token is in the testnet's logs")
	}
	if err := tn.Stop(); err != nil {
		t.Fatal(err)
	}
	err = filepath.WalkDir(info.Dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() { // directories, and the nodes' links to the model
			return err
		}
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(token)) {
			t.Errorf("the Hub token is in %s", p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if lines := bytes.Count(logs.Bytes(), []byte("\n")); lines == 0 || !bytes.Contains(logs.Bytes(), []byte("checkpoint pushed")) {
		t.Fatalf("the logs (%d lines) do not record the push: the check above proves nothing", lines)
	}
	var card bytes.Buffer
	card.Write(h.Repo("alice/signal-tiny-lora").Files[hub.CardFile])
	for _, want := range []string{saved.Checkpoint.ID, "| rank | 8", "| steps | 20 |"} {
		if !bytes.Contains(card.Bytes(), []byte(want)) {
			t.Errorf("the model card lacks %q", want)
		}
	}
}
