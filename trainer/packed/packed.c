// Packed-weight GEMM: y = x·Wᵀ + beta·y with W pre-packed into 32-column
// panels, AVX-512F. See packed.go for why it exists.
#include <immintrin.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/mman.h>
#include "packed.h"

#define NR 32   // output columns per panel: two zmm registers
#define MR 12   // rows per micro-kernel call: 24 accumulators + 2 panel + 1 broadcast of 32 zmm
#define KC 1024 // depth per pass; a panel chunk (KC·NR floats, 128 KiB) stays in L2

int pk_avx512(void) {
	static int have = -1;
	if (have < 0) {
		__builtin_cpu_init();
		have = __builtin_cpu_supports("avx512f") != 0;
	}
	return have;
}

// pk_pack lays W [n][k] (row-major) out as panels [ceil(n/32)][k][32]:
// panel p, row kk holds W[32p .. 32p+31][kk], zero past n. The kernel then
// reads 32 columns of one depth step as two aligned vectors, in the order it
// uses them, from one contiguous stream.
void pk_pack(float *dst, const float *w, long n, long k) {
	long panels = (n + NR - 1) / NR;
	for (long p = 0; p < panels; p++) {
		float *d = dst + p * k * NR;
		for (long j = 0; j < NR; j++) {
			long col = p * NR + j;
			if (col < n) {
				const float *src = w + col * k;
				for (long kk = 0; kk < k; kk++) d[kk * NR + j] = src[kk];
			} else {
				for (long kk = 0; kk < k; kk++) d[kk * NR + j] = 0;
			}
		}
	}
}

// kern computes an mr×32 tile over kc depth steps: acc = x[0:mr][0:kc] ·
// b[0:kc][0:32], then y = acc + beta·y (beta 0: y is not read). Weights
// come from memory as one sequential stream per panel, which the hardware
// prefetcher follows: software prefetch of the next panel measured slower
// (100–104 GFLOP/s against 107–111 on the 128-row shapes).
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
kern(int mr, long kc, const float *x, long ldx, const float *b, float *y, long ldy, float beta,
     __mmask16 m0, __mmask16 m1) {
	__m512 c0[MR], c1[MR];
	for (int i = 0; i < mr; i++) {
		c0[i] = _mm512_setzero_ps();
		c1[i] = _mm512_setzero_ps();
	}
	for (long kk = 0; kk < kc; kk++) {
		__m512 b0 = _mm512_load_ps(b + kk * NR), b1 = _mm512_load_ps(b + kk * NR + 16);
		for (int i = 0; i < mr; i++) {
			__m512 a = _mm512_set1_ps(x[i * ldx + kk]);
			c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
			c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
		}
	}
	for (int i = 0; i < mr; i++) {
		float *c = y + i * ldy;
		if (beta != 0) {
			__m512 bt = _mm512_set1_ps(beta);
			c0[i] = _mm512_fmadd_ps(bt, _mm512_maskz_loadu_ps(m0, c), c0[i]);
			c1[i] = _mm512_fmadd_ps(bt, _mm512_maskz_loadu_ps(m1, c + 16), c1[i]);
		}
		_mm512_mask_storeu_ps(c, m0, c0[i]);
		_mm512_mask_storeu_ps(c + 16, m1, c1[i]);
	}
}

static __mmask16 mask(long cols) {
	if (cols >= 16) return 0xffff;
	if (cols <= 0) return 0;
	return (__mmask16)((1u << cols) - 1);
}

// pk_mul writes columns [n0, n1) of y [rows][ldy]: y = x·Wᵀ + beta·y, x
// [rows][ldx] with k columns, wp packed by pk_pack with n ≥ n1 and n0 a
// multiple of 32. Panels are the outer loop and rows the inner one, so a
// panel chunk is read from memory once and then from cache by every row
// block; x (rows·k floats) is re-read per panel from cache.
__attribute__((target("avx512f"))) void
pk_mul(long rows, long k, const float *x, long ldx, const float *wp, long n0, long n1, float *y, long ldy, float beta) {
	if (rows <= 0 || n1 <= n0) return;
	long blocks = (rows + MR - 1) / MR;
	for (long p = n0 / NR; p * NR < n1; p++) {
		const float *panel = wp + p * k * NR;
		long cols = n1 - p * NR;
		__mmask16 m0 = mask(cols), m1 = mask(cols - 16);
		for (long k0 = 0; k0 < k; k0 += KC) {
			long kc = k - k0 < KC ? k - k0 : KC;
			const float *b = panel + k0 * NR;
			float bt = k0 > 0 ? 1.0f : beta;
			for (long blk = 0; blk < blocks; blk++) {
				long i0 = blk * MR, mr = rows - i0 < MR ? rows - i0 : MR;
				const float *xb = x + i0 * ldx + k0;
				float *yb = y + i0 * ldy + p * NR;
				switch (mr) {
#define CASE(n) \
	case n: kern(n, kc, xb, ldx, b, yb, ldy, bt, m0, m1); break;
					CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
					CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#undef CASE
				}
			}
		}
	}
}

// pk_alloc returns floats floats of 2 MiB-aligned memory advised to be
// backed by transparent huge pages (NULL when out of memory). Weights are
// streamed from memory on every forward; with 4 KiB pages the hardware
// prefetcher stops at every page boundary and each page costs a TLB miss:
// huge pages made the decode shapes 30–40 % faster (BenchmarkMul) and left
// the prefill shapes as they were. Where THP is off, madvise is a no-op.
float *pk_alloc(long floats) {
	size_t huge = (size_t)2 << 20;
	size_t bytes = ((size_t)floats * 4 + huge - 1) & ~(huge - 1);
	void *p = NULL;
	if (posix_memalign(&p, huge, bytes) != 0) return NULL;
	madvise(p, bytes, MADV_HUGEPAGE);
	return (float *)p;
}

void pk_free(float *p) { free(p); }
