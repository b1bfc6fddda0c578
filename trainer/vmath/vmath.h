int vm_simd(void);
float vm_exp(float x);
float vm_max(const float *x, long n);
double vm_exp_shift(float *x, long n, float shift);
double vm_sum_exp_shift(const float *x, long n, float shift);
void vm_causal_softmax(float *s, long L, long ld, float *lse, long lse_stride);
void vm_causal_softmax_rows(float *s, long rows, long off, long width, long ld, float *lse, long lse_stride);
void vm_causal_exp(float *s, long L, long ld, const float *lse, long lse_stride);
void vm_swiglu_rows(float *act, float *sg, const float *gu, long rows, long inter);
