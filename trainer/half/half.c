// Products of f32 activations with half-precision weights (see half.go).
#include "half.h"

#include <cblas.h>
#include <immintrin.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

uint16_t *hm_alloc(long elems) {
	size_t bytes = ((size_t)elems * 2 + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1);
	void *p = NULL;
	if (posix_memalign(&p, 2u << 20, bytes) != 0) return NULL;
	madvise(p, bytes, MADV_HUGEPAGE);
	return p;
}

void hm_free(uint16_t *p) { free(p); }

static inline uint16_t f32_to_bf16(float f) {
	uint32_t u;
	memcpy(&u, &f, 4);
	if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); // quiet NaN
	u += 0x7fff + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
	uint32_t u = (uint32_t)h << 16;
	float f;
	memcpy(&f, &u, 4);
	return f;
}

static inline float f16_to_f32(uint16_t h) {
	_Float16 f;
	memcpy(&f, &h, 2);
	return (float)f;
}

// f16_wide widens with F16C's vcvtph2ps, eight at a time.
__attribute__((target("avx,f16c"))) static void f16_wide(float *dst, const uint16_t *src, long n) {
	long i = 0;
	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
	for (; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

static inline uint16_t f32_to_f16(float f) {
	_Float16 h = (_Float16)f;
	uint16_t u;
	memcpy(&u, &h, 2);
	return u;
}

// row_bf16_512 is f32_to_bf16 over a row, sixteen at a time with AVX-512F
// integer arithmetic: the same bits as the scalar rounding (NaNs quieted,
// subnormals kept, unlike AVX512-BF16's vcvtne2ps2bf16, which flushes
// them), so every path rounds alike.
__attribute__((target("avx512f"))) static void row_bf16_512(uint16_t *d, const float *x, long n) {
	const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x40);
	long i = 0;
	for (; i + 16 <= n; i += 16) {
		__m512 f = _mm512_loadu_ps(x + i);
		__m512i u = _mm512_castps_si512(f);
		__m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
		__mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
		r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
		_mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtepi32_epi16(r));
	}
	for (; i < n; i++) d[i] = f32_to_bf16(x[i]);
}

void hm_to_bf16(uint16_t *dst, const float *x, long rows, long cols, long ldx) {
	int wide = __builtin_cpu_supports("avx512f");
	for (long r = 0; r < rows; r++) {
		const float *xr = x + r * ldx;
		uint16_t *d = dst + r * cols;
		if (wide)
			row_bf16_512(d, xr, cols);
		else
			for (long c = 0; c < cols; c++) d[c] = f32_to_bf16(xr[c]);
	}
}

void hm_to_f32(float *dst, const uint16_t *src, long n, int dtype) {
	if (dtype == HM_BF16)
		for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
	else if (__builtin_cpu_supports("f16c"))
		f16_wide(dst, src, n);
	else
		for (long i = 0; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

void hm_from_f32(uint16_t *dst, const float *src, long n, int dtype) {
	if (dtype == HM_BF16)
		for (long i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
	else
		for (long i = 0; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

// ---- the f32 path: widen a block of W into a per-thread buffer, then sgemm ----

static _Thread_local float *wide;
static _Thread_local long wide_len;

static float *wide_buf(long n) {
	if (n > wide_len) {
		free(wide);
		wide = malloc((size_t)n * 4);
		wide_len = wide ? n : 0;
		if (!wide) {
			fprintf(stderr, "half: out of memory for a %ld-element buffer\n", n);
			abort();
		}
	}
	return wide;
}

// Blocks of W small enough to stay in L2 while every row of x uses them.
#define WIDE_ELEMS (64 << 10)

static void f32_mul_t(int dtype, long rows, long k, const float *x, long ldx, const uint16_t *w, long n0, long n1,
                      float *y, long ldy, float beta) {
	long nb = WIDE_ELEMS / k;
	if (nb < 8) nb = 8;
	float *buf = wide_buf(nb * k);
	for (long n = n0; n < n1; n += nb) {
		long c = n1 - n < nb ? n1 - n : nb;
		hm_to_f32(buf, w + n * k, c * k, dtype);
		if (rows == 1)
			cblas_sgemv(CblasRowMajor, CblasNoTrans, c, k, 1, buf, k, x, 1, beta, y + n, 1);
		else
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, c, k, 1, x, ldx, buf, k, beta, y + n, ldy);
	}
}

static void f32_mul(int dtype, long rows, long n, long k, const float *dy, long lddy, const uint16_t *w, long k0,
                    long k1, float *dx, long lddx, float beta) {
	long kc = k1 - k0;
	long nb = WIDE_ELEMS / kc;
	if (nb < 8) nb = 8;
	float *buf = wide_buf(nb * kc);
	for (long i = 0; i < n; i += nb) {
		long c = n - i < nb ? n - i : nb;
		for (long r = 0; r < c; r++) hm_to_f32(buf + r * kc, w + (i + r) * k + k0, kc, dtype);
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, kc, c, 1, dy + i, lddy, buf, kc,
		            i == 0 ? beta : 1, dx + k0, lddx);
	}
}

// ---- the oneDNN paths ----
//
// Each thread keeps its own primitives, keyed by the product's shape and
// strides (a pass repeats a few dozen shapes), its own stream and its own
// scratchpad: oneDNN runs single-threaded inside one job of the team, which
// shares a product out by columns.

typedef struct {
	long key[8];
	dnnl_primitive_t prim;
	dnnl_memory_t src, wei, dst, pad;
	size_t pad_bytes;
} entry;

#define CACHE 48

static _Thread_local entry cache[CACHE];
static _Thread_local int cache_next;
static _Thread_local dnnl_stream_t stream;
static _Thread_local void *scratch;
static _Thread_local size_t scratch_len;
static dnnl_engine_t engine;

static void check(dnnl_status_t s, const char *what) {
	if (s != dnnl_success) {
		fprintf(stderr, "half: oneDNN %s failed (status %d)\n", what, (int)s);
		abort();
	}
}

// prim_for returns the cached primitive for a product of src [m, kk]
// (dense) with weights [kk, nn] at strides (ws0, ws1) into dst [m, nn] with
// row stride ldd, accumulating when acc.
static entry *prim_for(long m, long kk, long nn, long ws0, long ws1, long ldd, int acc) {
	long key[8] = {m, kk, nn, ws0, ws1, ldd, acc, 1};
	for (int i = 0; i < CACHE; i++)
		if (memcmp(cache[i].key, key, sizeof key) == 0) return &cache[i];
	if (!stream) {
		omp_set_num_threads(1);
		check(dnnl_stream_create(&stream, engine, dnnl_stream_default_flags), "stream");
	}
	entry *e = &cache[cache_next];
	cache_next = (cache_next + 1) % CACHE;
	if (e->prim) {
		dnnl_primitive_destroy(e->prim);
		dnnl_memory_destroy(e->src);
		dnnl_memory_destroy(e->wei);
		dnnl_memory_destroy(e->dst);
		if (e->pad) dnnl_memory_destroy(e->pad);
		memset(e, 0, sizeof *e);
	}
	dnnl_memory_desc_t a, b, c;
	dnnl_dims_t ad = {m, kk}, bd = {kk, nn}, cd = {m, nn}, as = {kk, 1}, bs = {ws0, ws1}, cs = {ldd, 1};
	check(dnnl_memory_desc_init_by_strides(&a, 2, ad, dnnl_bf16, as), "src desc");
	check(dnnl_memory_desc_init_by_strides(&b, 2, bd, dnnl_bf16, bs), "weights desc");
	check(dnnl_memory_desc_init_by_strides(&c, 2, cd, dnnl_f32, cs), "dst desc");
	dnnl_matmul_desc_t md;
	check(dnnl_matmul_desc_init(&md, &a, &b, NULL, &c), "matmul desc");
	dnnl_primitive_attr_t attr;
	check(dnnl_primitive_attr_create(&attr), "attr");
	check(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user), "scratchpad mode");
	if (acc) {
		dnnl_post_ops_t po;
		check(dnnl_post_ops_create(&po), "post ops");
		check(dnnl_post_ops_append_sum(po, 1.0f), "sum");
		check(dnnl_primitive_attr_set_post_ops(attr, po), "set post ops");
		dnnl_post_ops_destroy(po);
	}
	dnnl_primitive_desc_t pd;
	check(dnnl_primitive_desc_create(&pd, &md, attr, engine, NULL), "matmul");
	dnnl_primitive_attr_destroy(attr);
	check(dnnl_primitive_create(&e->prim, pd), "primitive");
	const dnnl_memory_desc_t *pad = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
	e->pad_bytes = pad ? dnnl_memory_desc_get_size(pad) : 0;
	check(dnnl_memory_create(&e->src, &a, engine, DNNL_MEMORY_NONE), "memory");
	check(dnnl_memory_create(&e->wei, &b, engine, DNNL_MEMORY_NONE), "memory");
	check(dnnl_memory_create(&e->dst, &c, engine, DNNL_MEMORY_NONE), "memory");
	if (e->pad_bytes) check(dnnl_memory_create(&e->pad, pad, engine, DNNL_MEMORY_NONE), "memory");
	dnnl_primitive_desc_destroy(pd);
	memcpy(e->key, key, sizeof key);
	return e;
}

static void exec(entry *e, const void *src, const void *wei, void *dst) {
	dnnl_memory_set_data_handle(e->src, (void *)src);
	dnnl_memory_set_data_handle(e->wei, (void *)wei);
	dnnl_memory_set_data_handle(e->dst, dst);
	dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, e->src}, {DNNL_ARG_WEIGHTS, e->wei}, {DNNL_ARG_DST, e->dst}};
	int n = 3;
	if (e->pad_bytes) {
		if (e->pad_bytes > scratch_len) {
			free(scratch);
			scratch = aligned_alloc(64, (e->pad_bytes + 63) & ~(size_t)63);
			scratch_len = scratch ? e->pad_bytes : 0;
			if (!scratch) abort();
		}
		dnnl_memory_set_data_handle(e->pad, scratch);
		args[n++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, e->pad};
	}
	check(dnnl_primitive_execute(e->prim, stream, n, args), "execute");
	check(dnnl_stream_wait(stream), "wait");
}

// gemv_bf16 is the product for a few rows (a decode step) with AVX512-BF16
// dot products along W's rows, which are contiguous in the row-major copy:
// W streams through once, one row at a time, each used by every row of x
// while in L1. oneDNN's matmul on a plain (not reordered) W copies W into
// its blocked layout on every call, which at one row costs more than the
// product (30 against 75 GFLOP/s in cache, 1×1536×576, one thread); this
// kernel reads W once and nothing else. One row at a time, not four
// interleaved: the hardware prefetcher follows one sequential stream at
// the machine's read bandwidth (22 GB/s on one EPYC core) but four
// streams a row apart at half of it (11 GB/s at k 576).
#define GEMV_ROWS 4

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static inline __m512 dot_tail(__m512 acc, const uint16_t *x,
                                                                                      const uint16_t *w, long n) {
	__mmask32 m = n >= 32 ? 0xffffffffu : ((1u << n) - 1);
	return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, x), (__m512bh)_mm512_maskz_loadu_epi16(m, w));
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void gemv_bf16(long rows, long k, const uint16_t *xb,
                                                                               const uint16_t *w, long n0, long n1,
                                                                               float *y, long ldy, float beta) {
	for (long n = n0; n < n1; n++) {
		const uint16_t *wn = w + n * k;
		for (long r = 0; r < rows; r++) {
			const uint16_t *x = xb + r * k;
			__m512 a0 = _mm512_setzero_ps(), a1 = a0;
			long i = 0;
			for (; i + 64 <= k; i += 64) {
				a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + i), (__m512bh)_mm512_loadu_si512(wn + i));
				a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + i + 32),
				                      (__m512bh)_mm512_loadu_si512(wn + i + 32));
			}
			for (; i < k; i += 32) a0 = dot_tail(a0, x + i, wn + i, k - i);
			float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
			float *yr = y + r * ldy + n;
			*yr = beta != 0 ? *yr + s : s;
		}
	}
}

void hm_mul_t(int path, int dtype, long rows, long k, const float *x, long ldx, const uint16_t *xb,
              const uint16_t *w, long n0, long n1, float *y, long ldy, float beta) {
	if (path == HM_PATH_F32 || dtype != HM_BF16) {
		f32_mul_t(dtype, rows, k, x, ldx, w, n0, n1, y, ldy, beta);
		return;
	}
	if (rows <= GEMV_ROWS && path >= HM_PATH_AVX512_BF16) {
		if (beta != 0 && beta != 1) abort();
		gemv_bf16(rows, k, xb, w, n0, n1, y, ldy, beta);
		return;
	}
	if (beta != 0 && beta != 1) abort();
	// Weights [k, n1-n0] read in place from W's rows n0..n1: strides (1, k).
	entry *e = prim_for(rows, k, n1 - n0, 1, k, ldy, beta != 0);
	exec(e, xb, w + n0 * k, y + n0);
}

void hm_mul(int path, int dtype, long rows, long n, long k, const float *dy, long lddy, const uint16_t *dyb,
            const uint16_t *w, long k0, long k1, float *dx, long lddx, float beta) {
	if (path == HM_PATH_F32 || dtype != HM_BF16) {
		f32_mul(dtype, rows, n, k, dy, lddy, w, k0, k1, dx, lddx, beta);
		return;
	}
	if (beta != 0 && beta != 1) abort();
	// Weights [n, k1-k0]: columns k0..k1 of W, strides (k, 1).
	entry *e = prim_for(rows, n, k1 - k0, k, 1, lddx, beta != 0);
	exec(e, dyb, w + k0, dx + k0);
}

// works reports whether oneDNN builds a bf16 product at the current ISA.
static int works(void) {
	dnnl_memory_desc_t a, b, c;
	dnnl_dims_t ad = {4, 64}, bd = {64, 32}, cd = {4, 32};
	if (dnnl_memory_desc_init_by_tag(&a, 2, ad, dnnl_bf16, dnnl_ab) != dnnl_success) return 0;
	if (dnnl_memory_desc_init_by_tag(&b, 2, bd, dnnl_bf16, dnnl_ba) != dnnl_success) return 0;
	if (dnnl_memory_desc_init_by_tag(&c, 2, cd, dnnl_f32, dnnl_ab) != dnnl_success) return 0;
	dnnl_matmul_desc_t md;
	if (dnnl_matmul_desc_init(&md, &a, &b, NULL, &c) != dnnl_success) return 0;
	dnnl_primitive_desc_t pd;
	if (dnnl_primitive_desc_create(&pd, &md, NULL, engine, NULL) != dnnl_success) return 0;
	dnnl_primitive_desc_destroy(pd);
	return 1;
}

int hm_setup(int max_path) {
	if (max_path <= HM_PATH_F32) return HM_PATH_F32;
	dnnl_cpu_isa_t isa = max_path >= HM_PATH_AMX          ? dnnl_cpu_isa_all
	                     : max_path == HM_PATH_AVX512_BF16 ? dnnl_cpu_isa_avx512_core_bf16
	                                                       : dnnl_cpu_isa_avx512_core;
	dnnl_set_max_cpu_isa(isa); // refused once oneDNN has started: the first setup wins
	if (dnnl_engine_create(&engine, dnnl_cpu, 0) != dnnl_success) return HM_PATH_F32;
	dnnl_cpu_isa_t eff = dnnl_get_effective_cpu_isa();
	int path = (eff & dnnl_cpu_isa_avx512_core_amx) == dnnl_cpu_isa_avx512_core_amx   ? HM_PATH_AMX
	           : (eff & dnnl_cpu_isa_avx512_core_bf16) == dnnl_cpu_isa_avx512_core_bf16 ? HM_PATH_AVX512_BF16
	           : (eff & dnnl_cpu_isa_avx512_core) == dnnl_cpu_isa_avx512_core           ? HM_PATH_AVX512
	                                                                                     : HM_PATH_F32;
	if (path > max_path) path = max_path;
	if (path != HM_PATH_F32 && !works()) path = HM_PATH_F32;
	return path;
}
