/* Rotary position embedding on the CPU (loaded by runner/model/native.py with the other kernels):
 * out = x * cos + roll(x, d/2) * signed_sin (`ops.rope_tables`' rotate-half layout, the sin table's
 * first half negated), fp32, or bf16 in and out computed in fp32 and rounded once.
 *
 * torch runs this as three elementwise kernels and a roll, each a dispatch and an allocation; at
 * decode's one token per sequence that is all overhead, on every layer. Here one pass per (sequence,
 * head, token) row reads x through its strides (a view of the fused qkv projection) and writes a
 * contiguous output. Rows are independent: threads split them only when there are many (prefill).
 */
#include "common.h"

#define PARALLEL_MIN (1L << 16) /* elements: below this, one thread beats waking the others */

/* x (b, h, s, d) at element strides (sb, sh, ss, 1); cos and sin (b, 1, s, d) contiguous; out (b, h, s, d)
 * contiguous. */
static inline __attribute__((always_inline)) void rotate(const void *x, const void *cos, const void *sin, void *out,
                                                         long b, long h, long s, long d, long sb, long sh, long ss,
                                                         int threads, int half) {
  const long rows = b * h * s, d2 = d / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= PARALLEL_MIN)
  for (long r = 0; r < rows; ++r) {
    const long bi = r / (h * s), hi = r / s % h, si = r % s;
    const long xi = bi * sb + hi * sh + si * ss, ti = (bi * s + si) * d;
#pragma omp simd
    for (long i = 0; i < d; ++i) {
      const long j = i < d2 ? i + d2 : i - d2;
      /* One explicit fused multiply-add: left to the compiler, a vectorized and a scalar version of this
       * loop (it may keep both, picked per row at run time) could round differently, and a row's result
       * would depend on which row it is. */
      const float y = fmaf(at(x, xi + i, half), at(cos, ti + i, half), at(x, xi + j, half) * at(sin, ti + i, half));
      if (half)
        ((bf16 *)out)[r * d + i] = narrow(y);
      else
        ((float *)out)[r * d + i] = y;
    }
  }
}

void rope(const float *x, const float *cos, const float *sin, float *out, long b, long h, long s, long d, long sb,
          long sh, long ss, int threads) {
  rotate(x, cos, sin, out, b, h, s, d, sb, sh, ss, threads, 0);
}

void rope_bf16(const bf16 *x, const bf16 *cos, const bf16 *sin, bf16 *out, long b, long h, long s, long d,
               long sb, long sh, long ss, int threads) {
  rotate(x, cos, sin, out, b, h, s, d, sb, sh, ss, threads, 1);
}
