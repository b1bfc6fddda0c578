package export

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"

	"github.com/signal-p2p/signal/trainer"
	"github.com/signal-p2p/signal/trainer/safetensors"
)

// The real tokenizers the tests give their random models.
var (
	tokSentencePiece = filepath.Join("..", "trainer", "tokenizer", "testdata", "sentencepiece-bpe") // Mistral 7B's, 32000
	tokLlama3        = filepath.Join("..", "trainer", "tokenizer", "testdata", "byte-level-bpe")    // Llama 3's, 128256
	tokQwen3Gz       = filepath.Join("..", "trainer", "tokenizer", "testdata", "extra", "qwen3")    // Qwen 3's, gzipped
)

// qwenTokenizer unpacks Qwen 3's tokenizer into a temporary directory.
func qwenTokenizer(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Open(filepath.Join(tokQwen3Gz, "tokenizer.json.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join(dir, "tokenizer.json"), raw)
	cfg, err := os.ReadFile(filepath.Join(tokQwen3Gz, "tokenizer_config.json"))
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join(dir, "tokenizer_config.json"), cfg)
	return dir
}

func mustWrite(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// family is a small random model of one family the engines serve.
type family struct {
	name string
	cfg  trainer.Config
	tok  string // tokenizer directory, "" for none
	// finalNorm scales model.norm.weight: random N(0, 0.02) weights give
	// logits too flat for a greedy continuation to mean anything, so the
	// tests, like signal-tiny (testnet.finalNormScale), scale it up.
	finalNorm float32
	seed      int64
}

func intp(v int) *int { return &v }

// families returns one model per family served, each with a real
// tokenizer when withTokenizer is set (else a 320-token vocabulary), and
// signal-tiny's shape (testnet.DefaultModelConfig) first.
func families(withTokenizer bool) []family {
	small := func(arch, mt string, vocab int) trainer.Config {
		return trainer.Config{Architectures: []string{arch}, ModelType: mt, HiddenSize: 64, IntermediateSize: 96,
			NumHiddenLayers: 2, NumAttentionHeads: 4, NumKeyValueHeads: 2, VocabSize: vocab, MaxPositionEmbeddings: 4096,
			BOSTokenID: trainer.TokenIDs{1}, EOSTokenID: trainer.TokenIDs{2}, TorchDtype: "float32"}
	}
	tiny := trainer.Config{HiddenSize: 128, IntermediateSize: 344, NumHiddenLayers: 2, NumAttentionHeads: 4,
		NumKeyValueHeads: 2, VocabSize: 32000, MaxPositionEmbeddings: 2048, BOSTokenID: trainer.TokenIDs{1}, EOSTokenID: trainer.TokenIDs{2}}
	llama3 := small("LlamaForCausalLM", "llama", 128256)
	llama3.RopeTheta = 500000
	llama3.RopeScaling = &trainer.RopeScaling{RopeType: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 64}
	llama3.BOSTokenID, llama3.EOSTokenID = trainer.TokenIDs{128000}, trainer.TokenIDs{128001}
	mistral := small("MistralForCausalLM", "mistral", 32000)
	mistral.SlidingWindow = intp(1024)
	mistral.RopeTheta = 1e6
	qwen2 := small("Qwen2ForCausalLM", "qwen2", 151936)
	qwen2.TieWordEmbeddings, qwen2.RopeTheta = true, 1e6
	qwen2.BOSTokenID, qwen2.EOSTokenID = nil, trainer.TokenIDs{151643}
	qwen3 := small("Qwen3ForCausalLM", "qwen3", 151936)
	qwen3.HeadDim, qwen3.TieWordEmbeddings, qwen3.RopeTheta = 32, true, 1e6
	qwen3.BOSTokenID, qwen3.EOSTokenID = nil, trainer.TokenIDs{151645}
	fs := []family{
		{"signal-tiny", tiny, tokSentencePiece, 8, 20240601},
		{"llama3", llama3, tokLlama3, 16, 11},
		{"mistral", mistral, tokSentencePiece, 16, 12},
		{"qwen2", qwen2, "qwen", 16, 13},
		{"qwen3", qwen3, "qwen", 16, 14},
	}
	if !withTokenizer {
		for i := range fs {
			fs[i].tok = ""
			fs[i].cfg.VocabSize = 320
			fs[i].cfg.BOSTokenID, fs[i].cfg.EOSTokenID = trainer.TokenIDs{1}, trainer.TokenIDs{2}
		}
	}
	return fs
}

// build writes f's model into dir.
func (f family) build(t *testing.T, dir string) {
	t.Helper()
	tok := f.tok
	if tok == "qwen" {
		tok = qwenTokenizer(t)
	}
	if err := trainer.GenerateRandomModel(dir, f.cfg, f.seed, tok); err != nil {
		t.Fatal(err)
	}
	if f.finalNorm != 0 && f.finalNorm != 1 {
		scaleTensor(t, dir, "model.norm.weight", f.finalNorm)
	}
}

// scaleTensor rewrites dir/model.safetensors with one tensor multiplied.
func scaleTensor(t *testing.T, dir, name string, k float32) {
	t.Helper()
	path := filepath.Join(dir, "model.safetensors")
	f, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var ts []safetensors.Tensor
	for _, n := range f.Names() {
		data, info, err := f.Float32(n)
		if err != nil {
			t.Fatal(err)
		}
		if n == name {
			for i := range data {
				data[i] *= k
			}
		}
		ts = append(ts, safetensors.Tensor{Name: n, Shape: info.Shape, Data: data, DType: info.DType})
	}
	f.Close()
	if err := safetensors.WriteFile(path, ts, map[string]string{"format": "pt"}); err != nil {
		t.Fatal(err)
	}
}

func mustLoad(t *testing.T, dir string) *trainer.Model {
	t.Helper()
	m, err := trainer.LoadModelWith(dir, trainer.LoadOptions{Precision: trainer.PrecisionF32})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// randomAdapter is a rank-4 adapter on every module of m with random A
// (PEFT's initialisation) and random B of a size that moves the logits as
// much as the base weights do, saved as PEFT files into dir and loaded
// back through trainer.LoadAdapter.
func randomAdapter(t *testing.T, m *trainer.Model, dir string, seed int64, rslora bool) *trainer.LoRA {
	t.Helper()
	l, err := trainer.NewLoRA(m, 4, 8, nil, seed)
	if err != nil {
		t.Fatal(err)
	}
	l.UseRSLoRA = rslora
	rng := rand.New(rand.NewPCG(uint64(seed), 7))
	for _, p := range l.Pairs() {
		for i := range p.B {
			p.B[i] = float32(rng.NormFloat64() * 0.05)
		}
	}
	if err := l.Save(dir); err != nil {
		t.Fatal(err)
	}
	back, err := trainer.LoadAdapter(dir, m)
	if err != nil {
		t.Fatal(err)
	}
	return back
}

// greedy is the native engine's greedy continuation of prompt and, for
// each generated token, the gap between the two largest logits that chose
// it (the engine's own logits for the whole sequence).
func greedy(t *testing.T, m *trainer.Model, prompt []int, n int, l *trainer.LoRA) (tokens []int, margins []float64) {
	t.Helper()
	p := trainer.DefaultSamplingParams()
	p.Temperature, p.MaxTokens = 0, n
	res, err := m.Sample(context.Background(), [][]int{prompt}, 1, p, l)
	if err != nil {
		t.Fatal(err)
	}
	tokens = res[0][0].Tokens
	seq := append(append([]int{}, prompt...), tokens...)
	logits, err := m.Logits(context.Background(), seq, l)
	if err != nil {
		t.Fatal(err)
	}
	V := m.Config().VocabSize
	for j := range tokens {
		row := logits[(len(prompt)-1+j)*V : (len(prompt)+j)*V]
		top := append([]float32{}, row...)
		sort.Slice(top, func(a, b int) bool { return top[a] > top[b] })
		if row[tokens[j]] != top[0] {
			t.Fatalf("greedy token %d (%d) is not the argmax of the engine's own logits", j, tokens[j])
		}
		margins = append(margins, float64(top[0]-top[1]))
	}
	return tokens, margins
}

func maxAbsDiff(a, b []float32) float64 {
	var d float64
	for i := range a {
		d = math.Max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

func maxAbs(a []float32) float64 {
	var d float64
	for _, v := range a {
		d = math.Max(d, math.Abs(float64(v)))
	}
	return d
}

func readF32(t *testing.T, path string) []float32 {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]float32, len(raw)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return out
}

// missing skips a test whose judge is not installed here, and fails it in
// CI, where make test installs every judge (as trainer's references do).
func missing(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("judge missing in CI: %s", why)
	}
	t.Skip(why)
}

// hfPython returns the pinned transformers + PEFT interpreter
// ($SIGNAL_HF_PYTHON, from scripts/pyenv.sh).
func hfPython(t *testing.T) string {
	t.Helper()
	py := os.Getenv("SIGNAL_HF_PYTHON")
	if py == "" {
		missing(t, "$SIGNAL_HF_PYTHON is not set (make test sets it: scripts/pyenv.sh)")
	}
	if err := exec.Command(py, "-c", "import torch, transformers, peft").Run(); err != nil {
		missing(t, py+" cannot import torch, transformers, peft")
	}
	return py
}

// runJSON runs a command with req as JSON on stdin and decodes its answer.
func runJSON(t *testing.T, c *exec.Cmd, req, out any) {
	t.Helper()
	in, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	c.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	raw, err := c.Output()
	if err != nil {
		t.Fatalf("%v: %v\n%s", c.Args, err, stderr.String())
	}
	if err := json.Unmarshal(raw, out); err != nil {
		t.Fatalf("%v answer: %v\n%s", c.Args, err, raw)
	}
}

// hfRef runs trainer/reference/hf_ref.py, the transformers + PEFT oracle
// trainer's tests use.
func hfRef(t *testing.T, py string, req, out any) {
	t.Helper()
	runJSON(t, exec.Command(py, filepath.Join("..", "trainer", "reference", "hf_ref.py")), req, out)
}

// trainedAdapter trains an adapter on m as a run on the testnet does (the
// session a node runs: text examples through trainer.EncodeExample,
// forward_backward and AdamW steps, save_state's PEFT files into dir) and
// loads it back. It is what `make run`'s example leaves behind.
func trainedAdapter(t *testing.T, m *trainer.Model, dir string) *trainer.LoRA {
	t.Helper()
	s, err := trainer.NewSession(m, trainer.SessionConfig{Rank: 8, Alpha: 16, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	data, err := trainer.EncodeExamples(m.Tokenizer(), []trainer.Example{
		{Text: "The cat sat on the mat."},
		{Prompt: "Q: Sky color?\nA:", Completion: " Blue."},
		{Text: "Once upon a time, in a land far away, there lived a quiet fox."},
	})
	if err != nil {
		t.Fatal(err)
	}
	p := trainer.DefaultAdamParams()
	p.LearningRate = 5e-3
	for step := 0; step < 20; step++ {
		if _, err := s.ForwardBackward(context.Background(), data, "cross_entropy", nil); err != nil {
			t.Fatal(err)
		}
		if _, err := s.OptimStep(context.Background(), p); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.SaveState(dir, trainer.SaveAdapter); err != nil {
		t.Fatal(err)
	}
	l, err := trainer.LoadAdapter(dir, m)
	if err != nil {
		t.Fatal(err)
	}
	return l
}
