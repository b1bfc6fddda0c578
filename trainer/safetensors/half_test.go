package safetensors

import (
	"math"
	"testing"
)

// TestFloat32ToHalf checks every half: each converts back to itself, and
// the f32 halfway between two neighbours rounds to the even one (or to
// infinity past the largest), as numpy's astype(float16) rounds.
func TestFloat32ToHalf(t *testing.T) {
	for h := 0; h < 1<<16; h++ {
		f := HalfToFloat32(uint16(h))
		if math.IsNaN(float64(f)) {
			if g := Float32ToHalf(f); g&0x7c00 != 0x7c00 || g&0x3ff == 0 {
				t.Fatalf("NaN %#04x -> %#04x", h, g)
			}
			continue
		}
		if g := Float32ToHalf(f); g != uint16(h) {
			t.Fatalf("%#04x (%v) -> %#04x", h, f, g)
		}
		if h&0x7fff >= 0x7c00 {
			continue
		}
		next := HalfToFloat32(uint16(h + 1))
		mid := float32((float64(f) + float64(next)) / 2)
		want := uint16(h)
		if h&1 == 1 {
			want = uint16(h + 1)
		}
		if h&0x7fff == 0x7bff { // 65504: halfway to 65536 rounds to infinity
			want = uint16(h&0x8000 | 0x7c00)
		}
		if g := Float32ToHalf(mid); g != want {
			t.Fatalf("midpoint of %#04x and %#04x (%v) -> %#04x, want %#04x", h, h+1, mid, g, want)
		}
		// Just off the midpoint, rounding is to the nearer neighbour.
		if g := Float32ToHalf(math.Nextafter32(mid, float32(math.Inf(1)*float64(sign(f))))); g != uint16(h+1) && f != 0 {
			t.Fatalf("above the midpoint of %#04x -> %#04x", h, g)
		}
	}
	if g := Float32ToHalf(1e-10); g != 0 {
		t.Errorf("1e-10 -> %#04x, want 0", g)
	}
	if g := Float32ToHalf(-1e6); g != 0xfc00 {
		t.Errorf("-1e6 -> %#04x, want -inf", g)
	}
}

func sign(f float32) float64 {
	if math.Signbit(float64(f)) {
		return -1
	}
	return 1
}
