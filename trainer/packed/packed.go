// Package packed multiplies activations by weights that were packed once, at
// load: y = x·Wᵀ + β·y with W [n, k] in Hugging Face's [out, in] layout, on
// CPUs with AVX-512F (Available), in C (packed.c).
//
// Why not OpenBLAS's sgemm, which the engine uses elsewhere: sgemm re-packs
// W on every call, and in a forward pass W is never in cache — each layer's
// weights are read once per product, from memory. On the 135M shape's
// 128-token prefill products that packing was 14 % of the prefill's time
// (perf: sgemm_incopy) and the kernel ran at 84–91 GFLOP/s per core; with W
// packed once, the panels stream from memory in the order the kernel reads
// them and the same products run at 104–111 (the core's FMA peak is 116).
// Small row counts (decode) gain more: W streams once, in order. oneDNN 2.6
// (Debian's libdnnl, PyTorch's CPU library), whose matmul keeps weights
// reordered once, ran the same cold products at 64–105 GFLOP/s and the
// one-row product at 5.6 against this kernel's 9–14 (a throwaway harness,
// one core): one micro-kernel here costs less than that dependency.
//
// The arithmetic is plain f32: each output is a sum over k in order, as in
// OpenBLAS's kernel, so results agree with sgemm to rounding.
package packed

// #cgo CFLAGS: -O3
// #include "packed.h"
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/signal-p2p/signal/trainer/internal/shape"
)

// PanelCols is the panel width: a column range handed to MulCols must start
// at a multiple of it.
const PanelCols = 32

// Available reports whether this CPU runs the kernel (AVX-512F).
func Available() bool { return C.pk_avx512() != 0 }

// Weights is a matrix W [N, K] packed for Mul, in memory outside Go's heap
// (2 MiB-aligned, advised to use huge pages: see pk_alloc). It is read-only
// after Pack and safe for concurrent use; Free releases it (or the garbage
// collector does, once the Weights is unreachable).
type Weights struct {
	N, K int
	data []float32
	mem  *memory
}

// memory owns the C allocation, so that a cleanup can free it without
// keeping the Weights reachable.
type memory struct {
	mu sync.Mutex
	p  *C.float
}

func (m *memory) free() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.p != nil {
		C.pk_free(m.p)
		m.p = nil
	}
}

// Pack copies w [n, k] (row-major) into the packed layout. It panics if w
// is too short, memory runs out, or the CPU lacks AVX-512F (check Available
// first).
func Pack(w []float32, n, k int) *Weights {
	if !Available() {
		panic("packed: Pack on a CPU without AVX-512F")
	}
	if n <= 0 || k <= 0 || len(w) < n*k {
		panic(fmt.Sprintf("packed: Pack of [%d, %d] from %d elements", n, k, len(w)))
	}
	size := (n + PanelCols - 1) / PanelCols * PanelCols * k
	cp := C.pk_alloc(C.long(size))
	if cp == nil {
		panic(fmt.Sprintf("packed: out of memory for [%d, %d]", n, k))
	}
	mem := &memory{p: cp}
	p := &Weights{N: n, K: k, data: unsafe.Slice((*float32)(unsafe.Pointer(cp)), size), mem: mem}
	runtime.AddCleanup(p, func(m *memory) { m.free() }, mem)
	C.pk_pack(cp, (*C.float)(&w[0]), C.long(n), C.long(k))
	return p
}

// Free releases the packed copy now; the Weights must not be used after.
// It is safe to call more than once.
func (p *Weights) Free() {
	p.data = nil
	p.mem.free()
}

// PanelChunk is the width of each of at most parts column chunks, whole
// panels each, that together cover the N columns: how a product is shared
// out to threads through MulCols.
func (p *Weights) PanelChunk(parts int) int {
	panels := (p.N + PanelCols - 1) / PanelCols
	parts = max(1, min(parts, panels))
	return (panels + parts - 1) / parts * PanelCols
}

// Bytes returns the memory the packed copy holds.
func (p *Weights) Bytes() int64 { return int64(len(p.data)) * 4 }

// Mul writes y = x·Wᵀ + beta·y for rows rows: x [rows, K] with row stride
// ldx, y [rows, N] with row stride ldy. With beta 0, y is only written.
func (p *Weights) Mul(y []float32, ldy int, x []float32, ldx int, rows int, beta float32) {
	p.MulCols(y, ldy, x, ldx, rows, 0, p.N, beta)
}

// MulCols is Mul for output columns [n0, n1) only (y's other columns are
// untouched); n0 must be a multiple of PanelCols. Disjoint column ranges
// may run concurrently on the same y.
func (p *Weights) MulCols(y []float32, ldy int, x []float32, ldx int, rows, n0, n1 int, beta float32) {
	if rows == 0 || n0 == n1 {
		return
	}
	if n0 < 0 || n0 > n1 || n1 > p.N || n0%PanelCols != 0 {
		panic(fmt.Sprintf("packed: columns [%d, %d) of %d (start must be a multiple of %d)", n0, n1, p.N, PanelCols))
	}
	p.Check(y, ldy, x, ldx, rows)
	C.pk_mul(C.long(rows), C.long(p.K), (*C.float)(&x[0]), C.long(ldx), (*C.float)(&p.data[0]),
		C.long(n0), C.long(n1), (*C.float)(&y[0]), C.long(ldy), C.float(beta))
	runtime.KeepAlive(p) // its cleanup frees the memory C just read
}

// Check panics unless y and x fit a product of rows rows (Mul's arguments)
// and p has not been freed: for code that runs pk_mul itself, from C
// (package team), and checks first.
func (p *Weights) Check(y []float32, ldy int, x []float32, ldx int, rows int) {
	if len(p.data) == 0 {
		panic("packed: Weights used after Free")
	}
	need("x", len(x), rows, p.K, ldx)
	need("y", len(y), rows, p.N, ldy)
}

// Panels returns the packed copy's memory, for C code that calls pk_mul
// (package team). It stays valid until Free; the caller keeps p alive
// while C reads it (runtime.KeepAlive).
func (p *Weights) Panels() unsafe.Pointer {
	if len(p.data) == 0 {
		panic("packed: Weights used after Free")
	}
	return unsafe.Pointer(&p.data[0])
}

// need panics unless a [rows, cols] matrix with row stride ld fits in n
// elements: a shape error is a programming error, caught before C reads.
func need(name string, n, rows, cols, ld int) { shape.Need("packed", name, n, rows, cols, ld) }
