// The team's threads and the work they run; see team.go for why they are
// POSIX threads and not goroutines.
#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "../half/half.h"
#include "../packed/packed.h"
#include "../vmath/vmath.h"
#include "team.h"

// tm_task is one task: jobs [0, jobs), each run by whichever thread claims
// it, through job. Element-wise and product tasks cut n rows (or columns)
// into jobs of chunk; the rest of the arguments are the union member of
// the task's kind. Its pointers are the arguments of the tm_ call that made
// it, valid until that call returns.
typedef struct tm_task tm_task;
struct tm_task {
	void (*job)(const tm_task *k, long j, int worker);
	long jobs, n, chunk;
	union {
		struct { // y = x·Wᵀ + beta·y, W packed: columns of y
			long rows, k, ldx, ldy;
			const float *x, *wp;
			float *y;
			float beta;
		} mul;
		struct { // half weights W [n, k]: y = x·Wᵀ + beta·y by columns of y, or dx = dy·W + beta·dx by columns of dx
			int path, dtype;
			long rows, n, k, ldx, ldy;
			const float *x;
			uint16_t *xb; // x rounded to bf16 (tobf16_job writes it), or NULL
			const uint16_t *w;
			float *y;
			float beta;
		} half;
		struct { // C = alpha·op(A)·op(B) + beta·C: rows of C (by_rows) or columns
			int ta, tb, by_rows;
			long m, nn, k, lda, ldb, ldc;
			const float *a, *b;
			float *c;
			float alpha, beta;
		} gemm;
		struct { // causal attention, forward and backward: job = (sequence, head)
			long heads, kv_heads, d, ld_out, tokens, scratch;
			const long *starts;
			const float *qkv, *dout, *out;
			float *o, *lse, *probs, *dqkv, *dkv;
		} attn;
		struct { // attention of one new row per sequence against a KV cache: job = (sequence, kv head)
			long heads, kv_heads, d, layers, layer, max_len, scratch;
			const long *slots, *pos;
			const float *qkv, *kc, *vc;
			float *out, *probs;
		} dec;
		struct { // element-wise kernels over rows
			long dim, ld, heads, d;
			float eps;
			float *y, *y2;
			const float *x, *x2, *w, *w2;
			const int32_t *targets;
			double *lse;
			const double *coef;
		} rows;
	} a;
};

// work packs the current task's next job and job count into one word (with
// a generation number that keeps successive tasks' words apart), so that a
// claim is one CAS that checks the index against the count of the same
// task: a helper late from the previous task either claims a real job of
// the current one or nothing. Bits 0–19 next job, 20–39 jobs, 40–63
// generation.
#define JOB_BITS 20
#define IDX(v) ((v) & ((1UL << JOB_BITS) - 1))
#define CNT(v) (((v) >> JOB_BITS) & ((1UL << JOB_BITS) - 1))

struct tm_team {
	tm_task task; // written by the caller before it publishes work
	int helpers;
	long spin_ns;
	pthread_t *threads;
	_Atomic unsigned long work;
	_Atomic long done;   // jobs of the current task finished
	_Atomic long helped; // jobs run by helpers, ever (for tests)
	_Atomic int sleepers;
	_Atomic int stop;
	int waiting; // the caller sleeps on done_cv (guarded by mu)
	pthread_mutex_t mu;
	pthread_cond_t cv, done_cv;
};

static long now_ns(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000L + t.tv_nsec;
}

// claim takes the current task's next job, and tells its job count.
static int claim(tm_team *t, long *job, long *jobs) {
	unsigned long v = atomic_load(&t->work);
	for (;;) {
		if (IDX(v) >= CNT(v)) return 0;
		if (atomic_compare_exchange_weak(&t->work, &v, v + 1)) {
			*job = (long)IDX(v);
			*jobs = (long)CNT(v);
			return 1;
		}
	}
}

static int claimable(tm_team *t) {
	unsigned long v = atomic_load(&t->work);
	return IDX(v) < CNT(v);
}

// span is job j's range [lo, hi) of the task's n rows or columns.
static void span(const tm_task *k, long j, long *lo, long *hi) {
	*lo = j * k->chunk;
	*hi = *lo + k->chunk < k->n ? *lo + k->chunk : k->n;
}

// ---- products ----

static void mul_job(const tm_task *k, long j, int worker) {
	(void)worker;
	long c0, c1;
	span(k, j, &c0, &c1);
	pk_mul(k->a.mul.rows, k->a.mul.k, k->a.mul.x, k->a.mul.ldx, k->a.mul.wp, c0, c1, k->a.mul.y, k->a.mul.ldy,
	       k->a.mul.beta);
}

// tobf16_job rounds rows of a half task's input (inner columns wide) into
// its xb, before the product reads it.
static void tobf16_job(const tm_task *k, long j, int worker) {
	(void)worker;
	long r0, r1;
	span(k, j, &r0, &r1);
	long inner = k->a.half.k; // set to the input's width by tm_half
	hm_to_bf16(k->a.half.xb + r0 * inner, k->a.half.x + r0 * k->a.half.ldx, r1 - r0, inner, k->a.half.ldx);
}

static void half_t_job(const tm_task *k, long j, int worker) {
	(void)worker;
	long c0, c1;
	span(k, j, &c0, &c1);
	hm_mul_t(k->a.half.path, k->a.half.dtype, k->a.half.rows, k->a.half.k, k->a.half.x, k->a.half.ldx, k->a.half.xb,
	         k->a.half.w, c0, c1, k->a.half.y, k->a.half.ldy, k->a.half.beta);
}

static void half_job(const tm_task *k, long j, int worker) {
	(void)worker;
	long c0, c1;
	span(k, j, &c0, &c1);
	hm_mul(k->a.half.path, k->a.half.dtype, k->a.half.rows, k->a.half.n, k->a.half.k, k->a.half.x, k->a.half.ldx,
	       k->a.half.xb, k->a.half.w, c0, c1, k->a.half.y, k->a.half.ldy, k->a.half.beta);
}

// A few rows times a transposed B (a decode step's x·Wᵀ) run as sgemv:
// measured on the 2-core EPYC, OpenBLAS's sgemm packs all of W first and is
// 2–3× slower up to about GEMV_ROWS rows. With more than one row, W is
// walked in blocks of GEMV_BLOCK_BYTES that stay in L2 while they serve
// every row.
#define GEMV_ROWS 4
#define GEMV_BLOCK_BYTES (512 << 10)

static void sgemm(int ta, int tb, long m, long n, long k, float alpha, const float *a, long lda, const float *b,
                  long ldb, float beta, float *c, long ldc) {
	if (!ta && tb && m <= GEMV_ROWS) {
		long blk = m == 1 ? n : GEMV_BLOCK_BYTES / (4 * k);
		if (blk < 16) blk = 16;
		for (long n0 = 0; n0 < n; n0 += blk) {
			long n1 = n0 + blk < n ? n0 + blk : n;
			for (long r = 0; r < m; r++)
				cblas_sgemv(CblasRowMajor, CblasNoTrans, n1 - n0, k, alpha, b + n0 * ldb, ldb, a + r * lda, 1, beta,
				            c + r * ldc + n0, 1);
		}
		return;
	}
	cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda,
	            b, ldb, beta, c, ldc);
}

static void gemm_job(const tm_task *k, long j, int worker) {
	(void)worker;
	long lo, hi;
	span(k, j, &lo, &hi);
	const typeof(k->a.gemm) *g = &k->a.gemm;
	if (g->by_rows) {
		const float *a = g->a + (g->ta ? lo : lo * g->lda); // rows of op(A): rows of A, or columns
		sgemm(g->ta, g->tb, hi - lo, g->nn, g->k, g->alpha, a, g->lda, g->b, g->ldb, g->beta, g->c + lo * g->ldc,
		      g->ldc);
		return;
	}
	const float *b = g->b + (g->tb ? lo * g->ldb : lo); // columns of op(B): rows of B, or columns
	sgemm(g->ta, g->tb, g->m, hi - lo, g->k, g->alpha, g->a, g->lda, b, g->ldb, g->beta, g->c + lo, g->ldc);
}

// ---- attention ----

// tm_attn_head is one head's causal attention for rows [row0, L) of a
// sequence of L rows (qkv and out from its first row): queries in blocks of
// attnBlockRows rows, each block scoring only the keys it can see, so a
// prompt of 4 blocks computes 10 of the 16 blocks of the score matrix (and
// of P·V); smaller blocks would skip more but make smaller, slower GEMMs.
// Row r's output goes to out + (r − row0)·ld_out + h·d, its probabilities
// [L] to probs + (r − row0)·L and, when lse is set, the log-sum-exp of its
// scores to lse[r − row0] (what the backward rebuilds them from).
#define ATTN_BLOCK_ROWS 128
void tm_attn_head(float *out, long ld_out, const float *qkv, long L, long heads, long kv_heads, long d, long h,
                  long row0, float *probs, float *lse) {
	long ld = (heads + 2 * kv_heads) * d;
	long g = h / (heads / kv_heads);
	float scale = 1.0f / sqrtf((float)d);
	const float *q = qkv + h * d, *kk = qkv + (heads + g) * d, *v = qkv + (heads + kv_heads + g) * d;
	for (long r0 = row0; r0 < L; r0 += ATTN_BLOCK_ROWS) {
		long r1 = r0 + ATTN_BLOCK_ROWS < L ? r0 + ATTN_BLOCK_ROWS : L, n = r1 - r0; // rows [r0, r1) see keys [0, r1)
		float *p = probs + (r0 - row0) * L;
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r1, d, scale, q + r0 * ld, ld, kk, ld, 0, p, L);
		vm_causal_softmax_rows(p, n, r0, r1, L, lse ? lse + (r0 - row0) : NULL, 1);
		if (r1 < L)
			for (long i = 0; i < n; i++) memset(p + i * L + r1, 0, (L - r1) * sizeof(float)); // keys past the block
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, r1, 1, p, L, v, ld, 0,
		            out + (r0 - row0) * ld_out + h * d, ld_out);
	}
}

static void attn_job(const tm_task *k, long j, int worker) {
	const typeof(k->a.attn) *a = &k->a.attn;
	long s = j / a->heads, h = j % a->heads, r = a->starts[s], L = a->starts[s + 1] - r;
	tm_attn_head(a->o + r * a->ld_out, a->ld_out, a->qkv + r * (a->heads + 2 * a->kv_heads) * a->d, L, a->heads,
	             a->kv_heads, a->d, h, 0, a->probs + worker * a->scratch, a->lse ? a->lse + h * a->tokens + r : NULL);
}

// attn_bwd_job is one (sequence, head)'s attention backward, the
// probabilities rebuilt from q, k and the forward's log-sum-exp rather than
// kept: dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P⊙(dP − rowsum(dO⊙O)), dQ = scale·dS·K,
// dK = scale·dSᵀ·Q. dQ goes to the head's q columns of dqkv; dK and dV to
// the head's own rows of dkv (tm_attention_bwd sums each KV group's heads
// after), so that jobs write disjoint memory.
static void attn_bwd_job(const tm_task *k, long j, int worker) {
	const typeof(k->a.attn) *a = &k->a.attn;
	long s = j / a->heads, h = j % a->heads, st = a->starts[s], n = a->starts[s + 1] - st;
	long d = a->d, ld = (a->heads + 2 * a->kv_heads) * d, od = a->heads * d, T = a->tokens;
	long g = h / (a->heads / a->kv_heads);
	float scale = 1.0f / sqrtf((float)d);
	const float *q = a->qkv + st * ld + h * d, *kk = a->qkv + st * ld + (a->heads + g) * d,
	            *v = a->qkv + st * ld + (a->heads + a->kv_heads + g) * d;
	const float *dout = a->dout + st * od + h * d, *o = a->out + st * od + h * d;
	float *dq = a->dqkv + st * ld + h * d, *dk = a->dkv + (h * T + st) * d, *dv = a->dkv + (a->heads * T + h * T + st) * d;
	float *p = a->probs + worker * 2 * a->scratch, *dp = p + a->scratch;
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, d, scale, q, ld, kk, ld, 0, p, n);
	vm_causal_exp(p, n, n, a->lse + h * T + st, 1);
	cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, d, n, 1, p, n, dout, od, 0, dv, d);
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, d, 1, dout, od, v, ld, 0, dp, n);
	for (long i = 0; i < n; i++) {
		float di = 0;
		for (long c = 0; c < d; c++) di += dout[i * od + c] * o[i * od + c];
		float *pr = p + i * n, *dpr = dp + i * n;
		for (long c = 0; c <= i; c++) pr[c] *= dpr[c] - di;
	}
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, n, scale, p, n, kk, ld, 0, dq, ld);
	cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, d, n, scale, p, n, q, ld, 0, dk, d);
}

// kv_sum_job sums, for rows [lo, hi), each KV group's per-head dK and dV
// (dkv) into the group's k and v columns of dqkv.
static void kv_sum_job(const tm_task *k, long j, int worker) {
	(void)worker;
	const typeof(k->a.attn) *a = &k->a.attn;
	long lo, hi;
	span(k, j, &lo, &hi);
	long d = a->d, ld = (a->heads + 2 * a->kv_heads) * d, T = a->tokens, group = a->heads / a->kv_heads;
	const float *dkh = a->dkv, *dvh = a->dkv + a->heads * T * d;
	for (long r = lo; r < hi; r++) {
		for (long g = 0; g < a->kv_heads; g++) {
			float *dk = a->dqkv + r * ld + (a->heads + g) * d, *dv = a->dqkv + r * ld + (a->heads + a->kv_heads + g) * d;
			memset(dk, 0, d * sizeof(float));
			memset(dv, 0, d * sizeof(float));
			for (long h = g * group; h < (g + 1) * group; h++) {
				const float *hk = dkh + (h * T + r) * d, *hv = dvh + (h * T + r) * d;
				for (long c = 0; c < d; c++) {
					dk[c] += hk[c];
					dv[c] += hv[c];
				}
			}
		}
	}
}

// dec_job is one sequence's new row against its cached keys and values for
// one KV head: the group's q heads are adjacent in the row, so they score
// the head's keys as one [group, d] matrix and read the cache once.
static void dec_job(const tm_task *k, long j, int worker) {
	const typeof(k->a.dec) *a = &k->a.dec;
	long i = j / a->kv_heads, g = j % a->kv_heads, group = a->heads / a->kv_heads, d = a->d;
	long n = a->pos[i] + 1, ld = (a->heads + 2 * a->kv_heads) * d;
	long off = ((a->slots[i] * a->layers + a->layer) * a->kv_heads + g) * a->max_len * d;
	float scale = 1.0f / sqrtf((float)d);
	float *s = a->probs + worker * a->scratch;
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, group, n, d, scale, a->qkv + i * ld + g * group * d, d,
	            a->kc + off, d, 0, s, n);
	for (long r = 0; r < group; r++) {
		float *row = s + r * n;
		double sum = vm_exp_shift(row, n, vm_max(row, n));
		vm_scale(row, n, (float)(1.0 / sum));
	}
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, group, d, n, 1, s, n, a->vc + off, d, 0,
	            a->out + i * a->heads * d + g * group * d, d);
}

// ---- element-wise kernels, on rows [lo, hi) ----

static void rmsnorm_job(const tm_task *k, long j, int worker) {
	(void)worker;
	const typeof(k->a.rows) *a = &k->a.rows;
	long lo, hi;
	span(k, j, &lo, &hi);
	vm_rmsnorm(a->y + lo * a->dim, a->y2 ? a->y2 + lo : NULL, a->x + lo * a->dim, a->w, hi - lo, a->dim, a->eps);
}

static void rmsnorm_bwd_job(const tm_task *k, long j, int worker) {
	(void)worker;
	const typeof(k->a.rows) *a = &k->a.rows;
	long lo, hi;
	span(k, j, &lo, &hi);
	vm_rmsnorm_bwd(a->y + lo * a->dim, a->x2 + lo * a->dim, a->x + lo * a->dim, a->w, a->w2 + lo, hi - lo, a->dim);
}

static void rope_job(const tm_task *k, long j, int worker) {
	(void)worker;
	const typeof(k->a.rows) *a = &k->a.rows;
	long lo, hi, half = a->d / 2;
	span(k, j, &lo, &hi);
	vm_rope(a->y + lo * a->ld, hi - lo, a->ld, a->heads, a->d, a->w + lo * half, a->w2 + lo * half);
}

static void swiglu_job(const tm_task *k, long j, int worker) {
	(void)worker;
	const typeof(k->a.rows) *a = &k->a.rows;
	long lo, hi;
	span(k, j, &lo, &hi);
	vm_swiglu_rows(a->y + lo * a->dim, a->y2 ? a->y2 + lo * a->dim : NULL, a->x + lo * 2 * a->dim, hi - lo, a->dim);
}

static void swiglu_bwd_job(const tm_task *k, long j, int worker) {
	(void)worker;
	const typeof(k->a.rows) *a = &k->a.rows;
	long lo, hi;
	span(k, j, &lo, &hi);
	vm_swiglu_bwd_rows(a->y + lo * 2 * a->dim, a->x2 + lo * a->dim, a->x + lo * 2 * a->dim, a->w + lo * a->dim, hi - lo,
	                   a->dim);
}

// log_softmax_job: per row of logits z, the exponentials in place (e^(z−max),
// kept for the gradient), lse = log Σ, and the target's log-probability.
static void log_softmax_job(const tm_task *k, long j, int worker) {
	(void)worker;
	const typeof(k->a.rows) *a = &k->a.rows;
	long lo, hi;
	span(k, j, &lo, &hi);
	for (long r = lo; r < hi; r++) {
		float *z = a->y + r * a->dim;
		float m = vm_max(z, a->dim), zt = z[a->targets[r]];
		a->lse[r] = log(vm_exp_shift(z, a->dim, m));
		a->y2[r] = (float)((double)(zt - m) - a->lse[r]);
	}
}

// softmax_grad_job turns each row's exponentials into dz = coef·(onehot(target)
// − softmax).
static void softmax_grad_job(const tm_task *k, long j, int worker) {
	(void)worker;
	const typeof(k->a.rows) *a = &k->a.rows;
	long lo, hi;
	span(k, j, &lo, &hi);
	for (long r = lo; r < hi; r++) {
		float *z = a->y + r * a->dim;
		vm_scale(z, a->dim, (float)(-a->coef[r] * exp(-a->lse[r])));
		z[a->targets[r]] += (float)a->coef[r];
	}
}

// ---- the team ----

static void run(tm_team *t, int worker) {
	long j, jobs;
	while (claim(t, &j, &jobs)) {
		t->task.job(&t->task, j, worker);
		if (!worker) {
			atomic_fetch_add(&t->done, 1);
			continue;
		}
		atomic_fetch_add_explicit(&t->helped, 1, memory_order_relaxed);
		// After this increment the caller may return and reuse the task:
		// only the count taken at the claim is read.
		if (atomic_fetch_add(&t->done, 1) + 1 == jobs) {
			pthread_mutex_lock(&t->mu);
			if (t->waiting) pthread_cond_signal(&t->done_cv);
			pthread_mutex_unlock(&t->mu);
		}
	}
}

typedef struct {
	tm_team *t;
	int worker;
} helper_arg;

// helper polls for work for spin_ns, then sleeps on the condition variable
// until submit wakes it.
static void *helper(void *p) {
	helper_arg a = *(helper_arg *)p;
	free(p);
	tm_team *t = a.t;
	for (;;) {
		long end = now_ns() + t->spin_ns;
		while (!claimable(t) && !atomic_load(&t->stop)) {
			for (int i = 0; i < 64; i++) __builtin_ia32_pause();
			if (now_ns() < end) continue;
			pthread_mutex_lock(&t->mu);
			atomic_fetch_add(&t->sleepers, 1);
			while (!claimable(t) && !atomic_load(&t->stop)) pthread_cond_wait(&t->cv, &t->mu);
			atomic_fetch_sub(&t->sleepers, 1);
			pthread_mutex_unlock(&t->mu);
		}
		if (atomic_load(&t->stop)) return NULL;
		run(t, a.worker);
	}
}

static void wake(tm_team *t) {
	pthread_mutex_lock(&t->mu);
	pthread_cond_broadcast(&t->cv);
	pthread_mutex_unlock(&t->mu);
}

tm_team *tm_new(int helpers, long spin_ns) {
	tm_team *t = calloc(1, sizeof *t);
	if (!t) return NULL;
	t->spin_ns = spin_ns;
	pthread_mutex_init(&t->mu, NULL);
	pthread_cond_init(&t->cv, NULL);
	pthread_cond_init(&t->done_cv, NULL);
	t->threads = calloc(helpers > 0 ? helpers : 1, sizeof(pthread_t));
	if (!t->threads) {
		tm_free(t);
		return NULL;
	}
	for (int i = 0; i < helpers; i++) {
		helper_arg *a = malloc(sizeof *a);
		if (!a) {
			tm_free(t);
			return NULL;
		}
		a->t = t, a->worker = i + 1;
		if (pthread_create(&t->threads[i], NULL, helper, a) != 0) {
			free(a);
			tm_free(t);
			return NULL;
		}
		t->helpers = i + 1;
	}
	return t;
}

void tm_free(tm_team *t) {
	atomic_store(&t->stop, 1);
	wake(t);
	for (int i = 0; i < t->helpers; i++) pthread_join(t->threads[i], NULL);
	pthread_mutex_destroy(&t->mu);
	pthread_cond_destroy(&t->cv);
	pthread_cond_destroy(&t->done_cv);
	free(t->threads);
	free(t);
}

// submit runs task k on the caller (worker 0) and t's helpers, or on the
// caller alone when t is NULL or the task is one job, and returns when
// every job is done.
static void submit(tm_team *t, const tm_task *k) {
	long jobs = k->jobs;
	if (jobs <= 0) return;
	if (!t || jobs == 1) {
		for (long j = 0; j < jobs; j++) k->job(k, j, 0);
		return;
	}
	t->task = *k;
	atomic_store(&t->done, 0);
	unsigned long gen = (atomic_load(&t->work) >> (2 * JOB_BITS)) + 1;
	atomic_store(&t->work, (gen << (2 * JOB_BITS)) | ((unsigned long)jobs << JOB_BITS));
	if (atomic_load(&t->sleepers) > 0) wake(t);
	run(t, 0);
	// The jobs left are running on helpers. Poll for them for spin_ns (a
	// job's end is usually microseconds away), then sleep: on a loaded
	// machine a helper may lose its core for a scheduler slice, and a
	// polling caller would burn its own slice waiting.
	long end = now_ns() + t->spin_ns;
	while (atomic_load(&t->done) < jobs) {
		for (int i = 0; i < 16; i++) __builtin_ia32_pause();
		if (now_ns() < end) continue;
		pthread_mutex_lock(&t->mu);
		t->waiting = 1;
		while (atomic_load(&t->done) < jobs) pthread_cond_wait(&t->done_cv, &t->mu);
		t->waiting = 0;
		pthread_mutex_unlock(&t->mu);
	}
}

// rows_task is an element-wise task over n rows in jobs of chunk rows.
static tm_task rows_task(void (*job)(const tm_task *, long, int), long n, long chunk) {
	return (tm_task){.job = job, .jobs = (n + chunk - 1) / chunk, .n = n, .chunk = chunk};
}

void tm_mul(tm_team *t, long rows, long k, const float *x, long ldx, const float *wp, long n, long chunk, float *y,
            long ldy, float beta) {
	tm_task tk = {.job = mul_job, .jobs = (n + chunk - 1) / chunk, .n = n, .chunk = chunk};
	tk.a.mul = (typeof(tk.a.mul)){.rows = rows, .k = k, .ldx = ldx, .ldy = ldy, .x = x, .wp = wp, .y = y, .beta = beta};
	submit(t, &tk);
}

// Elements of input each rounding job takes at least.
#define ROUND_CHUNK (32L << 10)

void tm_half(tm_team *t, int back, int path, int dtype, long rows, long n, long k, const float *x, long ldx,
             uint16_t *xb, const uint16_t *w, float *y, long ldy, float beta, long chunk) {
	if (xb) {
		long inner = back ? n : k;
		if (rows * inner <= ROUND_CHUNK) {
			hm_to_bf16(xb, x, rows, inner, ldx); // a decode step's row: not worth a hand-off
		} else {
			tm_task rk = rows_task(tobf16_job, rows, ROUND_CHUNK / inner + 1);
			rk.a.half = (typeof(rk.a.half)){.k = inner, .ldx = ldx, .x = x, .xb = xb};
			submit(t, &rk);
		}
	}
	long dim = back ? k : n;
	tm_task tk = {.job = back ? half_job : half_t_job, .jobs = (dim + chunk - 1) / chunk, .n = dim, .chunk = chunk};
	tk.a.half = (typeof(tk.a.half)){.path = path, .dtype = dtype, .rows = rows, .n = n, .k = k, .ldx = ldx,
	                                .ldy = ldy, .x = x, .xb = xb, .w = w, .y = y, .beta = beta};
	submit(t, &tk);
}

void tm_gemm(tm_team *t, int ta, int tb, int by_rows, long m, long n, long k, float alpha, const float *a, long lda,
             const float *b, long ldb, float beta, float *c, long ldc, long chunk) {
	long dim = by_rows ? m : n;
	tm_task tk = {.job = gemm_job, .jobs = (dim + chunk - 1) / chunk, .n = dim, .chunk = chunk};
	tk.a.gemm = (typeof(tk.a.gemm)){.ta = ta, .tb = tb, .by_rows = by_rows, .m = m, .nn = n, .k = k, .lda = lda,
	                                .ldb = ldb, .ldc = ldc, .a = a, .b = b, .c = c, .alpha = alpha, .beta = beta};
	submit(t, &tk);
}

void tm_attention(tm_team *t, float *out, long ld_out, const float *qkv, const long *starts, long seqs, long heads,
                  long kv_heads, long d, float *probs, long scratch, float *lse) {
	tm_task tk = {.job = attn_job, .jobs = seqs * heads};
	tk.a.attn = (typeof(tk.a.attn)){.heads = heads, .kv_heads = kv_heads, .d = d, .ld_out = ld_out,
	                                .tokens = starts[seqs], .scratch = scratch, .starts = starts, .qkv = qkv,
	                                .o = out, .lse = lse, .probs = probs};
	submit(t, &tk);
}

void tm_attention_bwd(tm_team *t, float *dqkv, const float *dout, const float *out, float *lse, const float *qkv,
                      const long *starts, long seqs, long heads, long kv_heads, long d, float *probs, long scratch,
                      float *dkv, long chunk) {
	tm_task tk = {.job = attn_bwd_job, .jobs = seqs * heads};
	tk.a.attn = (typeof(tk.a.attn)){.heads = heads, .kv_heads = kv_heads, .d = d, .tokens = starts[seqs],
	                                .scratch = scratch, .starts = starts, .qkv = qkv, .dout = dout, .out = out,
	                                .lse = lse, .probs = probs, .dqkv = dqkv, .dkv = dkv};
	submit(t, &tk);
	tm_task sum = rows_task(kv_sum_job, starts[seqs], chunk);
	sum.a.attn = tk.a.attn;
	submit(t, &sum);
}

void tm_decode_attention(tm_team *t, float *out, const float *qkv, long rows, long heads, long kv_heads, long d,
                         const float *kc, const float *vc, const long *slots, const long *pos, long layers, long layer,
                         long max_len, float *probs, long scratch) {
	tm_task tk = {.job = dec_job, .jobs = rows * kv_heads};
	tk.a.dec = (typeof(tk.a.dec)){.heads = heads, .kv_heads = kv_heads, .d = d, .layers = layers, .layer = layer,
	                              .max_len = max_len, .scratch = scratch, .slots = slots, .pos = pos, .qkv = qkv,
	                              .kc = kc, .vc = vc, .out = out, .probs = probs};
	submit(t, &tk);
}

void tm_rmsnorm(tm_team *t, float *out, float *rstd, const float *x, const float *w, long rows, long dim, float eps,
                long chunk) {
	tm_task tk = rows_task(rmsnorm_job, rows, chunk);
	tk.a.rows = (typeof(tk.a.rows)){.dim = dim, .eps = eps, .y = out, .y2 = rstd, .x = x, .w = w};
	submit(t, &tk);
}

void tm_rmsnorm_bwd(tm_team *t, float *dx, const float *dy, const float *x, const float *w, const float *rstd,
                    long rows, long dim, long chunk) {
	tm_task tk = rows_task(rmsnorm_bwd_job, rows, chunk);
	tk.a.rows = (typeof(tk.a.rows)){.dim = dim, .y = dx, .x2 = dy, .x = x, .w = w, .w2 = rstd};
	submit(t, &tk);
}

void tm_rope(tm_team *t, float *x, long rows, long ld, long heads, long d, const float *cos, const float *sin,
             long chunk) {
	tm_task tk = rows_task(rope_job, rows, chunk);
	tk.a.rows = (typeof(tk.a.rows)){.ld = ld, .heads = heads, .d = d, .y = x, .w = cos, .w2 = sin};
	submit(t, &tk);
}

void tm_swiglu(tm_team *t, float *act, float *sg, const float *gu, long rows, long inter, long chunk) {
	tm_task tk = rows_task(swiglu_job, rows, chunk);
	tk.a.rows = (typeof(tk.a.rows)){.dim = inter, .y = act, .y2 = sg, .x = gu};
	submit(t, &tk);
}

void tm_swiglu_bwd(tm_team *t, float *dgu, const float *dact, const float *gu, const float *sg, long rows, long inter,
                   long chunk) {
	tm_task tk = rows_task(swiglu_bwd_job, rows, chunk);
	tk.a.rows = (typeof(tk.a.rows)){.dim = inter, .y = dgu, .x2 = dact, .x = gu, .w = sg};
	submit(t, &tk);
}

void tm_log_softmax(tm_team *t, float *z, long rows, long vocab, const int32_t *targets, float *logp, double *lse,
                    long chunk) {
	tm_task tk = rows_task(log_softmax_job, rows, chunk);
	tk.a.rows = (typeof(tk.a.rows)){.dim = vocab, .y = z, .y2 = logp, .targets = targets, .lse = lse};
	submit(t, &tk);
}

void tm_softmax_grad(tm_team *t, float *z, long rows, long vocab, const int32_t *targets, double *lse,
                     const double *coef, long chunk) {
	tm_task tk = rows_task(softmax_grad_job, rows, chunk);
	tk.a.rows = (typeof(tk.a.rows)){.dim = vocab, .y = z, .targets = targets, .lse = lse, .coef = coef};
	submit(t, &tk);
}

long tm_helped(tm_team *t) { return atomic_load(&t->helped); }
