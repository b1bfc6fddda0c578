package trainer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

var tinyModels = []string{"tiny-sp", "tiny-bl"}

// mustLoad loads a test model in f32, whatever its file holds: the oracle
// tests hold the f32 engine to f32 tolerances (half_engine_test.go tests
// the half engine).
func mustLoad(t testing.TB, name string) *Model {
	t.Helper()
	m, err := LoadModelWith(modelDir(name), LoadOptions{Precision: PrecisionF32})
	if err != nil {
		t.Fatalf("LoadModel(%s): %v", name, err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func mustAdapter(t testing.TB, m *Model, name string) *LoRA {
	t.Helper()
	l, err := LoadAdapter(filepath.Join("testdata", name, "adapter"), m)
	if err != nil {
		t.Fatalf("LoadAdapter(%s): %v", name, err)
	}
	return l
}

func TestLoadModelFusesWeights(t *testing.T) {
	for _, name := range tinyModels {
		t.Run(name, func(t *testing.T) {
			m := mustLoad(t, name)
			c := m.Config()
			set, err := safetensors.OpenDir(filepath.Join("testdata", name))
			if err != nil {
				t.Fatal(err)
			}
			defer set.Close()
			get := func(n string) []float32 {
				f, _, ok := set.Lookup(n)
				if !ok {
					t.Fatalf("%s missing", n)
				}
				v, _, err := f.Float32(n)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
			hid := c.HiddenSize
			hd, kvd := c.NumAttentionHeads*c.HeadDim, c.NumKeyValueHeads*c.HeadDim
			ly := m.Layers[1]
			checks := []struct {
				name string
				got  []float32
			}{
				{"model.layers.1.self_attn.q_proj.weight", ly.WQKV[:hd*hid]},
				{"model.layers.1.self_attn.k_proj.weight", ly.WQKV[hd*hid : (hd+kvd)*hid]},
				{"model.layers.1.self_attn.v_proj.weight", ly.WQKV[(hd+kvd)*hid:]},
				{"model.layers.1.mlp.gate_proj.weight", ly.WGateUp[:c.IntermediateSize*hid]},
				{"model.layers.1.mlp.up_proj.weight", ly.WGateUp[c.IntermediateSize*hid:]},
				{"model.layers.1.mlp.down_proj.weight", ly.WDown},
				{"model.norm.weight", m.Norm},
			}
			for _, ch := range checks {
				want := get(ch.name)
				if len(want) != len(ch.got) {
					t.Fatalf("%s: len %d, want %d", ch.name, len(ch.got), len(want))
				}
				for i := range want {
					if want[i] != ch.got[i] {
						t.Fatalf("%s[%d] = %v, want %v", ch.name, i, ch.got[i], want[i])
					}
				}
			}
			if c.TieWordEmbeddings != (&m.LMHead[0] == &m.Embed[0]) {
				t.Errorf("tied=%v but LMHead aliasing disagrees", c.TieWordEmbeddings)
			}
			if m.MemoryBytes() <= 0 {
				t.Errorf("MemoryBytes = %d", m.MemoryBytes())
			}
		})
	}
}

// copyModel copies a test model's files into a temp dir so a test can break them.
func copyModel(t *testing.T, name string) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"config.json", "model.safetensors"} {
		raw, err := os.ReadFile(filepath.Join("testdata", name, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), raw, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestLoadModelErrors(t *testing.T) {
	t.Run("truncated weights", func(t *testing.T) {
		dir := copyModel(t, "tiny-bl")
		p := filepath.Join(dir, "model.safetensors")
		if err := os.Truncate(p, 5000); err != nil {
			t.Fatal(err)
		}
		_, err := LoadModel(dir)
		if !errors.Is(err, safetensors.ErrInvalid) || !strings.Contains(err.Error(), "model.safetensors") {
			t.Errorf("err = %v", err)
		}
	})
	t.Run("wrong shape", func(t *testing.T) {
		dir := copyModel(t, "tiny-bl")
		cfg, _ := os.ReadFile(filepath.Join(dir, "config.json"))
		cfg = []byte(strings.Replace(string(cfg), `"intermediate_size": 96`, `"intermediate_size": 97`, 1))
		os.WriteFile(filepath.Join(dir, "config.json"), cfg, 0o644)
		_, err := LoadModel(dir)
		if !errors.Is(err, ErrInvalidInput) || !strings.Contains(err.Error(), "mlp.down_proj.weight") {
			t.Errorf("err = %v", err)
		}
	})
	t.Run("unsupported architecture", func(t *testing.T) {
		dir := copyModel(t, "tiny-bl")
		cfg, _ := os.ReadFile(filepath.Join(dir, "config.json"))
		cfg = []byte(strings.NewReplacer(`"LlamaForCausalLM"`, `"GPT2LMHeadModel"`, `"model_type": "llama"`, `"model_type": "gpt2"`).Replace(string(cfg)))
		os.WriteFile(filepath.Join(dir, "config.json"), cfg, 0o644)
		if _, err := LoadModel(dir); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "GPT2LMHeadModel") {
			t.Errorf("err = %v", err)
		}
	})
	t.Run("missing weights", func(t *testing.T) {
		dir := copyModel(t, "tiny-bl")
		os.Remove(filepath.Join(dir, "model.safetensors"))
		if _, err := LoadModel(dir); !errors.Is(err, safetensors.ErrNotFound) {
			t.Errorf("err = %v", err)
		}
	})
	t.Run("missing dir", func(t *testing.T) {
		if _, err := LoadModel(filepath.Join(t.TempDir(), "nope")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("err = %v", err)
		}
	})
}

func TestConfigRopeLlama3(t *testing.T) {
	raw := `{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,
	"num_attention_heads":2,"vocab_size":10,"rope_theta":500000,"eos_token_id":[1,2],
	"rope_scaling":{"rope_type":"llama3","factor":32,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":8192}}`
	c, err := ParseConfig([]byte(raw))
	if err != nil {
		t.Fatal(err)
	}
	if c.HeadDim != 32 || c.NumKeyValueHeads != 2 || len(c.EOSTokenID) != 2 {
		t.Errorf("defaults not applied: %+v", c)
	}
	inv := c.InvFreq()
	plain := Config{HeadDim: 32, RopeTheta: 500000}.InvFreq()
	// Highest frequency untouched, lowest divided by the factor.
	if inv[0] != plain[0] {
		t.Errorf("inv[0] = %v, want %v", inv[0], plain[0])
	}
	if got, want := inv[15], plain[15]/32; got != want {
		t.Errorf("inv[15] = %v, want %v", got, want)
	}
	if _, err := ParseConfig([]byte(strings.Replace(raw, `"llama3"`, `"yarn"`, 1))); !errors.Is(err, ErrUnsupported) {
		t.Errorf("yarn: err = %v", err)
	}
}

func TestAdapterLoadSaveRoundTrip(t *testing.T) {
	for _, name := range tinyModels {
		t.Run(name, func(t *testing.T) {
			m := mustLoad(t, name)
			l := mustAdapter(t, m, name)
			if l.Rank != 4 || l.Alpha != 8 || l.Scale() != 2 || !l.Targets(ModO) || l.Targets(ModGate) {
				t.Fatalf("adapter = rank %d alpha %v targets %v", l.Rank, l.Alpha, l.TargetModules)
			}
			dir := t.TempDir()
			if err := l.Save(dir); err != nil {
				t.Fatal(err)
			}
			back, err := LoadAdapter(dir, m)
			if err != nil {
				t.Fatal(err)
			}
			a, b := l.Pairs(), back.Pairs()
			if len(a) != len(b) || len(a) != 8 {
				t.Fatalf("pairs %d vs %d", len(a), len(b))
			}
			for i := range a {
				for j := range a[i].A {
					if a[i].A[j] != b[i].A[j] {
						t.Fatalf("pair %d A[%d] differs", i, j)
					}
				}
				for j := range a[i].B {
					if a[i].B[j] != b[i].B[j] {
						t.Fatalf("pair %d B[%d] differs", i, j)
					}
				}
			}
		})
	}
}

func TestNewLoRA(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	l1, err := NewLoRA(m, 8, 16, nil, 7)
	if err != nil {
		t.Fatal(err)
	}
	l2, _ := NewLoRA(m, 8, 16, nil, 7)
	if len(l1.TargetModules) != 7 {
		t.Errorf("default targets = %v", l1.TargetModules)
	}
	p1, p2 := l1.Pairs(), l2.Pairs()
	bound := float32(1 / 8.0) // 1/sqrt(64)
	for i := range p1 {
		for j := range p1[i].A {
			if p1[i].A[j] != p2[i].A[j] {
				t.Fatal("same seed gave different A")
			}
			if v := p1[i].A[j]; v < -bound || v > bound {
				t.Fatalf("A value %v outside ±%v", v, bound)
			}
		}
		for _, v := range p1[i].B {
			if v != 0 {
				t.Fatal("B must start at zero")
			}
		}
	}
	if _, err := NewLoRA(m, 0, 16, nil, 1); !errors.Is(err, ErrInvalidInput) {
		t.Errorf("rank 0: err = %v", err)
	}
	if _, err := NewLoRA(m, 4, 16, []string{"lm_head"}, 1); !errors.Is(err, ErrInvalidInput) {
		t.Errorf("bad target: err = %v", err)
	}
}

func TestLoadAdapterErrors(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	src := filepath.Join("testdata", "tiny-sp", "adapter")
	mk := func(t *testing.T, cfg string, weights bool) string {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "adapter_config.json"), []byte(cfg), 0o644)
		if weights {
			raw, _ := os.ReadFile(filepath.Join(src, "adapter_model.safetensors"))
			os.WriteFile(filepath.Join(dir, "adapter_model.safetensors"), raw, 0o644)
		}
		return dir
	}
	good, _ := os.ReadFile(filepath.Join(src, "adapter_config.json"))
	cases := map[string]struct {
		cfg     string
		weights bool
		want    error
	}{
		"dora":         {strings.Replace(string(good), `"r": 4`, `"r": 4, "use_dora": true`, 1), true, ErrUnsupported},
		"wrong rank":   {strings.Replace(string(good), `"r": 4`, `"r": 8`, 1), true, ErrInvalidInput},
		"more targets": {strings.Replace(string(good), `"o_proj"`, `"o_proj", "up_proj"`, 1), true, ErrInvalidInput},
		"no weights":   {string(good), false, ErrInvalidInput},
		"bad json":     {"{", true, ErrInvalidInput},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := LoadAdapter(mk(t, c.cfg, c.weights), m); !errors.Is(err, c.want) {
				t.Errorf("err = %v, want %v", err, c.want)
			}
		})
	}
}

// A sharded checkpoint (model.safetensors.index.json + shards) loads to the
// same weights as the single file.
func TestLoadModelSharded(t *testing.T) {
	src := filepath.Join("testdata", "tiny-bl")
	single := mustLoad(t, "tiny-bl")
	f, err := safetensors.Open(filepath.Join(src, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dir := t.TempDir()
	var shards [2][]safetensors.Tensor
	index := map[string]string{}
	for i, name := range f.Names() {
		data, info, err := f.Float32(name)
		if err != nil {
			t.Fatal(err)
		}
		shards[i%2] = append(shards[i%2], safetensors.Tensor{Name: name, Shape: info.Shape, Data: data, DType: safetensors.BF16})
		index[name] = fmt.Sprintf("model-%05d-of-00002.safetensors", i%2+1)
	}
	for i, ts := range shards {
		if err := safetensors.WriteFile(filepath.Join(dir, fmt.Sprintf("model-%05d-of-00002.safetensors", i+1)), ts, nil); err != nil {
			t.Fatal(err)
		}
	}
	raw, _ := json.Marshal(map[string]any{"metadata": map[string]any{}, "weight_map": index})
	os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), raw, 0o644)
	cfg, _ := os.ReadFile(filepath.Join(src, "config.json"))
	os.WriteFile(filepath.Join(dir, "config.json"), cfg, 0o644)
	singleHalf, err := LoadModel(src)
	if err != nil {
		t.Fatal(err)
	}
	defer singleHalf.Close()
	for _, p := range []struct {
		prec   Precision
		single *Model
	}{{PrecisionF32, single}, {PrecisionAuto, singleHalf}} {
		sharded, err := LoadModelWith(dir, LoadOptions{Precision: p.prec})
		if err != nil {
			t.Fatal(err)
		}
		defer sharded.Close()
		toks := testTokens(6, p.single.Config().VocabSize, 3)
		a, _ := p.single.Logits(context.Background(), toks, nil)
		b, err := sharded.Logits(context.Background(), toks, nil)
		if err != nil {
			t.Fatal(err)
		}
		for i := range a {
			if a[i] != b[i] {
				t.Fatalf("precision %q: logit %d: sharded %v, single %v", p.prec, i, b[i], a[i])
			}
		}
	}
}
