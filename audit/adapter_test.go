package audit

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

// TestCompareAdapters: the replay's own update is the yardstick; a skipped
// step, a step along another direction and a step too large fail, a
// rounding-sized difference passes, and mismatched tensors fail.
func TestCompareAdapters(t *testing.T) {
	tol := DefaultTolerances()
	pre := Adapters{"a": make([]float32, 100), "b": {1, 1}}
	replay := Adapters{"a": make([]float32, 100), "b": {1.1, 0.9}}
	for i := range replay["a"] {
		replay["a"][i] = float32(0.1 * math.Pow(-1, float64(i)))
	}
	shifted := func(scale float64, flip bool) Adapters {
		out := Adapters{}
		for k, v := range replay {
			w := make([]float32, len(v))
			for i := range v {
				d := float64(v[i] - pre[k][i])
				if flip && k == "a" && i == 0 {
					d = -d
				}
				w[i] = pre[k][i] + float32(scale*d)
			}
			out[k] = w
		}
		return out
	}
	for _, tc := range []struct {
		name    string
		claimed Adapters
		passes  bool
	}{
		{"same", replay, true},
		{"rounding", shifted(1.01, false), true},
		{"one sign in a hundred flipped", shifted(1, true), true},
		{"skipped", pre, false},
		{"five times the step", shifted(5, false), false},
		{"the opposite step", shifted(-1, false), false},
		{"missing tensor", Adapters{"a": replay["a"]}, false},
		{"wrong length", Adapters{"a": replay["a"], "b": {1}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := CompareAdapters(pre, tc.claimed, replay, tol)
			if c.Passed != tc.passes || c.Figures == 0 && tc.passes {
				t.Fatalf("check %+v, want passed %v", c, tc.passes)
			}
			if !c.Passed && !strings.Contains(c.Reason, "adapter") {
				t.Fatalf("reason %q does not name the adapter", c.Reason)
			}
		})
	}
	nan := shifted(1, false)
	nan["a"][0] = float32(math.NaN())
	if c := CompareAdapters(pre, nan, replay, tol); c.Passed {
		t.Fatalf("a NaN adapter passed: %+v", c)
	}
}

// TestDecodeAdapters reads what the engines write (F32 and BF16) and
// refuses what is not a safetensors file.
func TestDecodeAdapters(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "adapter_model.safetensors")
	err := safetensors.WriteFile(path, []safetensors.Tensor{
		{Name: "x.lora_A.weight", Shape: []int{2}, Data: []float32{1.5, -2}},
		{Name: "x.lora_B.weight", Shape: []int{1}, Data: []float32{0.25}, DType: safetensors.BF16},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	a, err := DecodeAdapters(b)
	if err != nil || len(a) != 2 || a["x.lora_A.weight"][1] != -2 || a["x.lora_B.weight"][0] != 0.25 {
		t.Fatalf("decoded %v, %v", a, err)
	}
	for _, bad := range [][]byte{nil, []byte("not a safetensors file"), b[:len(b)-1]} {
		if _, err := DecodeAdapters(bad); err == nil {
			t.Fatalf("%q decoded", bad)
		}
	}
}

func FuzzDecodeAdapters(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("\x02\x00\x00\x00\x00\x00\x00\x00{}"))
	f.Add([]byte("\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}           \x00\x00\x80\x3f"))
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := DecodeAdapters(b)
		if err == nil && a == nil {
			t.Fatal("no adapters and no error")
		}
	})
}
