package trainer

import (
	"fmt"
	"math"
	"math/rand"
	"slices"
	"testing"

	"github.com/signal-p2p/signal/trainer/blas"
	"github.com/signal-p2p/signal/trainer/half"
	"github.com/signal-p2p/signal/trainer/packed"
	"github.com/signal-p2p/signal/trainer/team"
)

// The backward kernels are checked against central finite differences of
// f = Σ dy ⊙ forward(x), with f accumulated in float64. The forwards run in
// float32, so with step h = 1e-2 the difference quotient carries ~1e-4 of
// rounding and O(h²) of truncation error; a wrong formula is off by O(1).
const (
	fdStep = 1e-2
	fdAtol = 2e-3
	fdRtol = 1e-2
)

func randSlice(r *rand.Rand, n int, scale float32) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = (r.Float32()*2 - 1) * scale
	}
	return s
}

func dot64(a, b []float32) float64 {
	var s float64
	for i := range a {
		s += float64(a[i]) * float64(b[i])
	}
	return s
}

// checkFD compares grad with the finite-difference gradient of f over x.
func checkFD(t *testing.T, name string, x, grad []float32, f func() float64) {
	t.Helper()
	if len(grad) != len(x) {
		t.Fatalf("%s: gradient has %d entries, want %d", name, len(grad), len(x))
	}
	bad := 0
	for i := range x {
		old := x[i]
		x[i] = old + fdStep
		fp := f()
		x[i] = old - fdStep
		fm := f()
		x[i] = old
		num := (fp - fm) / (2 * fdStep)
		if diff := math.Abs(num - float64(grad[i])); diff > fdAtol+fdRtol*math.Abs(num) {
			if bad < 5 {
				t.Errorf("%s[%d]: analytic %.6g, finite difference %.6g", name, i, grad[i], num)
			}
			bad++
		}
	}
	if bad > 0 {
		t.Errorf("%s: %d of %d entries off", name, bad, len(x))
	}
}

// The kernels run on a nil team here (the caller alone); package team
// checks that sharing them out gives the same bits.

func TestRMSNormBackwardFD(t *testing.T) {
	var tm *team.Team
	r := rand.New(rand.NewSource(1))
	rows, h := 3, 8
	x, w, dy := randSlice(r, rows*h, 2), randSlice(r, h, 1.5), randSlice(r, rows*h, 1)
	y, rinv := make([]float32, rows*h), make([]float32, rows)
	f := func() float64 {
		tm.RMSNorm(y, rinv, x, w, rows, h, 1e-5)
		return dot64(dy, y)
	}
	f()
	dx := make([]float32, rows*h)
	tm.RMSNormBackward(dx, dy, x, w, rinv, rows, h)
	checkFD(t, "dx", x, dx, f)
}

// TestRoPEBackwardFD: rotating back (the sin table negated) is RoPE's
// backward, for heads that start past column 0 of a wider row.
func TestRoPEBackwardFD(t *testing.T) {
	var tm *team.Team
	r := rand.New(rand.NewSource(2))
	rows, nHeads, d, off, ld := 4, 2, 6, 3, 3+2*6+1
	half := d / 2
	invFreq := make([]float32, half)
	for i := range invFreq {
		invFreq[i] = float32(math.Pow(100, -float64(i)/float64(half)))
	}
	cos, sin, back := make([]float32, rows*half), make([]float32, rows*half), make([]float32, rows*half)
	RopeTables(cos, sin, []int{0, 3, 7, 9}, invFreq)
	for i, s := range sin {
		back[i] = -s
	}
	x, dy := randSlice(r, rows*ld, 1), randSlice(r, rows*ld, 1)
	// Columns outside the rotated heads are passed through; mask them out of f.
	for rr := 0; rr < rows; rr++ {
		for c := 0; c < ld; c++ {
			if c < off || c >= off+nHeads*d {
				dy[rr*ld+c] = 0
			}
		}
	}
	y := make([]float32, len(x))
	f := func() float64 {
		copy(y, x)
		tm.Rope(y[off:], rows, ld, nHeads, d, cos, sin)
		return dot64(dy, y)
	}
	dx := append([]float32(nil), dy...)
	tm.Rope(dx[off:], rows, ld, nHeads, d, cos, back)
	checkFD(t, "dx", x, dx, f)
}

func TestSwiGLUBackwardFD(t *testing.T) {
	var tm *team.Team
	r := rand.New(rand.NewSource(3))
	rows, inter := 3, 5
	gu, dh := randSlice(r, rows*2*inter, 3), randSlice(r, rows*inter, 1)
	h := make([]float32, rows*inter)
	f := func() float64 {
		tm.SwiGLU(h, nil, gu, rows, inter)
		return dot64(dh, h)
	}
	dgu := make([]float32, len(gu))
	h2, sg := make([]float32, rows*inter), make([]float32, rows*inter)
	tm.SwiGLU(h2, sg, gu, rows, inter)
	f()
	if !slices.Equal(h, h2) {
		t.Fatalf("SwiGLU keeping σ gives %v, without %v", h2, h)
	}
	tm.SwiGLUBackward(dgu, dh, gu, sg, rows, inter)
	checkFD(t, "dgu", gu, dgu, f)
}

// TestAttentionBackwardFD checks the attention backward (probabilities
// rebuilt from the forward's log-sum-exps) against finite differences of
// the forward, on the caller alone and on a team.
func TestAttentionBackwardFD(t *testing.T) {
	shared, err := team.New(2)
	if err != nil {
		t.Fatal(err)
	}
	defer shared.Close()
	for _, tc := range []struct {
		name           string
		nHeads, nKV, d int
		seqLens        []int
		tm             *team.Team
	}{
		{"gqa-2seq", 4, 2, 4, []int{3, 5}, shared},
		{"mqa-1seq", 4, 1, 6, []int{6}, nil},
		{"mha-3seq", 2, 2, 4, []int{1, 4, 2}, shared},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewSource(4))
			seqOff := []int{0}
			maxN := 0
			for _, n := range tc.seqLens {
				seqOff = append(seqOff, seqOff[len(seqOff)-1]+n)
				maxN = max(maxN, n)
			}
			tokens := seqOff[len(seqOff)-1]
			ld, od := (tc.nHeads+2*tc.nKV)*tc.d, tc.nHeads*tc.d
			qkv, dout := randSlice(r, tokens*ld, 1.5), randSlice(r, tokens*od, 1)
			out, lse := make([]float32, tokens*od), make([]float32, tc.nHeads*tokens)
			scratch := make([]float32, tc.tm.Threads()*2*maxN*maxN)
			f := func() float64 {
				tc.tm.Attention(out, od, qkv, seqOff, tc.nHeads, tc.nKV, tc.d, scratch, lse)
				return dot64(dout, out)
			}
			f()
			// The forward must be causal softmax attention: check one row by hand.
			checkAttnRow(t, qkv, out, seqOff, tc.nHeads, tc.nKV, tc.d)
			dqkv := make([]float32, len(qkv))
			tc.tm.AttentionBackward(dqkv, dout, out, lse, qkv, seqOff, tc.nHeads, tc.nKV, tc.d, scratch, make([]float32, 2*tc.nHeads*tokens*tc.d))
			checkFD(t, "dqkv", qkv, dqkv, f)
		})
	}
}

// checkAttnRow recomputes the last row of the last sequence, head 0, directly.
func checkAttnRow(t *testing.T, qkv, out []float32, seqOff []int, nHeads, nKV, d int) {
	t.Helper()
	ld := (nHeads + 2*nKV) * d
	scale := 1 / math.Sqrt(float64(d))
	st, en := seqOff[len(seqOff)-2], seqOff[len(seqOff)-1]
	i := en - 1
	var w []float64
	var sum float64
	for j := st; j <= i; j++ {
		var s float64
		for c := 0; c < d; c++ {
			s += float64(qkv[i*ld+c]) * float64(qkv[j*ld+nHeads*d+c])
		}
		e := math.Exp(s * scale)
		w = append(w, e)
		sum += e
	}
	for c := 0; c < d; c++ {
		var o float64
		for j := st; j <= i; j++ {
			o += w[j-st] / sum * float64(qkv[j*ld+(nHeads+nKV)*d+c])
		}
		if math.Abs(o-float64(out[i*nHeads*d+c])) > 1e-5 {
			t.Fatalf("attention out[%d][%d] = %v, direct %v", i, c, out[i*nHeads*d+c], o)
		}
	}
}

// TestLoRABackwardFD checks loraBackward for one module and for a group of
// three that read the same x (as q, k and v do) against finite
// differences of Σ dy·y over the group's outputs.
func TestLoRABackwardFD(t *testing.T) {
	for _, n := range []int{1, 3} {
		t.Run(fmt.Sprintf("%d modules", n), func(t *testing.T) { loraBackwardFD(t, n) })
	}
}

func loraBackwardFD(t *testing.T, n int) {
	r := rand.New(rand.NewSource(5))
	rows, in, out, rank := 5, 6, 7, 3
	s := float32(2.0)
	ldx, ldy := in+2, n*out+3 // strided, as inside fused activations
	w := n * rank
	x, dy := randSlice(r, rows*ldx, 1), randSlice(r, rows*ldy, 1)
	ms := make([]loraMember, n)
	stack := make([]float32, 0, w*in)
	u, y := make([]float32, rows*w), make([]float32, rows*ldy)
	for j := range ms {
		ms[j] = loraMember{a: randSlice(r, rank*in, 1), b: randSlice(r, out*rank, 1), out: out, off: j * out, u: u[j*rank:]}
		ms[j].da, ms[j].db = make([]float32, rank*in), make([]float32, out*rank)
		stack = append(stack, ms[j].a...)
	}
	f := func() float64 {
		var acc float64
		for _, m := range ms {
			blas.Sgemm(false, true, rows, rank, in, 1, x, ldx, m.a, in, 0, m.u, w)
			blas.Sgemm(false, true, rows, out, rank, s, m.u, w, m.b, rank, 0, y[m.off:], ldy)
			for i := 0; i < rows; i++ {
				acc += dot64(dy[i*ldy+m.off:i*ldy+m.off+out], y[i*ldy+m.off:i*ldy+m.off+out])
			}
		}
		return acc
	}
	f()
	dx := make([]float32, rows*ldx)
	loraBackward(nil, dx, ldx, x, ldx, dy, ldy, ms, w, rows, in, rank, s, make([]float32, rows*w), stack, make([]float32, w*in))
	// Padding columns of x are not read: their gradient must stay 0.
	for i := 0; i < rows; i++ {
		for c := in; c < ldx; c++ {
			if dx[i*ldx+c] != 0 {
				t.Fatalf("dx padding [%d][%d] = %v, want 0", i, c, dx[i*ldx+c])
			}
		}
	}
	checkFD(t, "dx", x, dx, f)
	for j, m := range ms {
		checkFD(t, fmt.Sprintf("dA[%d]", j), m.a, m.da, f)
		checkFD(t, fmt.Sprintf("dB[%d]", j), m.b, m.db, f)
	}
}

func TestLMHeadLossFD(t *testing.T) {
	r := rand.New(rand.NewSource(6))
	rows, h, vocab := lmHeadChunk+5, 4, 11 // two chunks, the second partial
	x, w := randSlice(r, rows*h, 1), randSlice(r, vocab*h, 1)
	targets := make([]int32, rows)
	d := Datum{Weights: make([]float32, rows), Logprobs: make([]float32, rows), Advantages: make([]float32, rows)}
	for i := range targets {
		targets[i] = int32(r.Intn(vocab))
		d.Weights[i] = r.Float32()
		d.Logprobs[i] = -2 - r.Float32()
		d.Advantages[i] = r.Float32()*2 - 1
	}
	d.Weights[3] = 0
	// The head's logits through OpenBLAS, where the CPU runs it through the
	// packed kernel the engine uses for a loaded F32 model, and through F16
	// weights (widened; a BF16 path rounds the activations to bf16, a step
	// function that finite differences cannot see through: the whole-model
	// tests check it against PyTorch instead).
	wh := half.FromFloat32(w, vocab, h, half.F16)
	copy(w, wh.Float32()) // every head multiplies by the same (f16-exact) weights
	heads := map[string]*base{"sgemm": {out: vocab, in: h, f32: w}, "f16": {out: vocab, in: h, h: wh}}
	if packed.Available() {
		heads["packed"] = &base{out: vocab, in: h, f32: w, p: packed.Pack(w, vocab, h)}
	}
	// cispo's gradient stops at its ratio by definition, so a finite
	// difference of its loss is not its gradient: TestLossTokenGradients
	// checks it against the formula, and the PyTorch test end to end.
	for _, name := range []string{LossCrossEntropy, LossImportanceSampling, LossPPO, LossDRO} {
		for kind, hw := range heads {
			t.Run(name+"/"+kind, func(t *testing.T) {
				ls, err := parseLoss(name, nil)
				if err != nil {
					t.Fatal(err)
				}
				logp, logits := make([]float32, rows), make([]float32, lmHeadChunk*vocab)
				var total float64
				lossAt := func(row int, lp float64) float64 {
					l, g := ls.token(&d, row, lp)
					total += l
					return g
				}
				f := func() float64 {
					total = 0
					lmHeadLoss(nil, nil, x, hw, rows, h, vocab, targets, logp, lossAt, logits, &trainHead{})
					return total
				}
				f()
				// Place each ratio exp(logp − sampling logp) at 0.5, 1 or 1.5, away
				// from PPO's clip edges where the loss has a kink that a finite
				// difference would straddle.
				for i := range d.Logprobs {
					d.Logprobs[i] = logp[i] - float32(math.Log([]float64{0.5, 1, 1.5}[i%3]))
				}
				// logp must be the log-softmax of the logits at the target.
				for i := 0; i < rows; i += 7 {
					var zs []float64
					m := math.Inf(-1)
					for j := 0; j < vocab; j++ {
						z := dot64(x[i*h:(i+1)*h], w[j*h:(j+1)*h])
						zs = append(zs, z)
						m = math.Max(m, z)
					}
					var s float64
					for _, z := range zs {
						s += math.Exp(z - m)
					}
					want := zs[targets[i]] - m - math.Log(s)
					if math.Abs(want-float64(logp[i])) > 1e-5 {
						t.Fatalf("logp[%d] = %v, want %v", i, logp[i], want)
					}
				}
				dx := make([]float32, rows*h)
				lmHeadLoss(nil, dx, x, hw, rows, h, vocab, targets, logp, lossAt, logits, &trainHead{})
				checkFD(t, "dx", x, dx, f)
			})
		}
	}
}

func TestLossTokenGradients(t *testing.T) {
	d := Datum{Weights: []float32{0.7}, Logprobs: []float32{-1.3}, Advantages: []float32{0.9}}
	neg := Datum{Weights: []float32{0.7}, Logprobs: []float32{-1.3}, Advantages: []float32{-0.6}}
	for _, tc := range []struct {
		name string
		d    *Datum
		cfg  map[string]float64
		logp float64
	}{
		{LossCrossEntropy, &d, nil, -2.1},
		{LossImportanceSampling, &d, nil, -1.1},
		{LossPPO, &d, nil, -1.25},  // inside the band
		{LossPPO, &d, nil, -0.9},   // ratio 1.49 > 1.2, A > 0: clipped
		{LossPPO, &neg, nil, -0.9}, // ratio > 1.2, A < 0: unclipped
		{LossPPO, &neg, nil, -1.6}, // ratio 0.74 < 0.8, A < 0: clipped
		{LossPPO, &d, map[string]float64{"clip_low_threshold": 0.5, "clip_high_threshold": 2}, -0.9},
		{LossDRO, &d, nil, -1.1},
		{LossDRO, &neg, map[string]float64{"beta": 0.4}, -2.0},
	} {
		ls, err := parseLoss(tc.name, tc.cfg)
		if err != nil {
			t.Fatal(err)
		}
		_, g := ls.token(tc.d, 0, tc.logp)
		const h = 1e-6
		lp, _ := ls.token(tc.d, 0, tc.logp+h)
		lm, _ := ls.token(tc.d, 0, tc.logp-h)
		if num := (lp - lm) / (2 * h); math.Abs(num-g) > 1e-6 {
			t.Errorf("%s at logp %v (cfg %v): d loss/d logp = %v, finite difference %v", tc.name, tc.logp, tc.cfg, g, num)
		}
	}
	// The values themselves, from the definitions.
	ce, _ := parseLoss(LossCrossEntropy, nil)
	if l, _ := ce.token(&d, 0, -2); math.Abs(l-1.4) > 1e-6 {
		t.Errorf("cross_entropy loss = %v, want 0.7·2 = 1.4", l)
	}
	is, _ := parseLoss(LossImportanceSampling, nil)
	if l, _ := is.token(&d, 0, -1.3); math.Abs(l+0.9) > 1e-6 {
		t.Errorf("importance_sampling loss at ratio 1 = %v, want -0.9", l)
	}
	ppo, _ := parseLoss(LossPPO, nil)
	if l, _ := ppo.token(&d, 0, -1.3+math.Log(2)); math.Abs(l+1.2*0.9) > 1e-6 {
		t.Errorf("ppo loss at ratio 2, A 0.9 = %v, want -1.2·0.9", l)
	}
	// cispo at ratio 2: the ratio clipped to 1.2 weighs A·logp, and is a
	// constant: d loss/d logp = -1.2·A, not the finite difference of the
	// clipped term (zero).
	cispo, _ := parseLoss(LossCISPO, nil)
	lp2 := -1.3 + math.Log(2)
	if l, g := cispo.token(&d, 0, lp2); math.Abs(l+1.2*0.9*lp2) > 1e-6 || math.Abs(g+1.2*0.9) > 1e-6 {
		t.Errorf("cispo at ratio 2, A 0.9: loss %v, grad %v; want %v, %v", l, g, -1.2*0.9*lp2, -1.2*0.9)
	}
	dro, _ := parseLoss(LossDRO, map[string]float64{"beta": 0.5})
	if l, _ := dro.token(&d, 0, -0.3); math.Abs(l-(-(0.9*-0.3)+0.25)) > 1e-6 {
		t.Errorf("dro loss at logp -0.3, logq -1.3, A 0.9, beta 0.5 = %v, want %v", l, -(0.9*-0.3)+0.25)
	}
	if _, err := parseLoss(LossDRO, map[string]float64{"clip_low_threshold": 0.5}); err == nil {
		t.Error("dro accepted clip_low_threshold, which is not its setting")
	}
}
