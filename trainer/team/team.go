// Package team is the engine's one parallel runner: every piece of a
// forward or backward pass that is worth sharing — products (packed or
// OpenBLAS), attention forward and backward, attention against a KV cache,
// and the element-wise kernels of package vmath — runs on the calling
// goroutine and helper threads that are POSIX threads, not goroutines.
// Each task is one cgo call that cuts its work into jobs the threads claim
// in turn; a nil *Team, or a task too small to share, runs on the caller
// alone.
//
// Why not goroutines: a forward hands work out about 180 times per
// 128-token prefill on the 135M shape (four products, attention and SwiGLU
// in each of 30 layers), each share a millisecond or less. While one
// goroutine computes in a cgo call and another holds the second P (polling
// for its next share, or waiting at the join), Go's sysmon finds no idle P,
// retakes the cgo call's P, and keeps waking every 20 µs to do so again;
// each wake preempts one of the two busy cores. Measured on that shape's
// products alone (one run, interleaved): a goroutine pool 153–170 GFLOP/s
// with ~105k context switches, this team 173–194 with ~40k, the same two
// halves on two goroutines with no join at all 173–204. The caller here is
// in one cgo call per task and the other P stays idle, so sysmon backs off.
//
// A helper polls for the next task for a while (teamSpin) and then sleeps
// on a condition variable, so an idle model costs no CPU; a caller waiting
// for the helpers' last jobs does the same, so that on a loaded machine a
// helper that lost its core does not cost the caller's core as well.
package team

// #cgo CFLAGS: -O2
// #cgo LDFLAGS: -lopenblas -lpthread -lm
// #include "team.h"
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"github.com/signal-p2p/signal/trainer/half"
	"github.com/signal-p2p/signal/trainer/internal/shape"
	"github.com/signal-p2p/signal/trainer/packed"
	// The team's C code calls vmath's (its element-wise kernels).
	_ "github.com/signal-p2p/signal/trainer/vmath"
)

// teamSpin is how long a helper polls for the next task, and a caller for
// the helpers' last jobs, before it sleeps: a pass hands a task out every
// few hundred microseconds, and waking a sleeping thread costs tens.
const teamSpin = 200 * time.Microsecond

// Team is a caller plus helper threads. One task runs at a time: a
// goroutine that finds the team busy runs its task alone instead of
// waiting. Close (or the garbage collector) stops the threads. Every
// method works on a nil *Team too, on the caller alone (a one-CPU
// machine has no helpers to start).
type Team struct {
	mu      sync.Mutex
	h       *handle
	threads int
}

// handle owns the C team so that a cleanup can stop its threads without
// keeping the Team reachable.
type handle struct {
	mu sync.Mutex
	t  *C.tm_team
}

func (h *handle) free() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.t != nil {
		C.tm_free(h.t)
		h.t = nil
	}
}

// New starts a team of the caller and helpers threads (helpers ≥ 1).
func New(helpers int) (*Team, error) {
	if helpers < 1 {
		return nil, fmt.Errorf("team: needs at least one helper, got %d", helpers)
	}
	t := C.tm_new(C.int(helpers), C.long(teamSpin.Nanoseconds()))
	if t == nil {
		return nil, fmt.Errorf("team: could not start %d helper threads", helpers)
	}
	h := &handle{t: t}
	tm := &Team{h: h, threads: helpers + 1}
	runtime.AddCleanup(tm, func(h *handle) { h.free() }, h)
	return tm, nil
}

// Threads is the number of threads a task runs on: the helpers and the
// caller. Per-thread scratch (the attention tasks') needs this many blocks.
func (tm *Team) Threads() int {
	if tm == nil {
		return 1
	}
	return tm.threads
}

// Close stops the helper threads; the Team must not be used after. It is
// safe to call more than once.
func (tm *Team) Close() {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	tm.h.free()
}

// helped counts the jobs the helpers have run.
func (tm *Team) helped() int64 {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	return int64(C.tm_helped(tm.h.t))
}

// acquire locks the team for one task and returns it, or returns nil when
// another goroutine holds it: the caller then runs the task alone rather
// than wait (release(nil) is a no-op).
func (tm *Team) acquire() *C.tm_team {
	if tm == nil || !tm.mu.TryLock() {
		return nil
	}
	if tm.h.t == nil {
		tm.mu.Unlock()
		panic("team: used after Close")
	}
	return tm.h.t
}

func (tm *Team) release(t *C.tm_team) {
	if t != nil {
		tm.mu.Unlock()
	}
}

// share returns the team for a task of jobs jobs, or nil (the caller runs
// it alone) when there is one job or the team is busy; release it after.
func (tm *Team) share(jobs int) *C.tm_team {
	if jobs < 2 {
		return nil
	}
	return tm.acquire()
}

func fptr(s []float32) *C.float { return (*C.float)(unsafe.Pointer(&s[0])) }

// optr is fptr for an optional output: NULL for a nil slice.
func optr(s []float32) *C.float {
	if s == nil {
		return nil
	}
	return fptr(s)
}

// lptr passes s to C as longs: int is 64 bits wherever the team runs
// (AVX-512 means amd64), as is C's long there.
func lptr(s []int) *C.long {
	if unsafe.Sizeof(s[0]) != unsafe.Sizeof(C.long(0)) {
		panic("team: int and C long differ in size on this platform")
	}
	return (*C.long)(unsafe.Pointer(&s[0]))
}

// minChunkMACs is the least work in one claimed chunk of a packed product:
// about 10 µs of the kernel, so that claims and calls stay a small part of
// it.
const minChunkMACs = 1 << 20

// Mul is p.Mul (y = x·Wᵀ + beta·y) shared out in column chunks of whole
// panels that the threads claim in turn. With many rows a chunk is one
// panel: a panel's work is then ~40 µs or more, and with more chunks than
// threads, each thread ends within a panel of the others (chunks of a
// quarter of the product left one thread 10 % more on the 576-column
// products: 18 panels cut 5+5+5+3). With few rows (decode) a chunk is as
// many panels as make minChunkMACs, but at least two chunks per thread.
func (tm *Team) Mul(p *packed.Weights, y []float32, ldy int, x []float32, ldx int, rows int, beta float32) {
	if rows == 0 {
		return
	}
	p.Check(y, ldy, x, ldx, rows)
	perPanel := rows * p.K * packed.PanelCols
	chunk := min(p.PanelChunk(2*tm.Threads()), (minChunkMACs+perPanel-1)/perPanel*packed.PanelCols)
	t := tm.share((p.N + chunk - 1) / chunk)
	defer tm.release(t)
	C.tm_mul(t, C.long(rows), C.long(p.K), fptr(x), C.long(ldx), (*C.float)(p.Panels()), C.long(p.N), C.long(chunk),
		fptr(y), C.long(ldy), C.float(beta))
	runtime.KeepAlive(p)
}

// halfChunk is the column granularity of a shared half product: oneDNN's
// bf16 kernels block the output by 64 columns here.
const halfChunk = 64

// HalfMulT is w.MulT (y = x·Wᵀ + beta·y) shared out in column chunks of
// y: activations are rounded to bf16 once, in row chunks (when the path
// reads them so), then each column chunk is one single-threaded product.
func (tm *Team) HalfMulT(w *half.Matrix, y []float32, ldy int, x []float32, ldx int, rows int, beta float32) {
	if rows == 0 {
		return
	}
	w.CheckMulT(y, ldy, x, ldx, rows, beta)
	tm.half(w, false, y, ldy, x, ldx, rows, w.N, w.K, beta)
}

// HalfMul is w.Mul (dx = dy·W + beta·dx) shared out in column chunks of dx.
func (tm *Team) HalfMul(w *half.Matrix, dx []float32, lddx int, dy []float32, lddy int, rows int, beta float32) {
	if rows == 0 {
		return
	}
	w.CheckMul(dx, lddx, dy, lddy, rows, beta)
	tm.half(w, true, dx, lddx, dy, lddy, rows, w.K, w.N, beta)
}

// half runs one half product: out columns [0, cols) in chunks, each a
// product over inner elements.
func (tm *Team) half(w *half.Matrix, back bool, y []float32, ldy int, x []float32, ldx, rows, cols, inner int, beta float32) {
	var xb *[]uint16 // filled by the task's first phase
	if w.RoundsInput() {
		xb = half.Buffer(rows * inner)
		defer half.PutBuffer(xb)
	}
	threads := tm.Threads()
	least := minGemmChunkMACs
	if rows <= gemvRows && !back {
		least = minGemvChunkMACs
	}
	chunks := max(1, min(2*threads, rows*cols*inner/least))
	chunk := (cols + chunks - 1) / chunks
	chunk = (chunk + halfChunk - 1) / halfChunk * halfChunk
	var xbp *C.uint16_t
	if xb != nil && len(*xb) > 0 {
		xbp = (*C.uint16_t)(&(*xb)[0])
	}
	t := tm.share((cols + chunk - 1) / chunk)
	defer tm.release(t)
	C.tm_half(t, cbool(back), C.int(half.Path()), C.int(w.DType), C.long(rows), C.long(w.N), C.long(w.K), fptr(x), C.long(ldx),
		xbp, (*C.uint16_t)(w.Pointer()), fptr(y), C.long(ldy), C.float(beta), C.long(chunk))
	runtime.KeepAlive(w)
}

// gemvRows is the most rows the half product streams W for (half.c's
// GEMV_ROWS), and minGemvChunkMACs the least work in one chunk of it: it
// packs nothing, so a chunk only has to outweigh its hand-off — a decode
// step's 576×576 projection splits too, where at the GEMM's bound it ran
// on one thread while the other waited.
const (
	gemvRows         = 4
	minGemvChunkMACs = 1 << 15
)

// minGemmChunkMACs is the least work in one chunk of Gemm: OpenBLAS
// re-packs the shared operand for every call, so a chunk must be worth
// more than that (a decode step's 576×960 product still splits in two).
const minGemmChunkMACs = 1 << 18

// Gemm is C = alpha·op(A)·op(B) + beta·C, with op(X) X or Xᵀ, op(A) m×k,
// op(B) k×n, all row-major, shared out as one single-threaded OpenBLAS
// call per chunk of C's rows (a tall C: many tokens) or 8-aligned columns.
// One chunk per thread: every chunk packs the operand the chunks share
// again, and two per thread measured ~15 % slower on the 135M shape's
// 128-token products. A few rows times Bᵀ (a decode step's x·Wᵀ) run as
// sgemv (see team.c). OpenBLAS must be at one thread meanwhile
// (trainer.AcquireSingleThreadBLAS), or its threads and the team's fight
// for the cores.
func (tm *Team) Gemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	if k <= 0 {
		panic(fmt.Sprintf("team: Gemm: inner dimension %d", k))
	}
	ar, ac, br, bc := m, k, k, n
	if transA {
		ar, ac = k, m
	}
	if transB {
		br, bc = n, k
	}
	need("A", len(a), ar, ac, lda)
	need("B", len(b), br, bc, ldb)
	need("C", len(c), m, n, ldc)
	threads := tm.Threads()
	byRows := m >= n || m >= 64*threads
	dim := n
	if byRows {
		dim = m
	}
	chunks := min(threads, m*n*k/minGemmChunkMACs, (dim+15)/16)
	chunk := dim
	if chunks >= 2 {
		chunk = (dim + chunks - 1) / chunks
		if !byRows {
			chunk = (chunk + 7) &^ 7
		}
	}
	t := tm.share((dim + chunk - 1) / chunk)
	defer tm.release(t)
	C.tm_gemm(t, cbool(transA), cbool(transB), cbool(byRows), C.long(m), C.long(n), C.long(k), C.float(alpha),
		fptr(a), C.long(lda), fptr(b), C.long(ldb), C.float(beta), fptr(c), C.long(ldc), C.long(chunk))
}

func cbool(b bool) C.int {
	if b {
		return 1
	}
	return 0
}

// checkHeads panics unless heads q heads share kvHeads key/value heads of
// d columns evenly.
func checkHeads(what string, heads, kvHeads, d int) {
	if heads <= 0 || kvHeads <= 0 || heads%kvHeads != 0 || d <= 0 {
		panic(fmt.Sprintf("team: %s: %d heads over %d kv heads of %d", what, heads, kvHeads, d))
	}
}

// checkBatch checks a packed batch's sequence starts and attention shape
// and returns its rows and longest sequence.
func checkBatch(what string, starts []int, heads, kvHeads, d int) (T, maxL int) {
	checkHeads(what, heads, kvHeads, d)
	if len(starts) == 0 || starts[0] != 0 {
		panic(fmt.Sprintf("team: %s: starts %v do not begin at 0", what, starts))
	}
	for s := 0; s+1 < len(starts); s++ {
		L := starts[s+1] - starts[s]
		if L < 0 {
			panic(fmt.Sprintf("team: %s: starts %v do not ascend", what, starts))
		}
		maxL = max(maxL, L)
	}
	return starts[len(starts)-1], maxL
}

// perThread returns the size of each thread's block of scratch, which must
// hold at least need floats.
func (tm *Team) perThread(what string, scratch []float32, need int) int {
	per := len(scratch) / tm.Threads()
	if per < need {
		panic(fmt.Sprintf("team: %s: scratch of %d floats for %d threads, each needs %d", what, len(scratch), tm.Threads(), need))
	}
	return per
}

// Attention computes causal grouped-query attention for the sequences of a
// packed batch, one job per (sequence, head): sequence s is rows
// [starts[s], starts[s+1]) of qkv, whose rows are [heads q | kvHeads k |
// kvHeads v] heads of d columns, q and k rotated; out receives [heads·d]
// per row (row stride ldOut). Each job is AttentionHead from row 0, its
// probabilities in the thread's block of scratch: Threads() blocks of at
// least the longest sequence squared. When lse is not nil it receives
// [heads, T]: each row's log-sum-exp of its scaled scores per head, from
// which AttentionBackward rebuilds the probabilities. Its GEMMs are
// OpenBLAS's, at one thread (see Gemm).
func (tm *Team) Attention(out []float32, ldOut int, qkv []float32, starts []int, heads, kvHeads, d int, scratch, lse []float32) {
	T, maxL := checkBatch("Attention", starts, heads, kvHeads, d)
	if T == 0 {
		return
	}
	need("qkv", len(qkv), T, (heads+2*kvHeads)*d, (heads+2*kvHeads)*d)
	need("out", len(out), T, heads*d, ldOut)
	if lse != nil {
		need("lse", len(lse), heads, T, T)
	}
	per := tm.perThread("Attention", scratch, maxL*maxL)
	seqs := len(starts) - 1
	t := tm.share(seqs * heads)
	defer tm.release(t)
	C.tm_attention(t, fptr(out), C.long(ldOut), fptr(qkv), lptr(starts), C.long(seqs), C.long(heads), C.long(kvHeads),
		C.long(d), fptr(scratch), C.long(per), optr(lse))
}

// AttentionBackward writes into dqkv's q, k and v columns the gradient of
// Attention's output with respect to them (before RoPE's backward), given
// dout [T, heads·d] and the forward's qkv, out [T, heads·d] and lse. The
// probabilities are rebuilt from q, k and lse, not kept; the full square
// of scores is recomputed per head. scratch holds Threads() blocks of at
// least twice the longest sequence squared; dkv [2, heads, T, d] holds each
// head's dK and dV until a KV group's heads are summed into dqkv.
func (tm *Team) AttentionBackward(dqkv, dout, out, lse, qkv []float32, starts []int, heads, kvHeads, d int, scratch, dkv []float32) {
	T, maxL := checkBatch("AttentionBackward", starts, heads, kvHeads, d)
	if T == 0 {
		return
	}
	ld := (heads + 2*kvHeads) * d
	need("qkv", len(qkv), T, ld, ld)
	need("dqkv", len(dqkv), T, ld, ld)
	need("out", len(out), T, heads*d, heads*d)
	need("dout", len(dout), T, heads*d, heads*d)
	need("lse", len(lse), heads, T, T)
	need("dkv", len(dkv), 2*heads*T, d, d)
	per := tm.perThread("AttentionBackward", scratch, 2*maxL*maxL) / 2
	seqs := len(starts) - 1
	t := tm.share(seqs * heads)
	defer tm.release(t)
	C.tm_attention_bwd(t, fptr(dqkv), fptr(dout), fptr(out), fptr(lse), fptr(qkv), lptr(starts), C.long(seqs),
		C.long(heads), C.long(kvHeads), C.long(d), fptr(scratch), C.long(per), fptr(dkv), C.long(tm.rowChunk(T, 2*ld)))
}

// DecodeAttention is attention for one new row per sequence against a KV
// cache: row i of qkv (q rotated; its own key and value already stored)
// attends to the pos[i]+1 keys and values of cache slot slots[i] at layer
// layer. k and v hold [slots, layers, kvHeads, maxLen, d] blocks, so that a
// KV head's keys are one contiguous matrix. out receives [rows, heads·d].
// One job per (sequence, KV head), shared out when the cache read is large
// enough to pay; scratch holds Threads() blocks of (heads/kvHeads)·maxLen.
func (tm *Team) DecodeAttention(out, qkv []float32, heads, kvHeads, d int, k, v []float32, slots, pos []int, layers, layer, maxLen int, scratch []float32) {
	rows := len(slots)
	if rows == 0 {
		return
	}
	checkHeads("DecodeAttention", heads, kvHeads, d)
	need("qkv", len(qkv), rows, (heads+2*kvHeads)*d, (heads+2*kvHeads)*d)
	need("out", len(out), rows, heads*d, heads*d)
	if len(pos) != rows || layer < 0 || layer >= layers {
		panic(fmt.Sprintf("team: DecodeAttention: %d slots, %d positions, layer %d of %d", rows, len(pos), layer, layers))
	}
	macs := 0
	for i, s := range slots {
		if s < 0 || pos[i] < 0 || pos[i] >= maxLen {
			panic(fmt.Sprintf("team: DecodeAttention: slot %d at position %d of %d", s, pos[i], maxLen))
		}
		need("k", len(k), ((s*layers+layer)*kvHeads+kvHeads)*maxLen, d, d)
		macs += 2 * heads * (pos[i] + 1) * d
	}
	need("v", len(v), len(k)/d, d, d)
	per := tm.perThread("DecodeAttention", scratch, heads/kvHeads*maxLen)
	jobs := rows * kvHeads
	if macs < minGemmChunkMACs {
		jobs = 1 // the whole read is smaller than one worthwhile share
	}
	t := tm.share(jobs)
	defer tm.release(t)
	C.tm_decode_attention(t, fptr(out), fptr(qkv), C.long(rows), C.long(heads), C.long(kvHeads), C.long(d), fptr(k),
		fptr(v), lptr(slots), lptr(pos), C.long(layers), C.long(layer), C.long(maxLen), fptr(scratch), C.long(per))
}

// AttentionHead is head h's causal attention for rows [row0, L) of one
// sequence of L rows, on the calling goroutine (no team needed): qkv holds
// the sequence's rows as Attention's do; row r's output goes to out at
// (r−row0)·ldOut + h·d and its softmax probabilities [L] to probs at
// (r−row0)·L (zero past r). Queries run in blocks of 128 rows, each scoring
// only the keys it can see. Attention's jobs run the same C function, so
// the engine has one attention forward.
func AttentionHead(out []float32, ldOut int, qkv []float32, L, heads, kvHeads, d, h, row0 int, probs []float32) {
	if row0 >= L {
		return
	}
	if heads <= 0 || kvHeads <= 0 || heads%kvHeads != 0 || d <= 0 || h < 0 || h >= heads || row0 < 0 {
		panic(fmt.Sprintf("team: AttentionHead: head %d of %d over %d kv heads of %d, from row %d", h, heads, kvHeads, d, row0))
	}
	need("qkv", len(qkv), L, (heads+2*kvHeads)*d, (heads+2*kvHeads)*d)
	need("out", len(out), L-row0, heads*d, ldOut)
	need("probs", len(probs), L-row0, L, L)
	C.tm_attn_head(fptr(out), C.long(ldOut), fptr(qkv), C.long(L), C.long(heads), C.long(kvHeads), C.long(d), C.long(h),
		C.long(row0), fptr(probs), nil)
}

// minRowElems keeps an element-wise task on the caller unless each job
// gets this many elements: below it a share saves less than the hand-off
// costs, and on a loaded machine every join is a chance to wait for a
// descheduled thread.
const minRowElems = 1 << 16

// rowChunk is the rows of one job of an element-wise task over rows rows
// of width elements: two jobs per thread when each gets minRowElems
// elements (a thread that starts late then takes fewer), else all rows.
func (tm *Team) rowChunk(rows, width int) int {
	jobs := min(2*tm.Threads(), rows*width/minRowElems, rows)
	if jobs < 2 {
		return max(rows, 1)
	}
	return (rows + jobs - 1) / jobs
}

// rowsTask is the team for an element-wise task over rows of width
// elements, and its chunk; release the team after.
func (tm *Team) rowsTask(rows, width int) (*C.tm_team, C.long) {
	chunk := tm.rowChunk(rows, width)
	return tm.share((rows + chunk - 1) / chunk), C.long(chunk)
}

// RMSNorm is vmath.RMSNorm (rstd may be nil) shared out in row chunks.
func (tm *Team) RMSNorm(out, rstd, x, w []float32, rows, dim int, eps float32) {
	if rows == 0 || dim == 0 {
		return
	}
	need("x", len(x), rows, dim, dim)
	need("out", len(out), rows, dim, dim)
	need("w", len(w), 1, dim, dim)
	if rstd != nil {
		need("rstd", len(rstd), rows, 1, 1)
	}
	t, chunk := tm.rowsTask(rows, dim)
	defer tm.release(t)
	C.tm_rmsnorm(t, fptr(out), optr(rstd), fptr(x), fptr(w), C.long(rows), C.long(dim), C.float(eps), chunk)
}

// RMSNormBackward adds to dx the gradient through out = RMSNorm(x)·w with w
// frozen, given dy and the forward's rstd (all [rows, dim], rstd [rows]):
// with g = dy·w, dx += rstd·g − x·rstd³·mean(g·x), the mean in float64.
func (tm *Team) RMSNormBackward(dx, dy, x, w, rstd []float32, rows, dim int) {
	if rows == 0 || dim == 0 {
		return
	}
	need("dx", len(dx), rows, dim, dim)
	need("dy", len(dy), rows, dim, dim)
	need("x", len(x), rows, dim, dim)
	need("w", len(w), 1, dim, dim)
	need("rstd", len(rstd), rows, 1, 1)
	t, chunk := tm.rowsTask(rows, dim)
	defer tm.release(t)
	C.tm_rmsnorm_bwd(t, fptr(dx), fptr(dy), fptr(x), fptr(w), fptr(rstd), C.long(rows), C.long(dim), chunk)
}

// Rope is vmath.Rope shared out in row chunks. With the sin table negated
// it turns back: a rotation's inverse is its transpose, so that is also
// its backward.
func (tm *Team) Rope(x []float32, rows, ld, heads, d int, cos, sin []float32) {
	if rows == 0 || heads == 0 || d == 0 {
		return
	}
	if d%2 != 0 {
		panic(fmt.Sprintf("team: Rope: head width %d is odd", d))
	}
	need("x", len(x), rows, heads*d, ld)
	need("cos", len(cos), rows, d/2, d/2)
	need("sin", len(sin), rows, d/2, d/2)
	t, chunk := tm.rowsTask(rows, heads*d)
	defer tm.release(t)
	C.tm_rope(t, fptr(x), C.long(rows), C.long(ld), C.long(heads), C.long(d), fptr(cos), fptr(sin), chunk)
}

// SwiGLU is vmath.SwiGLU (act = silu(gate)·up from gu [rows, 2·inter], and
// σ(gate) into sg unless nil) shared out in row chunks.
func (tm *Team) SwiGLU(act, sg, gu []float32, rows, inter int) {
	if rows == 0 || inter == 0 {
		return
	}
	need("gu", len(gu), rows, 2*inter, 2*inter)
	need("act", len(act), rows, inter, inter)
	if sg != nil {
		need("sg", len(sg), rows, inter, inter)
	}
	t, chunk := tm.rowsTask(rows, 3*inter)
	defer tm.release(t)
	C.tm_swiglu(t, fptr(act), optr(sg), fptr(gu), C.long(rows), C.long(inter), chunk)
}

// SwiGLUBackward writes dgu [rows, 2·inter] (gate columns, then up, as
// gu) from the gradient dact [rows, inter] and the forward's gu and
// sg = σ(gate): d up = dact·gate·σ, d gate = dact·up·σ·(1 + gate·(1 − σ)).
func (tm *Team) SwiGLUBackward(dgu, dact, gu, sg []float32, rows, inter int) {
	if rows == 0 || inter == 0 {
		return
	}
	need("gu", len(gu), rows, 2*inter, 2*inter)
	need("dgu", len(dgu), rows, 2*inter, 2*inter)
	need("dact", len(dact), rows, inter, inter)
	need("sg", len(sg), rows, inter, inter)
	t, chunk := tm.rowsTask(rows, 4*inter)
	defer tm.release(t)
	C.tm_swiglu_bwd(t, fptr(dgu), fptr(dact), fptr(gu), fptr(sg), C.long(rows), C.long(inter), chunk)
}

// checkTargets panics unless every target is a column of a vocab-wide row.
func checkTargets(what string, targets []int32, rows, vocab int) {
	if len(targets) < rows {
		panic(fmt.Sprintf("team: %s: %d targets for %d rows", what, len(targets), rows))
	}
	for _, t := range targets[:rows] {
		if t < 0 || int(t) >= vocab {
			panic(fmt.Sprintf("team: %s: target %d outside [0, %d)", what, t, vocab))
		}
	}
}

// LogSoftmax takes each row r of logits z [rows, vocab] to its target's
// log-probability logp[r], keeping in z the exponentials e^(z − max) and
// in lse[r] the log of their sum (float64): what SoftmaxGrad turns into the
// gradient without a second exponential.
func (tm *Team) LogSoftmax(z []float32, rows, vocab int, targets []int32, logp []float32, lse []float64) {
	if rows == 0 {
		return
	}
	need("z", len(z), rows, vocab, vocab)
	need("logp", len(logp), rows, 1, 1)
	if len(lse) < rows {
		panic(fmt.Sprintf("team: LogSoftmax: lse has %d of %d rows", len(lse), rows))
	}
	checkTargets("LogSoftmax", targets, rows, vocab)
	t, chunk := tm.rowsTask(rows, vocab)
	defer tm.release(t)
	C.tm_log_softmax(t, fptr(z), C.long(rows), C.long(vocab), (*C.int32_t)(unsafe.Pointer(&targets[0])), fptr(logp),
		(*C.double)(unsafe.Pointer(&lse[0])), chunk)
}

// SoftmaxGrad turns LogSoftmax's exponentials in z into the gradient of
// Σ coef[r]·logp[r] with respect to the logits: coef[r]·(onehot(target) −
// softmax) per row.
func (tm *Team) SoftmaxGrad(z []float32, rows, vocab int, targets []int32, lse, coef []float64) {
	if rows == 0 {
		return
	}
	need("z", len(z), rows, vocab, vocab)
	if len(lse) < rows || len(coef) < rows {
		panic(fmt.Sprintf("team: SoftmaxGrad: lse %d and coef %d for %d rows", len(lse), len(coef), rows))
	}
	checkTargets("SoftmaxGrad", targets, rows, vocab)
	t, chunk := tm.rowsTask(rows, vocab)
	defer tm.release(t)
	C.tm_softmax_grad(t, fptr(z), C.long(rows), C.long(vocab), (*C.int32_t)(unsafe.Pointer(&targets[0])),
		(*C.double)(unsafe.Pointer(&lse[0])), (*C.double)(unsafe.Pointer(&coef[0])), chunk)
}

// need panics unless a [rows, cols] matrix with row stride ld fits in n
// elements: a shape error is a programming error, caught before C reads.
func need(name string, n, rows, cols, ld int) { shape.Need("team", name, n, rows, cols, ld) }
