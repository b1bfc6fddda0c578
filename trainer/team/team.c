// The team's threads and the work they run; see team.go for why they are
// POSIX threads and not goroutines.
#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "../packed/packed.h"
#include "../vmath/vmath.h"
#include "team.h"

enum { TM_MUL = 1, TM_ATTN, TM_SWIGLU };

// tm_task is one task: jobs [0, jobs), each run by whichever thread claims
// it. Only the fields of its kind are read. Its pointers are the arguments
// of the tm_ call that made it, valid until that call returns.
typedef struct {
	int kind;
	long jobs;
	// TM_MUL: y = x·Wᵀ + beta·y over columns [j·chunk, min(n, (j+1)·chunk)).
	long rows, k, ldx, ldy, n, chunk;
	const float *x, *wp;
	float *y;
	float beta;
	// TM_ATTN: job j is head j % heads of sequence j / heads, whose rows are
	// [starts[s], starts[s+1]) of qkv (row stride (heads + 2·kv_heads)·d).
	// Probabilities go to probs + poff[s] + h·L² when poff is set, else to
	// the worker's scratch, probs + worker·scratch.
	float *out;
	long ld_out, heads, kv_heads, d, scratch;
	const float *qkv;
	const long *starts, *poff;
	float *probs;
	// TM_SWIGLU: act = silu(gate)·up for rows [j·chunk, min(n, (j+1)·chunk))
	// of gu [n, 2·inter] (n and chunk above).
	float *act;
	const float *gu;
	long inter;
} tm_task;

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
	pthread_mutex_t mu;
	pthread_cond_t cv;
};

static long now_ns(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000L + t.tv_nsec;
}

static int claim(tm_team *t, long *job) {
	unsigned long v = atomic_load(&t->work);
	for (;;) {
		if (IDX(v) >= CNT(v)) return 0;
		if (atomic_compare_exchange_weak(&t->work, &v, v + 1)) {
			*job = (long)IDX(v);
			return 1;
		}
	}
}

static int claimable(tm_team *t) {
	unsigned long v = atomic_load(&t->work);
	return IDX(v) < CNT(v);
}

// tm_attn_head is one head's causal attention for rows [row0, L) of a
// sequence of L rows (qkv and out from its first row): queries in blocks of
// attnBlockRows rows, each block scoring only the keys it can see, so a
// prompt of 4 blocks computes 10 of the 16 blocks of the score matrix (and
// of P·V); smaller blocks would skip more but make smaller, slower GEMMs.
// Row r's output goes to out + (r − row0)·ld_out + h·d and its probabilities
// [L] to probs + (r − row0)·L. It is the engine's one attention forward:
// trainer.CausalAttentionHead calls it too.
#define ATTN_BLOCK_ROWS 128
void tm_attn_head(float *out, long ld_out, const float *qkv, long L, long heads, long kv_heads, long d, long h,
                  long row0, float *probs) {
	long ld = (heads + 2 * kv_heads) * d;
	long g = h / (heads / kv_heads);
	float scale = 1.0f / sqrtf((float)d);
	const float *q = qkv + h * d, *kk = qkv + (heads + g) * d, *v = qkv + (heads + kv_heads + g) * d;
	for (long r0 = row0; r0 < L; r0 += ATTN_BLOCK_ROWS) {
		long r1 = r0 + ATTN_BLOCK_ROWS < L ? r0 + ATTN_BLOCK_ROWS : L, n = r1 - r0; // rows [r0, r1) see keys [0, r1)
		float *p = probs + (r0 - row0) * L;
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r1, d, scale, q + r0 * ld, ld, kk, ld, 0, p, L);
		vm_causal_softmax_rows(p, n, r0, r1, L, NULL, 0);
		if (r1 < L)
			for (long i = 0; i < n; i++) memset(p + i * L + r1, 0, (L - r1) * sizeof(float)); // keys past the block
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, r1, 1, p, L, v, ld, 0,
		            out + (r0 - row0) * ld_out + h * d, ld_out);
	}
}

static void job(const tm_task *k, long j, int worker) {
	switch (k->kind) {
	case TM_MUL: {
		long c0 = j * k->chunk, c1 = c0 + k->chunk < k->n ? c0 + k->chunk : k->n;
		pk_mul(k->rows, k->k, k->x, k->ldx, k->wp, c0, c1, k->y, k->ldy, k->beta);
		break;
	}
	case TM_ATTN: {
		long s = j / k->heads, h = j % k->heads, L = k->starts[s + 1] - k->starts[s];
		float *p = k->poff ? k->probs + k->poff[s] + h * L * L : k->probs + worker * k->scratch;
		long r = k->starts[s];
		tm_attn_head(k->out + r * k->ld_out, k->ld_out, k->qkv + r * (k->heads + 2 * k->kv_heads) * k->d, L, k->heads,
		             k->kv_heads, k->d, h, 0, p);
		break;
	}
	case TM_SWIGLU: {
		long r0 = j * k->chunk, r1 = r0 + k->chunk < k->n ? r0 + k->chunk : k->n;
		vm_swiglu_rows(k->act + r0 * k->inter, NULL, k->gu + r0 * 2 * k->inter, r1 - r0, k->inter);
		break;
	}
	}
}

static void run(tm_team *t, int worker) {
	long j;
	while (claim(t, &j)) {
		job(&t->task, j, worker);
		if (worker) atomic_fetch_add_explicit(&t->helped, 1, memory_order_relaxed);
		atomic_fetch_add(&t->done, 1);
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
	free(t->threads);
	free(t);
}

// submit runs task k on the caller (worker 0) and t's helpers, or on the
// caller alone when t is NULL, and returns when every job is done.
static void submit(tm_team *t, const tm_task *k) {
	long jobs = k->jobs;
	if (jobs <= 0) return;
	if (!t) {
		for (long j = 0; j < jobs; j++) job(k, j, 0);
		return;
	}
	t->task = *k;
	atomic_store(&t->done, 0);
	unsigned long gen = (atomic_load(&t->work) >> (2 * JOB_BITS)) + 1;
	atomic_store(&t->work, (gen << (2 * JOB_BITS)) | ((unsigned long)jobs << JOB_BITS));
	if (atomic_load(&t->sleepers) > 0) wake(t);
	run(t, 0);
	// The jobs left are running on helpers: wait for them without sleeping.
	while (atomic_load(&t->done) < jobs) __builtin_ia32_pause();
}

void tm_mul(tm_team *t, long rows, long k, const float *x, long ldx, const float *wp, long n, long chunk, float *y,
            long ldy, float beta) {
	tm_task tk = {.kind = TM_MUL, .jobs = (n + chunk - 1) / chunk, .rows = rows, .k = k, .ldx = ldx, .ldy = ldy,
	              .n = n, .chunk = chunk, .x = x, .wp = wp, .y = y, .beta = beta};
	submit(t, &tk);
}

void tm_attention(tm_team *t, float *out, long ld_out, const float *qkv, const long *starts, long seqs, long heads,
                  long kv_heads, long d, float *probs, const long *poff, long scratch) {
	tm_task tk = {.kind = TM_ATTN, .jobs = seqs * heads, .out = out, .ld_out = ld_out, .qkv = qkv, .starts = starts,
	              .heads = heads, .kv_heads = kv_heads, .d = d, .probs = probs, .poff = poff, .scratch = scratch};
	submit(t, &tk);
}

void tm_swiglu(tm_team *t, float *act, const float *gu, long rows, long inter, long chunk) {
	tm_task tk = {.kind = TM_SWIGLU, .jobs = (rows + chunk - 1) / chunk, .act = act, .gu = gu, .n = rows,
	              .chunk = chunk, .inter = inter};
	submit(t, &tk);
}

long tm_helped(tm_team *t) { return atomic_load(&t->helped); }
