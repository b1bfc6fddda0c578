#include <stdint.h>

// tm_team is a caller plus helper threads that share tasks: jobs that
// whichever thread claims them runs. One task at a time per team.
typedef struct tm_team tm_team;
tm_team *tm_new(int helpers, long spin_ns);
void tm_free(tm_team *t);

// Each task returns when all its jobs are done. With t NULL, or a task of
// one job, the caller runs every job itself. Tasks that cut rows or columns
// into jobs take the job's size as chunk.
void tm_mul(tm_team *t, long rows, long k, const float *x, long ldx, const float *wp, long n, long chunk, float *y,
            long ldy, float beta);
// tm_half is a product with half weights W [n, k] (package half): with back
// 0, y [rows, n] = x·Wᵀ + beta·y in jobs of chunk columns of y; with back 1,
// y [rows, k] = x·W + beta·y (x [rows, n]) in jobs of chunk columns. With xb
// (the oneDNN paths), x is first rounded into it, densely, in row jobs.
void tm_half(tm_team *t, int back, int path, int dtype, long rows, long n, long k, const float *x, long ldx,
             uint16_t *xb, const uint16_t *w, float *y, long ldy, float beta, long chunk);
void tm_gemm(tm_team *t, int ta, int tb, int by_rows, long m, long n, long k, float alpha, const float *a, long lda,
             const float *b, long ldb, float beta, float *c, long ldc, long chunk);
void tm_attention(tm_team *t, float *out, long ld_out, const float *qkv, const long *starts, long seqs, long heads,
                  long kv_heads, long d, float *probs, long scratch, float *lse);
void tm_attention_bwd(tm_team *t, float *dqkv, const float *dout, const float *out, float *lse, const float *qkv,
                      const long *starts, long seqs, long heads, long kv_heads, long d, float *probs, long scratch,
                      float *dkv, long chunk);
void tm_decode_attention(tm_team *t, float *out, const float *qkv, long rows, long heads, long kv_heads, long d,
                         const float *kc, const float *vc, const long *slots, const long *pos, long layers, long layer,
                         long max_len, float *probs, long scratch);
void tm_rmsnorm(tm_team *t, float *out, float *rstd, const float *x, const float *w, long rows, long dim, float eps,
                long chunk);
void tm_rmsnorm_bwd(tm_team *t, float *dx, const float *dy, const float *x, const float *w, const float *rstd,
                    long rows, long dim, long chunk);
void tm_rope(tm_team *t, float *x, long rows, long ld, long heads, long d, const float *cos, const float *sin,
             long chunk);
void tm_swiglu(tm_team *t, float *act, float *sg, const float *gu, long rows, long inter, long chunk);
void tm_swiglu_bwd(tm_team *t, float *dgu, const float *dact, const float *gu, const float *sg, long rows, long inter,
                   long chunk);
void tm_log_softmax(tm_team *t, float *z, long rows, long vocab, const int32_t *targets, float *logp, double *lse,
                    long chunk);
void tm_softmax_grad(tm_team *t, float *z, long rows, long vocab, const int32_t *targets, double *lse,
                     const double *coef, long chunk);
// tm_helped counts the jobs helpers have run (tests check that they help).
long tm_helped(tm_team *t);
// tm_attn_head is one head's causal attention for rows [row0, L) of one
// sequence, on the calling thread (see team.c).
void tm_attn_head(float *out, long ld_out, const float *qkv, long L, long heads, long kv_heads, long d, long h,
                  long row0, float *probs, float *lse);
