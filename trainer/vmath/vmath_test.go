package vmath

import (
	"math"
	"math/rand/v2"
	"testing"
)

func relErr(got, want float64) float64 {
	if want == 0 {
		return math.Abs(got)
	}
	return math.Abs(got-want) / math.Abs(want)
}

func TestExp(t *testing.T) {
	t.Logf("SIMD path: %v", SIMD())
	for x := float32(-87); x < 88; x += 0.0137 {
		if e := relErr(float64(Exp(x)), math.Exp(float64(x))); e > 3e-7 {
			t.Fatalf("Exp(%v) = %v, want %v (rel err %.2g)", x, Exp(x), math.Exp(float64(x)), e)
		}
	}
	if Exp(-100) != 0 || !math.IsInf(float64(Exp(100)), 1) || !math.IsNaN(float64(Exp(float32(math.NaN())))) {
		t.Error("Exp range ends or NaN wrong")
	}
}

// TestExpShiftSIMDAndTail checks every element of rows whose lengths are not
// multiples of 8 (the vector body and the scalar tail), the float64 sum,
// and the out-of-range lanes of the vector path (underflow, overflow, NaN).
func TestExpShiftSIMDAndTail(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{1, 7, 8, 9, 31, 100, 1029} {
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64() * 30)
		}
		orig := append([]float32(nil), x...)
		const shift = 3.5
		sumRO := SumExpShift(x, shift)
		for i := range x {
			if x[i] != orig[i] && !(x[i] != x[i]) {
				t.Fatalf("SumExpShift wrote x[%d]", i)
			}
		}
		sum := ExpShift(x, shift)
		if sumRO != sum {
			t.Fatalf("n=%d: SumExpShift %v, ExpShift's sum %v", n, sumRO, sum)
		}
		var want float64
		for i, v := range orig {
			w := math.Exp(float64(v - shift))
			if float64(v-shift) < -87.3 {
				w = 0
			}
			if float64(v-shift) > 88 {
				if !math.IsInf(float64(x[i]), 1) {
					t.Fatalf("n=%d: exp(%v) = %v, want +Inf", n, v-shift, x[i])
				}
				want = math.Inf(1)
				continue
			}
			if e := relErr(float64(x[i]), w); e > 3e-7 {
				t.Fatalf("n=%d: element %d: exp(%v) = %v, want %v", n, i, v-shift, x[i], w)
			}
			want += float64(x[i])
		}
		if e := relErr(sum, want); e > 1e-12 && !math.IsInf(want, 1) {
			t.Fatalf("n=%d: sum %v, want %v", n, sum, want)
		}
	}
	x := []float32{0, -200, 200, float32(math.NaN()), 1, 2, 3, 4, 5}
	ExpShift(x, 0)
	if x[0] != 1 || x[1] != 0 || !math.IsInf(float64(x[2]), 1) || !math.IsNaN(float64(x[3])) {
		t.Errorf("special lanes: %v", x[:4])
	}
	if m := Max([]float32{1, -3, 9, 2, 0, 0, 0, 0, 0, 4, 8.5}); m != 9 {
		t.Errorf("Max = %v, want 9", m)
	}
	if m := Max([]float32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}); m != 12 {
		t.Errorf("Max = %v, want 12 (tail)", m)
	}
}

func TestCausalSoftmaxAndExp(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, L := range []int{1, 5, 17} {
		ld := L + 3
		s := make([]float32, L*ld)
		for i := range s {
			s[i] = float32(rng.NormFloat64() * 4)
		}
		raw := append([]float32(nil), s...)
		lse := make([]float32, 2*L)
		CausalSoftmax(s, L, ld, lse, 2)
		for i := 0; i < L; i++ {
			m := math.Inf(-1)
			for j := 0; j <= i; j++ {
				m = math.Max(m, float64(raw[i*ld+j]))
			}
			var z float64
			for j := 0; j <= i; j++ {
				z += math.Exp(float64(raw[i*ld+j]) - m)
			}
			if e := math.Abs(float64(lse[2*i]) - (m + math.Log(z))); e > 1e-5 {
				t.Fatalf("L=%d row %d: lse %v, want %v", L, i, lse[2*i], m+math.Log(z))
			}
			for j := 0; j < L; j++ {
				want := 0.0
				if j <= i {
					want = math.Exp(float64(raw[i*ld+j])-m) / z
				}
				if math.Abs(float64(s[i*ld+j])-want) > 1e-6 {
					t.Fatalf("L=%d p[%d][%d] = %v, want %v", L, i, j, s[i*ld+j], want)
				}
			}
			for j := L; j < ld; j++ {
				if s[i*ld+j] != raw[i*ld+j] {
					t.Fatalf("L=%d: column %d beyond the block was written", L, j)
				}
			}
		}
		// CausalExp rebuilds the same probabilities from raw scores and lse.
		again := append([]float32(nil), raw...)
		CausalExp(again, L, ld, lse, 2)
		for i := 0; i < L; i++ {
			for j := 0; j < L; j++ {
				if math.Abs(float64(again[i*ld+j]-s[i*ld+j])) > 1e-6 {
					t.Fatalf("L=%d CausalExp[%d][%d] = %v, softmax gave %v", L, i, j, again[i*ld+j], s[i*ld+j])
				}
			}
		}
	}
}

func TestSwiGLU(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	const rows, inter = 3, 21
	gu := make([]float32, rows*2*inter)
	for i := range gu {
		gu[i] = float32(rng.NormFloat64() * 6)
	}
	gu[0], gu[1] = -120, 120 // σ saturates both ways without NaN
	act, sg := make([]float32, rows*inter), make([]float32, rows*inter)
	SwiGLU(act, sg, gu, rows, inter)
	act2 := make([]float32, rows*inter)
	SwiGLU(act2, nil, gu, rows, inter)
	for r := 0; r < rows; r++ {
		for i := 0; i < inter; i++ {
			g, u := float64(gu[r*2*inter+i]), float64(gu[r*2*inter+inter+i])
			s := 1 / (1 + math.Exp(-g))
			if math.Abs(float64(sg[r*inter+i])-s) > 1e-6*math.Max(s, 1e-30) && math.Abs(float64(sg[r*inter+i])-s) > 1e-37 {
				t.Fatalf("σ(%v) = %v, want %v", g, sg[r*inter+i], s)
			}
			want := g * s * u
			if math.Abs(float64(act[r*inter+i])-want) > 1e-6*math.Max(1, math.Abs(want)) {
				t.Fatalf("silu(%v)·%v = %v, want %v", g, u, act[r*inter+i], want)
			}
			if act2[r*inter+i] != act[r*inter+i] {
				t.Fatalf("act differs with and without sg")
			}
		}
	}
}

func TestShapeErrorsPanic(t *testing.T) {
	cases := map[string]func(){
		"softmax": func() { CausalSoftmax(make([]float32, 8), 3, 3, nil, 1) },
		"lse":     func() { CausalExp(make([]float32, 9), 3, 3, make([]float32, 2), 1) },
		"swiglu":  func() { SwiGLU(make([]float32, 4), nil, make([]float32, 8), 2, 4) },
		"ld":      func() { CausalSoftmax(make([]float32, 9), 3, 2, nil, 1) },
		"max":     func() { Max(nil) },
	}
	for name, fn := range cases {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: bad shape accepted", name)
				}
			}()
			fn()
		}()
	}
}

// TestCausalSoftmaxRowsMatchesFull: a block of rows [off, off+rows) against
// keys [0, width) gives those rows of the full causal softmax, zeros after
// each row's last key, and leaves columns past width alone.
func TestCausalSoftmaxRowsMatchesFull(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	const L = 23
	full := make([]float32, L*L)
	for i := range full {
		full[i] = float32(rng.NormFloat64() * 4)
	}
	raw := append([]float32(nil), full...)
	CausalSoftmax(full, L, L, nil, 0)
	for _, b := range []struct{ off, rows, width int }{{0, 5, 5}, {5, 7, 12}, {12, 11, 23}, {3, 4, 20}} {
		s := append([]float32(nil), raw[b.off*L:]...) // rows from off, stride L
		CausalSoftmaxRows(s, b.rows, b.off, b.width, L)
		for i := 0; i < b.rows; i++ {
			for j := 0; j < L; j++ {
				got := s[i*L+j]
				switch {
				case j >= b.width:
					if got != raw[(b.off+i)*L+j] {
						t.Fatalf("%+v row %d: column %d past the block written", b, i, j)
					}
				case math.Abs(float64(got-full[(b.off+i)*L+j])) > 1e-6:
					t.Fatalf("%+v p[%d][%d] = %v, full softmax %v", b, b.off+i, j, got, full[(b.off+i)*L+j])
				}
			}
		}
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a block narrower than its last row's keys did not panic")
		}
	}()
	CausalSoftmaxRows(make([]float32, 4*8), 4, 5, 8, 8)
}

// TestRMSNormMatchesFloat64 compares with the definition in float64: the
// vectorized sum of squares runs in another order, so 1/rms may differ in
// its last bit; outputs agree to 2 ulp.
func TestRMSNormMatchesFloat64(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for _, dim := range []int{1, 7, 8, 9, 64, 576, 1003} {
		rows := 5
		x, w := make([]float32, rows*dim), make([]float32, dim)
		for i := range x {
			x[i] = float32(r.NormFloat64() * 3)
		}
		for i := range w {
			w[i] = float32(1 + r.NormFloat64()*0.1)
		}
		out, rstd := make([]float32, rows*dim), make([]float32, rows)
		const eps = 1e-5
		RMSNorm(out, rstd, x, w, rows, dim, eps)
		for row := 0; row < rows; row++ {
			var ss float64
			for _, v := range x[row*dim : (row+1)*dim] {
				ss += float64(v) * float64(v)
			}
			inv := 1 / math.Sqrt(ss/float64(dim)+eps)
			if d := math.Abs(float64(rstd[row]) - inv); d > 2e-7*inv {
				t.Fatalf("dim %d row %d: rstd %v, want %v", dim, row, rstd[row], inv)
			}
			for i := 0; i < dim; i++ {
				want := float64(x[row*dim+i]) * inv * float64(w[i])
				if d := math.Abs(float64(out[row*dim+i]) - want); d > 3e-7*math.Abs(want)+1e-30 {
					t.Fatalf("dim %d row %d: out[%d] = %v, want %v", dim, row, i, out[row*dim+i], want)
				}
			}
		}
	}
}

// TestRopeMatchesScalar checks the rotation bit for bit against the scalar
// formula (each product rounded, then the sum), on heads whose half width
// is and is not a multiple of the vector width, within a wider row.
func TestRopeMatchesScalar(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	for _, d := range []int{2, 16, 22, 64} {
		rows, heads, ld := 3, 4, 4*d+5
		x := make([]float32, rows*ld)
		for i := range x {
			x[i] = float32(r.NormFloat64())
		}
		cos, sin := make([]float32, rows*d/2), make([]float32, rows*d/2)
		for i := range cos {
			a := r.Float64() * 6
			cos[i], sin[i] = float32(math.Cos(a)), float32(math.Sin(a))
		}
		want := append([]float32(nil), x...)
		for row := 0; row < rows; row++ {
			for h := 0; h < heads; h++ {
				v := want[row*ld+h*d : row*ld+(h+1)*d]
				for i := 0; i < d/2; i++ {
					a, b := v[i], v[i+d/2]
					c, s := cos[row*d/2+i], sin[row*d/2+i]
					ac, bs, bc, as := a*c, b*s, b*c, a*s
					v[i], v[i+d/2] = ac-bs, bc+as
				}
			}
		}
		Rope(x, rows, ld, heads, d, cos, sin)
		for i := range x {
			if x[i] != want[i] {
				t.Fatalf("d %d: x[%d] = %v, scalar %v", d, i, x[i], want[i])
			}
		}
	}
}
