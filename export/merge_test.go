package export

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/signal-p2p/signal/trainer"
)

// Merge tolerances, relative to the largest logit, judged by transformers
// (AutoModelForCausalLM on the merged directory, in float32) against PEFT
// (PeftModel over the base, float32, the adapter unmerged):
//
//   - f32: the merged weights differ from W only by the rounding of
//     W + s·B·A in float32, so the logits differ by summation order, as the
//     engine's own PyTorch comparisons do. Measured: at most 1.3e-6 of the
//     largest logit; the tolerance, 1e-4, leaves two orders of margin.
//   - f16: every merged weight is rounded to 11 significant bits (relative
//     error up to 2⁻¹¹), and so is the base's where it was F32. Measured
//     on these random models: 3e-4 to 1.1e-3; tolerance 5e-3.
//   - bf16: 8 significant bits (up to 2⁻⁸ relative), eight times f16's
//     rounding. Measured: 2.5e-3 to 1.2e-2 (Qwen3 the most, its q/k norms
//     amplifying); tolerance 4e-2. A bf16 merge is as close to base +
//     adapter as a bf16 copy of an F32 base is to that base: the figure is
//     the format's, not the merge's.
var mergeRelTol = map[DType]float64{F32: 1e-4, F16: 5e-3, BF16: 4e-2}

func testTokens(n, vocab, salt int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = (i*7919 + salt*104729 + 13) % vocab
	}
	return out
}

// TestMergeMatchesPEFT merges a random adapter (rsLoRA on Qwen3) into a
// random model of each family, in each dtype and once sharded, and checks
// transformers' logits on the merged directory against PEFT's on base +
// adapter. The merged directory must also load in the native engine.
func TestMergeMatchesPEFT(t *testing.T) {
	py := hfPython(t)
	tmp := t.TempDir()
	type job struct {
		family string
		dtype  DType
		shards bool
		dir    string
	}
	var jobs []job
	var reqs []map[string]any
	fams := families(false)
	tokens := make([][]int, len(fams))
	for i, f := range fams {
		base := filepath.Join(tmp, f.name, "base")
		f.build(t, base)
		m := mustLoad(t, base)
		adapter := filepath.Join(tmp, f.name, "adapter")
		l := randomAdapter(t, m, adapter, f.seed, f.name == "qwen3")
		tokens[i] = testTokens(13, f.cfg.VocabSize, i)
		reqs = append(reqs, map[string]any{"cmd": "logits", "model": base, "adapter": adapter, "tokens": tokens[i],
			"out": filepath.Join(tmp, f.name, "peft.f32")})
		for _, dt := range []DType{F32, F16, BF16} {
			out := filepath.Join(tmp, f.name, "merged-"+string(dt))
			o := MergeOptions{DType: dt}
			shards := dt == F32 && f.name == "llama3"
			if shards {
				o.MaxShardBytes = 64 << 10
			}
			if err := Merge(m, l, out, o); err != nil {
				t.Fatalf("%s %s: %v", f.name, dt, err)
			}
			jobs = append(jobs, job{f.name, dt, shards, out})
			reqs = append(reqs, map[string]any{"cmd": "logits", "model": out, "tokens": tokens[i],
				"out": filepath.Join(out, "logits.f32")})
		}
	}
	var ans struct{ Answers []json.RawMessage }
	hfRef(t, py, map[string]any{"cmd": "batch", "requests": reqs}, &ans)
	for _, j := range jobs {
		t.Run(fmt.Sprintf("%s/%s", j.family, j.dtype), func(t *testing.T) {
			want := readF32(t, filepath.Join(tmp, j.family, "peft.f32"))
			got := readF32(t, filepath.Join(j.dir, "logits.f32"))
			if len(got) != len(want) {
				t.Fatalf("%d logits, PEFT %d", len(got), len(want))
			}
			d, scale := maxAbsDiff(got, want), maxAbs(want)
			t.Logf("max |Δlogit| %.3g of max |logit| %.3g (relative %.3g; tolerance %.0e)", d, scale, d/scale, mergeRelTol[j.dtype])
			if d > mergeRelTol[j.dtype]*scale {
				t.Errorf("merged %s logits differ from PEFT's base + adapter by %.3g, more than %.0e of the largest logit", j.dtype, d, mergeRelTol[j.dtype])
			}
			cfg, err := trainer.ReadConfig(j.dir)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.TorchDtype != torchOf[j.dtype] {
				t.Errorf("config.json torch_dtype %q, want %q", cfg.TorchDtype, torchOf[j.dtype])
			}
			_, err = os.Stat(filepath.Join(j.dir, "model.safetensors.index.json"))
			if j.shards != (err == nil) {
				t.Errorf("sharded: %v, index.json: %v", j.shards, err)
			}
			mustLoad(t, j.dir)
		})
	}
}

// TestMergeRefusals: the output must be new or empty and not the base's
// own directory, and a failed merge leaves nothing behind.
func TestMergeRefusals(t *testing.T) {
	f := families(false)[2]
	tmp := t.TempDir()
	base := filepath.Join(tmp, "base")
	f.build(t, base)
	m := mustLoad(t, base)
	l := randomAdapter(t, m, filepath.Join(tmp, "adapter"), 1, false)
	full := filepath.Join(tmp, "full")
	mustWrite(t, filepath.Join(tmp, "x"), nil)
	if err := os.Mkdir(full, 0o755); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join(full, "keep"), []byte("x"))
	for _, c := range []struct {
		out string
		o   MergeOptions
	}{{base, MergeOptions{}}, {full, MergeOptions{}}, {filepath.Join(tmp, "q8"), MergeOptions{DType: Q8_0}}} {
		if err := Merge(m, l, c.out, c.o); err == nil {
			t.Errorf("merge into %s (%+v) succeeded", c.out, c.o)
		}
	}
	entries, _ := os.ReadDir(tmp)
	if len(entries) != 4 { // base, adapter, full, x: no temporary left
		t.Errorf("left behind: %v", entries)
	}
	empty := filepath.Join(tmp, "empty")
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := Merge(m, nil, empty, MergeOptions{}); err != nil {
		t.Fatalf("merge into an empty directory: %v", err)
	}
}
