// Element-wise kernels of the engine: exponentials for softmax and SwiGLU,
// 8 floats at a time with AVX2 and FMA where the CPU has them, otherwise the
// same arithmetic one float at a time. See vmath.go.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#include "vmath.h"

// Cephes' expf: x = k·ln2 + r with |r| ≤ ln2/2, exp(r) by a degree-6
// polynomial, 2^k through the exponent bits. Within 2 ulp of exp on
// [-87.3, 88]; 0 below (softmax terms that underflow), +Inf above (2^k must
// stay a normal float; the engine only takes exp of arguments ≤ 0).
#define EXP_HI 88.0f
#define EXP_LO -87.3f
#define LOG2E 1.44269504088896341f
#define C1 0.693359375f
#define C2 -2.12194440e-4f
#define P0 1.9875691500e-4f
#define P1 1.3981999507e-3f
#define P2 8.3334519073e-3f
#define P3 4.1665795894e-2f
#define P4 1.6666665459e-1f
#define P5 5.0000001201e-1f

static inline float exp1(float x) {
	if (x != x) return x;
	if (x > EXP_HI) return INFINITY;
	if (x < EXP_LO) return 0.0f;
	float k = nearbyintf(x * LOG2E);
	float r = x - k * C1 - k * C2;
	float p = P0;
	p = p * r + P1;
	p = p * r + P2;
	p = p * r + P3;
	p = p * r + P4;
	p = p * r + P5;
	p = p * r * r + r + 1.0f;
	int32_t bits = ((int32_t)k + 127) << 23;
	float s;
	memcpy(&s, &bits, 4);
	return p * s;
}

__attribute__((target("avx2,fma")))
static inline __m256 exp8(__m256 x) {
	__m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_LT_OQ);
	__m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_HI), _CMP_GT_OQ);
	__m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
	__m256 k = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	__m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(C1), xc);
	r = _mm256_fnmadd_ps(k, _mm256_set1_ps(C2), r);
	__m256 p = _mm256_set1_ps(P0);
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
	__m256 r2 = _mm256_mul_ps(r, r);
	p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
	__m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
	__m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
	y = _mm256_andnot_ps(under, y);
	y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
	// NaN in, NaN out.
	return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// Set once at load time, before any goroutine can call in: read-only after.
static int have_avx2;

__attribute__((constructor)) static void vm_init(void) {
	__builtin_cpu_init();
	have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static inline int avx2(void) { return have_avx2; }

int vm_simd(void) { return avx2(); }

float vm_exp(float x) { return exp1(x); }

// ---- max and exp(x - shift) with a float64 sum ----

__attribute__((target("avx2,fma")))
static float max_avx2(const float *x, long n) {
	long i = 0;
	float m = x[0];
	if (n >= 8) {
		__m256 vm = _mm256_loadu_ps(x);
		for (i = 8; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
		float t[8];
		_mm256_storeu_ps(t, vm);
		for (int j = 0; j < 8; j++) if (t[j] > m) m = t[j];
	}
	for (; i < n; i++) if (x[i] > m) m = x[i];
	return m;
}

float vm_max(const float *x, long n) {
	if (avx2()) return max_avx2(x, n);
	float m = x[0];
	for (long i = 1; i < n; i++) if (x[i] > m) m = x[i];
	return m;
}

__attribute__((target("avx2,fma")))
static double exp_shift_avx2(float *x, long n, float shift) {
	__m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
	__m256 vs = _mm256_set1_ps(shift);
	long i = 0;
	for (; i + 8 <= n; i += 8) {
		__m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
		_mm256_storeu_ps(x + i, e);
		s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
		s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
	}
	double t[4];
	_mm256_storeu_pd(t, _mm256_add_pd(s0, s1));
	double sum = (t[0] + t[1]) + (t[2] + t[3]);
	for (; i < n; i++) {
		float e = exp1(x[i] - shift);
		x[i] = e;
		sum += e;
	}
	return sum;
}

double vm_exp_shift(float *x, long n, float shift) {
	if (avx2()) return exp_shift_avx2(x, n, shift);
	double sum = 0;
	for (long i = 0; i < n; i++) {
		float e = exp1(x[i] - shift);
		x[i] = e;
		sum += e;
	}
	return sum;
}

__attribute__((target("avx2,fma")))
static double sum_exp_shift_avx2(const float *x, long n, float shift) {
	__m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
	__m256 vs = _mm256_set1_ps(shift);
	long i = 0;
	for (; i + 8 <= n; i += 8) {
		__m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
		s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
		s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
	}
	double t[4];
	_mm256_storeu_pd(t, _mm256_add_pd(s0, s1));
	double sum = (t[0] + t[1]) + (t[2] + t[3]);
	for (; i < n; i++) sum += exp1(x[i] - shift);
	return sum;
}

double vm_sum_exp_shift(const float *x, long n, float shift) {
	if (avx2()) return sum_exp_shift_avx2(x, n, shift);
	double sum = 0;
	for (long i = 0; i < n; i++) sum += exp1(x[i] - shift);
	return sum;
}

__attribute__((target("avx2,fma")))
static void scale_avx2(float *x, long n, float f) {
	__m256 vf = _mm256_set1_ps(f);
	long i = 0;
	for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vf));
	for (; i < n; i++) x[i] *= f;
}

void vm_scale(float *x, long n, float f) {
	if (avx2()) {
		scale_avx2(x, n, f);
		return;
	}
	for (long i = 0; i < n; i++) x[i] *= f;
}

// ---- causal softmax of an [L, L] score block ----

void vm_causal_softmax_rows(float *s, long rows, long off, long width, long ld, float *lse, long lse_stride) {
	for (long i = 0; i < rows; i++) {
		float *row = s + i * ld;
		long n = off + i + 1; // row off+i sees keys 0..off+i
		float m = vm_max(row, n);
		double sum = vm_exp_shift(row, n, m);
		vm_scale(row, n, (float)(1.0 / sum));
		if (n < width) memset(row + n, 0, (size_t)(width - n) * sizeof(float));
		if (lse) lse[i * lse_stride] = m + (float)log(sum);
	}
}

void vm_causal_softmax(float *s, long L, long ld, float *lse, long lse_stride) {
	vm_causal_softmax_rows(s, L, 0, L, ld, lse, lse_stride);
}

void vm_causal_exp(float *s, long L, long ld, const float *lse, long lse_stride) {
	for (long i = 0; i < L; i++) {
		float *row = s + i * ld;
		vm_exp_shift(row, i + 1, lse[i * lse_stride]);
		if (i + 1 < L) memset(row + i + 1, 0, (size_t)(L - i - 1) * sizeof(float));
	}
}

// ---- SwiGLU: act = silu(g)·u, σ through exp(-|g|) ----

static inline float sigmoid1(float g) {
	float e = exp1(-fabsf(g));
	return g >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

__attribute__((target("avx2,fma")))
static inline __m256 sigmoid8(__m256 g) {
	__m256 sign = _mm256_set1_ps(-0.0f);
	__m256 e = exp8(_mm256_or_ps(g, sign)); // exp(-|g|)
	__m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
	__m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
	return _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), neg);
}

__attribute__((target("avx2,fma")))
static void swiglu_avx2(float *act, float *sg, const float *g, const float *u, long n) {
	long i = 0;
	for (; i + 8 <= n; i += 8) {
		__m256 gv = _mm256_loadu_ps(g + i);
		__m256 s = sigmoid8(gv);
		if (sg) _mm256_storeu_ps(sg + i, s);
		_mm256_storeu_ps(act + i, _mm256_mul_ps(_mm256_mul_ps(gv, s), _mm256_loadu_ps(u + i)));
	}
	for (; i < n; i++) {
		float s = sigmoid1(g[i]);
		if (sg) sg[i] = s;
		act[i] = g[i] * s * u[i];
	}
}

void vm_swiglu_rows(float *act, float *sg, const float *gu, long rows, long inter) {
	for (long r = 0; r < rows; r++) {
		const float *g = gu + r * 2 * inter, *u = g + inter;
		float *a = act + r * inter, *s = sg ? sg + r * inter : 0;
		if (avx2()) {
			swiglu_avx2(a, s, g, u, inter);
			continue;
		}
		for (long i = 0; i < inter; i++) {
			float sv = sigmoid1(g[i]);
			if (s) s[i] = sv;
			a[i] = g[i] * sv * u[i];
		}
	}
}

// The backward of SwiGLU from σ(g) kept by the forward (no exponential):
// d up = dact·g·σ(g), d gate = dact·u·σ(g)·(1 + g·(1 − σ(g))).
void vm_swiglu_bwd_rows(float *dgu, const float *dact, const float *gu, const float *sg, long rows, long inter) {
	for (long r = 0; r < rows; r++) {
		const float *g = gu + r * 2 * inter, *u = g + inter, *dh = dact + r * inter, *s = sg + r * inter;
		float *dg = dgu + r * 2 * inter, *du = dg + inter;
		for (long i = 0; i < inter; i++) {
			du[i] = dh[i] * g[i] * s[i];
			dg[i] = dh[i] * u[i] * s[i] * (1 + g[i] * (1 - s[i]));
		}
	}
}

// RMSNorm: out = x / sqrt(mean(x²) + eps) · w per row, the mean of squares
// accumulated in float64 (4 lanes, then summed) as the scalar path does in
// order; both round the same 1/rms to f32 before scaling.
__attribute__((target("avx2,fma"))) static double sumsq_avx2(const float *x, long n) {
	__m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
	long i = 0;
	for (; i + 8 <= n; i += 8) {
		__m256 v = _mm256_loadu_ps(x + i);
		__m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
		a0 = _mm256_fmadd_pd(lo, lo, a0);
		a1 = _mm256_fmadd_pd(hi, hi, a1);
	}
	double t[4];
	_mm256_storeu_pd(t, _mm256_add_pd(a0, a1));
	double s = (t[0] + t[1]) + (t[2] + t[3]);
	for (; i < n; i++) s += (double)x[i] * (double)x[i];
	return s;
}

__attribute__((target("avx2,fma"))) static void scale_mul_avx2(float *out, const float *x, const float *w, float inv, long n) {
	__m256 iv = _mm256_set1_ps(inv);
	long i = 0;
	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(w + i)));
	for (; i < n; i++) out[i] = x[i] * inv * w[i];
}

void vm_rmsnorm(float *out, float *rstd, const float *x, const float *w, long rows, long dim, float eps) {
	for (long r = 0; r < rows; r++) {
		const float *xr = x + r * dim;
		float *or = out + r * dim;
		double ss = 0;
		if (avx2()) {
			ss = sumsq_avx2(xr, dim);
		} else {
			for (long i = 0; i < dim; i++) ss += (double)xr[i] * (double)xr[i];
		}
		float inv = (float)(1.0 / sqrt(ss / (double)dim + (double)eps));
		if (rstd) rstd[r] = inv;
		if (avx2()) {
			scale_mul_avx2(or, xr, w, inv, dim);
			continue;
		}
		for (long i = 0; i < dim; i++) or[i] = xr[i] * inv * w[i];
	}
}

// The backward of RMSNorm with w frozen, added into dx: with g = dy·w,
// dx += rstd·g − x·rstd³·mean(g·x), the mean accumulated in float64.
void vm_rmsnorm_bwd(float *dx, const float *dy, const float *x, const float *w, const float *rstd, long rows, long dim) {
	for (long r = 0; r < rows; r++) {
		const float *xr = x + r * dim, *dyr = dy + r * dim;
		float *dxr = dx + r * dim;
		double dot = 0;
		for (long i = 0; i < dim; i++) dot += (double)(dyr[i] * w[i]) * (double)xr[i];
		float ri = rstd[r];
		float c = (float)(dot / (double)dim) * ri * ri * ri;
		for (long i = 0; i < dim; i++) dxr[i] += dyr[i] * w[i] * ri - xr[i] * c;
	}
}

// Rotary embedding in Hugging Face's rotate-half layout, in place: for each
// row and head (d wide, halves lo and hi), lo' = lo·cos − hi·sin and
// hi' = hi·cos + lo·sin, each product rounded before the sum as in the
// scalar path (no FMA contraction: results match it bit for bit).
__attribute__((target("avx2"))) static void rope_avx2(float *lo, float *hi, const float *c, const float *s, long half) {
	long i = 0;
	for (; i + 8 <= half; i += 8) {
		__m256 a = _mm256_loadu_ps(lo + i), b = _mm256_loadu_ps(hi + i);
		__m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
		_mm256_storeu_ps(lo + i, _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv)));
		_mm256_storeu_ps(hi + i, _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv)));
	}
	for (; i < half; i++) {
		float a = lo[i], b = hi[i];
		float ac = a * c[i], bs = b * s[i], bc = b * c[i], as = a * s[i];
		lo[i] = ac - bs;
		hi[i] = bc + as;
	}
}

void vm_rope(float *x, long rows, long ld, long nheads, long d, const float *cos, const float *sin) {
	long half = d / 2;
	for (long r = 0; r < rows; r++) {
		const float *c = cos + r * half, *s = sin + r * half;
		for (long h = 0; h < nheads; h++) {
			float *lo = x + r * ld + h * d, *hi = lo + half;
			if (avx2()) {
				rope_avx2(lo, hi, c, s, half);
				continue;
			}
			for (long i = 0; i < half; i++) {
				float a = lo[i], b = hi[i];
				float ac = a * c[i], bs = b * s[i], bc = b * c[i], as = a * s[i];
				lo[i] = ac - bs;
				hi[i] = bc + as;
			}
		}
	}
}
