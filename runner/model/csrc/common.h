/* What the native kernels share (included by each .c file here; runner/model/native.py hashes it with
 * them): 16-lane fp32 vectors, bf16 widened and rounded as torch does, and the transpose tree that sums
 * the lanes of 16 vectors at once. */
#ifndef ALISA_COMMON_H
#define ALISA_COMMON_H

#include <math.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define W 16

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int vi __attribute__((vector_size(W * sizeof(int))));
typedef unsigned short bf16;  /* the upper half of an fp32: widening is a 16-bit shift */
typedef unsigned short vh __attribute__((vector_size(W * sizeof(bf16))));
typedef signed char vb __attribute__((vector_size(W)));

#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

static inline float widen(bf16 h) {
  unsigned bits = (unsigned)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* Round to nearest, ties to even, as torch rounds fp32 to bf16 (a NaN stays a quiet NaN). */
static inline bf16 narrow(float f) {
  unsigned bits;
  memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)((bits >> 16) | 0x40);
  return (bf16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* Element i of an fp32 buffer, or of a bf16 one widened (`half` is a constant at each call site). */
static inline __attribute__((always_inline)) float at(const void *p, long i, int half) {
  return half ? widen(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

/* W bf16 values widened to fp32 (exact). */
static inline vf load_bf16(const bf16 *p) {
#ifdef __AVX512F__  /* GCC 12 scalarizes the generic widening below: 16 inserts a vector */
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16);
#else
  vh h;
  memcpy(&h, p, sizeof h);
  vi bits = __builtin_convertvector(h, vi) << 16;
  vf v;
  memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

/* r[j] = sum of the lanes of v[j] for W vectors: a tree of shuffles (each level halves the lanes per
 * vector and doubles the vectors per register), not W separate horizontal sums. A vector's lanes are
 * summed in the same order whichever slot j it has. */
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

#endif
