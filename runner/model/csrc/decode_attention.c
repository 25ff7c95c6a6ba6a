/* Decode attention's two passes over the KV cache on the CPU (loaded by runner/model/native.py):
 * queries, scores, probabilities and outputs in fp32; K and V in fp32, or in bf16 (the `_bf16`
 * entry points: a bf16 model's cache, half the bytes to read), widened to fp32 as they are loaded
 * (exact), so a bf16 key scores as its fp32 value would.
 *
 * One query per sequence attends to t cached keys. With grouped-query attention each kv head
 * serves g query heads, so every (sequence, kv head) pair is a tiny (g x d) @ (d x t) product
 * and a (g x t) @ (t x d) one. A batched BLAS call runs these well below memory bandwidth (the
 * products are too small to amortise its blocking), yet reading K and V once is the whole cost.
 * These loops read each key and value row once for all g query heads of its pair; threads share
 * the work by (pair, block of keys) for the scores and (pair, block of output columns) for the
 * values, and every output is the same sum in the same order whichever thread computes it, so
 * results do not depend on the thread count.
 *
 * Layouts, in elements: q (pairs, g, d) contiguous; K and V rows contiguous (d apart), pair p's
 * rows start at (p / kvh) * batch_stride + (p % kvh) * head_stride; score and probability row
 * (p, i) starts at (p * g + i) * row_stride. d is a multiple of 16 and at most MAX_D.
 */
#include "common.h"

#define MAX_G 8
#define MAX_D 256

/* W elements of a K or V buffer from element i: fp32, or bf16 widened (`half` is a constant at
 * every call site, so each entry point compiles to its own loop). */
static inline __attribute__((always_inline)) vf load_kv(const void *base, long i, int half) {
  return half ? load_bf16((const bf16 *)base + i) : load((const float *)base + i);
}

/* Lane-wise partial products of a . b[b0:] (summed over d / W chunks). */
static inline __attribute__((always_inline)) vf dot_lanes(const float *a, const void *b, long b0, long d,
                                                          int half) {
  vf acc = load(a) * load_kv(b, b0, half);
  for (long c = W; c < d; c += W) acc += load(a + c) * load_kv(b, b0 + c, half);
  return acc;
}

/* The element offset of the first K or V row of pair p (a sequence's kv head). */
static inline long pair_rows(long p, long kvh, long batch_stride, long head_stride) {
  return (p / kvh) * batch_stride + (p % kvh) * head_stride;
}

/* dst[j] = scale * q . k[j] for n <= W keys from element k0, through one tree: the last, partial
 * block too, so a key's score never depends on the slot it sits in. */
static inline __attribute__((always_inline)) void score_block(const float *q, const void *k, long k0, long n,
                                                              long d, float scale, float *dst, int half) {
  vf lanes[W];
  for (int jj = 0; jj < W; ++jj) lanes[jj] = jj < n ? dot_lanes(q, k, k0 + jj * d, d, half) : (vf){0};
  vf r = transpose_sum(lanes) * scale;
  memcpy(dst, &r, n * sizeof(float));
}

/* Scores of pair p's keys j0..j0+n (n <= W) for its g heads: a full block of bf16 keys is widened once
 * for all g heads (it stays in L1 across them). */
static inline __attribute__((always_inline)) void score_keys(const float *q, const void *k, float *s, long p, long j0,
                                                             long n, long g, long d, long kp, long row_stride,
                                                             float scale, int half) {
  if (n == W) {
    float wide[W * MAX_D];
    if (half)
      for (long c = 0; c < W * d; c += W) {
        vf x = load_kv(k, kp + j0 * d + c, 1);
        memcpy(wide + c, &x, sizeof x);
      }
    for (long i = 0; i < g; ++i)  /* a constant n: the compiler drops the per-key test here */
      score_block(q + (p * g + i) * d, half ? (const void *)wide : k, half ? 0 : kp + j0 * d, W, d, scale,
                  s + (p * g + i) * row_stride + j0, 0);
  } else {
    for (long i = 0; i < g; ++i)
      score_block(q + (p * g + i) * d, k, kp + j0 * d, n, d, scale, s + (p * g + i) * row_stride + j0, half);
  }
}

/* s[p, i, j] = scale * q[p, i] . K[p, j] for j < t, shared among the threads of the enclosing parallel
 * region by (pair, block of W keys): a batch of one sequence keeps both cores busy. */
static inline __attribute__((always_inline)) void scores(const float *q, const void *k, float *s, long pairs,
                                                         long g, long d, long t, long batch_stride,
                                                         long head_stride, long kvh, long row_stride,
                                                         float scale, int half) {
  const long blocks = (t + W - 1) / W;
#pragma omp for schedule(static)
  for (long it = 0; it < pairs * blocks; ++it) {
    const long p = it / blocks, j0 = it % blocks * W;
    score_keys(q, k, s, p, j0, t - j0 < W ? t - j0 : W, g, d, pair_rows(p, kvh, batch_stride, head_stride),
               row_stride, scale, half);
  }
}

void decode_scores(const float *q, const float *k, float *s, long pairs, long g, long d, long t,
                   long batch_stride, long head_stride, long kvh, long row_stride, float scale,
                   int threads) {
#pragma omp parallel num_threads(threads)
  scores(q, k, s, pairs, g, d, t, batch_stride, head_stride, kvh, row_stride, scale, 0);
}

void decode_scores_bf16(const float *q, const bf16 *k, float *s, long pairs, long g, long d, long t,
                        long batch_stride, long head_stride, long kvh, long row_stride, float scale,
                        int threads) {
#pragma omp parallel num_threads(threads)
  scores(q, k, s, pairs, g, d, t, batch_stride, head_stride, kvh, row_stride, scale, 1);
}

/* Columns c..c+W of out[p, i0..i0+n] (+)= sum_j probs[p, i, j] * V[p, j] for j < t, in order of j (the
 * same sum whatever thread or column block computes it). n is a constant at each call: the n
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void value_cols(const float *pp, const void *v, float *op, long vp,
                                                             long c, long d, long t, long row_stride,
                                                             int accumulate, int half, const int n) {
  vf acc[MAX_G];
  for (int i = 0; i < n; ++i) acc[i] = accumulate ? load(op + i * d + c) : (vf){0};
  for (long j = 0; j < t; ++j) {
    const vf row = load_kv(v, vp + j * d + c, half);  /* widened once for all n heads */
    for (int i = 0; i < n; ++i) acc[i] += pp[i * row_stride + j] * row;
  }
  for (int i = 0; i < n; ++i) memcpy(op + i * d + c, &acc[i], sizeof(vf));
}

/* out[p, i] (+)= sum_j probs[p, i, j] * V[p, j] for j < t; accumulate adds to out. Shared among the
 * threads of the enclosing parallel region by (pair, W output columns). */
static inline __attribute__((always_inline)) void values(const float *probs, const void *v, float *out,
                                                         long pairs, long g, long d, long t, long batch_stride,
                                                         long head_stride, long kvh, long row_stride,
                                                         int accumulate, int half) {
  const long cols = d / W;
#pragma omp for schedule(static)
  for (long it = 0; it < pairs * cols; ++it) {
    const long p = it / cols, c = it % cols * W, vp = pair_rows(p, kvh, batch_stride, head_stride);
    for (long i0 = 0; i0 < g; i0 += MAX_G) {  /* up to MAX_G heads share each pass over V */
      const float *pp = probs + (p * g + i0) * row_stride;
      float *op = out + (p * g + i0) * d;
      switch (g - i0 < MAX_G ? g - i0 : MAX_G) {
#define CASE(n) case n: value_cols(pp, v, op, vp, c, d, t, row_stride, accumulate, half, n); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
      }
    }
  }
}

void decode_values(const float *probs, const float *v, float *out, long pairs, long g, long d, long t,
                   long batch_stride, long head_stride, long kvh, long row_stride, int accumulate,
                   int threads) {
#pragma omp parallel num_threads(threads)
  values(probs, v, out, pairs, g, d, t, batch_stride, head_stride, kvh, row_stride, accumulate, 0);
}

void decode_values_bf16(const float *probs, const bf16 *v, float *out, long pairs, long g, long d, long t,
                        long batch_stride, long head_stride, long kvh, long row_stride, int accumulate,
                        int threads) {
#pragma omp parallel num_threads(threads)
  values(probs, v, out, pairs, g, d, t, batch_stride, head_stride, kvh, row_stride, accumulate, 1);
}

/* e^x for x <= 0 (a softmax row less its max), within about 2 ulp: Cephes' expf (range reduction by
 * ln 2 in two parts, a degree-6 polynomial), 2^n put in the exponent; below -87.3 (e^x under fp32's
 * smallest normal) 0. */
static inline vf exp_nonpositive(vf x) {
  const vf lo = (vf){0} - 87.3f;
  const vi small = x < lo;
  x = (vf)(((vi)x & ~small) | ((vi)lo & small));
  const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* round to nearest: |n| < 2^22 */
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = (vf){0} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return (vf)((vi)(p * (vf)e) & ~small);
}

/* Each probability row (p, i) of s, in place: softmax over its t scores (max subtracted first, as torch
 * does). Shared among the threads of the enclosing parallel region by rows. */
static inline void softmax_rows(float *s, long rows, long t, long row_stride) {
#pragma omp for schedule(static)
  for (long r = 0; r < rows; ++r) {
    float *x = s + r * row_stride, top = x[0], sum = 0.f;
    for (long j = 1; j < t; ++j) top = x[j] > top ? x[j] : top;
    long j = 0;
    vf acc = (vf){0};
    for (; j + W <= t; j += W) {
      const vf e = exp_nonpositive(load(x + j) - top);
      acc += e;
      memcpy(x + j, &e, sizeof e);
    }
    for (int l = 0; l < W; ++l) sum += acc[l];
    for (; j < t; ++j) {
      vf tail = (vf){0} + (x[j] - top);
      x[j] = exp_nonpositive(tail)[0];
      sum += x[j];
    }
    const float inv = 1.f / sum;
    for (j = 0; j < t; ++j) x[j] *= inv;
  }
}

void decode_softmax(float *s, long rows, long t, int threads) {
#pragma omp parallel num_threads(threads)
  softmax_rows(s, rows, t, t);
}

/* Decode attention in one call over one part of K and V without a bias: scores into s (pairs, g, t),
 * softmax in place (s then holds the probabilities), then out (pairs, g, d) = probs @ V. Bit for bit
 * what decode_scores, decode_softmax and decode_values compute, one parallel region instead of three
 * calls. */
static inline __attribute__((always_inline)) void attend(const float *q, const void *k, const void *v, float *s,
                                                         float *out, long pairs, long g, long d, long t,
                                                         long k_batch_stride, long k_head_stride,
                                                         long v_batch_stride, long v_head_stride, long kvh,
                                                         float scale, int threads, int half) {
#pragma omp parallel num_threads(threads)
  {
    scores(q, k, s, pairs, g, d, t, k_batch_stride, k_head_stride, kvh, t, scale, half);
    softmax_rows(s, pairs * g, t, t);
    values(s, v, out, pairs, g, d, t, v_batch_stride, v_head_stride, kvh, t, 0, half);
  }
}

void decode_attend(const float *q, const float *k, const float *v, float *s, float *out, long pairs, long g, long d,
                   long t, long k_batch_stride, long k_head_stride, long v_batch_stride, long v_head_stride,
                   long kvh, float scale, int threads) {
  attend(q, k, v, s, out, pairs, g, d, t, k_batch_stride, k_head_stride, v_batch_stride, v_head_stride, kvh,
         scale, threads, 0);
}

void decode_attend_bf16(const float *q, const bf16 *k, const bf16 *v, float *s, float *out, long pairs, long g,
                        long d, long t, long k_batch_stride, long k_head_stride, long v_batch_stride,
                        long v_head_stride, long kvh, float scale, int threads) {
  attend(q, k, v, s, out, pairs, g, d, t, k_batch_stride, k_head_stride, v_batch_stride, v_head_stride, kvh,
         scale, threads, 1);
}
