package export

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"testing"
)

func sampleGGUF() *ggufFile {
	g := &ggufFile{}
	g.set("general.architecture", "llama")
	g.set("general.name", "sample")
	g.set("a.bool", true)
	g.set("a.u32", uint32(7))
	g.set("a.i32", int32(-7))
	g.set("a.u64", uint64(1<<40))
	g.set("a.f32", float32(1.5))
	g.set("a.strings", []string{"x", "", "▁y"})
	g.set("a.i32s", []int32{1, -2, 3})
	g.set("a.u32s", []uint32{4, 5})
	g.set("a.f32s", []float32{-1000, 0.25})
	vals := func(n int) func() ([]float32, error) {
		return func() ([]float32, error) {
			v := make([]float32, n)
			for i := range v {
				v[i] = float32(i%7) - 3.25
			}
			return v, nil
		}
	}
	g.addTensor("f32", ggmlF32, vals(6), 2, 3)
	g.addTensor("f16", ggmlF16, vals(5), 5)
	g.addTensor("bf16", ggmlBF16, vals(3), 3)
	g.addTensor("q8", ggmlQ8_0, vals(64), 2, 32)
	return g
}

// TestGGUFRoundTrip writes every metadata type and tensor type and reads
// them back with the tests' independent reader.
func TestGGUFRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	if err := sampleGGUF().write(&buf); err != nil {
		t.Fatal(err)
	}
	f, err := readGGUF(buf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"general.architecture": "llama", "a.bool": true, "a.u32": uint32(7), "a.i32": int32(-7),
		"a.u64": uint64(1 << 40), "a.f32": float32(1.5)}
	for k, v := range want {
		if f.kv[k] != v {
			t.Errorf("%s = %#v, want %#v", k, f.kv[k], v)
		}
	}
	if s := f.kv["a.strings"].([]any); len(s) != 3 || s[2] != "▁y" || s[1] != "" {
		t.Errorf("a.strings = %#v", s)
	}
	if s := f.kv["a.f32s"].([]any); s[0] != float32(-1000) {
		t.Errorf("a.f32s = %#v", s)
	}
	if f.keys[0] != "general.architecture" {
		t.Errorf("keys out of order: %v", f.keys)
	}
	src := func(n int) []float32 {
		out := make([]float32, n)
		for i := range out {
			out[i] = float32(i%7) - 3.25
		}
		return out
	}
	for _, c := range []struct {
		name string
		dims []int
		tol  float64
	}{{"f32", []int{3, 2}, 0}, {"f16", []int{5}, 0}, {"bf16", []int{3}, 0}, {"q8", []int{32, 2}, 3.25 / 127 / 2 * 1.001}} {
		tn, ok := f.tensor(c.name)
		if !ok {
			t.Fatalf("tensor %s missing", c.name)
		}
		if len(tn.dims) != len(c.dims) || tn.dims[0] != c.dims[0] {
			t.Errorf("%s dims %v, want %v (innermost first)", c.name, tn.dims, c.dims)
		}
		if tn.offset%ggufAlignment != 0 {
			t.Errorf("%s offset %d unaligned", c.name, tn.offset)
		}
		got := tn.decode()
		want := src(len(got))
		for i := range got {
			if d := math.Abs(float64(got[i] - want[i])); d > c.tol {
				t.Fatalf("%s[%d] = %v, want %v", c.name, i, got[i], want[i])
			}
		}
	}
}

// TestPermuteRows checks the llama q/k permutation against its definition:
// within each head, row 2j+h comes from row h·D/2+j.
func TestPermuteRows(t *testing.T) {
	const heads, d, cols = 3, 8, 5
	w := make([]float32, heads*d*cols)
	for i := range w {
		w[i] = float32(i)
	}
	p := permuteRows(w, heads, cols)
	for hd := 0; hd < heads; hd++ {
		for j := 0; j < d/2; j++ {
			for h := 0; h < 2; h++ {
				for c := 0; c < cols; c++ {
					if got, want := p[((hd*d)+2*j+h)*cols+c], w[((hd*d)+h*d/2+j)*cols+c]; got != want {
						t.Fatalf("head %d row %d col %d = %v, want %v", hd, 2*j+h, c, got, want)
					}
				}
			}
		}
	}
}

// TestWriteFileAtomic: a failed tensor leaves no file and no temporary.
func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	g := sampleGGUF()
	g.addTensor("bad", ggmlF32, func() ([]float32, error) { return make([]float32, 3), nil }, 4)
	path := filepath.Join(dir, "x.gguf")
	if err := g.writeFile(path); err == nil {
		t.Fatal("wrote a tensor of the wrong size")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("left %v behind", entries)
	}
}
