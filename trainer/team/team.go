// Package team runs the inference forward's parallel work — products with
// packed weights, per-head attention, the SwiGLU activation — on the
// calling goroutine and helper threads that are POSIX threads, not
// goroutines.
//
// Why not goroutines: the forward hands work out about 180 times per
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
// on a condition variable, so an idle model costs no CPU.
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

	"github.com/signal-p2p/signal/trainer/internal/shape"
	"github.com/signal-p2p/signal/trainer/packed"
	// The team's C code calls vmath's (the softmax and SwiGLU rows).
	_ "github.com/signal-p2p/signal/trainer/vmath"
)

// teamSpin is how long a helper polls for the next task before it sleeps:
// a forward hands one out every few hundred microseconds, and waking a
// sleeping thread costs tens.
const teamSpin = 200 * time.Microsecond

// Team is a caller plus helper threads. One task runs at a time: a
// goroutine that finds the team busy runs its task alone instead of
// waiting. Close (or the garbage collector) stops the threads.
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
// caller. Per-worker scratch (Attention's) needs this many slots.
func (tm *Team) Threads() int { return tm.threads }

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
	if !tm.mu.TryLock() {
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

func fptr(s []float32) *C.float { return (*C.float)(unsafe.Pointer(&s[0])) }

// lptr passes s to C as longs: int is 64 bits wherever the team runs
// (AVX-512 means amd64), as is C's long there.
func lptr(s []int) *C.long {
	if unsafe.Sizeof(s[0]) != unsafe.Sizeof(C.long(0)) {
		panic("team: int and C long differ in size on this platform")
	}
	return (*C.long)(unsafe.Pointer(&s[0]))
}

// minChunkMACs is the least work in one claimed chunk of a product: about
// 10 µs of the kernel, so that claims and calls stay a small part of it.
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
	t := tm.acquire()
	defer tm.release(t)
	perPanel := rows * p.K * packed.PanelCols
	chunk := min(p.PanelChunk(2*tm.threads), (minChunkMACs+perPanel-1)/perPanel*packed.PanelCols)
	C.tm_mul(t, C.long(rows), C.long(p.K), fptr(x), C.long(ldx), (*C.float)(p.Panels()), C.long(p.N), C.long(chunk),
		fptr(y), C.long(ldy), C.float(beta))
	runtime.KeepAlive(p)
}

// Attention computes causal grouped-query attention for the sequences of a
// packed batch, one job per (sequence, head): sequence s is rows
// [starts[s], starts[s+1]) of qkv, whose rows are [heads q | kvHeads k |
// kvHeads v] heads of d columns, q and k rotated; out receives [heads·d]
// per row (row stride ldOut). Each head's softmax probabilities [L, L] go
// to probs at probOffsets[s] + h·L² when probOffsets is not nil (kept for a
// backward), otherwise to per-thread scratch: probs then holds Threads()
// blocks of scratch floats, each at least the longest sequence squared.
// Each job is AttentionHead from row 0. Its GEMMs are OpenBLAS's: keep
// OpenBLAS at one thread meanwhile (trainer.AcquireSingleThreadBLAS), or
// its threads and the team's fight for the cores.
func (tm *Team) Attention(out []float32, ldOut int, qkv []float32, starts []int, heads, kvHeads, d int, probs []float32, probOffsets []int, scratch int) {
	seqs := len(starts) - 1
	if seqs <= 0 {
		return
	}
	if heads <= 0 || kvHeads <= 0 || heads%kvHeads != 0 || d <= 0 {
		panic(fmt.Sprintf("team: Attention: %d heads over %d kv heads of %d", heads, kvHeads, d))
	}
	if starts[0] != 0 {
		panic(fmt.Sprintf("team: Attention: starts %v do not begin at 0", starts))
	}
	T, maxL := starts[seqs], 0
	for s := 0; s < seqs; s++ {
		L := starts[s+1] - starts[s]
		if L < 0 {
			panic(fmt.Sprintf("team: Attention: starts %v do not ascend", starts))
		}
		maxL = max(maxL, L)
		if probOffsets != nil && (probOffsets[s] < 0 || probOffsets[s]+heads*L*L > len(probs)) {
			panic(fmt.Sprintf("team: Attention: sequence %d's probabilities at %d overrun %d", s, probOffsets[s], len(probs)))
		}
	}
	if T == 0 {
		return
	}
	need("qkv", len(qkv), T, (heads+2*kvHeads)*d, (heads+2*kvHeads)*d)
	need("out", len(out), T, heads*d, ldOut)
	var poff *C.long
	if probOffsets != nil {
		if len(probOffsets) < seqs {
			panic(fmt.Sprintf("team: Attention: %d probability offsets for %d sequences", len(probOffsets), seqs))
		}
		poff = lptr(probOffsets)
	} else if scratch < maxL*maxL || len(probs) < tm.threads*scratch {
		panic(fmt.Sprintf("team: Attention: scratch of %d floats for %d threads (longest sequence %d) in %d", scratch, tm.threads, maxL, len(probs)))
	}
	t := tm.acquire()
	defer tm.release(t)
	C.tm_attention(t, fptr(out), C.long(ldOut), fptr(qkv), lptr(starts), C.long(seqs), C.long(heads), C.long(kvHeads),
		C.long(d), fptr(probs), poff, C.long(scratch))
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
		C.long(row0), fptr(probs))
}

// SwiGLU writes act = silu(gate)·up for rows of gu [rows, 2·inter] (gate
// in the first inter columns, up in the rest) into act [rows, inter], in
// row chunks, two per thread.
func (tm *Team) SwiGLU(act, gu []float32, rows, inter int) {
	if rows == 0 || inter == 0 {
		return
	}
	need("gu", len(gu), rows, 2*inter, 2*inter)
	need("act", len(act), rows, inter, inter)
	t := tm.acquire()
	defer tm.release(t)
	chunk := (rows + 2*tm.threads - 1) / (2 * tm.threads)
	C.tm_swiglu(t, fptr(act), fptr(gu), C.long(rows), C.long(inter), C.long(chunk))
}

// need panics unless a [rows, cols] matrix with row stride ld fits in n
// elements: a shape error is a programming error, caught before C reads.
func need(name string, n, rows, cols, ld int) { shape.Need("team", name, n, rows, cols, ld) }
