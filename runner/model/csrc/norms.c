/* RMSNorm over the last dim, fp32 on the CPU (loaded by runner/model/native.py with decode_attention.c).
 *
 * torch 2.13's CPU rms_norm is a chain of elementwise kernels (square, mean, add, rsqrt, two
 * multiplies and dtype checks); at decode's few rows each is mostly dispatch, and a model runs two
 * norms per layer. One pass per row here, in HF LlamaRMSNorm's order: x * rsqrt(mean(x^2) + eps),
 * then times the weight. Rows are independent: threads split them only when there are many
 * (prefill), so a row's result never depends on the thread count.
 */
#include <math.h>

#define PARALLEL_MIN (1L << 16) /* elements: below this, one thread beats waking the others */

void rms_norm(const float *x, const float *w, float *out, long rows, long d, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= PARALLEL_MIN)
  for (long r = 0; r < rows; ++r) {
    const float *xr = x + r * d;
    float *o = out + r * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (long c = 0; c < d; ++c) ss += xr[c] * xr[c];
    const float s = 1.f / sqrtf(ss / (float)d + eps);
#pragma omp simd
    for (long c = 0; c < d; ++c) o[c] = xr[c] * s * w[c];
  }
}
