package gpu

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/signal-p2p/signal/audit"
	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/native"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// pythonWithTorch returns the interpreter the worker runs on in these
// tests: $SIGNAL_HF_PYTHON (the pinned torch 2.x environment make test
// builds, the torch GPU nodes run, with SDPA), else $SIGNAL_PYTHON (default
// /usr/bin/python3, Debian's torch 1.13). Without torch the test is
// skipped, or fails under CI=true.
func pythonWithTorch(t *testing.T) string {
	t.Helper()
	return pythonsWithTorch(t)[0]
}

// pythonsWithTorch returns every distinct interpreter above that imports
// torch, torch 2.x first: the worker's own suite runs on each, so it keeps
// working on the 1.13 some nodes still have.
func pythonsWithTorch(t *testing.T) []string {
	t.Helper()
	legacy := os.Getenv("SIGNAL_PYTHON")
	if legacy == "" {
		legacy = "/usr/bin/python3"
	}
	var out []string
	for _, py := range []string{os.Getenv("SIGNAL_HF_PYTHON"), legacy} {
		if py == "" || slices.Contains(out, py) {
			continue
		}
		if err := exec.Command(py, "-c", "import torch").Run(); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s cannot import torch (CI=true): %v", py, err)
			}
			t.Logf("%s cannot import torch: %v", py, err)
			continue
		}
		out = append(out, py)
	}
	if len(out) == 0 {
		t.Skip("no interpreter with torch")
	}
	return out
}

// mustModelsDir builds a models directory holding "tiny-sp": the trainer's
// tiny test model with the SentencePiece tokenizer beside it.
func mustModelsDir(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	dst := filepath.Join(root, "tiny-sp")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	links := map[string]string{
		"config.json":           "../../trainer/testdata/tiny-sp/config.json",
		"model.safetensors":     "../../trainer/testdata/tiny-sp/model.safetensors",
		"tokenizer.json":        "../../trainer/tokenizer/testdata/sentencepiece-bpe/tokenizer.json",
		"tokenizer_config.json": "../../trainer/tokenizer/testdata/sentencepiece-bpe/tokenizer_config.json",
	}
	for name, src := range links {
		abs, err := filepath.Abs(src)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(abs); err != nil {
			t.Fatalf("test model file: %v", err)
		}
		if err := os.Symlink(abs, filepath.Join(dst, name)); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func mustEngine(t *testing.T, mutate func(*Config)) *Engine {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Python = pythonWithTorch(t)
	cfg.Threads = 1
	cfg.ModelsDir = mustModelsDir(t)
	// scripts/gpu-check.sh runs these tests on a GPU: SIGNAL_GPU_DEVICE=cuda:0
	// (and SIGNAL_GPU_DTYPE=float32 for the strict native agreement).
	if d := os.Getenv("SIGNAL_GPU_DEVICE"); d != "" {
		cfg.Device = d
		cfg.NVMLGPUs = 1
	}
	cfg.DType = os.Getenv("SIGNAL_GPU_DTYPE")
	cfg.HealthInterval = 200 * time.Millisecond
	cfg.InitialBackoff = 50 * time.Millisecond
	cfg.MaxBackoff = 500 * time.Millisecond
	if mutate != nil {
		mutate(&cfg)
	}
	e, err := NewEngine(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.Start(ctx); err != nil {
		_ = e.Stop()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return e
}

func mustDo(t *testing.T, s node.Session, call protocol.Call, body any, out any) protocol.Usage {
	t.Helper()
	raw, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := node.Compute(context.Background(), s, call, raw)
	if err != nil {
		t.Fatalf("%s: %v", call, err)
	}
	usage := resp.Usage
	if out != nil {
		if err := json.Unmarshal(resp.Body, out); err != nil {
			t.Fatalf("%s: decode %s: %v", call, resp.Body, err)
		}
	}
	return usage
}

func spec(run string) protocol.SessionSpec {
	return protocol.SessionSpec{RunID: run, BaseModel: "tiny-sp", LoRARank: 4, LoRAAlpha: 8, Seed: 1,
		TargetModules: []string{"q_proj", "v_proj"}}
}

func TestEngineSessionLifecycle(t *testing.T) {
	e := mustEngine(t, nil)
	want := BackendCPUTorch
	if e.cfg.Device != "cpu" {
		want = BackendCUDA
	}
	if got := e.Backend(); got != want {
		t.Fatalf("Backend() = %q, want %q", got, want)
	}
	ctx := context.Background()
	s, err := e.Open(ctx, spec("run-1"))
	if err != nil {
		t.Fatal(err)
	}
	other, err := e.Open(ctx, spec("run-2"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	// Text examples are tokenized here: the prompt's targets weigh 0.
	fbReq := protocol.ForwardBackwardRequest{Examples: []protocol.TextExample{
		{Prompt: "The capital of France is", Completion: " Paris."},
		{Text: "Once upon a time there was a cat."},
	}}
	var fb protocol.ForwardBackwardResponse
	usage := mustDo(t, s, protocol.CallForwardBackward, fbReq, &fb)
	if fb.GradNorm == nil || *fb.GradNorm <= 0 || fb.LossSum <= 0 || len(fb.Logprobs) != 2 {
		t.Fatalf("forward_backward = %+v", fb)
	}
	if usage.TrainTokens != fb.Tokens || fb.Tokens < 10 {
		t.Fatalf("usage %+v for %d tokens", usage, fb.Tokens)
	}
	var fwd protocol.ForwardBackwardResponse
	mustDo(t, s, protocol.CallForward, fbReq, &fwd)
	if fwd.GradNorm != nil || fwd.LossSum != fb.LossSum {
		t.Fatalf("forward = %+v, want loss %v and no grad_norm", fwd, fb.LossSum)
	}

	var st protocol.OptimStepResponse
	lr := 0.05
	mustDo(t, s, protocol.CallOptimStep, protocol.OptimStepRequest{AdamParams: &protocol.AdamParams{LearningRate: &lr}}, &st)
	if st.Step != 1 || st.LearningRate != lr || st.GradNorm != *fb.GradNorm {
		t.Fatalf("optim_step = %+v", st)
	}
	var after protocol.ForwardBackwardResponse
	mustDo(t, s, protocol.CallForward, fbReq, &after)
	if after.LossSum >= fb.LossSum {
		t.Fatalf("loss %v after a step, was %v", after.LossSum, fb.LossSum)
	}

	// Sampling: text prompt, greedy, then a stop string taken from the
	// greedy text itself so that it must cut there.
	zero := 0.0
	var smp protocol.SampleResponse
	sreq := protocol.SampleRequest{Prompts: []protocol.Prompt{{Text: "Hello"}},
		SamplingParams: protocol.SamplingParams{MaxTokens: 12, Temperature: &zero}}
	usage = mustDo(t, s, protocol.CallSample, sreq, &smp)
	g := smp.Samples[0][0]
	if len(g.Tokens) == 0 || len(g.Logprobs) != len(g.Tokens) || g.Text == "" || usage.SampledTokens != int64(len(g.Tokens)) {
		t.Fatalf("sample = %+v usage %+v", g, usage)
	}
	runes := []rune(g.Text)
	if len(runes) > 4 {
		stop := string(runes[len(runes)/2 : len(runes)/2+2])
		sreq.SamplingParams.Stop = []string{stop}
		mustDo(t, s, protocol.CallSample, sreq, &smp)
		c := smp.Samples[0][0]
		if c.StopReason != "stop" || strings.Contains(c.Text, stop) || !strings.HasPrefix(g.Text, c.Text) || len(c.Tokens) > len(g.Tokens) {
			t.Fatalf("stop %q: got %+v from greedy %+v", stop, c, g)
		}
	}

	// Full state round trip through a directory into the other session.
	dir := t.TempDir()
	if err := s.SaveState(ctx, dir, "full"); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("save_state full: %v", err)
		}
	}
	if err := other.LoadState(ctx, dir); err != nil {
		t.Fatal(err)
	}
	if other.Step() != 1 || s.Step() != 1 {
		t.Fatalf("steps after load: %d (saved session %d), want 1", other.Step(), s.Step())
	}
	var same protocol.ForwardBackwardResponse
	mustDo(t, other, protocol.CallForward, fbReq, &same)
	if same.LossSum != after.LossSum {
		t.Fatalf("restored session loss %v, saved session %v", same.LossSum, after.LossSum)
	}

	h, err := e.Supervisor().Health(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if h.Sessions != 2 || len(h.Models) != 1 {
		t.Fatalf("health %+v: want 2 sessions on 1 shared model", h)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := node.Compute(ctx, s, protocol.CallForward, []byte(`{"data":[{"model_input":{"tokens":[1]},"loss_fn_inputs":{"target_tokens":[2]}}]}`)); !errors.Is(err, ErrClosed) {
		t.Fatalf("call after close: %v, want ErrClosed", err)
	}
}

func TestEngineBadInput(t *testing.T) {
	e := mustEngine(t, nil)
	ctx := context.Background()
	if _, err := e.Open(ctx, protocol.SessionSpec{RunID: "x", BaseModel: "../etc"}); !errors.Is(err, node.ErrUnknownModel) {
		t.Fatalf("bad model name: %v", err)
	}
	if _, err := e.Open(ctx, protocol.SessionSpec{RunID: "x", BaseModel: "missing"}); !errors.Is(err, node.ErrUnknownModel) {
		t.Fatalf("missing model: %v", err)
	}
	bad := spec("bad")
	bad.TargetModules = []string{"lm_head"}
	if _, err := e.Open(ctx, bad); !errors.Is(err, node.ErrInvalidRequest) || !strings.Contains(err.Error(), "lm_head") {
		t.Fatalf("bad target: %v", err)
	}
	s, err := e.Open(ctx, spec("run"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cases := []struct {
		call protocol.Call
		body string
		want string
	}{
		{protocol.CallForwardBackward, `{"data":[{"model_input":{"tokens":[1,2]},"loss_fn_inputs":{"target_tokens":[2,99999],"weights":[1,1]}}]}`, "target_tokens[1]"},
		{protocol.CallForwardBackward, `{"data":[], "bogus": 1}`, "bogus"},
		{protocol.CallOptimStep, `{}`, "no accumulated gradients"},
		{protocol.CallOptimStep, `{"adam_params":{"beta2":1.5}}`, "beta2"},
		{protocol.CallSample, `{"prompts":[{"tokens":[1]}],"sampling_params":{"max_tokens":4,"top_k":-7}}`, "top_k"},
		{protocol.CallSample, `{"prompts":[{}],"sampling_params":{"max_tokens":4}}`, "prompts[0]"},
		{protocol.CallSaveState, `{}`, "save_state"},
		{"explode", `{}`, "explode"},
	}
	for _, c := range cases {
		_, err := node.Compute(ctx, s, c.call, []byte(c.body))
		if !errors.Is(err, node.ErrInvalidRequest) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s %s: err %v, want ErrInvalidRequest naming %q", c.call, c.body, err, c.want)
		}
	}
	if err := s.SaveState(ctx, t.TempDir(), "everything"); !errors.Is(err, node.ErrInvalidRequest) || !strings.Contains(err.Error(), "mode") {
		t.Errorf("save_state bad mode: %v", err)
	}
	if err := s.LoadState(ctx, t.TempDir()); !errors.Is(err, node.ErrInvalidRequest) || !strings.Contains(err.Error(), "adapter_config.json") {
		t.Errorf("load_state of an empty dir: %v", err)
	}
	if s.Step() != 0 {
		t.Errorf("step %d after rejected calls", s.Step())
	}
}

func TestSupervisorRestartsCrashedWorker(t *testing.T) {
	e := mustEngine(t, nil)
	ctx := context.Background()
	s, err := e.Open(ctx, spec("r"))
	if err != nil {
		t.Fatal(err)
	}
	h, _ := e.Supervisor().LastHealth()
	gen := e.Supervisor().Generation()
	if err := syscall.Kill(h.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for e.Supervisor().Generation() == gen || !e.Supervisor().Ready() {
		if time.Now().After(deadline) {
			t.Fatal("worker was not restarted within a minute")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if e.Supervisor().Restarts() != 1 {
		t.Fatalf("restarts = %d, want 1", e.Supervisor().Restarts())
	}
	if h2, _ := e.Supervisor().LastHealth(); h2.PID == h.PID {
		t.Fatal("same worker pid after restart")
	}
	// The old session's state died with the worker: it says so, and the run
	// can be reopened on the new worker.
	if _, err := node.Compute(ctx, s, protocol.CallForward, []byte(`{"data":[{"model_input":{"tokens":[1]},"loss_fn_inputs":{"target_tokens":[2]}}]}`)); !errors.Is(err, ErrSessionLost) || !errors.Is(err, node.ErrUnavailable) {
		t.Fatalf("call on a lost session: %v, want ErrSessionLost", err)
	}
	_ = s.Close()
	s2, err := e.Open(ctx, spec("r"))
	if err != nil {
		t.Fatal(err)
	}
	_ = s2.Close()
}

func TestSupervisorStopAndFailedStart(t *testing.T) {
	py := pythonWithTorch(t)
	cfg := DefaultConfig()
	cfg.Python = py
	cfg.Device = "cuda:7" // no such device here (or on CI): the worker exits at once
	cfg.StartTimeout = 3 * time.Second
	cfg.InitialBackoff = 20 * time.Millisecond
	cfg.MaxBackoff = 100 * time.Millisecond
	sup, err := NewSupervisor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	err = sup.Start(context.Background())
	if h, ok := sup.LastHealth(); ok && h.Backend == BackendCUDA {
		t.Skip("this machine has a cuda:7")
	}
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("start on a missing device: %v, want ErrUnavailable", err)
	}
	if _, err := sup.Call(context.Background(), protocol.SessionRequest{Call: "health"}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("call while down: %v", err)
	}
	// Start gave up waiting; the loop keeps retrying in the background.
	deadline := time.Now().Add(time.Minute)
	for sup.Restarts() < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("restarts = %d after a minute: the supervisor should keep retrying", sup.Restarts())
		}
		time.Sleep(50 * time.Millisecond)
	}
	dir := sup.runDir
	if err := sup.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("run dir %s left behind: %v", dir, err)
	}
}

func TestConfigValidate(t *testing.T) {
	for name, mut := range map[string]func(*Config){
		"python":  func(c *Config) { c.Python = "" },
		"device":  func(c *Config) { c.Device = "tpu" },
		"dtype":   func(c *Config) { c.DType = "int8" },
		"threads": func(c *Config) { c.Threads = -1 },
		"backoff": func(c *Config) { c.MaxBackoff = c.InitialBackoff / 2 },
		"health":  func(c *Config) { c.HealthFailures = 0 },
	} {
		c := DefaultConfig()
		mut(&c)
		if err := c.Validate(); !errors.Is(err, ErrInvalidInput) {
			t.Errorf("%s: Validate() = %v, want ErrInvalidInput", name, err)
		}
	}
	c := DefaultConfig()
	if err := c.Validate(); err != nil {
		t.Fatalf("default config: %v", err)
	}
}

// TestEngineRefusesOtherFamilies: the worker computes only what the model
// check admits, so a directory it refuses — here Llama weights under a
// Qwen2 architecture name, whose names disagree — is neither advertised nor
// opened. (Before the check, the worker took any config.json and once
// trained Qwen directories as a different model: no biases, no q/k norms.)
func TestEngineRefusesOtherFamilies(t *testing.T) {
	models := mustModelsDir(t)
	src := filepath.Join(models, "tiny-sp")
	dst := filepath.Join(models, "qwen-like")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(src, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	raw = []byte(strings.ReplaceAll(string(raw), "LlamaForCausalLM", "Qwen2ForCausalLM"))
	if err := os.WriteFile(filepath.Join(dst, "config.json"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(src, "model.safetensors"), filepath.Join(dst, "model.safetensors")); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Python = pythonWithTorch(t)
	cfg.ModelsDir = models
	e, err := NewEngine(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := e.Models(); !slices.Contains(got, "tiny-sp") || slices.Contains(got, "qwen-like") {
		t.Fatalf("advertised %v, want tiny-sp and not qwen-like", got)
	}
	if _, err := e.ModelDir("qwen-like"); !errors.Is(err, ErrInvalidInput) || !strings.Contains(err.Error(), "Qwen2ForCausalLM") {
		t.Fatalf("ModelDir(qwen-like): %v, want an invalid-input error naming the architecture", err)
	}
}

// TestOpenDirMatchesNative: a capacity challenge's random model, generated
// by the node into a directory of its own, opens on the worker as on the
// native engine, and the challenge's training step agrees within the
// audit tolerances (the challenge is verified across engines).
func TestOpenDirMatchesNative(t *testing.T) {
	e := mustEngine(t, nil)
	dir := t.TempDir()
	cfg := trainer.Config{HiddenSize: 64, IntermediateSize: 128, NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2,
		VocabSize: 512, MaxPositionEmbeddings: 128, BOSTokenID: trainer.TokenIDs{1}, EOSTokenID: trainer.TokenIDs{2}}
	if err := trainer.GenerateRandomModel(dir, cfg, 9, ""); err != nil {
		t.Fatal(err)
	}
	spec := protocol.SessionSpec{RunID: "challenge", BaseModel: "random", LoRARank: 4, LoRAAlpha: 8, TargetModules: []string{"q_proj", "v_proj"}, Seed: 3}
	nat, err := native.New(t.TempDir(), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	fb := protocol.ForwardBackwardRequest{Data: []protocol.Datum{{ModelInput: protocol.ModelInput{Tokens: []int{5, 6, 7, 8, 9}}}}}
	fb.Data[0].LossFnInputs.TargetTokens = []int{6, 7, 8, 9, 10}
	fb.Data[0].LossFnInputs.Weights = []float64{1, 1, 1, 1, 1}
	var answers [2]protocol.ForwardBackwardResponse
	for i, o := range []node.DirOpener{e, nat} {
		s, err := o.OpenDir(context.Background(), dir, spec)
		if err != nil {
			t.Fatal(err)
		}
		mustDo(t, s, protocol.CallForwardBackward, fb, &answers[i])
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if c := audit.CompareForward(answers[0], answers[1], true, audit.DefaultTolerances()); !c.Passed {
		t.Fatalf("worker and native disagree on the challenge: %s", c.Reason)
	}
	// LoadedModels is the worker's last health report (every 200 ms here):
	// wait for one after the close.
	deadline := time.Now().Add(10 * time.Second)
	for len(e.LoadedModels()) != 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if len(e.LoadedModels()) != 0 {
		t.Errorf("the worker still holds %v 10 s after the session closed", e.LoadedModels())
	}
}
