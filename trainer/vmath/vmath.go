// Package vmath holds the engine's element-wise kernels — softmax rows, the
// causal attention softmax, SwiGLU, RMSNorm, RoPE, and the backward of
// SwiGLU and RMSNorm — written in C (vmath.c) so that the ones dominated
// by exponentials run 8 floats at a time with AVX2 and FMA where the CPU
// has them (checked at run time; other CPUs take a scalar path with the
// same arithmetic). Go's compiler does not vectorize, and these loops took
// ~17% of a prefill and more of a training step in scalar Go. The
// exponential is Cephes' expf, within 2 ulp of exp; sums of exponentials
// accumulate in float64. Package team runs them in parallel, calling the C
// functions directly; the Go functions here run them on the calling
// goroutine (sampling's log-sum-exp, and the tests).
//
// Slices are row-major float32; shape errors are programming errors and
// panic with a message naming the operand, checked in Go so that C never
// reads out of bounds. Every function is safe for concurrent use on
// disjoint outputs and allocates nothing.
package vmath

// #cgo CFLAGS: -O2
// #cgo LDFLAGS: -lm
// #include "vmath.h"
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/signal-p2p/signal/trainer/internal/shape"
)

// SIMD reports whether the AVX2+FMA path is in use.
func SIMD() bool { return C.vm_simd() != 0 }

// Exp returns e^x (within 2 ulp; 0 below -87.3, +Inf above 88, a bound
// the engine's arguments, all ≤ 0, never approach).
func Exp(x float32) float32 { return float32(C.vm_exp(C.float(x))) }

func ptr(s []float32) *C.float { return (*C.float)(unsafe.Pointer(&s[0])) }

// Max returns the largest element of x (len(x) > 0).
func Max(x []float32) float32 {
	if len(x) == 0 {
		panic("vmath: Max of an empty slice")
	}
	return float32(C.vm_max(ptr(x), C.long(len(x))))
}

// ExpShift sets x[i] = e^(x[i]−shift) in place and returns Σ x[i] in float64.
func ExpShift(x []float32, shift float32) float64 {
	if len(x) == 0 {
		return 0
	}
	return float64(C.vm_exp_shift(ptr(x), C.long(len(x)), C.float(shift)))
}

// SumExpShift returns Σ e^(x[i]−shift) in float64, leaving x unchanged
// (a log-sum-exp over logits that are still needed).
func SumExpShift(x []float32, shift float32) float64 {
	if len(x) == 0 {
		return 0
	}
	return float64(C.vm_sum_exp_shift(ptr(x), C.long(len(x)), C.float(shift)))
}

func need(name string, n, rows, cols, ld int) { shape.Need("vmath", name, n, rows, cols, ld) }

// CausalSoftmax turns the [L, L] block of scores s (row stride ld) into
// causal attention probabilities in place: row i's softmax over columns
// [0, i], zeros after. When lse is not nil, lse[i·lseStride] receives row
// i's log-sum-exp (what a backward pass needs to rebuild the row).
func CausalSoftmax(s []float32, L, ld int, lse []float32, lseStride int) {
	if L == 0 {
		return
	}
	need("s", len(s), L, L, ld)
	var lp *C.float
	if lse != nil {
		need("lse", len(lse), L, 1, lseStride)
		lp = ptr(lse)
	}
	C.vm_causal_softmax(ptr(s), C.long(L), C.long(ld), lp, C.long(lseStride))
}

// CausalSoftmaxRows is CausalSoftmax for rows [off, off+rows) of a larger
// causal score matrix, given as a [rows, width] block (row stride ld) that
// holds those rows' scores against keys [0, width): row i's softmax runs
// over columns [0, off+i] and zeros the rest of the block. A blocked
// attention computes only the keys a block of queries can see (width =
// off+rows) instead of every row against every key.
func CausalSoftmaxRows(s []float32, rows, off, width, ld int) {
	if rows == 0 {
		return
	}
	if off < 0 || width < off+rows {
		panic(fmt.Sprintf("vmath: CausalSoftmaxRows: rows %d from %d need width >= %d, have %d", rows, off, off+rows, width))
	}
	need("s", len(s), rows, width, ld)
	C.vm_causal_softmax_rows(ptr(s), C.long(rows), C.long(off), C.long(width), C.long(ld), nil, 0)
}

// CausalExp rebuilds causal probabilities in place from raw scores s and
// each row's log-sum-exp: s[i][j] = e^(s[i][j] − lse[i·lseStride]) for
// j ≤ i, 0 after.
func CausalExp(s []float32, L, ld int, lse []float32, lseStride int) {
	if L == 0 {
		return
	}
	need("s", len(s), L, L, ld)
	need("lse", len(lse), L, 1, lseStride)
	C.vm_causal_exp(ptr(s), C.long(L), C.long(ld), ptr(lse), C.long(lseStride))
}

// SwiGLU writes act = silu(gate)·up for rows of gu [rows, 2·inter] holding
// gate in columns [0, inter) and up in [inter, 2·inter); act is
// [rows, inter]. When sg is not nil it receives σ(gate) [rows, inter] (what
// the backward needs).
func SwiGLU(act, sg, gu []float32, rows, inter int) {
	if rows == 0 || inter == 0 {
		return
	}
	need("gu", len(gu), rows, 2*inter, 2*inter)
	need("act", len(act), rows, inter, inter)
	var sp *C.float
	if sg != nil {
		need("sg", len(sg), rows, inter, inter)
		sp = ptr(sg)
	}
	C.vm_swiglu_rows(ptr(act), sp, ptr(gu), C.long(rows), C.long(inter))
}

// RMSNorm writes out = x / sqrt(mean(x²) + eps) · w for rows of x [rows,
// dim], and when rstd is not nil stores each row's 1/rms there. The mean of
// squares accumulates in float64.
func RMSNorm(out, rstd, x, w []float32, rows, dim int, eps float32) {
	if rows == 0 || dim == 0 {
		return
	}
	need("x", len(x), rows, dim, dim)
	need("out", len(out), rows, dim, dim)
	need("w", len(w), 1, dim, dim)
	var rp *C.float
	if rstd != nil {
		need("rstd", len(rstd), rows, 1, 1)
		rp = ptr(rstd)
	}
	C.vm_rmsnorm(ptr(out), rp, ptr(x), ptr(w), C.long(rows), C.long(dim), C.float(eps))
}

// Rope rotates nHeads heads of d columns (even), starting at x[0] in each
// of rows rows of stride ld, in place by the angles whose cosines and sines
// are cos and sin [rows, d/2] (Hugging Face's rotate-half layout).
func Rope(x []float32, rows, ld, nHeads, d int, cos, sin []float32) {
	if rows == 0 || nHeads == 0 || d == 0 {
		return
	}
	if d%2 != 0 {
		panic(fmt.Sprintf("vmath: Rope: head width %d is odd", d))
	}
	need("x", len(x), rows, nHeads*d, ld)
	need("cos", len(cos), rows, d/2, d/2)
	need("sin", len(sin), rows, d/2, d/2)
	C.vm_rope(ptr(x), C.long(rows), C.long(ld), C.long(nHeads), C.long(d), ptr(cos), ptr(sin))
}
