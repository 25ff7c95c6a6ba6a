/* Linears at decode's few rows on the CPU (loaded by runner/model/native.py): out = x @ w^T, with
 * bf16 weights (a bf16 model's) or int8 weights times a bf16 scale per output (`model.weight_bits: 8`,
 * runner/model/int8.py), x and out in fp32 or bf16, every product and sum in fp32.
 *
 * At a few rows a linear is one pass over its weight, so memory bandwidth is the whole cost: oneDNN's
 * bf16 kernel and torch's int8 one reached about 14 and 10 GB/s here where the same machine streams
 * 18 (runner/model/kernels.py has the numbers). Here each thread takes blocks of W output rows; a
 * block's weights (W rows of k) stay in L1 while every input row passes over them, so the weight is
 * read from memory once whatever the row count, and widened to fp32 in registers (bf16: a shift;
 * int8: sign extension and a conversion, exact). Rows go in passes of R = 4, 2 or 1: a pass keeps
 * R x (W / R) = W accumulators, summed by one transpose tree. An output's sum is the same tree of
 * the same products whatever R, block or thread computed it, so results do not depend on the row
 * count or the thread count.
 *
 * Layouts: x (rows, k) and out (rows, n) contiguous; w (n, k) contiguous; scale: bf16 (n,) for per-row int8,
 * fp32 (n, k / 32) for group-wise int8 (`_q8` entry points, GGUF Q8_0's blocks), else null; k a multiple of W.
 */
#include "common.h"

enum { F32 = 0, BF16 = 1, INT8 = 2, INT8G = 3 };
#define GROUP 32 /* INT8G: one fp32 scale per 32 weights of a row (GGUF Q8_0's block) */

static inline __attribute__((always_inline)) vf load_as(const void *p, long i, int kind) {
  vf v;
  if (kind == F32) {
    memcpy(&v, (const float *)p + i, sizeof v);
  } else if (kind == BF16) {
    v = load_bf16((const bf16 *)p + i);
  } else {
#ifdef __AVX512F__  /* GCC 12 scalarizes the generic widening below: 16 inserts a vector */
    v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)((const signed char *)p + i))));
#else
    vb b;
    memcpy(&b, (const signed char *)p + i, sizeof b);
    v = __builtin_convertvector(__builtin_convertvector(b, vi), vf);
#endif
  }
  return v;
}

/* Lane r * J + j of the result: x[r0 + r] . w[n0 + j], for R rows and J = W / R weight rows, of which
 * the first `nw` exist (the others read as zero). R, J and the kinds are constants at every call. INT8G
 * weights are scaled by their group's `gscale` as they are loaded (k a multiple of GROUP). */
static inline __attribute__((always_inline)) vf dots(const void *x, long r0, const void *w, const float *gscale,
                                                     long n0, long nw, long k, int R, int wkind, int xkind) {
  const int J = W / R;
  const long esize = wkind >= INT8 ? 1 : wkind == BF16 ? 2 : 4;
  long row[W];  /* a missing weight row re-reads the last one: no test in the loop, its lanes are not stored */
  for (int j = 0; j < J; ++j) row[j] = (n0 + (j < nw ? j : nw - 1)) * k;
  vf acc[W];
  for (int i = 0; i < W; ++i) acc[i] = (vf){0};
  for (long c = 0; c < k; c += W) {
    vf wv[W];
    for (int j = 0; j < J; ++j) {
      wv[j] = load_as(w, row[j] + c, wkind == INT8G ? INT8 : wkind);
      if (wkind == INT8G) wv[j] *= gscale[(row[j] + c) / GROUP];  /* exact: 8 bits times an fp16-sized scale */
      /* The same place W rows on (the next block's), once per cache line. The hardware prefetcher
       * alone left these W interleaved row streams at 14-15 GB/s on this project's machine; with this,
       * 20 (bf16) and 25 (int8) GB/s, a 30-layer SmolLM2-sized weight set from memory (scratch
       * microbenchmark). A prefetch past the weight's end is harmless: it never faults. */
      if ((c * esize) % 64 == 0) __builtin_prefetch((const char *)w + (row[j] + W * k + c) * esize, 0, 3);
    }
    for (int r = 0; r < R; ++r) {
      const vf xv = load_as(x, (r0 + r) * k + c, xkind);
      for (int j = 0; j < J; ++j) acc[r * J + j] += xv * wv[j];
    }
  }
  return transpose_sum(acc);
}

/* What a linear writes: its product (PLAIN); plus a residual of out's shape (ADD: a layer's
 * `h + linear(x)` in one rounding); or SwiGLU's silu(gate) * up, where the weight's first n/2 rows
 * are the gate's and the rest the up projection's (GLU: out has n/2 columns). */
enum { PLAIN = 0, ADD = 1, GLU = 2 };

/* Writes rows r0.. (R of them) of out, columns n0..n0+nw: lane r * J + j of s (and of u, the up
 * rows' sums, for GLU), times its row's scale for int8 weights (up rows' scales `up_scale`). */
static inline __attribute__((always_inline)) void store(vf s, vf u, void *out, const void *res, long r0, long n0,
                                                        long nw, long n_out, const bf16 *scale,
                                                        const bf16 *up_scale, int R, int okind, int epi) {
  const int J = W / R;
  float v[W], up[W];
  memcpy(v, &s, sizeof v);
  memcpy(up, &u, sizeof up);
  for (int r = 0; r < R; ++r)
    for (long j = 0; j < nw; ++j) {
      const long o = (r0 + r) * n_out + n0 + j;
      float y = scale ? v[r * J + j] * widen(scale[n0 + j]) : v[r * J + j];
      if (epi == GLU) {
        const float g = y, x = up_scale ? up[r * J + j] * widen(up_scale[n0 + j]) : up[r * J + j];
        y = g / (1.f + expf(-g)) * x;
      } else if (epi == ADD) {
        y += at(res, o, okind == BF16);
      }
      if (okind == BF16)
        ((bf16 *)out)[o] = narrow(y);
      else
        ((float *)out)[o] = y;
    }
}

/* All rows against W output columns from n0 (nb of them exist), in passes of R = 4, 2, 1 rows. For
 * GLU, column c's gate row is c and its up row c + n_out. */
static inline __attribute__((always_inline)) void pass(const void *x, const void *w, const void *scale, void *out,
                                                       const void *res, long r0, long n0, long nb, long n_out,
                                                       long k, int R, int wkind, int xkind, int epi) {
  const bf16 *rs = wkind == INT8 ? (const bf16 *)scale : 0;  /* per output row, applied at the store */
  const float *gs = wkind == INT8G ? (const float *)scale : 0;  /* per group, applied in the loop */
  for (long j = 0; j < nb; j += W / R) {
    const long nw = nb - j < W / R ? nb - j : W / R;
    const vf s = dots(x, r0, w, gs, n0 + j, nw, k, R, wkind, xkind);
    const vf u = epi == GLU ? dots(x, r0, w, gs, n_out + n0 + j, nw, k, R, wkind, xkind) : (vf){0};
    store(s, u, out, res, r0, n0 + j, nw, n_out, rs, rs ? rs + n_out : 0, R, xkind, epi);
  }
}

static inline __attribute__((always_inline)) void linear(const void *x, const void *w, const void *scale,
                                                         void *out, const void *res, long rows, long n, long k,
                                                         int threads, int wkind, int xkind, int epi) {
  const long n_out = epi == GLU ? n / 2 : n, blocks = (n_out + W - 1) / W;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long b = 0; b < blocks; ++b) {
    const long n0 = b * W, nb = n_out - n0 < W ? n_out - n0 : W;
    long r0 = 0;  /* the block's weight rows stay in L1 across the passes */
    for (; r0 + 4 <= rows; r0 += 4) pass(x, w, scale, out, res, r0, n0, nb, n_out, k, 4, wkind, xkind, epi);
    for (; r0 + 2 <= rows; r0 += 2) pass(x, w, scale, out, res, r0, n0, nb, n_out, k, 2, wkind, xkind, epi);
    if (r0 < rows) pass(x, w, scale, out, res, r0, n0, nb, n_out, k, 1, wkind, xkind, epi);
  }
}

/* The entry points, one per (weight, activation) dtype pair and epilogue: a constant `epi` compiles each
 * to its own loop. `res` is read for ADD only. */
#define ENTRY(name, wk, xk, epi_)                                                                            \
  void name(const void *x, const void *w, const void *scale, void *out, const void *res, long rows, long n,  \
            long k, int threads) {                                                                           \
    linear(x, w, scale, out, res, rows, n, k, threads, wk, xk, epi_);                                       \
  }
ENTRY(linear_rows_bf16, BF16, BF16, PLAIN)
ENTRY(linear_rows_bf16_add, BF16, BF16, ADD)
ENTRY(linear_rows_bf16_glu, BF16, BF16, GLU)
ENTRY(linear_rows_int8, INT8, F32, PLAIN)
ENTRY(linear_rows_int8_add, INT8, F32, ADD)
ENTRY(linear_rows_int8_glu, INT8, F32, GLU)
ENTRY(linear_rows_int8_bf16, INT8, BF16, PLAIN)
ENTRY(linear_rows_int8_bf16_add, INT8, BF16, ADD)
ENTRY(linear_rows_int8_bf16_glu, INT8, BF16, GLU)
ENTRY(linear_rows_q8, INT8G, F32, PLAIN)
ENTRY(linear_rows_q8_add, INT8G, F32, ADD)
ENTRY(linear_rows_q8_glu, INT8G, F32, GLU)
ENTRY(linear_rows_q8_bf16, INT8G, BF16, PLAIN)
ENTRY(linear_rows_q8_bf16_add, INT8G, BF16, ADD)
ENTRY(linear_rows_q8_bf16_glu, INT8G, BF16, GLU)
