// Internal to the core (not installed): the float log-sum-exp loops of the intermediate stages
// (RowLse::sum_lowp, ColLse::sum_row_lowp in kernels.hpp) written with AVX2 + FMA intrinsics, for
// CPUs that have AVX2 but not AVX-512 (lse_avx512.hpp has the AVX-512 form).
//
// Why by hand: GCC 12's AVX2 clone of those loops if-converts fast_exp's two clamps into three
// compares, four masks and three blends per vector (45 instructions for 8 exponentials), where
// max/min and one mask do (31). On the 2-vCPU Zen 3 VM the sum of 8 exponentials went 0.78 -> 0.52 ns
// an entry (bench/RESULTS.md, session 10).
//
// Each exponential is detail::fast_exp_lowp(float)'s operations in the same order (the AVX2 clone's
// contraction of the multiply-adds into fma), so the values are those of that clone; only the
// order in which a row's 256-entry blocks are summed differs (two accumulators instead of one),
// a float rounding difference far inside what the lowp stages tolerate (kernels.hpp).
#pragma once
#include <cstdint>

#include "prefetch.hpp"
#include "segtransfer/fastexp.hpp"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SEGTRANSFER_NO_CLONES)
// GCC 12's AVX-512 intrinsics pass an undefined vector as the unused merge source of their
// unmasked forms, which -Wmaybe-uninitialized reports where they are inlined (GCC bug 105593,
// fixed in 13); the state that counts is the header's, so it is set around the include.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define SEGTRANSFER_AVX2_LSE 1
#endif

#if defined(__x86_64__) && defined(__GNUC__)
namespace segtransfer {
namespace {
// Whether this CPU has AVX2 and FMA, which every intrinsics kernel of the core needs (these loops
// and the cost tiles of point_cost.hpp). Asked once.
inline bool cpu_has_avx2_fma() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
}  // namespace
}  // namespace segtransfer
#endif

#ifdef SEGTRANSFER_AVX2_LSE
namespace segtransfer {
namespace {

// detail::fast_exp_lowp(float) on 8 lanes (see fastexp.hpp for the method and its error).
__attribute__((target("avx2,fma"), always_inline)) inline __m256 fast_exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);  // below: flushed to 0
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 ns = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(ns, shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
  using detail::kExpLowpPoly;
  __m256 p = _mm256_set1_ps(kExpLowpPoly[0]);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpLowpPoly[1]));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpLowpPoly[2]));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpLowpPoly[3]));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpLowpPoly[4]));
  // ns's low mantissa bits hold n + 2^22 (the shifter is 1.5 * 2^23), so its bit pattern minus that
  // of the shifter is n: 2^n is (n + 127) << 23, without a float -> int conversion.
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_castps_si256(ns), _mm256_set1_epi32(127 - 0x4B400000)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

// Lanes [0, k) of 8 set.
__attribute__((target("avx2"), always_inline)) inline __m256i first_lanes(int64_t k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2"), always_inline)) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 exponents A[col] - c * inv_eps - shift from entries [k, k + 8) (Masked: those below len, whose
// lanes `mask` sets; the caller zeroes the others' exponentials). The sparse form gathers A with
// scalar loads: vgatherdps ran the whole loop at 3.1 ns an entry on Zen 3, scalar loads at 1.3.
template <bool Sparse, bool Masked>
__attribute__((target("avx2,fma"), always_inline)) inline __m256 row_exponents8(const float* c, const int32_t* cols,
                                                                            const float* A, int64_t k, int64_t len,
                                                                            __m256 inv, __m256 shift, __m256i mask) {
  __m256 cv, av;
  if (Masked) {
    cv = _mm256_maskload_ps(c + k, mask);
    if (Sparse) {
      alignas(32) float g[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int l = 0; l < 8 && l < len - k; ++l) g[l] = A[cols[k + l]];
      av = _mm256_load_ps(g);
    } else {
      av = _mm256_maskload_ps(A + k, mask);
    }
  } else {
    cv = _mm256_loadu_ps(c + k);
    if (Sparse) {
      const int32_t* q = cols + k;
      av = _mm256_setr_ps(A[q[0]], A[q[1]], A[q[2]], A[q[3]], A[q[4]], A[q[5]], A[q[6]], A[q[7]]);
    } else {
      av = _mm256_loadu_ps(A + k);
    }
  }
  return _mm256_sub_ps(_mm256_fnmadd_ps(cv, inv, av), shift);
}

// RowLse<float>::shifted_sum<float>: sum_k exp(A[cols[k]] - c[k] * inv_eps - shift) (cols null:
// A[k]), partial sums in float over blocks of 256 entries, the blocks added in double.
template <bool Sparse>
__attribute__((target("avx2,fma"))) double lse_sum_avx2(const float* c, const int32_t* cols, int64_t len,
                                                        const float* A, float inv_eps, float shift) {
  const __m256 inv = _mm256_set1_ps(inv_eps), sh = _mm256_set1_ps(shift);
  const __m256i all = _mm256_set1_epi32(-1);
  double total = 0.0;
  constexpr int64_t kBlock = 256;
  for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < len ? j0 + kBlock : len;
    if (Sparse)
      prefetch_ahead(c, cols, j0, j1);
    else
      prefetch_dense_ahead(c, j0, j1);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t k = j0;
    for (; k + 16 <= j1; k += 16) {
      s0 = _mm256_add_ps(s0, fast_exp8(row_exponents8<Sparse, false>(c, cols, A, k, j1, inv, sh, all)));
      s1 = _mm256_add_ps(s1, fast_exp8(row_exponents8<Sparse, false>(c, cols, A, k + 8, j1, inv, sh, all)));
    }
    for (; k < j1; k += 8) {
      const __m256i mask = first_lanes(j1 - k);
      const __m256 e = fast_exp8(row_exponents8<Sparse, true>(c, cols, A, k, j1, inv, sh, mask));
      s0 = _mm256_add_ps(s0, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
    }
    total += static_cast<double>(hsum8(_mm256_add_ps(s0, s1)));
  }
  return total;
}

// ColLse<float>::shifted_row<float>: part[j] += exp(Ai - c[j] * inv_eps - mx[j]), j in [0, m).
__attribute__((target("avx2,fma"))) inline void col_lse_row_avx2(const float* c, int64_t m, float Ai, float inv_eps,
                                                                 const float* mx, float* part) {
  const __m256 inv = _mm256_set1_ps(inv_eps), a = _mm256_set1_ps(Ai);
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_fnmadd_ps(_mm256_loadu_ps(c + j), inv, a), _mm256_loadu_ps(mx + j));
    _mm256_storeu_ps(part + j, _mm256_add_ps(_mm256_loadu_ps(part + j), fast_exp8(x)));
  }
  if (j < m) {
    const __m256i mask = first_lanes(m - j);
    const __m256 x =
        _mm256_sub_ps(_mm256_fnmadd_ps(_mm256_maskload_ps(c + j, mask), inv, a), _mm256_maskload_ps(mx + j, mask));
    const __m256 e = _mm256_and_ps(fast_exp8(x), _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(part + j, mask, _mm256_add_ps(_mm256_maskload_ps(part + j, mask), e));
  }
}

}  // namespace
}  // namespace segtransfer
#endif
