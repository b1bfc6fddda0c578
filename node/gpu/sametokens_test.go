package gpu

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/native"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// recordingEngine wraps an engine and records the typed values its sessions
// receive: what each engine is actually asked to compute on.
type recordingEngine struct {
	node.Engine
	mu      sync.Mutex
	data    [][]trainer.Datum
	prompts [][][]int
}

func (e *recordingEngine) Open(ctx context.Context, spec protocol.SessionSpec) (node.Session, error) {
	s, err := e.Engine.Open(ctx, spec)
	if err != nil {
		return nil, err
	}
	return &recordingSession{Session: s, e: e}, nil
}

type recordingSession struct {
	node.Session
	e *recordingEngine
}

func (s *recordingSession) record(data []trainer.Datum) {
	s.e.mu.Lock()
	defer s.e.mu.Unlock()
	s.e.data = append(s.e.data, data)
}

func (s *recordingSession) ForwardBackward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	s.record(data)
	return s.Session.ForwardBackward(ctx, data, loss)
}

func (s *recordingSession) Forward(ctx context.Context, data []trainer.Datum, loss node.Loss) (trainer.ForwardResult, error) {
	s.record(data)
	return s.Session.Forward(ctx, data, loss)
}

func (s *recordingSession) Sample(ctx context.Context, prompts [][]int, num int, p trainer.SamplingParams) ([][]trainer.Sample, error) {
	s.e.mu.Lock()
	s.e.prompts = append(s.e.prompts, prompts)
	s.e.mu.Unlock()
	return s.Session.Sample(ctx, prompts, num, p)
}

// modelsWithTokenizer lays out a models directory with tiny-sp and its real
// SentencePiece tokenizer (BOS 1, EOS 2), linked from the trainer's testdata.
func modelsWithTokenizer(t *testing.T) string {
	t.Helper()
	models := t.TempDir()
	dir := filepath.Join(models, "tiny-sp")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for src, dst := range map[string]string{
		"trainer/testdata/tiny-sp/config.json":                               "config.json",
		"trainer/testdata/tiny-sp/model.safetensors":                         "model.safetensors",
		"trainer/tokenizer/testdata/sentencepiece-bpe/tokenizer.json":        "tokenizer.json",
		"trainer/tokenizer/testdata/sentencepiece-bpe/tokenizer_config.json": "tokenizer_config.json",
	} {
		abs, err := filepath.Abs(filepath.Join("..", "..", src))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(abs, filepath.Join(dir, dst)); err != nil {
			t.Fatal(err)
		}
	}
	return models
}

// TestSameTokensOnEveryEngine sends the same text, prompt/completion and
// token requests through a native node, a worker node and the CLI's data
// reader, and checks that every engine receives identical token ids and
// weights, and computes the same losses; and that text prompts and stop
// strings give the same prompt tokens and the same cut samples.
func TestSameTokensOnEveryEngine(t *testing.T) {
	// The native engine in f32 (not the BF16 file's half engine): this test
	// holds both engines to float32 agreement.
	t.Setenv("SIGNAL_ENGINE_PRECISION", "f32")
	models := modelsWithTokenizer(t)
	ctx := context.Background()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	nat, err := native.New(models, quiet)
	if err != nil {
		t.Fatal(err)
	}
	defer nat.Close()
	engines := map[string]*recordingEngine{
		"native": {Engine: nat},
		"worker": {Engine: mustEngine(t, func(c *Config) { c.ModelsDir = models })},
	}
	spec := protocol.SessionSpec{RunID: "same", BaseModel: "tiny-sp", LoRARank: 4, LoRAAlpha: 8, Seed: 1,
		TargetModules: []string{"q_proj", "v_proj"}}

	examples := []protocol.TextExample{
		{Text: "The cat sat on the mat."},
		{Prompt: "Question: what is two and two?\nAnswer:", Completion: " four"},
		{Completion: "no prompt at all"},
	}
	tokens := protocol.Datum{ModelInput: protocol.ModelInput{Tokens: []int{1, 450, 4996, 17354}},
		LossFnInputs: protocol.LossFnInputs{TargetTokens: []int{450, 4996, 17354, 1701}, Weights: []float64{0, 1, 0.5, 1}}}
	calls := []struct {
		call protocol.Call
		body any
	}{
		{protocol.CallForward, protocol.ForwardBackwardRequest{Examples: examples}},
		{protocol.CallForward, protocol.ForwardBackwardRequest{Data: []protocol.Datum{tokens}}},
		{protocol.CallForwardBackward, protocol.ForwardBackwardRequest{Examples: examples}},
		{protocol.CallSample, protocol.SampleRequest{Prompts: []protocol.Prompt{{Text: "Once upon a time"}, {Tokens: []int{1, 450}}},
			SamplingParams: protocol.SamplingParams{MaxTokens: 12, Temperature: new(0.0), Stop: []string{"e"}}}},
	}
	answers := map[string][]json.RawMessage{}
	for name, e := range engines {
		m := node.NewManager(node.ManagerConfig{Logger: quiet}, e)
		if r := m.Handle(ctx, mustRequest(t, "init", spec.RunID, protocol.CallInit, spec)); r.Error != nil {
			t.Fatalf("%s init: %+v", name, r.Error)
		}
		for i, c := range calls {
			r := m.Handle(ctx, mustRequest(t, name+string(rune('a'+i)), spec.RunID, c.call, c.body))
			if r.Error != nil {
				t.Fatalf("%s %s: %+v", name, c.call, r.Error)
			}
			answers[name] = append(answers[name], r.Body)
		}
	}
	nd, wd := engines["native"].data, engines["worker"].data
	if len(nd) != 3 || !reflect.DeepEqual(nd, wd) {
		t.Fatalf("the engines received different data:\nnative %+v\nworker %+v", nd, wd)
	}
	if np, wp := engines["native"].prompts, engines["worker"].prompts; len(np) != 1 || !reflect.DeepEqual(np, wp) {
		t.Fatalf("the engines received different prompts: native %v worker %v", np, wp)
	}

	// The CLI reads the same examples from a JSONL file.
	m, err := trainer.LoadModel(filepath.Join(models, "tiny-sp"))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var jsonl strings.Builder
	for _, ex := range examples {
		b, _ := json.Marshal(ex)
		jsonl.Write(append(b, '\n'))
	}
	cli, err := trainer.ReadDataJSONL(strings.NewReader(jsonl.String()), m.Tokenizer())
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cli, nd[0]) {
		t.Fatalf("the CLI reads other data than the nodes receive:\ncli  %+v\nnode %+v", cli, nd[0])
	}

	// The BOS/EOS rule (API.md): text has the tokenizer's BOS and no EOS;
	// a prompt's targets weigh 0, the completion ends with EOS and weighs 1.
	tok := m.Tokenizer()
	text, pc, bare := nd[0][0], nd[0][1], nd[0][2]
	if text.Tokens[0] != 1 || slices.Contains(text.TargetTokens, 2) || slices.Contains(text.Weights, 0) {
		t.Errorf("text datum %+v: want BOS first, no EOS, every weight 1", text)
	}
	prompt := tok.Encode(examples[1].Prompt, true)
	if !slices.Equal(pc.Tokens[:len(prompt)], prompt) || pc.TargetTokens[len(pc.TargetTokens)-1] != 2 {
		t.Errorf("prompt/completion datum %+v: want the prompt's own tokens %v first and EOS last", pc, prompt)
	}
	for i, w := range pc.Weights {
		if want := float32(map[bool]int{true: 0, false: 1}[i+1 < len(prompt)]); w != want {
			t.Errorf("prompt/completion weight[%d] = %v, want %v", i, w, want)
		}
	}
	if bare.Tokens[0] != 1 || bare.Weights[0] != 1 {
		t.Errorf("completion without a prompt %+v: want BOS then every target weighted", bare)
	}

	// Same losses (the worker within the agreement test's tolerance) and the
	// same greedy, stop-cut samples.
	for i := range calls {
		var n, w map[string]any
		if err := json.Unmarshal(answers["native"][i], &n); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(answers["worker"][i], &w); err != nil {
			t.Fatal(err)
		}
		if calls[i].call == protocol.CallSample {
			var ns, ws protocol.SampleResponse
			_ = json.Unmarshal(answers["native"][i], &ns)
			_ = json.Unmarshal(answers["worker"][i], &ws)
			cut := 0
			for p := range ns.Samples {
				a, b := ns.Samples[p][0], ws.Samples[p][0]
				if a.StopReason == trainer.StopStop {
					cut++
				}
				if !slices.Equal(a.Tokens, b.Tokens) || a.Text != b.Text || a.StopReason != b.StopReason {
					t.Errorf("sample %d: native %q %v (%s), worker %q %v (%s)", p, a.Text, a.Tokens, a.StopReason, b.Text, b.Tokens, b.StopReason)
				}
			}
			if cut == 0 {
				t.Errorf("no sample stopped at the stop string: %+v", ns.Samples)
			}
			continue
		}
		for _, k := range []string{"loss_sum", "loss_mean", "tokens"} {
			if !near(n[k].(float64), w[k].(float64), 1e-4, 0) {
				t.Errorf("call %d %s: native %v, worker %v", i, k, n[k], w[k])
			}
		}
	}
}

func mustRequest(t *testing.T, id, run string, call protocol.Call, body any) protocol.SessionRequest {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	return protocol.SessionRequest{RequestID: id, RunID: run, Call: call, Body: b}
}
