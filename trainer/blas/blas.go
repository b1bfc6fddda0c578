// Package blas is a thin cgo wrapper over OpenBLAS's CBLAS interface, for the
// few routines the engine needs (sgemm, sgemv) and OpenBLAS's thread count.
//
// Matrices are row-major float32 slices with a leading dimension (the
// distance between rows), so that a sub-matrix such as one attention head's
// columns of a packed [tokens, heads·dim] matrix is passed without copying.
// Shape errors are programming errors and panic with a message naming the
// operand; they are checked in Go so that C never reads out of bounds.
package blas

// #cgo LDFLAGS: -lopenblas
// #include <cblas.h>
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/signal-p2p/signal/trainer/internal/shape"
)

// SetThreads sets the number of threads OpenBLAS uses for every later call
// (process-wide).
func SetThreads(n int) {
	if n < 1 {
		n = 1
	}
	C.openblas_set_num_threads(C.int(n))
}

// Threads returns OpenBLAS's current thread count.
func Threads() int { return int(C.openblas_get_num_threads()) }

func trans(t bool) C.enum_CBLAS_TRANSPOSE {
	if t {
		return C.CblasTrans
	}
	return C.CblasNoTrans
}

// need checks that a row-major matrix of rows×cols with leading dimension ld
// fits in a slice of length n.
func need(name string, n, rows, cols, ld int) { shape.Need("blas", name, n, rows, cols, ld) }

// Sgemm computes C = alpha·op(A)·op(B) + beta·C, where op(X) is X or Xᵀ,
// op(A) is m×k, op(B) is k×n and C is m×n, all row-major.
func Sgemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	ar, ac := m, k
	if transA {
		ar, ac = k, m
	}
	br, bc := k, n
	if transB {
		br, bc = n, k
	}
	need("C", len(c), m, n, ldc)
	if k == 0 {
		// C = beta·C; OpenBLAS handles k=0 but the operands may be empty.
		for i := 0; i < m; i++ {
			row := c[i*ldc : i*ldc+n]
			for j := range row {
				row[j] *= beta
			}
		}
		return
	}
	need("A", len(a), ar, ac, lda)
	need("B", len(b), br, bc, ldb)
	C.cblas_sgemm(C.CblasRowMajor, trans(transA), trans(transB), C.blasint(m), C.blasint(n), C.blasint(k),
		C.float(alpha), (*C.float)(unsafe.Pointer(&a[0])), C.blasint(lda),
		(*C.float)(unsafe.Pointer(&b[0])), C.blasint(ldb), C.float(beta),
		(*C.float)(unsafe.Pointer(&c[0])), C.blasint(ldc))
}

// Sgemv computes y = alpha·op(A)·x + beta·y for a row-major m×n matrix A
// (op(A) = Aᵀ when transA), with unit strides.
func Sgemv(transA bool, m, n int, alpha float32, a []float32, lda int, x []float32, beta float32, y []float32) {
	if m == 0 || n == 0 {
		return
	}
	need("A", len(a), m, n, lda)
	xl, yl := n, m
	if transA {
		xl, yl = m, n
	}
	if len(x) < xl || len(y) < yl {
		panic(fmt.Sprintf("blas: Sgemv: x has %d (need %d), y has %d (need %d)", len(x), xl, len(y), yl))
	}
	C.cblas_sgemv(C.CblasRowMajor, trans(transA), C.blasint(m), C.blasint(n), C.float(alpha),
		(*C.float)(unsafe.Pointer(&a[0])), C.blasint(lda), (*C.float)(unsafe.Pointer(&x[0])), 1,
		C.float(beta), (*C.float)(unsafe.Pointer(&y[0])), 1)
}
