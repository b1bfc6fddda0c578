// tm_team is a caller plus helper threads that share tasks: jobs that
// whichever thread claims them runs. One task at a time per team.
typedef struct tm_team tm_team;
tm_team *tm_new(int helpers, long spin_ns);
void tm_free(tm_team *t);

// Each task returns when all its jobs are done. With t NULL the caller runs
// every job itself.
void tm_mul(tm_team *t, long rows, long k, const float *x, long ldx, const float *wp, long n, long chunk, float *y,
            long ldy, float beta);
void tm_attention(tm_team *t, float *out, long ld_out, const float *qkv, const long *starts, long seqs, long heads,
                  long kv_heads, long d, float *probs, const long *poff, long scratch);
void tm_swiglu(tm_team *t, float *act, const float *gu, long rows, long inter, long chunk);
// tm_helped counts the jobs helpers have run (tests check that they help).
long tm_helped(tm_team *t);
// tm_attn_head is one head's causal attention for rows [row0, L) of one
// sequence, on the calling thread (see team.c).
void tm_attn_head(float *out, long ld_out, const float *qkv, long L, long heads, long kv_heads, long d, long h,
                  long row0, float *probs);
