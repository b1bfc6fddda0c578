package safetensors

import (
	"encoding/binary"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func mustWrite(t *testing.T, path string, tensors []Tensor) {
	t.Helper()
	if err := WriteFile(path, tensors, map[string]string{"format": "pt"}); err != nil {
		t.Fatalf("WriteFile: %v", err)
	}
}

func TestRoundTripF32AndBF16(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "m.safetensors")
	a := []float32{1, -2.5, 3.25, 0, float32(math.Inf(1)), 1e-3}
	b := []float32{0.5, 1.5, -7, 100}
	mustWrite(t, path, []Tensor{
		{Name: "b", Shape: []int{2, 2}, Data: b, DType: BF16},
		{Name: "a", Shape: []int{2, 3}, Data: a},
	})
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.DataOffset%8 != 0 {
		t.Errorf("data offset %d not 8-aligned", f.DataOffset)
	}
	if f.Metadata["format"] != "pt" {
		t.Errorf("metadata = %v", f.Metadata)
	}
	got, info, err := f.Float32("a")
	if err != nil {
		t.Fatal(err)
	}
	if info.DType != F32 || len(info.Shape) != 2 || info.Shape[0] != 2 || info.Shape[1] != 3 {
		t.Errorf("info = %+v", info)
	}
	for i := range a {
		if got[i] != a[i] {
			t.Errorf("a[%d] = %v, want %v", i, got[i], a[i])
		}
	}
	view, ok := f.View("a")
	if !ok || view[2] != 3.25 {
		t.Errorf("View(a) = %v, %v", view, ok)
	}
	if _, ok := f.View("b"); ok {
		t.Error("View of a BF16 tensor must not alias")
	}
	gb, _, err := f.Float32("b")
	if err != nil {
		t.Fatal(err)
	}
	for i := range b { // these values are exact in BF16
		if gb[i] != b[i] {
			t.Errorf("b[%d] = %v, want %v", i, gb[i], b[i])
		}
	}
	if _, _, err := f.Float32("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing tensor: err = %v, want ErrNotFound", err)
	}
}

func TestBF16Rounding(t *testing.T) {
	cases := []struct {
		in   float32
		want uint16
	}{
		{1, 0x3f80},
		{math.Float32frombits(0x3f808000), 0x3f80}, // tie, even stays
		{math.Float32frombits(0x3f818000), 0x3f82}, // tie, odd rounds up
		{math.Float32frombits(0x3f808001), 0x3f81},
		{-2, 0xc000},
	}
	for _, c := range cases {
		if got := Float32ToBF16(c.in); got != c.want {
			t.Errorf("Float32ToBF16(%#x) = %#x, want %#x", math.Float32bits(c.in), got, c.want)
		}
	}
}

func TestHalfToFloat32(t *testing.T) {
	cases := map[uint16]float32{
		0x3c00: 1, 0xc000: -2, 0x7bff: 65504, 0x0001: float32(math.Ldexp(1, -24)),
		0x0000: 0, 0x3555: 0.333251953125, 0x0200: float32(math.Ldexp(1, -15)),
	}
	for h, want := range cases {
		if got := HalfToFloat32(h); got != want {
			t.Errorf("HalfToFloat32(%#x) = %v, want %v", h, got, want)
		}
	}
	if !math.IsInf(float64(HalfToFloat32(0x7c00)), 1) || !math.IsNaN(float64(HalfToFloat32(0x7e00))) {
		t.Error("inf/NaN conversion wrong")
	}
}

func header(js string, data int) []byte {
	buf := make([]byte, 8+len(js)+data)
	binary.LittleEndian.PutUint64(buf, uint64(len(js)))
	copy(buf[8:], js)
	return buf
}

func TestParseHeaderRejects(t *testing.T) {
	cases := map[string][]byte{
		"short":           {1, 2, 3},
		"huge length":     append(binary.LittleEndian.AppendUint64(nil, 1<<40), '{', '}'),
		"past end":        append(binary.LittleEndian.AppendUint64(nil, 100), '{', '}'),
		"not json":        header(`{"a":`, 0),
		"not object":      header(`[1,2]`, 0),
		"unknown dtype":   header(`{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}`, 4),
		"shape mismatch":  header(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}`, 4),
		"beyond data":     header(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, 4),
		"gap":             header(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, 8),
		"overlap":         header(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, 4),
		"trailing data":   header(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, 8),
		"negative dim":    header(`{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}`, 4),
		"bad offsets len": header(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}`, 4),
		"bad metadata":    header(`{"__metadata__":{"a":1}}`, 0),
	}
	for name, buf := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := ParseHeader(buf, int64(len(buf))); !errors.Is(err, ErrInvalid) {
				t.Errorf("err = %v, want ErrInvalid", err)
			}
		})
	}
}

func TestOpenTruncated(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "m.safetensors")
	mustWrite(t, path, []Tensor{{Name: "w", Shape: []int{64}, Data: make([]float32, 64)}})
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{0, 5, 12, len(raw) - 1} {
		p := filepath.Join(dir, "t.safetensors")
		if err := os.WriteFile(p, raw[:n], 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := Open(p)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "t.safetensors") {
			t.Errorf("truncated to %d: err = %v, want ErrInvalid naming the file", n, err)
		}
	}
}

func TestOpenDirSharded(t *testing.T) {
	dir := t.TempDir()
	mustWrite(t, filepath.Join(dir, "model-00001-of-00002.safetensors"), []Tensor{{Name: "x", Shape: []int{1}, Data: []float32{7}}})
	mustWrite(t, filepath.Join(dir, "model-00002-of-00002.safetensors"), []Tensor{{Name: "y", Shape: []int{1}, Data: []float32{9}}})
	idx := `{"metadata":{},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}`
	if err := os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(idx), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f, _, ok := s.Lookup("y")
	if !ok {
		t.Fatal("y not found")
	}
	v, _, err := f.Float32("y")
	if err != nil || v[0] != 9 {
		t.Errorf("y = %v, %v", v, err)
	}
	if got := s.Names(); len(got) != 2 {
		t.Errorf("Names = %v", got)
	}
	bad := `{"weight_map":{"z":"model-00001-of-00002.safetensors"}}`
	if err := os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenDir(dir); !errors.Is(err, ErrNotFound) {
		t.Errorf("index naming a missing tensor: err = %v, want ErrNotFound", err)
	}
	if _, err := OpenDir(t.TempDir()); !errors.Is(err, ErrNotFound) {
		t.Errorf("empty dir: err = %v, want ErrNotFound", err)
	}
}

func FuzzParseHeader(f *testing.F) {
	f.Add(header(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, 4))
	f.Add(header(`{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,1],"data_offsets":[0,4]}}`, 4))
	f.Add(header(`{}`, 0))
	f.Fuzz(func(t *testing.T, buf []byte) {
		h, err := ParseHeader(buf, int64(len(buf)))
		if err != nil {
			return
		}
		// Whatever passes must be convertible without going out of bounds.
		for _, ti := range h.Tensors {
			b := buf[h.DataOffset+ti.Begin : h.DataOffset+ti.End]
			dst := make([]float32, ti.NumElements())
			if err := Convert(dst, b, ti.DType); err != nil && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("valid header but Convert failed: %v", err)
			}
		}
	})
}

func TestReadF16(t *testing.T) {
	// 1, -2, 0.5, 65504 as IEEE half, little-endian.
	halves := []uint16{0x3c00, 0xc000, 0x3800, 0x7bff}
	data := make([]byte, 0, 8)
	for _, h := range halves {
		data = binary.LittleEndian.AppendUint16(data, h)
	}
	buf := header(`{"h":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}`, 0)
	buf = append(buf, data...)
	path := filepath.Join(t.TempDir(), "h.safetensors")
	if err := os.WriteFile(path, buf, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, _, err := f.Float32("h")
	if err != nil {
		t.Fatal(err)
	}
	want := []float32{1, -2, 0.5, 65504}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("h[%d] = %v, want %v", i, got[i], want[i])
		}
	}
	if _, ok := f.View("h"); ok {
		t.Error("an F16 tensor must not be viewed as f32")
	}
}
