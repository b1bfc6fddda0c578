#include <stdint.h>

// Element types of a half matrix's storage.
enum { HM_BF16 = 0, HM_F16 = 1 };

// Product paths, slowest first (see half.go's Path).
enum { HM_PATH_F32 = 0, HM_PATH_AVX512 = 1, HM_PATH_AVX512_BF16 = 2, HM_PATH_AMX = 3 };

// hm_setup picks the product path, at most max_path, from what this CPU
// and oneDNN offer, and returns it. Call it once, before any product.
int hm_setup(int max_path);

uint16_t *hm_alloc(long elems);
void hm_free(uint16_t *p);

// hm_to_bf16 rounds x [rows, cols] (row stride ldx) to bf16, densely into dst.
void hm_to_bf16(uint16_t *dst, const float *x, long rows, long cols, long ldx);
// hm_to_f32 widens n elements of src (bf16 or f16 bits) into dst.
void hm_to_f32(float *dst, const uint16_t *src, long n, int dtype);
// hm_from_f32 rounds n f32 values to dtype (nearest even) into dst.
void hm_from_f32(uint16_t *dst, const float *src, long n, int dtype);

// hm_mul_t is y[:, n0:n1] = x·W[n0:n1, :]ᵀ + beta·y[:, n0:n1] for W [n, k]
// of dtype. On the oneDNN paths (bf16 weights) it reads xb, x rounded to
// bf16 and dense [rows, k]; otherwise x.
void hm_mul_t(int path, int dtype, long rows, long k, const float *x, long ldx, const uint16_t *xb,
              const uint16_t *w, long n0, long n1, float *y, long ldy, float beta);
// hm_mul is dx[:, k0:k1] = dy·W[:, k0:k1] + beta·dx[:, k0:k1] for W [n, k];
// dyb is dy rounded to bf16, dense [rows, n], on the oneDNN paths.
void hm_mul(int path, int dtype, long rows, long n, long k, const float *dy, long lddy, const uint16_t *dyb,
            const uint16_t *w, long k0, long k1, float *dx, long lddx, float beta);
