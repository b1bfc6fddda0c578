package testnet

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

// The unmodified tinker SDK (the version scripts/pyenv.lock pins) against a
// testnet of 3 coordinators and 2 nodes, through a follower (its calls are
// forwarded to the leader, as a client's are when its coordinator is not
// the leader): testdata/tinker_flows.py runs the flows, this test judges
// what they print.

// toksOfFlow is tinker_flows.py's TOKENS.
var toksOfFlow = []int{1, 415, 5255, 3290, 356, 272, 2130, 28723, 1, 415, 5255, 3290, 356, 272, 2130, 28723}

// tinkerPython is the test environment's interpreter when it imports the
// tinker SDK; without it the test skips, or fails in CI.
func tinkerPython(t *testing.T) string {
	t.Helper()
	py := os.Getenv("SIGNAL_HF_PYTHON")
	if py != "" && exec.Command(py, "-c", "import tinker, torch").Run() == nil {
		return py
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("$SIGNAL_HF_PYTHON (%q) does not import tinker and torch (make test sets it: scripts/pyenv.sh)", py)
	}
	t.Skipf("$SIGNAL_HF_PYTHON (%q) does not import tinker and torch", py)
	return ""
}

// tinkerNet starts the testnet and picks a follower for the SDK's base URL.
func tinkerNet(t *testing.T) (*InProcess, string, int) {
	// Batches of more than 2 datums go as chunks in parallel (the SDK's
	// path for batches over 1024 datums), first chunk last.
	tn := startTestnet(t, func(c *Config) { c.Coordinators, c.Nodes, c.TinkerChunkLen = 3, 2, 2 })
	leader := -1
	deadline := time.Now().Add(time.Minute)
	for leader < 0 && time.Now().Before(deadline) {
		for i, c := range tn.Coordinators() {
			if c.Core().IsLeader() {
				leader = i
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if leader < 0 {
		t.Fatal("no leader")
	}
	follower := (leader + 1) % 3
	return tn, tn.Coordinators()[follower].URL(), leader
}

type flowResult map[string]json.RawMessage

// runFlow runs one flow to its end; onPause answers its pauses.
func runFlow(ctx context.Context, t *testing.T, py, flow, base, key string, onPause func(what string)) map[string]flowResult {
	t.Helper()
	cmd := exec.CommandContext(ctx, py, "-W", "ignore", filepath.Join("testdata", "tinker_flows.py"), flow, base, key)
	cmd.Env = append(os.Environ(), "HF_HUB_OFFLINE=1", "TOKENIZERS_PARALLELISM=false", "FLOW_TMP="+t.TempDir(),
		"TINKER_BASE_URL="+base, "TINKER_API_KEY="+key)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	out := map[string]flowResult{}
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "RESULT "):
			var r flowResult
			if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "RESULT ")), &r); err != nil {
				t.Fatalf("flow %s: %q: %v", flow, line, err)
			}
			var what string
			_ = json.Unmarshal(r["what"], &what)
			out[what] = r
		case strings.HasPrefix(line, "PAUSE "):
			onPause(strings.TrimPrefix(line, "PAUSE "))
			_, _ = io.WriteString(stdin, "go\n")
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("flow %s: %v\n%s", flow, err, stderr.String())
	}
	return out
}

func field[T any](t *testing.T, r flowResult, name string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(r[name], &v); err != nil {
		t.Fatalf("field %s of %v: %v", name, r, err)
	}
	return v
}

func TestTinkerSDK(t *testing.T) {
	py := tinkerPython(t)
	tn, base, _ := tinkerNet(t)
	key := "tml-" + tn.Info().APIKey
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	t.Run("supervised", func(t *testing.T) {
		out := runFlow(ctx, t, py, "supervised", base, key, nil)
		info := out["info"]
		if got := field[string](t, info, "model_name"); got != DefaultModelName {
			t.Errorf("get_info model_name %q, want %q", got, DefaultModelName)
		}
		// get_tokenizer resolved the tokenizer get_info named, offline.
		if got := field[string](t, info, "decoded"); !strings.Contains(got, "cat") {
			t.Errorf("the SDK's tokenizer decoded the tokens as %q", got)
		}
		l := out["losses"]
		losses, steps := field[[]float64](t, l, "losses"), field[[]float64](t, l, "steps")
		if len(losses) != 15 || losses[14] > losses[0]/2 {
			t.Errorf("15 pipelined steps: losses %v, want the last below half the first", losses)
		}
		for i, s := range steps {
			if int(s) != i+1 {
				t.Fatalf("optim_step steps %v, want 1..15 in order", steps)
			}
		}
		// The client made from the saved state with its optimizer takes the
		// very steps the first client took after the save.
		r := out["resumed"]
		resumed := field[[]float64](t, r, "losses")
		if !slices.Equal(resumed, losses[10:15]) {
			t.Errorf("resumed with optimizer: %v, the first client after the save: %v (want bit-for-bit)", resumed, losses[10:15])
		}
		// Without the optimizer the weights are the same (same first loss)
		// and the moments fresh (a different second step).
		fresh := field[[]float64](t, r, "fresh")
		if fresh[0] != losses[10] || fresh[1] == losses[11] {
			t.Errorf("loaded without optimizer: %v, with: %v; want the same first loss and another second", fresh, losses[10:12])
		}
		path := field[string](t, l, "path")
		if cps := field[[]string](t, out["checkpoints"], "paths"); !slices.Contains(cps, path) {
			t.Errorf("list_checkpoints %v lacks %s", cps, path)
		}
		if cps := field[[]string](t, out["after_delete"], "paths"); slices.Contains(cps, path) {
			t.Errorf("after delete, list_checkpoints still has %s: %v", path, cps)
		}
		// The checkpoint behind the path is the run's Signal checkpoint.
		c, err := client.New(base, tn.Info().APIKey)
		if err != nil {
			t.Fatal(err)
		}
		runID := strings.Split(strings.TrimPrefix(path, "tinker://"), "/")[0]
		h, err := c.GetRun(ctx, runID)
		if err != nil {
			t.Fatal(err)
		}
		if run := h.Info(); run.Step != 15 || len(run.Checkpoints) == 0 {
			t.Errorf("run %s: step %d, %d checkpoints; want step 15 and the saved checkpoint", runID, h.Info().Step, len(h.Info().Checkpoints))
		}
		// The downloaded adapter is the saved checkpoint's, byte for byte:
		// its CID is the one the run's step-10 checkpoint names.
		var want string
		for _, cp := range h.Info().Checkpoints {
			for _, f := range cp.Files {
				if cp.Step == 10 && f.Name == "adapter_model.safetensors" {
					want = f.CID
				}
			}
		}
		files := field[map[string]string](t, out["download"], "files")
		b, err := os.ReadFile(files["adapter_model.safetensors"])
		if err != nil {
			t.Fatalf("the CLI's download %v: %v", files, err)
		}
		if got := storage.NewCID(b).String(); want == "" || got != want {
			t.Errorf("downloaded adapter_model.safetensors has CID %s, the saved checkpoint's is %q", got, want)
		}
	})

	t.Run("rl", func(t *testing.T) {
		out := runFlow(ctx, t, py, "rl", base, key, nil)
		var seqs []struct {
			Tokens   []int     `json:"tokens"`
			Logprobs []float64 `json:"logprobs"`
		}
		seqs = field[[]struct {
			Tokens   []int     `json:"tokens"`
			Logprobs []float64 `json:"logprobs"`
		}](t, out["samples"], "sequences")
		if len(seqs) != 3 {
			t.Fatalf("3 samples asked, %d answered", len(seqs))
		}
		for _, s := range seqs {
			if len(s.Tokens) != 6 || len(s.Logprobs) != 6 {
				t.Errorf("a sample of max_tokens 6: %d tokens, %d logprobs", len(s.Tokens), len(s.Logprobs))
			}
		}
		rl := out["rl"]
		for _, loss := range []string{"importance_sampling", "ppo", "cispo", "dro"} {
			var r struct {
				Loss     float64     `json:"loss"`
				Logprobs [][]float64 `json:"logprobs"`
			}
			r = field[struct {
				Loss     float64     `json:"loss"`
				Logprobs [][]float64 `json:"logprobs"`
			}](t, rl, loss)
			if math.IsNaN(r.Loss) || len(r.Logprobs) != 3 {
				t.Errorf("%s without weights: loss %v, %d logprob rows", loss, r.Loss, len(r.Logprobs))
			}
			// The RL datums' sampled tokens: the training run's logprobs of
			// them are the sampler's (same weights, before any RL step).
			for i, s := range seqs {
				got := r.Logprobs[i][len(r.Logprobs[i])-6:]
				for j := range got {
					if math.Abs(got[j]-s.Logprobs[j]) > 1e-2 { // decode (cached keys) against a full forward, both f32
						t.Fatalf("%s: datum %d logprob %d is %v, the sampler said %v", loss, i, j, got[j], s.Logprobs[j])
					}
				}
			}
		}
		lp := out["logprobs"]
		fresh, fw := field[[]*float64](t, lp, "fresh"), field[[]float64](t, lp, "forward")
		if len(fresh) != len(fw)+1 || fresh[0] != nil {
			t.Fatalf("compute_logprobs %d values (first %v), forward %d", len(fresh), fresh[0], len(fw))
		}
		for i, v := range fw {
			if fresh[i+1] == nil || *fresh[i+1] != v {
				t.Fatalf("compute_logprobs[%d] = %v, forward's logprob %v: want equal", i+1, fresh[i+1], v)
			}
		}
		// prompt_logprobs_last_n scores the suffix alone.
		last3 := field[[]*float64](t, lp, "last3")
		for i, v := range last3 {
			if (v == nil) != (i < len(last3)-3) || (v != nil && *v != fw[i-1]) {
				t.Fatalf("compute_logprobs(last_n=3)[%d] = %v; want null before the last 3, then forward's", i, v)
			}
		}
		// Top-k prompt logprobs: none at position 0; then 3 tokens, most
		// likely first, the prompt's own token scored as forward scores it
		// where it ranks among them.
		topk := field[[]*[][2]float64](t, lp, "topk")
		if len(topk) != len(fw)+1 || topk[0] != nil {
			t.Fatalf("topk_prompt_logprobs: %d positions (first %v), want %d and none first", len(topk), topk[0], len(fw)+1)
		}
		for p := 1; p < len(topk); p++ {
			row := *topk[p]
			if len(row) != 3 || row[0][1] < row[1][1] || row[1][1] < row[2][1] {
				t.Fatalf("position %d's top 3: %v", p, row)
			}
			if row[0][1] < fw[p-1]-1e-4 {
				t.Errorf("position %d: the most likely token's logprob %v is below the prompt token's %v", p, row[0][1], fw[p-1])
			}
			for _, e := range row {
				if int(e[0]) == toksOfFlow[p] && math.Abs(e[1]-fw[p-1]) > 1e-4 {
					t.Errorf("position %d: the prompt's token %d scored %v among the top 3, %v by forward", p, toksOfFlow[p], e[1], fw[p-1])
				}
			}
		}
		// The sampler saved before the RL step samples the old weights.
		if old := field[[]*float64](t, lp, "sampler"); *old[1] == *fresh[1] {
			t.Errorf("the snapshot sampler's logprobs equal the trained model's after an optimizer step: %v", *old[1])
		}
		cu := out["custom"]
		m := field[map[string]float64](t, cu, "metrics")
		if fl := field[float64](t, cu, "forward_loss"); math.Abs(m["nll:sum"]-fl) > 1e-3*math.Abs(fl) {
			t.Errorf("forward_backward_custom's NLL %v, forward's cross-entropy %v", m["nll:sum"], fl)
		}
		s := out["samplers"]
		live, path := field[[]int](t, s, "live"), field[[]int](t, s, "path")
		if !slices.Equal(live, path) {
			t.Errorf("greedy samples of the same weights: named checkpoint %v, live sampler %v", path, live)
		}
		// The closed session's runs (its model's, its samplers') are ended.
		session, _, _ := strings.Cut(field[string](t, out["closed"], "model_id"), ":")
		c, err := client.New(base, tn.Info().APIKey)
		if err != nil {
			t.Fatal(err)
		}
		runs, err := c.ListRuns(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ended := 0
		for _, r := range runs {
			if strings.HasPrefix(r.Name, session+":") {
				if r.Status != protocol.RunEnded {
					t.Errorf("run %s (%s) of the closed session is %s", r.ID, r.Name, r.Status)
				}
				ended++
			}
		}
		if ended < 2 {
			t.Errorf("%d runs of the closed session found; want its model's and its samplers'", ended)
		}
		// Stopped at the first sampled live[1], which the sample keeps.
		want := live[:slices.Index(live, live[1])+1]
		if stop := field[[]int](t, s, "stop"); !slices.Equal(stop, want) || field[string](t, s, "stop_reason") != "stop" {
			t.Errorf("stop at token id %d: got %v (%s), want %v (stop)", live[1], stop, field[string](t, s, "stop_reason"), want)
		}
	})

	t.Run("errors", func(t *testing.T) {
		out := runFlow(ctx, t, py, "errors", base, key, nil)["errors"]
		for name, want := range map[string]struct {
			typ    string
			status int
			text   string
		}{
			"bad_key":       {"AuthenticationError", 401, "API key is unknown"},
			"unknown_model": {"BadRequestError", 400, "no/such-model"},
			"short_targets": {"BadRequestError", 400, "target_tokens"},
		} {
			var got struct {
				Error   string  `json:"error"`
				Status  int     `json:"status"`
				Message string  `json:"message"`
				Seconds float64 `json:"seconds"`
			}
			if err := json.Unmarshal(out[name], &got); err != nil {
				t.Fatal(err)
			}
			if got.Error != want.typ || got.Status != want.status || !strings.Contains(got.Message, want.text) {
				t.Errorf("%s: %s %d %q, want %s %d naming %q", name, got.Error, got.Status, got.Message, want.typ, want.status, want.text)
			}
		}
	})

	t.Run("poor", func(t *testing.T) {
		c, err := client.New(base, "")
		if err != nil {
			t.Fatal(err)
		}
		k, err := c.CreateKey(ctx, tn.Info().AdminToken, protocol.CreateKeyRequest{Credits: 2})
		if err != nil {
			t.Fatal(err)
		}
		out := runFlow(ctx, t, py, "poor", base, "tml-"+k.APIKey, nil)["poor"]
		var got struct {
			Error   string  `json:"error"`
			Message string  `json:"message"`
			Seconds float64 `json:"seconds"`
		}
		_ = json.Unmarshal(mustJSON(t, out), &got)
		if got.Error == "" || !strings.Contains(got.Message, "balance") {
			t.Errorf("an account of 2 micro-credits: %s %q, want a failure naming the balance", got.Error, got.Message)
		}
	})
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestTinkerSurvives kills the leader, then the run's node, while a
// pipelined SDK loop has calls in flight: the loop finishes, and every
// forward_backward is charged exactly once.
func TestTinkerSurvives(t *testing.T) {
	py := tinkerPython(t)
	tn, base, leader := tinkerNet(t)
	key := "tml-" + tn.Info().APIKey
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, err := client.New(base, tn.Info().APIKey)
	if err != nil {
		t.Fatal(err)
	}
	out := runFlow(ctx, t, py, "survive", base, key, func(what string) {
		switch what {
		case "leader":
			if err := tn.Coordinators()[leader].Stop(); err != nil {
				t.Errorf("stop leader: %v", err)
			}
		case "node":
			runs, err := c.ListRuns(ctx)
			if err != nil || len(runs) != 1 {
				t.Fatalf("runs %v: %v", runs, err)
			}
			i := tn.NodeIndex(runs[0].Node)
			if err := tn.KillNode(i); err != nil {
				t.Errorf("kill node %d: %v", i, err)
			}
		}
	})["survive"]
	losses := field[[]float64](t, out, "losses")
	if len(losses) != 20 || losses[19] > losses[0]/2 {
		t.Errorf("the loop's losses %v: want 20, the last below half the first", losses)
	}
	acct, err := c.Account(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n := map[string]int{}
	for _, ch := range acct.Charges {
		n[ch.Call]++
	}
	if n["forward_backward"] != 20 || n["optim_step"] != 20 {
		t.Errorf("charges by call %v: want 20 forward_backward and 20 optim_step, each charged once", n)
	}
	runs, err := c.ListRuns(ctx)
	if err != nil || len(runs) != 1 {
		t.Fatalf("runs %v: %v", runs, err)
	}
	if r := runs[0]; r.Status != protocol.RunReady || r.ResumedFromStep == nil {
		t.Errorf("run after a node loss: status %s, resumed_from_step %v; want ready, resumed", r.Status, r.ResumedFromStep)
	}
}

// TestTinkerCookbook runs tinker-cookbook's supervised recipe unchanged on
// the cookbook's example conversations and the embedded model, named by its
// Hugging Face-style alias as recipes name models (its tokenizer comes from
// a Hugging Face cache holding the testnet model's tokenizer files: the Hub
// itself cannot be reached here).
func TestTinkerCookbook(t *testing.T) {
	py := tinkerPython(t)
	if exec.Command(py, "-c", "import tinker_cookbook").Run() != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s does not import tinker_cookbook", py)
		}
		t.Skipf("%s does not import tinker_cookbook", py)
	}
	tn := startTestnet(t, func(c *Config) { c.Coordinators, c.Nodes = 1, 1 })
	hf := t.TempDir()
	snap := filepath.Join(hf, "hub", "models--"+strings.ReplaceAll(DefaultModelAlias, "/", "--"), "snapshots", strings.Repeat("0", 40))
	if err := os.MkdirAll(snap, 0o755); err != nil {
		t.Fatal(err)
	}
	refs := filepath.Join(filepath.Dir(filepath.Dir(snap)), "refs")
	if err := os.MkdirAll(refs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(refs, "main"), []byte(strings.Repeat("0", 40)), 0o644); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(tn.Info().Dir, "models", DefaultModelName)
	for _, f := range []string{"config.json", "tokenizer.json", "tokenizer_config.json"} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(snap, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	const steps = 12
	cmd := exec.CommandContext(ctx, py, "-W", "ignore", filepath.Join("testdata", "cookbook_sft.py"),
		tn.Info().Coordinators[0], DefaultModelAlias, t.TempDir(), strconv.Itoa(steps))
	cmd.Env = append(os.Environ(), "HF_HOME="+hf, "HF_HUB_OFFLINE=1", "TOKENIZERS_PARALLELISM=false", "TINKER_API_KEY=tml-"+tn.Info().APIKey)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the cookbook's recipe: %v\n%s", err, lastBytes(out, 4000))
	}
	var res struct {
		NLL         []float64 `json:"nll"`
		Checkpoints []struct {
			StatePath   string `json:"state_path"`
			SamplerPath string `json:"sampler_path"`
		} `json:"checkpoints"`
	}
	for _, line := range strings.Split(string(out), "\n") {
		if r, ok := strings.CutPrefix(line, "RESULT "); ok {
			if err := json.Unmarshal([]byte(r), &res); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(res.NLL) != steps {
		t.Fatalf("the recipe logged %d steps of %d:\n%s", len(res.NLL), steps, lastBytes(out, 4000))
	}
	t.Logf("the recipe's train NLL by step: %.3f", res.NLL)
	first, last := mean(res.NLL[:3]), mean(res.NLL[steps-3:])
	if !(last < first) {
		t.Errorf("the recipe's train NLL %v: the last 3 steps' mean %v is not below the first 3's %v", res.NLL, last, first)
	}
	if len(res.Checkpoints) == 0 || !strings.HasPrefix(res.Checkpoints[len(res.Checkpoints)-1].StatePath, "tinker://") {
		t.Errorf("the recipe's final checkpoint: %+v", res.Checkpoints)
	}
}

func mean(xs []float64) float64 {
	s := 0.0
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

// lastBytes is the end of a command's output, for a failure's message.
func lastBytes(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
