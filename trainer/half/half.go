// Package half keeps frozen base weights in their file's half-precision
// type (BF16 or F16, 2 bytes a parameter, never an f32 copy) and multiplies
// f32 activations by them: y = x·Wᵀ for the forward and dx = dy·W for the
// backward, both from the one row-major [out, in] copy, in C (half.c).
//
// How a product runs depends on the path chosen once per process (Path):
//
//   - amx, avx512_bf16, avx512: oneDNN's matmul (Debian's libdnnl, the
//     library PyTorch's CPU products use), bf16 × bf16 with f32
//     accumulation and an f32 result. The activations are rounded to bf16
//     first (oneDNN 2.6 has no f32 × bf16 matmul), as PyTorch's autocast
//     does. oneDNN picks its own kernels up to the ISA allowed: AMX tiles,
//     AVX512-BF16 dot products, or AVX-512 that widens bf16 itself.
//   - f32: each block of W is widened into a per-thread buffer that stays
//     in L2 and multiplied by OpenBLAS's sgemm in f32 — for CPUs without
//     AVX-512, and for F16 weights on every CPU (oneDNN 2.6 multiplies f16
//     only on AVX512-FP16).
//
// SIGNAL_ENGINE_ISA caps the path (amx, avx512_bf16, avx512 or f32): the
// tests run every path this CPU allows in child processes that set it, so
// a machine with AMX still tests the fallbacks, and so does CI wherever it
// lands.
//
// Why oneDNN and not a kernel of our own or OpenBLAS: Debian's OpenBLAS
// 0.3.21 is built without its bf16 GEMM, and oneDNN is the well-kept
// library that reaches AMX. Measured on the 2-core EPYC (AVX512-BF16, no
// AMX), one thread, 1024×1536×576: oneDNN bf16 150–215 GFLOP/s with
// weights read in place, OpenBLAS sgemm 62–99. Weights are read in place
// (no reorder to oneDNN's blocked layout) because one copy must serve both
// directions: the blocked layout won 0–10 % on training shapes.
//
// Threading: products are shared out by package team in column chunks, and
// each chunk runs oneDNN on its own thread with one OpenMP thread, its own
// stream, primitive cache and scratchpad, so that OpenMP's threads never
// compete with the team's.
package half

// #cgo CFLAGS: -O3
// #cgo LDFLAGS: -ldnnl -lgomp -lopenblas
// #include "half.h"
import "C"

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"unsafe"

	"github.com/signal-p2p/signal/trainer/internal/shape"
)

// DType is a half matrix's element type.
type DType int

const (
	BF16 DType = C.HM_BF16
	F16  DType = C.HM_F16
)

func (d DType) String() string {
	if d == F16 {
		return "F16"
	}
	return "BF16"
}

// Product paths, slowest first.
const (
	PathF32        = C.HM_PATH_F32
	PathAVX512     = C.HM_PATH_AVX512
	PathAVX512BF16 = C.HM_PATH_AVX512_BF16
	PathAMX        = C.HM_PATH_AMX
)

var pathNames = []string{"f32", "avx512", "avx512_bf16", "amx"}

var (
	setupOnce sync.Once
	path      int
)

// Path returns the product path this process uses, chosen at its first
// use from the CPU's features, capped by SIGNAL_ENGINE_ISA.
func Path() int {
	setupOnce.Do(func() {
		limit := PathAMX
		if v := isaCap(); v != "" {
			limit = -1
			for i, n := range pathNames {
				if n == v || (v == "avx2" && i == PathF32) {
					limit = i
				}
			}
			if limit < 0 {
				fmt.Fprintf(os.Stderr, "signal: SIGNAL_ENGINE_ISA=%q is not one of %s; using the best path\n", v, strings.Join(pathNames, ", "))
				limit = PathAMX
			}
		}
		path = int(C.hm_setup(C.int(limit)))
	})
	return path
}

func isaCap() string { return strings.ToLower(strings.TrimSpace(os.Getenv("SIGNAL_ENGINE_ISA"))) }

// PathName names a path as SIGNAL_ENGINE_ISA spells it.
func PathName(p int) string { return pathNames[p] }

// Describe names the path a matrix of dtype is multiplied on, for reports:
// "onednn/avx512_bf16", or "f32" (widened, OpenBLAS).
func Describe(d DType) string {
	p := Path()
	if p == PathF32 || d != BF16 {
		return "f32 (widened, openblas)"
	}
	return "onednn/" + pathNames[p]
}

// Matrix is W [N, K], row-major, in DType, outside Go's heap. It is
// written once (Data) and then read-only and safe for concurrent use.
type Matrix struct {
	N, K  int
	DType DType
	data  []uint16
	mem   *memory
}

type memory struct {
	mu sync.Mutex
	p  *C.uint16_t
}

func (m *memory) free() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.p != nil {
		C.hm_free(m.p)
		m.p = nil
	}
}

// New allocates an uninitialised [n, k] matrix of dtype; fill it through
// Data. It panics when memory runs out.
func New(n, k int, dtype DType) *Matrix {
	if n <= 0 || k <= 0 {
		panic(fmt.Sprintf("half: New of [%d, %d]", n, k))
	}
	p := C.hm_alloc(C.long(n * k))
	if p == nil {
		panic(fmt.Sprintf("half: out of memory for [%d, %d]", n, k))
	}
	mem := &memory{p: p}
	m := &Matrix{N: n, K: k, DType: dtype, data: unsafe.Slice((*uint16)(unsafe.Pointer(p)), n*k), mem: mem}
	runtime.AddCleanup(m, func(mm *memory) { mm.free() }, mem)
	return m
}

// FromFloat32 rounds w [n, k] to dtype (nearest even): for tests and
// random models.
func FromFloat32(w []float32, n, k int, dtype DType) *Matrix {
	m := New(n, k, dtype)
	if len(w) < n*k {
		panic(fmt.Sprintf("half: FromFloat32 of [%d, %d] from %d elements", n, k, len(w)))
	}
	C.hm_from_f32((*C.uint16_t)(&m.data[0]), (*C.float)(&w[0]), C.long(n*k), C.int(dtype))
	return m
}

// FromFloat32Into rounds src to dtype into dst (len(src) elements).
func FromFloat32Into(dst []uint16, src []float32, dtype DType) {
	if len(src) == 0 {
		return
	}
	if len(dst) < len(src) {
		panic(fmt.Sprintf("half: FromFloat32Into of %d elements into %d", len(src), len(dst)))
	}
	C.hm_from_f32((*C.uint16_t)(&dst[0]), (*C.float)(&src[0]), C.long(len(src)), C.int(dtype))
}

// Data returns the matrix's elements as stored, to fill after New.
func (m *Matrix) Data() []uint16 {
	m.live()
	return m.data
}

// Bytes returns the memory the matrix holds.
func (m *Matrix) Bytes() int64 { return int64(len(m.data)) * 2 }

// Rows widens rows [r0, r1) into dst [(r1-r0)·K] (an embedding lookup, or an
// export).
func (m *Matrix) Rows(dst []float32, r0, r1 int) {
	m.live()
	if r0 < 0 || r1 > m.N || r0 > r1 || len(dst) < (r1-r0)*m.K {
		panic(fmt.Sprintf("half: rows [%d, %d) of %d into %d elements", r0, r1, m.N, len(dst)))
	}
	if r0 == r1 {
		return
	}
	C.hm_to_f32((*C.float)(&dst[0]), (*C.uint16_t)(&m.data[r0*m.K]), C.long((r1-r0)*m.K), C.int(m.DType))
	runtime.KeepAlive(m)
}

// Float32 returns the whole matrix widened to f32.
func (m *Matrix) Float32() []float32 {
	out := make([]float32, m.N*m.K)
	m.Rows(out, 0, m.N)
	return out
}

// Free releases the matrix now; it must not be used after.
func (m *Matrix) Free() {
	m.data = nil
	m.mem.free()
}

func (m *Matrix) live() {
	if len(m.data) == 0 {
		panic("half: Matrix used after Free")
	}
}

// Pointer returns the elements' memory for C code (package team), valid
// until Free; the caller keeps m alive while C reads it.
func (m *Matrix) Pointer() unsafe.Pointer {
	m.live()
	return unsafe.Pointer(&m.data[0])
}

// RoundsInput reports whether products with m read the activations rounded
// to bf16 (the oneDNN paths) rather than in f32.
func (m *Matrix) RoundsInput() bool { return m.DType == BF16 && Path() != PathF32 }

// ToBF16 rounds x [rows, cols] (row stride ldx) into dst, densely.
func ToBF16(dst []uint16, x []float32, rows, cols, ldx int) {
	if rows == 0 {
		return
	}
	shape.Need("half", "x", len(x), rows, cols, ldx)
	shape.Need("half", "dst", len(dst), rows, cols, cols)
	C.hm_to_bf16((*C.uint16_t)(&dst[0]), (*C.float)(&x[0]), C.long(rows), C.long(cols), C.long(ldx))
}

var bufs sync.Pool

// Buffer returns a scratch buffer of at least n elements for rounded
// activations; give it back with PutBuffer.
func Buffer(n int) *[]uint16 {
	if b, ok := bufs.Get().(*[]uint16); ok && cap(*b) >= n {
		*b = (*b)[:n]
		return b
	}
	b := make([]uint16, n)
	return &b
}

// PutBuffer returns a buffer from Buffer.
func PutBuffer(b *[]uint16) { bufs.Put(b) }

// MulT is y = x·Wᵀ + beta·y (beta 0 or 1) on the calling thread: x [rows,
// K] with row stride ldx, y [rows, N] with row stride ldy. Package team
// shares the same product out by columns.
func (m *Matrix) MulT(y []float32, ldy int, x []float32, ldx int, rows int, beta float32) {
	if rows == 0 {
		return
	}
	m.CheckMulT(y, ldy, x, ldx, rows, beta)
	xb := m.round(x, ldx, rows, m.K)
	defer PutBuffer(xb)
	C.hm_mul_t(C.int(Path()), C.int(m.DType), C.long(rows), C.long(m.K), (*C.float)(&x[0]), C.long(ldx), bptr(*xb),
		(*C.uint16_t)(m.Pointer()), 0, C.long(m.N), (*C.float)(&y[0]), C.long(ldy), C.float(beta))
	runtime.KeepAlive(m)
}

// Mul is dx = dy·W + beta·dx (beta 0 or 1): dy [rows, N], dx [rows, K].
func (m *Matrix) Mul(dx []float32, lddx int, dy []float32, lddy int, rows int, beta float32) {
	if rows == 0 {
		return
	}
	m.CheckMul(dx, lddx, dy, lddy, rows, beta)
	dyb := m.round(dy, lddy, rows, m.N)
	defer PutBuffer(dyb)
	C.hm_mul(C.int(Path()), C.int(m.DType), C.long(rows), C.long(m.N), C.long(m.K), (*C.float)(&dy[0]), C.long(lddy),
		bptr(*dyb), (*C.uint16_t)(m.Pointer()), 0, C.long(m.K), (*C.float)(&dx[0]), C.long(lddx), C.float(beta))
	runtime.KeepAlive(m)
}

// round returns x rounded to bf16 when the path reads it so, else an empty
// buffer.
func (m *Matrix) round(x []float32, ldx, rows, cols int) *[]uint16 {
	if !m.RoundsInput() {
		return Buffer(0)
	}
	b := Buffer(rows * cols)
	ToBF16(*b, x, rows, cols, ldx)
	return b
}

func bptr(b []uint16) *C.uint16_t {
	if len(b) == 0 {
		return nil
	}
	return (*C.uint16_t)(&b[0])
}

// CheckMulT panics unless the arguments fit MulT.
func (m *Matrix) CheckMulT(y []float32, ldy int, x []float32, ldx int, rows int, beta float32) {
	m.live()
	checkBeta(beta)
	shape.Need("half", "x", len(x), rows, m.K, ldx)
	shape.Need("half", "y", len(y), rows, m.N, ldy)
}

// CheckMul panics unless the arguments fit Mul.
func (m *Matrix) CheckMul(dx []float32, lddx int, dy []float32, lddy int, rows int, beta float32) {
	m.live()
	checkBeta(beta)
	shape.Need("half", "dy", len(dy), rows, m.N, lddy)
	shape.Need("half", "dx", len(dx), rows, m.K, lddx)
}

func checkBeta(beta float32) {
	if beta != 0 && beta != 1 {
		panic(fmt.Sprintf("half: beta %v (0 or 1)", beta))
	}
}

// FromBits widens n = len(dst) elements of src (dtype's bits) into dst.
func FromBits(dst []float32, src []uint16, dtype DType) {
	if len(dst) == 0 {
		return
	}
	if len(src) < len(dst) {
		panic(fmt.Sprintf("half: FromBits of %d elements from %d", len(dst), len(src)))
	}
	C.hm_to_f32((*C.float)(&dst[0]), (*C.uint16_t)(&src[0]), C.long(len(dst)), C.int(dtype))
}
