package export

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/signal-p2p/signal/trainer"
)

// ggufPy returns a command running testdata/gguf_check.py with ggml's gguf
// package ($SIGNAL_LLAMACPP/python) on the pinned Python environment.
func ggufPy(t *testing.T) *exec.Cmd {
	t.Helper()
	py := hfPython(t)
	dir := os.Getenv("SIGNAL_LLAMACPP")
	if dir == "" {
		missing(t, "$SIGNAL_LLAMACPP is not set (make test sets it: scripts/llamacpp.sh)")
	}
	if _, err := os.Stat(filepath.Join(dir, "python", "gguf")); err != nil {
		missing(t, "no gguf package under "+dir+": "+err.Error())
	}
	c := exec.Command(py, filepath.Join("testdata", "gguf_check.py"))
	c.Env = append(os.Environ(), "PYTHONPATH="+filepath.Join(dir, "python"))
	return c
}

// wantTensors is what llama.cpp's converter writes for a model of config c
// in dtype dt: name → [type, dims in ggml order].
func wantTensors(c trainer.Config, arch string, dt DType) map[string]string {
	mat := func(in, out int) string {
		t := ggmlOf[dt]
		if t == ggmlQ8_0 && in%q8Block != 0 {
			t = ggmlF16
		}
		return fmt.Sprintf("%v %v", t, []int{in, out})
	}
	vec := func(n int) string { return fmt.Sprintf("F32 %v", []int{n}) }
	hid, inter, V := c.HiddenSize, c.IntermediateSize, c.VocabSize
	hd, kvd := c.NumAttentionHeads*c.HeadDim, c.NumKeyValueHeads*c.HeadDim
	w := map[string]string{"token_embd.weight": mat(hid, V), "output_norm.weight": vec(hid)}
	if !c.TieWordEmbeddings {
		w["output.weight"] = mat(hid, V)
	}
	if c.RopeScaling != nil {
		w["rope_freqs.weight"] = vec(c.HeadDim / 2)
	}
	for i := 0; i < c.NumHiddenLayers; i++ {
		p := fmt.Sprintf("blk.%d.", i)
		w[p+"attn_norm.weight"], w[p+"ffn_norm.weight"] = vec(hid), vec(hid)
		w[p+"attn_q.weight"], w[p+"attn_k.weight"], w[p+"attn_v.weight"] = mat(hid, hd), mat(hid, kvd), mat(hid, kvd)
		w[p+"attn_output.weight"] = mat(hd, hid)
		w[p+"ffn_gate.weight"], w[p+"ffn_up.weight"], w[p+"ffn_down.weight"] = mat(hid, inter), mat(hid, inter), mat(inter, hid)
		if arch == "qwen2" {
			w[p+"attn_q.bias"], w[p+"attn_k.bias"], w[p+"attn_v.bias"] = vec(hd), vec(kvd), vec(kvd)
		}
		if arch == "qwen3" {
			w[p+"attn_q_norm.weight"], w[p+"attn_k_norm.weight"] = vec(c.HeadDim), vec(c.HeadDim)
		}
	}
	return w
}

type pyRead struct {
	KV      map[string]any
	Tensors []struct {
		Name  string
		Shape []int
		Type  string
	}
}

// TestGGUFReadByGGUFPy reads the exported files with ggml's gguf package:
// the metadata llama.cpp needs, llama.cpp's tensor names, shapes and types,
// and, for Q8_0, the bytes themselves: each block is what gguf's quantizer
// (llama.cpp's converter's, bit-exact with ggml's reference) makes of the
// same weights.
func TestGGUFReadByGGUFPy(t *testing.T) {
	ggufPy(t)
	// GGUFReader parses a vocabulary in Python, many seconds a file on
	// this machine, so three families are read: SentencePiece with Q8_0's
	// F16 fallback (signal-tiny), byte-level with rope factors (Llama 3),
	// Qwen's vocabulary padding and q/k norms (Qwen3; its Q8_0 file alone).
	// Qwen2's biases and Mistral's files are checked by llama.cpp running
	// them (TestGGUFGreedyMatchesLlamaCpp).
	for _, f := range families(true) {
		if f.name == "mistral" || f.name == "qwen2" {
			continue
		}
		qwen := f.name == "qwen3"
		t.Run(f.name, func(t *testing.T) {
			tmp := t.TempDir()
			f.build(t, filepath.Join(tmp, "base"))
			m := mustLoad(t, filepath.Join(tmp, "base"))
			c := m.Config()
			arch, _ := ggufArch(c)
			files := map[DType]string{}
			for _, dt := range []DType{F32, Q8_0} {
				files[dt] = filepath.Join(tmp, string(dt)+".gguf")
				if err := WriteGGUF(m, files[dt], GGUFOptions{DType: dt}); err != nil {
					t.Fatal(err)
				}
			}
			adapterFile := filepath.Join(tmp, "adapter.gguf")
			l := randomAdapter(t, m, filepath.Join(tmp, "adapter"), 3, f.name == "qwen3")
			if err := WriteAdapterGGUF(m, l, adapterFile, GGUFOptions{DType: F16}); err != nil {
				t.Fatal(err)
			}
			var ans struct {
				Read map[string]pyRead
				Q8_0 struct {
					Checked int
					Differ  []string
				} `json:"q8_0"`
			}
			req := map[string]any{
				"files": map[string]string{"f32": files[F32], "q8_0": files[Q8_0], "adapter": adapterFile},
				"q8_0":  []string{"f32", "q8_0"},
			}
			dts := []DType{F32, Q8_0}
			if qwen {
				req = map[string]any{"files": map[string]string{"q8_0": files[Q8_0], "adapter": adapterFile}}
				dts = dts[1:]
			}
			runJSON(t, ggufPy(t), req, &ans)
			for _, dt := range dts {
				got := ans.Read[string(dt)]
				want := wantTensors(c, arch, dt)
				for _, tn := range got.Tensors {
					if w, ok := want[tn.Name]; !ok {
						t.Errorf("%s: unexpected tensor %s", dt, tn.Name)
					} else if g := fmt.Sprintf("%s %v", tn.Type, tn.Shape); g != w {
						t.Errorf("%s: %s is %s, want %s", dt, tn.Name, g, w)
					}
					delete(want, tn.Name)
				}
				for n := range want {
					t.Errorf("%s: tensor %s missing", dt, n)
				}
				checkKV(t, got.KV, map[string]any{
					"general.architecture": arch, "general.type": "model", "general.file_type": float64(ggufFileType[dt]),
					arch + ".block_count": float64(c.NumHiddenLayers), arch + ".context_length": float64(c.MaxPositionEmbeddings),
					arch + ".embedding_length": float64(c.HiddenSize), arch + ".feed_forward_length": float64(c.IntermediateSize),
					arch + ".attention.head_count": float64(c.NumAttentionHeads), arch + ".attention.head_count_kv": float64(c.NumKeyValueHeads),
					arch + ".attention.key_length": float64(c.HeadDim), arch + ".rope.freq_base": c.RopeTheta,
				})
				toks, _ := got.KV["tokenizer.ggml.tokens"].(map[string]any)
				if toks == nil || toks["len"] != float64(c.VocabSize) {
					t.Errorf("%s: tokenizer.ggml.tokens %v, want %d tokens", dt, toks, c.VocabSize)
				}
				if got.KV["tokenizer.ggml.model"] == "gpt2" {
					if mg, _ := got.KV["tokenizer.ggml.merges"].(map[string]any); mg == nil || mg["len"].(float64) < 1000 {
						t.Errorf("%s: merges %v", dt, got.KV["tokenizer.ggml.merges"])
					}
				}
			}
			if q := ans.Q8_0; !qwen && (q.Checked == 0 || len(q.Differ) > 0) {
				t.Errorf("Q8_0: %d tensors checked, %d differ from gguf's quantizer: %v", q.Checked, len(q.Differ), q.Differ)
			} else if !qwen {
				t.Logf("Q8_0: %d tensors byte-identical to gguf.quants.quantize", q.Checked)
			}

			ad := ans.Read["adapter"]
			checkKV(t, ad.KV, map[string]any{"general.architecture": arch, "general.type": "adapter", "adapter.type": "lora"})
			if a, _ := ad.KV["adapter.lora.alpha"].(float64); float32(a) != l.Scale()*float32(l.Rank) {
				t.Errorf("adapter.lora.alpha %v, want %v", a, l.Scale()*float32(l.Rank))
			}
			if len(ad.Tensors) != 2*len(l.Pairs()) {
				t.Errorf("adapter has %d tensors, want %d", len(ad.Tensors), 2*len(l.Pairs()))
			}
			for _, tn := range ad.Tensors {
				if tn.Name == "blk.1.ffn_down.weight.lora_b" && fmt.Sprint(tn.Shape) != fmt.Sprint([]int{l.Rank, c.HiddenSize}) {
					t.Errorf("%s shape %v", tn.Name, tn.Shape)
				}
			}
		})
	}
}

func checkKV(t *testing.T, got, want map[string]any) {
	t.Helper()
	for k, w := range want {
		g := got[k]
		if gf, ok := g.(float64); ok {
			if wf, ok := w.(float64); ok && float32(gf) == float32(wf) {
				continue
			}
		}
		if g != w {
			t.Errorf("%s = %v (%T), want %v", k, g, g, w)
		}
	}
}
