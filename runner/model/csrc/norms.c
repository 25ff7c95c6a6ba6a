/* RMSNorm over the last dim on the CPU (loaded by runner/model/native.py with decode_attention.c):
 * fp32, or bf16 in and out (`rms_norm_bf16`, a bf16 model's) computed in fp32 and rounded once.
 *
 * torch 2.13's CPU rms_norm is a chain of elementwise kernels (square, mean, add, rsqrt, two
 * multiplies and dtype checks; for bf16 also the casts to fp32 and back); at decode's few rows each
 * is mostly dispatch, and a model runs two norms per layer. One pass per row here, in HF
 * LlamaRMSNorm's order: x * rsqrt(mean(x^2) + eps), then times the weight. Rows are independent:
 * threads split them only when there are many (prefill), so a row's result never depends on the
 * thread count.
 */
#include "common.h"

#define PARALLEL_MIN (1L << 16) /* elements: below this, one thread beats waking the others */

static inline __attribute__((always_inline)) void norm(const void *x, const void *w, void *out, long rows, long d,
                                                       float eps, int threads, int half) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= PARALLEL_MIN)
  for (long r = 0; r < rows; ++r) {
    const long row = r * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (long c = 0; c < d; ++c) ss += at(x, row + c, half) * at(x, row + c, half);
    const float s = 1.f / sqrtf(ss / (float)d + eps);
#pragma omp simd
    for (long c = 0; c < d; ++c) {
      const float y = at(x, row + c, half) * s * at(w, c, half);
      if (half)
        ((bf16 *)out)[row + c] = narrow(y);
      else
        ((float *)out)[row + c] = y;
    }
  }
}

void rms_norm(const float *x, const float *w, float *out, long rows, long d, float eps, int threads) {
  norm(x, w, out, rows, d, eps, threads, 0);
}

void rms_norm_bf16(const bf16 *x, const bf16 *w, bf16 *out, long rows, long d, float eps, int threads) {
  norm(x, w, out, rows, d, eps, threads, 1);
}
