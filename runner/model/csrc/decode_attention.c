/* Decode attention's two passes over the KV cache on the CPU (loaded by runner/model/native.py):
 * queries, scores, probabilities and outputs in fp32; K and V in fp32, or in bf16 (the `_bf16`
 * entry points: a bf16 model's cache, half the bytes to read), widened to fp32 as they are loaded
 * (exact), so a bf16 key scores as its fp32 value would.
 *
 * One query per sequence attends to t cached keys. With grouped-query attention each kv head
 * serves g query heads, so every (sequence, kv head) pair is a tiny (g x d) @ (d x t) product
 * and a (g x t) @ (t x d) one. A batched BLAS call runs these well below memory bandwidth (the
 * products are too small to amortise its blocking), yet reading K and V once is the whole cost.
 * These loops read each key and value row once for all g query heads of its pair, one thread
 * per pair, so results do not depend on the thread count.
 *
 * Layouts, in elements: q (pairs, g, d) contiguous; K and V rows contiguous (d apart), pair p's
 * rows start at (p / kvh) * batch_stride + (p % kvh) * head_stride; score and probability row
 * (p, i) starts at (p * g + i) * row_stride. d is a multiple of 16 and at most MAX_D.
 */
#include <string.h>

#define W 16
#define MAX_G 8
#define MAX_D 256

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int vi __attribute__((vector_size(W * sizeof(int))));

#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

typedef unsigned short bf16;  /* the upper half of an fp32: widening is a 16-bit shift */
typedef unsigned short vh __attribute__((vector_size(W * sizeof(bf16))));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

static inline vf load_bf16(const bf16 *p) {
  vh h;
  memcpy(&h, p, sizeof h);
  vi bits = __builtin_convertvector(h, vi) << 16;
  vf v;
  memcpy(&v, &bits, sizeof v);
  return v;
}

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

/* r[j] = sum of the lanes of v[j] for W vectors: a tree of shuffles (each level halves the
 * lanes per vector and doubles the vectors per register), not W separate horizontal sums. */
static inline vf transpose_sum(const vf *v) {
  vf t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i) {
    vf a = v[2 * i], b = v[2 * i + 1];
    t[i] = SHUF(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
         + SHUF(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    vf a = t[2 * i], b = t[2 * i + 1];
    u[i] = SHUF(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
         + SHUF(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    vf a = u[2 * i], b = u[2 * i + 1];
    w[i] = SHUF(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
         + SHUF(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return SHUF(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
       + SHUF(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
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

/* s[p, i, j] = scale * q[p, i] . K[p, j] for j < t. */
static inline __attribute__((always_inline)) void scores(const float *q, const void *k, float *s, long pairs,
                                                         long g, long d, long t, long batch_stride,
                                                         long head_stride, long kvh, long row_stride,
                                                         float scale, int threads, int half) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long p = 0; p < pairs; ++p) {
    const long kp = pair_rows(p, kvh, batch_stride, head_stride);
    float wide[W * MAX_D];  /* a bf16 block of W keys, widened once for all g heads */
    long j0 = 0;
    for (; j0 + W <= t; j0 += W) {  /* W keys at a time: they stay in L1 across the g heads */
      if (half)
        for (long c = 0; c < W * d; c += W) {
          vf x = load_kv(k, kp + j0 * d + c, 1);
          memcpy(wide + c, &x, sizeof x);
        }
      for (long i = 0; i < g; ++i)  /* a constant n: the compiler drops the per-key test here */
        score_block(q + (p * g + i) * d, half ? (const void *)wide : k, half ? 0 : kp + j0 * d, W, d, scale,
                    s + (p * g + i) * row_stride + j0, 0);
    }
    for (long i = 0; j0 < t && i < g; ++i)
      score_block(q + (p * g + i) * d, k, kp + j0 * d, t - j0, d, scale, s + (p * g + i) * row_stride + j0,
                  half);
  }
}

void decode_scores(const float *q, const float *k, float *s, long pairs, long g, long d, long t,
                   long batch_stride, long head_stride, long kvh, long row_stride, float scale,
                   int threads) {
  scores(q, k, s, pairs, g, d, t, batch_stride, head_stride, kvh, row_stride, scale, threads, 0);
}

void decode_scores_bf16(const float *q, const bf16 *k, float *s, long pairs, long g, long d, long t,
                        long batch_stride, long head_stride, long kvh, long row_stride, float scale,
                        int threads) {
  scores(q, k, s, pairs, g, d, t, batch_stride, head_stride, kvh, row_stride, scale, threads, 1);
}

/* out[p, i] (+)= sum_j probs[p, i, j] * V[p, j] for j < t; accumulate adds to out. */
static inline __attribute__((always_inline)) void values(const float *probs, const void *v, float *out,
                                                         long pairs, long g, long d, long t, long batch_stride,
                                                         long head_stride, long kvh, long row_stride,
                                                         int accumulate, int threads, int half) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long p = 0; p < pairs; ++p) {
    const long vp = pair_rows(p, kvh, batch_stride, head_stride);
    for (long i0 = 0; i0 < g; i0 += MAX_G) {  /* up to MAX_G heads share each pass over V */
      long n = g - i0 < MAX_G ? g - i0 : MAX_G;
      const float *pp = probs + (p * g + i0) * row_stride;
      float *op = out + (p * g + i0) * d;
      vf acc[MAX_G][MAX_D / W];
      for (long i = 0; i < n; ++i)
        for (long c = 0; c < d; c += W) acc[i][c / W] = accumulate ? load(op + i * d + c) : (vf){0};
      for (long j = 0; j < t; ++j) {
        const long vj = vp + j * d;
        vf row[MAX_D / W];  /* widened once for all n heads */
        for (long c = 0; c < d; c += W) row[c / W] = load_kv(v, vj + c, half);
        for (long i = 0; i < n; ++i) {
          const float wgt = pp[i * row_stride + j];
          for (long c = 0; c < d; c += W) acc[i][c / W] += wgt * row[c / W];
        }
      }
      for (long i = 0; i < n; ++i) memcpy(op + i * d, acc[i], d * sizeof(float));
    }
  }
}

void decode_values(const float *probs, const float *v, float *out, long pairs, long g, long d, long t,
                   long batch_stride, long head_stride, long kvh, long row_stride, int accumulate,
                   int threads) {
  values(probs, v, out, pairs, g, d, t, batch_stride, head_stride, kvh, row_stride, accumulate, threads, 0);
}

void decode_values_bf16(const float *probs, const bf16 *v, float *out, long pairs, long g, long d, long t,
                        long batch_stride, long head_stride, long kvh, long row_stride, int accumulate,
                        int threads) {
  values(probs, v, out, pairs, g, d, t, batch_stride, head_stride, kvh, row_stride, accumulate, threads, 1);
}
