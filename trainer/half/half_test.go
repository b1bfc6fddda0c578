package half

import (
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestEveryPath runs this package's product tests once per path this CPU
// offers, each in a child process capped by SIGNAL_ENGINE_ISA (the path is
// chosen once per process), and checks that the child ran on that path.
func TestEveryPath(t *testing.T) {
	if os.Getenv("HALF_WANT_PATH") != "" {
		t.Skip("in a child")
	}
	for p := PathF32; p <= Path(); p++ {
		t.Run(PathName(p), func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^(TestProducts|TestChildPath)$", "-test.v")
			cmd.Env = append(os.Environ(), "SIGNAL_ENGINE_ISA="+PathName(p), "HALF_WANT_PATH="+PathName(p))
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "--- PASS: TestProducts") || !strings.Contains(string(out), "--- PASS: TestChildPath") {
				t.Fatalf("path %s: %v\n%s", PathName(p), err, out)
			}
		})
	}
}

// TestUnknownCap: a SIGNAL_ENGINE_ISA the engine does not know is said on
// stderr, naming the values it takes, and the best path is used.
func TestUnknownCap(t *testing.T) {
	if os.Getenv("HALF_WANT_PATH") != "" {
		t.Skip("in a child")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildPath$", "-test.v")
	cmd.Env = append(os.Environ(), "SIGNAL_ENGINE_ISA=avx1024", "HALF_WANT_PATH="+PathName(Path()))
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestChildPath") ||
		!strings.Contains(string(out), `SIGNAL_ENGINE_ISA="avx1024" is not one of f32, avx512, avx512_bf16, amx`) {
		t.Fatalf("%v\n%s", err, out)
	}
}

func TestChildPath(t *testing.T) {
	want := os.Getenv("HALF_WANT_PATH")
	if want == "" {
		t.Skip("run by TestEveryPath")
	}
	if got := PathName(Path()); got != want {
		t.Fatalf("path %s, want %s", got, want)
	}
}

// TestProducts checks both products against float64 sums of the same
// operands. Where the path rounds the activations to bf16, the reference
// rounds them too, so the only difference left is f32 accumulation: the
// tolerance is 1e-5 of Σ|x·w|. Against the unrounded activations the
// stated bound is 2⁻⁸ of Σ|x·w| (bf16 keeps 8 significant bits).
func TestProducts(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, dt := range []DType{BF16, F16} {
		for _, sh := range [][3]int{{1, 64, 48}, {3, 100, 129}, {37, 96, 64}, {64, 33, 200}} {
			rows, n, k := sh[0], sh[1], sh[2]
			wf := make([]float32, n*k)
			for i := range wf {
				wf[i] = float32(rng.NormFloat64() * 0.1)
			}
			w := FromFloat32(wf, n, k, dt)
			wr := w.Float32() // the weights as stored
			for i := range wf {
				if d := math.Abs(float64(wr[i] - wf[i])); d > math.Abs(float64(wf[i]))/128+6e-8 { // f16 subnormals keep less
					t.Fatalf("%s: element %d stored as %v from %v", dt, i, wr[i], wf[i])
				}
			}
			ldx, ldy := k+3, n+5
			x := make([]float32, rows*ldx)
			dy := make([]float32, rows*ldy)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			for i := range dy {
				dy[i] = float32(rng.NormFloat64())
			}
			for _, beta := range []float32{0, 1} {
				y := make([]float32, rows*ldy)
				dx := make([]float32, rows*ldx)
				for i := range y {
					y[i] = 0.5
				}
				for i := range dx {
					dx[i] = -0.25
				}
				w.MulT(y, ldy, x, ldx, rows, beta)
				w.Mul(dx, ldx, dy, ldy, rows, beta)
				xr, dyr := asUsed(w, x), asUsed(w, dy)
				for r := range rows {
					for j := range n {
						var s, a, exact float64
						for c := range k {
							s += float64(xr[r*ldx+c]) * float64(wr[j*k+c])
							exact += float64(x[r*ldx+c]) * float64(wr[j*k+c])
							a += math.Abs(float64(x[r*ldx+c]) * float64(wr[j*k+c]))
						}
						got := float64(y[r*ldy+j]) - float64(beta)*0.5
						if math.Abs(got-s) > 1e-5*a || math.Abs(got-exact) > a/256 {
							t.Fatalf("%s [%d,%d,%d] beta %v: y[%d,%d] = %v, want %v (exact %v, Σ|xw| %v)", dt, rows, n, k, beta, r, j, got, s, exact, a)
						}
					}
					for c := range k {
						var s, a float64
						for j := range n {
							s += float64(dyr[r*ldy+j]) * float64(wr[j*k+c])
							a += math.Abs(float64(dy[r*ldy+j]) * float64(wr[j*k+c]))
						}
						got := float64(dx[r*ldx+c]) + float64(beta)*0.25
						if math.Abs(got-s) > 1e-5*a {
							t.Fatalf("%s [%d,%d,%d] beta %v: dx[%d,%d] = %v, want %v", dt, rows, n, k, beta, r, c, got, s)
						}
					}
				}
				// Padding between rows is never written.
				for r := range rows {
					for j := n; j < ldy; j++ {
						if want := 0.5 * float32(1); y[r*ldy+j] != want {
							t.Fatalf("y padding [%d,%d] = %v", r, j, y[r*ldy+j])
						}
					}
				}
			}
			w.Free()
		}
	}
}

// asUsed is x as the path multiplies it: rounded to bf16 where it rounds.
func asUsed(w *Matrix, x []float32) []float32 {
	if !w.RoundsInput() {
		return x
	}
	b := make([]uint16, len(x))
	ToBF16(b, x, 1, len(x), len(x))
	out := make([]float32, len(x))
	FromBits(out, b, BF16)
	return out
}

func TestRounding(t *testing.T) {
	for _, c := range []struct {
		f    float32
		bits uint16
	}{{1, 0x3f80}, {-2, 0xc000}, {1.00390625, 0x3f80}, {1.01171875, 0x3f82}, {float32(math.Inf(1)), 0x7f80}} {
		b := make([]uint16, 1)
		ToBF16(b, []float32{c.f}, 1, 1, 1)
		if b[0] != c.bits {
			t.Errorf("bf16(%v) = %#x, want %#x", c.f, b[0], c.bits)
		}
	}
	b := make([]uint16, 1)
	ToBF16(b, []float32{float32(math.NaN())}, 1, 1, 1)
	out := make([]float32, 1)
	FromBits(out, b, BF16)
	if !math.IsNaN(float64(out[0])) {
		t.Errorf("NaN rounds to %v", out[0])
	}
}
