int pk_avx512(void);
void pk_pack(float *dst, const float *w, long n, long k);
void pk_mul(long rows, long k, const float *x, long ldx, const float *wp, long n0, long n1, float *y, long ldy, float beta);
float *pk_alloc(long floats);
void pk_free(float *p);
