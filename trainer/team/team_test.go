package team

import (
	"math"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/signal-p2p/signal/trainer/half"
	"github.com/signal-p2p/signal/trainer/packed"
	"github.com/signal-p2p/signal/trainer/vmath"
)

func newTeam(t *testing.T, helpers int) *Team {
	t.Helper()
	tm, err := New(helpers)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tm.Close)
	return tm
}

func randSlice(r *rand.Rand, n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = float32(r.NormFloat64())
	}
	return s
}

// requireHelp fails the test unless the team's helpers have run jobs, by
// the time f (a task large enough to share) has run for up to 10 s: on a
// loaded machine a helper thread may sit out a few tasks, but a team whose
// helpers never join fails.
func requireHelp(t *testing.T, tm *Team, f func()) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); tm.helped() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the helpers ran none of the jobs")
		}
		f()
	}
}

// alone runs f with the team held by someone else, so that f's task takes
// the path a busy team takes: the caller computes it by itself.
func alone(tm *Team, f func()) {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	f()
}

// TestMulMatchesPacked: a product shared out in panel chunks equals the
// packed kernel's single call bit for bit (each column is the same sum in
// the same order), for rows around the kernel's 12-row block, widths on and
// off a panel edge, depths around its 1024-deep pass and beta 0, 1 and ½;
// and so does the busy-team path.
func TestMulMatchesPacked(t *testing.T) {
	if !packed.Available() {
		t.Skip("no AVX-512F: the engine does not pack weights here")
	}
	r := rand.New(rand.NewPCG(1, 2))
	for _, helpers := range []int{1, 3} {
		tm := newTeam(t, helpers)
		for _, rows := range []int{1, 5, 12, 13, 130} {
			for _, nk := range [][2]int{{1000, 576}, {96, 1100}, {33, 64}, {7, 5}} {
				n, k := nk[0], nk[1]
				p := packed.Pack(randSlice(r, n*k), n, k)
				x := randSlice(r, rows*k)
				for _, beta := range []float32{0, 1, 0.5} {
					y0 := randSlice(r, rows*n)
					want := append([]float32(nil), y0...)
					p.Mul(want, n, x, k, rows, beta)
					got := append([]float32(nil), y0...)
					tm.Mul(p, got, n, x, k, rows, beta)
					solo := append([]float32(nil), y0...)
					alone(tm, func() { tm.Mul(p, solo, n, x, k, rows, beta) })
					for i := range want {
						if got[i] != want[i] || solo[i] != want[i] {
							t.Fatalf("helpers %d, %dx%dx%d beta %v: element %d = %v (alone %v), one call gives %v",
								helpers, rows, n, k, beta, i, got[i], solo[i], want[i])
						}
					}
				}
				p.Free()
			}
		}
		p := packed.Pack(randSlice(r, 1000*576), 1000, 576)
		x, y := randSlice(r, 130*576), make([]float32, 130*1000)
		requireHelp(t, tm, func() { tm.Mul(p, y, 1000, x, 576, 130, 0) })
		p.Free()
	}
}

// attnRef is causal grouped-query attention in float64: out [T, H·D],
// each head's probabilities [L, L] per sequence and the log-sum-exp of
// each row's scaled scores, lse [H, T].
func attnRef(qkv []float32, starts []int, H, KV, D int) (out []float64, probs [][]float64, lse []float64) {
	ld := (H + 2*KV) * D
	T := starts[len(starts)-1]
	out, lse = make([]float64, T*H*D), make([]float64, H*T)
	for s := 0; s+1 < len(starts); s++ {
		r0, L := starts[s], starts[s+1]-starts[s]
		for h := 0; h < H; h++ {
			g := h / (H / KV)
			p := make([]float64, L*L)
			for i := 0; i < L; i++ {
				row := p[i*L : (i+1)*L]
				mx := math.Inf(-1)
				for j := 0; j <= i; j++ {
					var dot float64
					for d := 0; d < D; d++ {
						dot += float64(qkv[(r0+i)*ld+h*D+d]) * float64(qkv[(r0+j)*ld+(H+g)*D+d])
					}
					row[j] = dot / math.Sqrt(float64(D))
					mx = max(mx, row[j])
				}
				var sum float64
				for j := 0; j <= i; j++ {
					row[j] = math.Exp(row[j] - mx)
					sum += row[j]
				}
				lse[h*T+r0+i] = mx + math.Log(sum)
				for j := 0; j <= i; j++ {
					row[j] /= sum
					for d := 0; d < D; d++ {
						out[(r0+i)*H*D+h*D+d] += row[j] * float64(qkv[(r0+j)*ld+(H+KV+g)*D+d])
					}
				}
			}
			probs = append(probs, p)
		}
	}
	return out, probs, lse
}

// TestAttentionMatchesFloat64: sequences of different lengths (one of a
// single row, some past the 128-row query block) in one batch, shared and
// alone, with and without the log-sum-exps: the output and the
// log-sum-exps agree with float64 to f32 rounding, and every way gives the
// same bits.
func TestAttentionMatchesFloat64(t *testing.T) {
	const H, KV, D = 6, 2, 16
	ld := (H + 2*KV) * D
	starts := []int{0, 1, 6, 136, 436}
	T := starts[len(starts)-1]
	r := rand.New(rand.NewPCG(3, 4))
	qkv := randSlice(r, T*ld)
	want, _, wantLSE := attnRef(qkv, starts, H, KV, D)
	maxL := 300
	tm := newTeam(t, 2)
	ldOut := H*D + 3 // a wider output row: only the first H·D columns are written
	var outs [][]float32
	for _, withLSE := range []bool{true, false} {
		for _, solo := range []bool{false, true} {
			out := make([]float32, T*ldOut)
			var lse []float32
			if withLSE {
				lse = make([]float32, H*T)
				for i := range lse {
					lse[i] = float32(math.NaN()) // every one must be written
				}
			}
			run := func() { tm.Attention(out, ldOut, qkv, starts, H, KV, D, make([]float32, tm.Threads()*maxL*maxL), lse) }
			if solo {
				alone(tm, run)
			} else {
				run()
			}
			for i := 0; i < T; i++ {
				for c := 0; c < H*D; c++ {
					g, w := float64(out[i*ldOut+c]), want[i*H*D+c]
					if math.Abs(g-w) > 1e-5*(1+math.Abs(w)) {
						t.Fatalf("lse %v alone %v: out[%d][%d] = %v, float64 gives %v", withLSE, solo, i, c, g, w)
					}
				}
				for c := H * D; c < ldOut; c++ {
					if out[i*ldOut+c] != 0 {
						t.Fatalf("lse %v alone %v: column %d past H·D written", withLSE, solo, c)
					}
				}
			}
			for i := range lse {
				if g, w := float64(lse[i]), wantLSE[i]; math.Abs(g-w) > 1e-5*(1+math.Abs(w)) {
					t.Fatalf("alone %v: lse %d = %v, float64 gives %v", solo, i, g, w)
				}
			}
			outs = append(outs, out)
		}
	}
	requireHelp(t, tm, func() {
		tm.Attention(make([]float32, T*H*D), H*D, qkv, starts, H, KV, D, make([]float32, tm.Threads()*maxL*maxL), nil)
	})
	for _, o := range outs[1:] {
		for i := range o {
			if o[i] != outs[0][i] {
				t.Fatalf("element %d differs between ways of running: %v vs %v", i, o[i], outs[0][i])
			}
		}
	}
}

// TestAttentionHeadFromRow: one head's attention from a later row (the
// last alone, as sampling's prefill asks, and from inside the first query
// block of a sequence longer than one) writes only those rows, relative to
// row0, in agreement with float64.
func TestAttentionHeadFromRow(t *testing.T) {
	const H, KV, D, L = 4, 2, 8, 150
	ld := (H + 2*KV) * D
	r := rand.New(rand.NewPCG(11, 12))
	qkv := randSlice(r, L*ld)
	want, wantProbs, _ := attnRef(qkv, []int{0, L}, H, KV, D)
	for _, row0 := range []int{L - 1, 100, 0} {
		for h := 0; h < H; h++ {
			n := L - row0
			out, probs := make([]float32, n*H*D), make([]float32, n*L)
			AttentionHead(out, H*D, qkv, L, H, KV, D, h, row0, probs)
			for i := 0; i < n; i++ {
				for c := 0; c < H*D; c++ {
					g := float64(out[i*H*D+c])
					if c/D != h {
						if g != 0 {
							t.Fatalf("row0 %d head %d: row %d column %d of another head written", row0, h, i, c)
						}
						continue
					}
					if w := want[(row0+i)*H*D+c]; math.Abs(g-w) > 1e-5*(1+math.Abs(w)) {
						t.Fatalf("row0 %d head %d: out[%d][%d] = %v, float64 gives %v", row0, h, row0+i, c, g, w)
					}
				}
				for j := 0; j < L; j++ {
					if g, w := float64(probs[i*L+j]), wantProbs[h][(row0+i)*L+j]; math.Abs(g-w) > 1e-6 {
						t.Fatalf("row0 %d head %d: probability [%d][%d] = %v, float64 gives %v", row0, h, row0+i, j, g, w)
					}
				}
			}
		}
	}
}

// TestSwiGLUMatchesVmath: the row chunks give vmath's SwiGLU bit for bit,
// σ(gate) too, for row counts below, at and above the number of chunks.
func TestSwiGLUMatchesVmath(t *testing.T) {
	tm := newTeam(t, 1)
	r := rand.New(rand.NewPCG(5, 6))
	const inter = 37
	for _, rows := range []int{1, 3, 4, 5, 129, 2000} {
		gu := randSlice(r, rows*2*inter)
		want, wantSG := make([]float32, rows*inter), make([]float32, rows*inter)
		vmath.SwiGLU(want, wantSG, gu, rows, inter)
		got, solo, sg := make([]float32, rows*inter), make([]float32, rows*inter), make([]float32, rows*inter)
		tm.SwiGLU(got, sg, gu, rows, inter)
		alone(tm, func() { tm.SwiGLU(solo, nil, gu, rows, inter) })
		for i := range want {
			if got[i] != want[i] || solo[i] != want[i] || sg[i] != wantSG[i] {
				t.Fatalf("rows %d: element %d = %v (alone %v, σ %v), vmath gives %v (σ %v)", rows, i, got[i], solo[i], sg[i], want[i], wantSG[i])
			}
		}
	}
}

// TestConcurrentCallers: goroutines sharing one team (one gets it, the
// others compute alone) all get the right answers. Run with -race.
func TestConcurrentCallers(t *testing.T) {
	tm := newTeam(t, 1)
	r := rand.New(rand.NewPCG(7, 8))
	const rows, inter = 64, 300
	gu := randSlice(r, rows*2*inter)
	want := make([]float32, rows*inter)
	vmath.SwiGLU(want, nil, gu, rows, inter)
	var p *packed.Weights
	var x, wantY []float32
	if packed.Available() {
		p = packed.Pack(randSlice(r, 500*200), 500, 200)
		x = randSlice(r, rows*200)
		wantY = make([]float32, rows*500)
		p.Mul(wantY, 500, x, 200, rows, 0)
	}
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				got := make([]float32, rows*inter)
				tm.SwiGLU(got, nil, gu, rows, inter)
				for j := range got {
					if got[j] != want[j] {
						errs <- "SwiGLU differs"
						return
					}
				}
				if p == nil {
					continue
				}
				y := make([]float32, rows*500)
				tm.Mul(p, y, 500, x, 200, rows, 0)
				for j := range y {
					if y[j] != wantY[j] {
						errs <- "Mul differs"
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
}

// TestMisusePanics: shape errors panic in Go before C reads anything, as
// does a team used after Close (which may be called twice); a team needs a
// helper.
func TestMisusePanics(t *testing.T) {
	if _, err := New(0); err == nil {
		t.Error("a team without helpers was made")
	}
	tm := newTeam(t, 1)
	closed, err := New(1)
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()
	closed.Close()
	cases := map[string]func(){
		"swiglu short act": func() { tm.SwiGLU(make([]float32, 5), nil, make([]float32, 20), 2, 5) },
		"swiglu short gu":  func() { tm.SwiGLU(make([]float32, 10), nil, make([]float32, 19), 2, 5) },
		"attention heads": func() {
			tm.Attention(make([]float32, 16), 16, make([]float32, 64), []int{0, 1}, 3, 2, 4, make([]float32, 8), nil)
		},
		"attention short qkv": func() {
			tm.Attention(make([]float32, 32), 16, make([]float32, 63), []int{0, 2}, 2, 1, 8, make([]float32, 8), nil)
		},
		"attention starts": func() {
			tm.Attention(make([]float32, 32), 16, make([]float32, 64), []int{0, 2, 1}, 2, 1, 8, make([]float32, 8), nil)
		},
		"attention scratch": func() {
			tm.Attention(make([]float32, 32), 16, make([]float32, 64), []int{0, 2}, 2, 1, 8, make([]float32, 7), nil)
		},
		"attention short lse": func() {
			tm.Attention(make([]float32, 32), 16, make([]float32, 64), []int{0, 2}, 2, 1, 8, make([]float32, 8), make([]float32, 3))
		},
		"gemm short c": func() {
			tm.Gemm(false, true, 2, 3, 4, 1, make([]float32, 8), 4, make([]float32, 12), 4, 0, make([]float32, 5), 3)
		},
		"log softmax target": func() {
			tm.LogSoftmax(make([]float32, 6), 2, 3, []int32{0, 3}, make([]float32, 2), make([]float64, 2))
		},
		"decode position": func() {
			tm.DecodeAttention(make([]float32, 8), make([]float32, 16), 2, 1, 4, make([]float32, 32), make([]float32, 32),
				[]int{0}, []int{8}, 1, 0, 8, make([]float32, 16))
		},
		"after Close": func() { closed.SwiGLU(make([]float32, 50000), nil, make([]float32, 100000), 10000, 5) },
	}
	if packed.Available() {
		p := packed.Pack(make([]float32, 64*8), 64, 8)
		cases["mul short x"] = func() { tm.Mul(p, make([]float32, 128), 64, make([]float32, 8), 8, 2, 0) }
		cases["mul short y"] = func() { tm.Mul(p, make([]float32, 64), 64, make([]float32, 16), 8, 2, 0) }
		q := packed.Pack(make([]float32, 64*8), 64, 8)
		q.Free()
		cases["mul after Free"] = func() { tm.Mul(q, make([]float32, 64), 64, make([]float32, 8), 8, 1, 0) }
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			f()
		})
	}
}

// sgemmRef is alpha·op(A)·op(B) + beta·C in float64.
func sgemmRef(ta, tb bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) []float64 {
	out := make([]float64, m*n)
	for i := 0; i < m; i++ {
		for j := 0; j < n; j++ {
			var s float64
			for p := 0; p < k; p++ {
				ai, bi := i*lda+p, p*ldb+j
				if ta {
					ai = p*lda + i
				}
				if tb {
					bi = j*ldb + p
				}
				av, bv := a[ai], b[bi]
				s += float64(av) * float64(bv)
			}
			out[i*n+j] = float64(alpha)*s + float64(beta)*float64(c[i*ldc+j])
		}
	}
	return out
}

// TestGemmMatchesFloat64: every transpose pair, products cut by rows and by
// columns (and the sgemv path of a few rows times Bᵀ, in several blocks of
// B), strided operands and beta 0 and 1, shared and alone, agree with
// float64 to f32 rounding and leave C's row padding alone.
func TestGemmMatchesFloat64(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 14))
	tm := newTeam(t, 2)
	for _, sz := range [][3]int{{300, 40, 200}, {20, 700, 200}, {3, 5, 7}, {1, 1000, 600}, {3, 300, 2000}, {256, 960, 576}} {
		m, n, k := sz[0], sz[1], sz[2]
		for _, ta := range []bool{false, true} {
			for _, tb := range []bool{false, true} {
				lda, ldb, ldc := k+3, n+2, n+1
				ar, br := m, k
				if ta {
					lda, ar = m+3, k
				}
				if tb {
					ldb, br = k+2, n
				}
				a, b := randSlice(r, ar*lda), randSlice(r, br*ldb)
				for _, beta := range []float32{0, 1} {
					c0 := randSlice(r, m*ldc)
					want := sgemmRef(ta, tb, m, n, k, 0.5, a, lda, b, ldb, beta, c0, ldc)
					for _, solo := range []bool{false, true} {
						c := append([]float32(nil), c0...)
						run := func() { tm.Gemm(ta, tb, m, n, k, 0.5, a, lda, b, ldb, beta, c, ldc) }
						if solo {
							alone(tm, run)
						} else {
							run()
						}
						for i := 0; i < m; i++ {
							for j := 0; j < n; j++ {
								if d := math.Abs(float64(c[i*ldc+j]) - want[i*n+j]); d > 1e-5*math.Sqrt(float64(k))*(1+math.Abs(want[i*n+j])) {
									t.Fatalf("%v ta %v tb %v beta %v alone %v: C[%d][%d] = %v, float64 %v", sz, ta, tb, beta, solo, i, j, c[i*ldc+j], want[i*n+j])
								}
							}
							if c[i*ldc+n] != c0[i*ldc+n] {
								t.Fatalf("%v ta %v tb %v: padding of row %d written", sz, ta, tb, i)
							}
						}
					}
				}
			}
		}
	}
	a, b, c := randSlice(r, 256*576), randSlice(r, 960*576), make([]float32, 256*960)
	requireHelp(t, tm, func() { tm.Gemm(false, true, 256, 960, 576, 1, a, 576, b, 576, 0, c, 960) })
}

// TestDecodeAttentionMatchesFloat64: rows of several sequences, each at its
// own position in its own cache slot and at a middle layer, attend to their
// cached keys and values as float64 attention over the same rows does,
// shared and alone alike.
func TestDecodeAttentionMatchesFloat64(t *testing.T) {
	const H, KV, D, layers, layer, maxLen = 6, 2, 16, 3, 1, 300
	ld := (H + 2*KV) * D
	r := rand.New(rand.NewPCG(15, 16))
	slots, pos := []int{2, 0, 3}, []int{0, 17, 299}
	kc, vc := randSlice(r, 4*layers*KV*maxLen*D), randSlice(r, 4*layers*KV*maxLen*D)
	qkv := randSlice(r, len(slots)*ld)
	tm := newTeam(t, 2)
	for _, solo := range []bool{false, true} {
		out := make([]float32, len(slots)*H*D)
		run := func() {
			tm.DecodeAttention(out, qkv, H, KV, D, kc, vc, slots, pos, layers, layer, maxLen, make([]float32, tm.Threads()*H/KV*maxLen))
		}
		if solo {
			alone(tm, run)
		} else {
			run()
		}
		for i, slot := range slots {
			// The sequence as qkv rows: its cached keys and values, then this
			// row's q (earlier rows' q are never read for the last row).
			n := pos[i] + 1
			seq := make([]float32, n*ld)
			for p := 0; p < n; p++ {
				for g := 0; g < KV; g++ {
					off := ((slot*layers+layer)*KV+g)*maxLen*D + p*D
					copy(seq[p*ld+(H+g)*D:], kc[off:off+D])
					copy(seq[p*ld+(H+KV+g)*D:], vc[off:off+D])
				}
			}
			copy(seq[(n-1)*ld:(n-1)*ld+H*D], qkv[i*ld:])
			want, _, _ := attnRef(seq, []int{0, n}, H, KV, D)
			for c := 0; c < H*D; c++ {
				if g, w := float64(out[i*H*D+c]), want[(n-1)*H*D+c]; math.Abs(g-w) > 1e-5*(1+math.Abs(w)) {
					t.Fatalf("alone %v: sequence %d column %d = %v, float64 gives %v", solo, i, c, g, w)
				}
			}
		}
	}
}

// TestRowKernelsShareAlike: each element-wise task gives the same bits
// shared out in row chunks as on the caller alone, for a row count that
// splits into uneven chunks; the backward kernels are checked against
// finite differences in package trainer.
func TestRowKernelsShareAlike(t *testing.T) {
	r := rand.New(rand.NewPCG(17, 18))
	tm := newTeam(t, 2)
	const rows, dim, inter, heads, d, vocab = 301, 576, 300, 5, 64, 1000
	x, w, dy := randSlice(r, rows*dim), randSlice(r, dim), randSlice(r, rows*dim)
	gu, dact, cos, sin := randSlice(r, rows*2*inter), randSlice(r, rows*inter), randSlice(r, rows*d/2), randSlice(r, rows*d/2)
	logits := randSlice(r, rows*vocab)
	targets := make([]int32, rows)
	coef := make([]float64, rows)
	for i := range targets {
		targets[i], coef[i] = int32(r.IntN(vocab)), r.NormFloat64()
	}
	run := func() [][]float32 {
		out, rstd, dx := make([]float32, rows*dim), make([]float32, rows), append([]float32(nil), dy...)
		tm.RMSNorm(out, rstd, x, w, rows, dim, 1e-5)
		tm.RMSNormBackward(dx, dy, x, w, rstd, rows, dim)
		rot := append([]float32(nil), x...)
		tm.Rope(rot[3:], rows, dim, heads, d, cos, sin)
		act, sg, dgu := make([]float32, rows*inter), make([]float32, rows*inter), make([]float32, rows*2*inter)
		tm.SwiGLU(act, sg, gu, rows, inter)
		tm.SwiGLUBackward(dgu, dact, gu, sg, rows, inter)
		z, logp, lse := append([]float32(nil), logits...), make([]float32, rows), make([]float64, rows)
		tm.LogSoftmax(z, rows, vocab, targets, logp, lse)
		tm.SoftmaxGrad(z, rows, vocab, targets, lse, coef)
		return [][]float32{out, rstd, dx, rot, act, sg, dgu, logp, z}
	}
	shared := run()
	var solo [][]float32
	alone(tm, func() { solo = run() })
	for k := range shared {
		for i := range shared[k] {
			if shared[k][i] != solo[k][i] {
				t.Fatalf("output %d element %d: shared %v, alone %v", k, i, shared[k][i], solo[k][i])
			}
		}
	}
	// LogSoftmax and SoftmaxGrad against float64 on a few rows.
	logp, z := shared[7], shared[8]
	for i := 0; i < rows; i += 37 {
		row := logits[i*vocab : (i+1)*vocab]
		mx := math.Inf(-1)
		for _, v := range row {
			mx = max(mx, float64(v))
		}
		var sum float64
		for _, v := range row {
			sum += math.Exp(float64(v) - mx)
		}
		if want := float64(row[targets[i]]) - mx - math.Log(sum); math.Abs(float64(logp[i])-want) > 1e-5 {
			t.Fatalf("row %d: logp %v, float64 %v", i, logp[i], want)
		}
		for j, v := range row {
			want := -coef[i] * math.Exp(float64(v)-mx) / sum
			if j == int(targets[i]) {
				want += coef[i]
			}
			if math.Abs(float64(z[i*vocab+j])-want) > 1e-6 {
				t.Fatalf("row %d column %d: gradient %v, float64 %v", i, j, z[i*vocab+j], want)
			}
		}
	}
	requireHelp(t, tm, func() { run() })
}

// TestAttentionBackwardShareAlike: the backward's jobs give the same bits
// shared as alone (its gradient is checked against finite differences in
// package trainer).
func TestAttentionBackwardShareAlike(t *testing.T) {
	const H, KV, D = 4, 2, 8
	ld := (H + 2*KV) * D
	starts := []int{0, 5, 6, 140}
	T, maxL := 140, 134
	r := rand.New(rand.NewPCG(19, 20))
	qkv, dout := randSlice(r, T*ld), randSlice(r, T*H*D)
	tm := newTeam(t, 2)
	out, lse := make([]float32, T*H*D), make([]float32, H*T)
	tm.Attention(out, H*D, qkv, starts, H, KV, D, make([]float32, tm.Threads()*maxL*maxL), lse)
	run := func() []float32 {
		dqkv := randSlice(r, T*ld) // every q, k and v column is overwritten
		tm.AttentionBackward(dqkv, dout, out, lse, qkv, starts, H, KV, D, make([]float32, tm.Threads()*2*maxL*maxL), make([]float32, 2*H*T*D))
		return dqkv
	}
	shared := run()
	var solo []float32
	alone(tm, func() { solo = run() })
	for i := range shared {
		if shared[i] != solo[i] {
			t.Fatalf("element %d: shared %v, alone %v", i, shared[i], solo[i])
		}
	}
}

// TestHalfShareAlike checks that a half product shared out in column chunks
// agrees with the whole product on the caller alone (the path this process
// chose; package half tests every path's arithmetic). Not to the bit:
// oneDNN blocks the inner dimension by the output's width, so chunks of
// different widths sum in different orders; the tolerance is f32 rounding.
func TestHalfShareAlike(t *testing.T) {
	tm := newTeam(t, 1)
	r := rand.New(rand.NewPCG(21, 22))
	for _, dt := range []half.DType{half.BF16, half.F16} {
		for _, sh := range [][3]int{{1, 1000, 96}, {5, 300, 700}, {130, 200, 96}} {
			rows, n, k := sh[0], sh[1], sh[2]
			wf := make([]float32, n*k)
			for i := range wf {
				wf[i] = float32(r.NormFloat64() * 0.05)
			}
			w := half.FromFloat32(wf, n, k, dt)
			x := make([]float32, rows*k)
			dy := make([]float32, rows*n)
			for i := range x {
				x[i] = float32(r.NormFloat64())
			}
			for i := range dy {
				dy[i] = float32(r.NormFloat64())
			}
			for _, beta := range []float32{0, 1} {
				y1, y2 := make([]float32, rows*n), make([]float32, rows*n)
				dx1, dx2 := make([]float32, rows*k), make([]float32, rows*k)
				for i := range y1 {
					y1[i], y2[i] = 1, 1
				}
				for i := range dx1 {
					dx1[i], dx2[i] = 2, 2
				}
				w.MulT(y1, n, x, k, rows, beta)
				tm.HalfMulT(w, y2, n, x, k, rows, beta)
				w.Mul(dx1, k, dy, n, rows, beta)
				tm.HalfMul(w, dx2, k, dy, n, rows, beta)
				for i := range y1 {
					if !closeF32(y1[i], y2[i]) {
						t.Fatalf("%s %v beta %v: shared y[%d] = %v, alone %v", dt, sh, beta, i, y2[i], y1[i])
					}
				}
				for i := range dx1 {
					if !closeF32(dx1[i], dx2[i]) {
						t.Fatalf("%s %v beta %v: shared dx[%d] = %v, alone %v", dt, sh, beta, i, dx2[i], dx1[i])
					}
				}
			}
		}
	}
	if tm.helped() == 0 {
		t.Fatal("the helper ran no job")
	}
}

func closeF32(a, b float32) bool { return math.Abs(float64(a-b)) <= 1e-5*(1+math.Abs(float64(a))) }
