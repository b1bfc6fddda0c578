package team

import (
	"math"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

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

// attnRef is causal grouped-query attention in float64: out [T, H·D] and
// each head's probabilities [L, L] per sequence.
func attnRef(qkv []float32, starts []int, H, KV, D int) (out []float64, probs [][]float64) {
	ld := (H + 2*KV) * D
	T := starts[len(starts)-1]
	out = make([]float64, T*H*D)
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
	return out, probs
}

// TestAttentionMatchesFloat64: sequences of different lengths (one of a
// single row, some past the 128-row query block) in one batch, with the
// probabilities kept at offsets and in per-thread scratch, shared and
// alone: the output and the kept probabilities (zero above the diagonal)
// agree with float64 to f32 rounding, and all four ways give the same
// bits.
func TestAttentionMatchesFloat64(t *testing.T) {
	const H, KV, D = 6, 2, 16
	ld := (H + 2*KV) * D
	starts := []int{0, 1, 6, 136, 436}
	T := starts[len(starts)-1]
	r := rand.New(rand.NewPCG(3, 4))
	qkv := randSlice(r, T*ld)
	want, wantProbs := attnRef(qkv, starts, H, KV, D)
	offsets := make([]int, len(starts))
	maxL := 0
	for s := 0; s+1 < len(starts); s++ {
		L := starts[s+1] - starts[s]
		offsets[s+1] = offsets[s] + H*L*L
		maxL = max(maxL, L)
	}
	tm := newTeam(t, 2)
	ldOut := H*D + 3 // a wider output row: only the first H·D columns are written
	var outs [][]float32
	for _, keep := range []bool{true, false} {
		for _, solo := range []bool{false, true} {
			out := make([]float32, T*ldOut)
			var probs []float32
			var off []int
			scratch := maxL * maxL
			if keep {
				probs, off = make([]float32, offsets[len(offsets)-1]), offsets
				for i := range probs {
					probs[i] = float32(math.NaN()) // every kept element must be written
				}
			} else {
				probs = make([]float32, tm.Threads()*scratch)
			}
			run := func() { tm.Attention(out, ldOut, qkv, starts, H, KV, D, probs, off, scratch) }
			if solo {
				alone(tm, run)
			} else {
				run()
			}
			for i := 0; i < T; i++ {
				for c := 0; c < H*D; c++ {
					g, w := float64(out[i*ldOut+c]), want[i*H*D+c]
					if math.Abs(g-w) > 1e-5*(1+math.Abs(w)) {
						t.Fatalf("keep %v alone %v: out[%d][%d] = %v, float64 gives %v", keep, solo, i, c, g, w)
					}
				}
				for c := H * D; c < ldOut; c++ {
					if out[i*ldOut+c] != 0 {
						t.Fatalf("keep %v alone %v: column %d past H·D written", keep, solo, c)
					}
				}
			}
			if keep {
				for s := 0; s+1 < len(starts); s++ {
					L := starts[s+1] - starts[s]
					for h := 0; h < H; h++ {
						p, w := probs[offsets[s]+h*L*L:offsets[s]+(h+1)*L*L], wantProbs[s*H+h]
						for i := range p {
							if math.Abs(float64(p[i])-w[i]) > 1e-6 {
								t.Fatalf("alone %v: sequence %d head %d probability %d = %v, float64 gives %v", solo, s, h, i, p[i], w[i])
							}
						}
					}
				}
			}
			outs = append(outs, out)
		}
	}
	requireHelp(t, tm, func() {
		tm.Attention(make([]float32, T*H*D), H*D, qkv, starts, H, KV, D, make([]float32, tm.Threads()*maxL*maxL), nil, maxL*maxL)
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
	want, wantProbs := attnRef(qkv, []int{0, L}, H, KV, D)
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
// for row counts below, at and above the number of chunks.
func TestSwiGLUMatchesVmath(t *testing.T) {
	tm := newTeam(t, 1)
	r := rand.New(rand.NewPCG(5, 6))
	const inter = 37
	for _, rows := range []int{1, 3, 4, 5, 129} {
		gu := randSlice(r, rows*2*inter)
		want := make([]float32, rows*inter)
		vmath.SwiGLU(want, nil, gu, rows, inter)
		got, solo := make([]float32, rows*inter), make([]float32, rows*inter)
		tm.SwiGLU(got, gu, rows, inter)
		alone(tm, func() { tm.SwiGLU(solo, gu, rows, inter) })
		for i := range want {
			if got[i] != want[i] || solo[i] != want[i] {
				t.Fatalf("rows %d: element %d = %v (alone %v), vmath gives %v", rows, i, got[i], solo[i], want[i])
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
				tm.SwiGLU(got, gu, rows, inter)
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
		"swiglu short act": func() { tm.SwiGLU(make([]float32, 5), make([]float32, 20), 2, 5) },
		"swiglu short gu":  func() { tm.SwiGLU(make([]float32, 10), make([]float32, 19), 2, 5) },
		"attention heads": func() {
			tm.Attention(make([]float32, 16), 16, make([]float32, 64), []int{0, 1}, 3, 2, 4, make([]float32, 8), nil, 1)
		},
		"attention short qkv": func() {
			tm.Attention(make([]float32, 32), 16, make([]float32, 63), []int{0, 2}, 2, 1, 8, make([]float32, 8), nil, 4)
		},
		"attention starts": func() {
			tm.Attention(make([]float32, 32), 16, make([]float32, 64), []int{0, 2, 1}, 2, 1, 8, make([]float32, 8), nil, 4)
		},
		"attention scratch": func() {
			tm.Attention(make([]float32, 32), 16, make([]float32, 64), []int{0, 2}, 2, 1, 8, make([]float32, 4), nil, 3)
		},
		"attention offsets": func() {
			tm.Attention(make([]float32, 32), 16, make([]float32, 64), []int{0, 2}, 2, 1, 8, make([]float32, 7), []int{0}, 0)
		},
		"after Close": func() { closed.SwiGLU(make([]float32, 10), make([]float32, 20), 2, 5) },
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
