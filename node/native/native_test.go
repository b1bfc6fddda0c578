package native

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// modelsDir assembles a models directory holding "tiny-sp" from the
// repository's trainer test data (weights) and tokenizer test data.
func modelsDir(t *testing.T) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	dir := t.TempDir()
	m := filepath.Join(dir, "tiny-sp")
	if err := os.Mkdir(m, 0o755); err != nil {
		t.Fatal(err)
	}
	for dst, src := range map[string]string{
		"config.json":           "trainer/testdata/tiny-sp/config.json",
		"model.safetensors":     "trainer/testdata/tiny-sp/model.safetensors",
		"tokenizer.json":        "trainer/tokenizer/testdata/sentencepiece-bpe/tokenizer.json",
		"tokenizer_config.json": "trainer/tokenizer/testdata/sentencepiece-bpe/tokenizer_config.json",
	} {
		abs := filepath.Join(root, src)
		if _, err := os.Stat(abs); err != nil {
			t.Fatalf("test data %s: %v", src, err)
		}
		if err := os.Symlink(abs, filepath.Join(m, dst)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func call(t *testing.T, mgr *node.Manager, id string, c protocol.Call, body, out any) protocol.SessionResponse {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	resp := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: id, RunID: "run-n", Call: c, Body: b})
	if resp.Error != nil {
		t.Fatalf("%s: %+v", c, *resp.Error)
	}
	if out != nil {
		if err := json.Unmarshal(resp.Body, out); err != nil {
			t.Fatal(err)
		}
	}
	return resp
}

// TestNativeEngineThroughManager trains the tiny model through the node's
// session manager: text examples, optimizer steps with an automatic
// checkpoint, sampling, and a full save/load that restores the exact loss.
func TestNativeEngineThroughManager(t *testing.T) {
	eng, err := New(modelsDir(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	if got := eng.Models(); len(got) != 1 || got[0] != "tiny-sp" {
		t.Fatalf("Models = %v", got)
	}
	st, err := storage.Open("file://"+t.TempDir(), storage.Credentials{})
	if err != nil {
		t.Fatal(err)
	}
	mgr := node.NewManager(node.ManagerConfig{MaxSessions: 4, Storage: st, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, eng)

	call(t, mgr, "i", protocol.CallInit, protocol.SessionSpec{RunID: "run-n", BaseModel: "tiny-sp", LoRARank: 4, LoRAAlpha: 8, Seed: 1, CheckpointEvery: 2}, nil)
	batch := protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{
		{Text: "The quick brown fox jumps over the lazy dog."},
		{Prompt: "Question: 2+2?", Completion: " Answer: 4"},
	}}
	var first, fb protocol.ForwardBackwardResponse
	resp := call(t, mgr, "fb0", protocol.CallForwardBackward, batch, &first)
	if first.Tokens <= 0 || first.GradNorm == nil || *first.GradNorm <= 0 || len(first.Logprobs) != 2 || resp.Usage.TrainTokens != first.Tokens {
		t.Fatalf("forward_backward = %+v usage %+v", first, resp.Usage)
	}
	lr := 5e-2
	var auto *protocol.Checkpoint
	for i := 0; i < 2; i++ {
		if i > 0 {
			call(t, mgr, "fb"+string(rune('a'+i)), protocol.CallForwardBackward, batch, &fb)
		}
		r := call(t, mgr, "os"+string(rune('a'+i)), protocol.CallOptimStep, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}, nil)
		if r.Checkpoint != nil {
			auto = r.Checkpoint
		}
	}
	if auto == nil || auto.Step != 2 || auto.Mode != "full" {
		t.Fatalf("automatic checkpoint = %+v", auto)
	}
	var after protocol.ForwardBackwardResponse
	call(t, mgr, "fwd1", protocol.CallForward, batch, &after)
	if after.LossMean >= first.LossMean {
		t.Fatalf("loss did not fall: %v → %v", first.LossMean, after.LossMean)
	}
	if after.GradNorm != nil {
		t.Fatal("forward returned a grad norm")
	}
	zero := 0.0
	var smp protocol.SampleResponse
	sr := call(t, mgr, "smp", protocol.CallSample, protocol.SampleRequest{Prompts: []protocol.Prompt{{Text: "Once upon a time"}},
		SamplingParams: protocol.SamplingParams{MaxTokens: 5, Temperature: &zero}}, &smp)
	if len(smp.Samples) != 1 || len(smp.Samples[0]) != 1 || len(smp.Samples[0][0].Tokens) == 0 || sr.Usage.SampledTokens == 0 {
		t.Fatalf("sample = %+v", smp)
	}

	// Train one step more, then restore step 2: the forward loss is the
	// one measured at step 2, exactly.
	call(t, mgr, "fb9", protocol.CallForwardBackward, batch, nil)
	call(t, mgr, "os9", protocol.CallOptimStep, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}, nil)
	var state protocol.SessionState
	call(t, mgr, "load", protocol.CallLoadState, protocol.LoadStateRequest{Checkpoint: auto.ID}, &state)
	var restored protocol.ForwardBackwardResponse
	call(t, mgr, "fwd2", protocol.CallForward, batch, &restored)
	if state.Step != 2 || restored.LossSum != after.LossSum {
		t.Fatalf("after load: step %d, loss %v, want step 2, loss %v", state.Step, restored.LossSum, after.LossSum)
	}

	// A second run shares the loaded model.
	b, _ := json.Marshal(protocol.SessionSpec{RunID: "run-2", BaseModel: "tiny-sp", LoRARank: 2})
	if r := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: "i2", RunID: "run-2", Call: protocol.CallInit, Body: b}); r.Error != nil {
		t.Fatal(r.Error)
	}
	if got := eng.Loaded(); len(got) != 1 {
		t.Fatalf("loaded models = %v, want one shared", got)
	}

	// Bad input is a clear invalid_request, and the run goes on.
	bad := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: "bad", RunID: "run-n", Call: protocol.CallForwardBackward,
		Body: []byte(`{"data":[{"model_input":{"tokens":[1,2]},"loss_fn_inputs":{"target_tokens":[99999999,1],"weights":[1,1]}}]}`)})
	if bad.Error == nil || bad.Error.Code != protocol.CodeInvalidRequest {
		t.Fatalf("bad token error = %+v", bad.Error)
	}
	unk := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: "u", RunID: "run-x", Call: protocol.CallInit, Body: []byte(`{"base_model":"../etc"}`)})
	if unk.Error == nil || unk.Error.Code != protocol.CodeUnknownModel {
		t.Fatalf("unknown model error = %+v", unk.Error)
	}
	call(t, mgr, "fwd3", protocol.CallForward, batch, nil)
}

func TestNewErrors(t *testing.T) {
	if _, err := New(filepath.Join(t.TempDir(), "absent"), nil); err == nil {
		t.Fatal("missing models dir accepted")
	}
	eng, err := New(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := eng.Open(context.Background(), protocol.SessionSpec{BaseModel: "nope"}); !errors.Is(err, node.ErrUnknownModel) {
		t.Fatalf("Open unknown = %v", err)
	}
}

func TestFetchMissingModel(t *testing.T) {
	src := filepath.Join(modelsDir(t), "tiny-sp")
	eng, err := New(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	fetches := 0
	eng.Fetch = func(_ context.Context, name, dir string) error {
		fetches++
		if name != "tiny-sp" {
			return fmt.Errorf("%w: %s", node.ErrUnknownModel, name)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		for _, f := range []string{"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} {
			b, err := os.ReadFile(filepath.Join(src, f))
			if err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
				return err
			}
		}
		return nil
	}
	for i := 0; i < 2; i++ {
		s, err := eng.Open(context.Background(), protocol.SessionSpec{BaseModel: "tiny-sp", LoRARank: 2})
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	if fetches != 1 || len(eng.Models()) != 1 {
		t.Fatalf("fetches = %d, models = %v", fetches, eng.Models())
	}
	if _, err := eng.Open(context.Background(), protocol.SessionSpec{BaseModel: "other"}); !errors.Is(err, node.ErrUnknownModel) {
		t.Fatalf("unknown fetch err = %v", err)
	}
}

// TestModelMemory: the engine reports what each model holds before it is
// loaded (from its headers) and after (the loaded model's own figure), in
// the precision it was given, so that the node advertises what placement
// needs: 2 bytes a matrix parameter for the BF16 test model, about 8 in f32.
func TestModelMemory(t *testing.T) {
	dir := modelsDir(t)
	sizes := map[trainer.Precision]int64{}
	for _, prec := range []trainer.Precision{trainer.PrecisionAuto, trainer.PrecisionF32} {
		eng, err := New(dir, nil)
		if err != nil {
			t.Fatal(err)
		}
		eng.Precision = prec
		before := eng.ModelMemory()["tiny-sp"]
		// Adverts ask while a session's open loads the model (the race
		// detector watches this under make test).
		stop := make(chan struct{})
		asked := make(chan struct{})
		go func() {
			defer close(asked)
			for {
				select {
				case <-stop:
					return
				default:
					eng.ModelMemory()
				}
			}
		}()
		m, err := eng.model(context.Background(), "tiny-sp")
		close(stop)
		<-asked
		if err != nil {
			t.Fatal(err)
		}
		after := eng.ModelMemory()["tiny-sp"]
		if after != m.MemoryBytes() || before != after {
			t.Fatalf("precision %q: reported %d before loading, %d after; the model holds %d", prec, before, after, m.MemoryBytes())
		}
		sizes[prec] = after
		if err := eng.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if r := float64(sizes[trainer.PrecisionF32]) / float64(sizes[trainer.PrecisionAuto]); r < 1.9 {
		t.Fatalf("f32 holds %d bytes, BF16 %d: ratio %.2f", sizes[trainer.PrecisionF32], sizes[trainer.PrecisionAuto], r)
	}
}

// TestRandomModelSession: a session on a generated random model (a
// capacity challenge's) trains on a model the node does not serve; two
// nodes given the same seed compute the same loss, another seed another
// one; closing the session deletes the model; a model past the bounds is
// refused by name.
func TestRandomModelSession(t *testing.T) {
	rm := protocol.RandomModel{Seed: 5, HiddenSize: 64, IntermediateSize: 128, Layers: 2, Heads: 4, KVHeads: 2, VocabSize: 512, Context: 128}
	fb := protocol.ForwardBackwardRequest{Data: []protocol.Datum{{ModelInput: protocol.ModelInput{Tokens: []int{5, 6, 7, 8}}}}}
	fb.Data[0].LossFnInputs.TargetTokens = []int{6, 7, 8, 9}
	fb.Data[0].LossFnInputs.Weights = []float64{1, 1, 1, 1}
	loss := func(rm protocol.RandomModel) float64 {
		e, err := New(t.TempDir(), slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			t.Fatal(err)
		}
		tmp := t.TempDir()
		mgr := node.NewManager(node.ManagerConfig{TempDir: tmp}, e)
		spec := protocol.SessionSpec{RunID: "run-n", BaseModel: "random", LoRARank: 4, Seed: 1, RandomModel: &rm}
		call(t, mgr, "i", protocol.CallInit, spec, nil)
		var out protocol.ForwardBackwardResponse
		call(t, mgr, "f", protocol.CallForwardBackward, fb, &out)
		call(t, mgr, "c", protocol.CallClose, struct{}{}, nil)
		left, _ := os.ReadDir(tmp)
		if len(left) != 0 {
			t.Errorf("closed session left %d entries in the node's temp dir", len(left))
		}
		if len(e.Loaded()) != 0 {
			t.Errorf("the generated model stays loaded: %v", e.Loaded())
		}
		return out.LossSum
	}
	a, b := loss(rm), loss(rm)
	rm2 := rm
	rm2.Seed++
	c := loss(rm2)
	if a != b || a == c || a <= 0 {
		t.Fatalf("losses %v, %v (same seed), %v (another)", a, b, c)
	}
	e, err := New(t.TempDir(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	mgr := node.NewManager(node.ManagerConfig{TempDir: t.TempDir()}, e)
	big := rm
	big.VocabSize, big.HiddenSize = 1<<20, 4096
	raw, _ := json.Marshal(protocol.SessionSpec{RunID: "run-n", BaseModel: "random", LoRARank: 4, RandomModel: &big})
	resp := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: "i", RunID: "run-n", Call: protocol.CallInit, Body: raw})
	if resp.Error == nil || resp.Error.Code != protocol.CodeInvalidRequest {
		t.Fatalf("an oversized random model: %+v", resp.Error)
	}
	t.Logf("refused: %s", resp.Error.Message)
}

// TestOutOfMemoryIsRefusedBeforeLoading: a model larger than the memory
// available is refused with out_of_memory (the coordinator places the run
// elsewhere and notes the node's ceiling), and nothing is loaded.
func TestOutOfMemoryIsRefusedBeforeLoading(t *testing.T) {
	e, err := New(modelsDir(t), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	e.Available = func() int64 { return 1 << 10 }
	mgr := node.NewManager(node.ManagerConfig{TempDir: t.TempDir()}, e)
	raw, _ := json.Marshal(protocol.SessionSpec{RunID: "run-n", BaseModel: "tiny-sp", LoRARank: 4})
	resp := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: "i", RunID: "run-n", Call: protocol.CallInit, Body: raw})
	if resp.Error == nil || resp.Error.Code != protocol.CodeOutOfMemory || len(e.Loaded()) != 0 {
		t.Fatalf("init past the available memory: %+v, loaded %v", resp.Error, e.Loaded())
	}
	t.Logf("refused: %s", resp.Error.Message)
	e.Available = nil // the machine's own figure: the tiny model fits
	resp = mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: "j", RunID: "run-n", Call: protocol.CallInit, Body: raw})
	if resp.Error != nil {
		t.Fatalf("init within the machine's memory: %+v", resp.Error)
	}
}
