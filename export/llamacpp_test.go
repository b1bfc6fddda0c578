package export

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/signal-p2p/signal/trainer"
)

// llamaCpp returns the directory scripts/llamacpp.sh installed node-llama-cpp
// into ($SIGNAL_LLAMACPP; make test sets it).
func llamaCpp(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("SIGNAL_LLAMACPP")
	if dir == "" {
		missing(t, "$SIGNAL_LLAMACPP is not set (make test sets it: scripts/llamacpp.sh)")
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "node-llama-cpp")); err != nil {
		missing(t, "no node-llama-cpp under "+dir+": "+err.Error())
	}
	if _, err := exec.LookPath("node"); err != nil {
		missing(t, "node is not installed")
	}
	return dir
}

type llamaJob struct {
	Model     string   `json:"model"`
	Lora      string   `json:"lora,omitempty"`
	Prompts   [][]int  `json:"prompts"`
	MaxTokens int      `json:"max_tokens"`
	Texts     []string `json:"texts,omitempty"`
}

type llamaAns struct {
	Samples [][]int
	Tokens  [][]int
	BOS     *int
	EOS     *int
	AddBOS  bool `json:"add_bos"`
}

// runLlamaCpp runs testdata/llamacpp.mjs: llama.cpp's greedy decoding and
// tokenization of the GGUF files of each job.
func runLlamaCpp(t *testing.T, dir string, jobs []llamaJob) []llamaAns {
	t.Helper()
	c := exec.Command("node", filepath.Join("testdata", "llamacpp.mjs"))
	c.Env = append(os.Environ(), "SIGNAL_LLAMACPP="+dir)
	var ans struct{ Answers []llamaAns }
	runJSON(t, c, map[string]any{"jobs": jobs}, &ans)
	if len(ans.Answers) != len(jobs) {
		t.Fatalf("%d answers to %d jobs", len(ans.Answers), len(jobs))
	}
	return ans.Answers
}

// Greedy decoding on random weights can meet near-ties, where the two
// engines' different (equally correct) float rounding picks different
// tokens. Each continuation is compared token by token up to the first
// position where the engine's own top-two logit gap is under minMargin
// (llama.cpp's F32 products and KV cache differ from Signal's by about
// 1e-5 of a logit; BF16 and F16 files round activations too, about 1e-2),
// and at least minAgree tokens must be compared that way, or the seed is
// a bad one and the test says so.
const (
	greedyTokens = 24
	minAgree     = 12
)

func compareGreedy(t *testing.T, want []int, margins []float64, got []int, minMargin float64, minAgree int) {
	t.Helper()
	n := len(want)
	for j, mg := range margins {
		if mg < minMargin {
			n = j
			break
		}
	}
	if n < minAgree && n < len(want) {
		t.Fatalf("only %d tokens before a near-tie (margins %.3g): choose another seed or prompt", n, margins)
	}
	if len(got) < n {
		t.Fatalf("llama.cpp stopped after %d tokens %v, Signal %v", len(got), got, want)
	}
	for j := 0; j < n; j++ {
		if got[j] != want[j] {
			t.Fatalf("token %d: llama.cpp %v, Signal %v (margin there %.3g)", j, got, want, margins[j])
		}
	}
	minM := 1e9
	for _, m := range margins[:n] {
		minM = min(minM, m)
	}
	same := 0
	for same < len(want) && same < len(got) && got[same] == want[same] {
		same++
	}
	t.Logf("%d/%d greedy tokens compared and equal (up to the first margin < %g; smallest margin compared %.3g); the first %d of %d agree", n, len(want), minMargin, minM, same, len(want))
}

// TestGGUFGreedyMatchesLlamaCpp exports signal-tiny's shape (with an
// adapter trained as a testnet run trains one) and a random model of each
// family (random adapters) to GGUF and checks llama.cpp's greedy continuations
// against the native engine's (Model.Sample at temperature 0): for the base
// model, the base with the adapter GGUF, and the merged model, in F32; for
// signal-tiny also in BF16 and F16. llama.cpp also tokenizes sample texts as
// Signal's tokenizer does.
func TestGGUFGreedyMatchesLlamaCpp(t *testing.T) {
	lc := llamaCpp(t)
	texts := []string{"The cat sat on the mat.", "Hello, world! 12345 héllo\nnew line", "  leading spaces and\ttabs"}
	for _, f := range families(true) {
		t.Run(f.name, func(t *testing.T) {
			tmp := t.TempDir()
			baseDir := filepath.Join(tmp, "base")
			f.build(t, baseDir)
			m := mustLoad(t, baseDir)
			// signal-tiny's adapter is trained as a testnet run trains one;
			// the families' are random (rsLoRA on Qwen3).
			var l *trainer.LoRA
			if f.name == "signal-tiny" {
				l = trainedAdapter(t, m, filepath.Join(tmp, "adapter"))
			} else {
				l = randomAdapter(t, m, filepath.Join(tmp, "adapter"), f.seed, f.name == "qwen3")
			}
			mergedDir := filepath.Join(tmp, "merged")
			if err := Merge(m, l, mergedDir, MergeOptions{DType: F32}); err != nil {
				t.Fatal(err)
			}
			merged := mustLoad(t, mergedDir)

			files := map[string]string{}
			write := func(name string, err error) {
				t.Helper()
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
			}
			for _, dt := range []DType{F32, BF16, F16, Q8_0} {
				if dt != F32 && f.name != "signal-tiny" {
					continue
				}
				files["base-"+string(dt)] = filepath.Join(tmp, "base-"+string(dt)+".gguf")
				write("base", WriteGGUF(m, files["base-"+string(dt)], GGUFOptions{DType: dt}))
			}
			files["adapter"] = filepath.Join(tmp, "adapter.gguf")
			write("adapter", WriteAdapterGGUF(m, l, files["adapter"], GGUFOptions{DType: F32}))
			files["merged"] = filepath.Join(tmp, "merged.gguf")
			write("merged", WriteGGUF(merged, files["merged"], GGUFOptions{DType: F32}))

			tk := m.Tokenizer()
			prompt := tk.Encode("Once upon a time, in a land far away", true)
			baseTok, baseMargins := greedy(t, m, prompt, greedyTokens, nil)
			adTok, adMargins := greedy(t, m, prompt, greedyTokens, l)
			if slices.Equal(baseTok, adTok) {
				t.Fatalf("the adapter leaves the greedy continuation unchanged (%v); the adapter checks prove nothing", baseTok)
			}
			type check struct {
				name, model, lora string
				want              []int
				margins           []float64
				minMargin         float64
				minAgree          int
			}
			cases := []check{
				{"base f32", files["base-f32"], "", baseTok, baseMargins, 1e-3, minAgree},
				{"base+adapter f32", files["base-f32"], files["adapter"], adTok, adMargins, 1e-3, minAgree},
				{"merged f32", files["merged"], "", adTok, adMargins, 1e-3, minAgree},
			}
			if f.name == "signal-tiny" {
				// Q8_0 rounds weights and (in llama.cpp's products)
				// activations to 8 bits: only clear choices are compared.
				cases = append(cases, check{"base bf16", files["base-bf16"], "", baseTok, baseMargins, 0.01, minAgree},
					check{"base f16", files["base-f16"], "", baseTok, baseMargins, 0.01, minAgree},
					check{"base q8_0", files["base-q8_0"], "", baseTok, baseMargins, 0.05, 3})
			}
			var jobs []llamaJob
			for _, c := range cases {
				jobs = append(jobs, llamaJob{Model: c.model, Lora: c.lora, Prompts: [][]int{prompt}, MaxTokens: greedyTokens, Texts: texts})
			}
			answers := runLlamaCpp(t, lc, jobs)
			for i, c := range cases {
				ans := answers[i]
				t.Run(c.name, func(t *testing.T) {
					compareGreedy(t, c.want, c.margins, ans.Samples[0], c.minMargin, c.minAgree)
					if c.name != "base f32" {
						return
					}
					for i, text := range texts {
						if want := tk.Encode(text, false); !slices.Equal(ans.Tokens[i], want) {
							t.Errorf("llama.cpp tokenizes %q as %v, Signal as %v", text, ans.Tokens[i], want)
						}
					}
					wantBOS := len(tk.Encode("a", true)) > len(tk.Encode("a", false))
					if ans.AddBOS != wantBOS {
						t.Errorf("llama.cpp adds BOS: %v, Signal: %v", ans.AddBOS, wantBOS)
					}
					if eos := tk.EOS(); len(eos) > 0 && (ans.EOS == nil || *ans.EOS != eos[0]) {
						t.Errorf("llama.cpp's EOS %v, Signal's %v", ans.EOS, eos)
					}
				})
			}
		})
	}
}
