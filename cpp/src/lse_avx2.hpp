// Internal to the core (not installed): the float log-sum-exp loops of the intermediate stages
// (RowLse::sum_lowp, ColLse::sum_row_lowp in kernels.hpp) written with AVX2 + FMA intrinsics, for
// CPUs that have AVX2 but not AVX-512 (lse_avx512.hpp has the AVX-512 form); below them, the AVX2
// counterparts of lse_avx512.hpp's other loops (kept terms, compactions, Newton's plan rows) and
// the exact stages' and the blocked solver's double-exponent sums.
//
// Why by hand: GCC 12's AVX2 clone of those loops if-converts fast_exp's two clamps into three
// compares, four masks and three blends per vector (45 instructions for 8 exponentials), where
// max/min and one mask do (31). On the 2-vCPU Zen 3 VM the sum of 8 exponentials went 0.78 -> 0.52 ns
// an entry (bench/RESULTS.md, session 10).
//
// The exponentials are formed in base 2 (fast_pow2_8: fast_exp_lowp's polynomial for 2^f, the
// exponent's multiply-adds scaled by log2 e), which shortens each exponential's chain of dependent
// operations; their values then differ from fast_exp_lowp's (the clones', and the AVX-512 loops')
// by the rounding of a float exponent, as the order in which a row's 256-entry blocks are summed
// does (four accumulators instead of one): far inside what the lowp stages tolerate (kernels.hpp).
// The exact stages' double-exponent sums use fast_exp(float)'s form (fast_exp8).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// p 2^n in the lanes `keep` sets, 0 in the others, from ns = n + 1.5 * 2^23 (the shifter that rounded
// n): ns's low mantissa bits hold n + 2^22, so its bit pattern minus that of the shifter is n, and
// 2^n is (n + 127) << 23, without a float -> int conversion. fast_exp8's and fast_pow2_8's scale.
__attribute__((target("avx2"), always_inline)) inline __m256 scale_pow2(__m256 p, __m256 ns, __m256 keep) {
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_castps_si256(ns), _mm256_set1_epi32(127 - 0x4B400000)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

// detail::fast_exp(float) on 8 lanes: its degree-7 Taylor polynomial, for the exact stages' float
// sums (lse_sum_avx2 with double exponents).
__attribute__((target("avx2,fma"), always_inline)) inline __m256 fast_exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);  // below: flushed to 0
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 ns = _mm256_fmadd_ps(x, _mm256_set1_ps(detail::kLog2e), shifter);
  const __m256 n = _mm256_sub_ps(ns, shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  return scale_pow2(p, ns, keep);
}

// 2^u on 8 lanes, for the intermediate stages' float loops, whose callers form the exponent in
// base 2 (u = x log2 e, folded into the multiply-adds that form x): fast_exp_lowp's degree-4
// polynomial rescaled to 2^f (kExp2LowpPoly), f = u - round(u) exact, 2^n in the exponent bits.
// Why not fast_exp_lowp's form: each exponential is a chain of dependent operations, and on Zen 2
// the four chains the loops keep in flight fill the FP scheduler (12.8 cycles a vector of 8, twice
// its port count). In base 2 the reduction is one exact subtraction instead of a multiply-add and
// two Cody-Waite steps, and the lower clamp goes (a lane below 2^-125.5 is masked to 0 whatever its
// bits): 14 operations and ~37 cycles of chain instead of 17 and ~51; a dense sum in cache 0.49 ->
// 0.41 ns an entry (bench/RESULTS.md, session 35). Error: the polynomial's 2.7e-6 relative (as
// fast_exp_lowp's), plus u's rounding, |u| 2^-24 ln2 <= 5e-6 at the flush point, of the order of the
// float exponent's own (kernels.hpp). 0 below 2^-125.5 (e^-87) and for NaN, 2^127 above 127.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 fast_pow2_8(__m256 u) {
  const __m256 keep = _mm256_cmp_ps(u, _mm256_set1_ps(-125.5f), _CMP_GE_OQ);  // below: flushed to 0
  u = _mm256_min_ps(u, _mm256_set1_ps(127.0f));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 ns = _mm256_add_ps(u, shifter);  // round(u) in the low mantissa bits (see scale_pow2)
  const __m256 f = _mm256_sub_ps(u, _mm256_sub_ps(ns, shifter));
  using detail::kExp2LowpPoly;
  __m256 p = _mm256_set1_ps(kExp2LowpPoly[0]);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2LowpPoly[1]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2LowpPoly[2]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2LowpPoly[3]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2LowpPoly[4]));
  return scale_pow2(p, ns, keep);
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

// 8 exponents (A[col] - c * inv_eps - shift) log2 e, for fast_pow2_8, from entries [k, k + 8)
// (Masked: those below len, whose lanes `mask` sets; the caller zeroes the others' exponentials);
// `inv` and `shift` come scaled by log2 e. The sparse form gathers A with
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
  return _mm256_fmsub_ps(av, _mm256_set1_ps(detail::kLog2e), _mm256_fmadd_ps(cv, inv, shift));
}

// The same 8 exponents formed in double from double A (RowLse<float>::shifted_sum<double>: the
// exact stages), then rounded to float, as that loop does.
template <bool Sparse, bool Masked>
__attribute__((target("avx2,fma"), always_inline)) inline __m256 row_exponents8(const float* c, const int32_t* cols,
                                                                            const double* A, int64_t k, int64_t len,
                                                                            __m256d inv, __m256d shift,
                                                                            __m256i mask) {
  __m128 clo, chi;
  __m256d alo, ahi;
  if (!Sparse && Masked) {  // masked loads (fast on AMD, unlike masked stores); lanes past len read 0
    const __m128i mlo = _mm256_castsi256_si128(mask), mhi = _mm256_extracti128_si256(mask, 1);
    clo = _mm_maskload_ps(c + k, mlo);
    chi = _mm_maskload_ps(c + k + 4, mhi);
    alo = _mm256_maskload_pd(A + k, _mm256_cvtepi32_epi64(mlo));
    ahi = _mm256_maskload_pd(A + k + 4, _mm256_cvtepi32_epi64(mhi));
  } else if (Sparse && !Masked) {
    const int32_t* q = cols + k;
    alo = _mm256_setr_pd(A[q[0]], A[q[1]], A[q[2]], A[q[3]]);
    ahi = _mm256_setr_pd(A[q[4]], A[q[5]], A[q[6]], A[q[7]]);
    clo = _mm_loadu_ps(c + k);
    chi = _mm_loadu_ps(c + k + 4);
  } else if (Masked) {
    alignas(32) double g[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    alignas(32) float cq[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t n = len - k < 8 ? len - k : 8;
    for (int64_t l = 0; l < n; ++l) g[l] = A[Sparse ? cols[k + l] : k + l], cq[l] = c[k + l];
    alo = _mm256_load_pd(g);
    ahi = _mm256_load_pd(g + 4);
    clo = _mm_load_ps(cq);
    chi = _mm_load_ps(cq + 4);
  } else {
    alo = _mm256_loadu_pd(A + k);
    ahi = _mm256_loadu_pd(A + k + 4);
    clo = _mm_loadu_ps(c + k);
    chi = _mm_loadu_ps(c + k + 4);
  }
  const __m128 lo = _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_fnmadd_pd(_mm256_cvtps_pd(clo), inv, alo), shift));
  const __m128 hi = _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_fnmadd_pd(_mm256_cvtps_pd(chi), inv, ahi), shift));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// A value in every lane: 4 doubles.
__attribute__((target("avx2"), always_inline)) inline __m256d splat(double v) { return _mm256_set1_pd(v); }
// A coefficient of row_exponents8 in every lane: a float one scaled by log2 e (float exponents are
// formed in base 2), a double one as it is.
__attribute__((target("avx2"), always_inline)) inline __m256 exponent_coeff(float v) {
  return _mm256_set1_ps(v * detail::kLog2e);
}
__attribute__((target("avx2"), always_inline)) inline __m256d exponent_coeff(double v) { return splat(v); }

// The exponential of row_exponents8's result: base 2 from float exponents, e^x from double ones.
template <typename E>
__attribute__((target("avx2,fma"), always_inline)) inline __m256 row_exp8(__m256 v) {
  if constexpr (std::is_same<E, float>::value)
    return fast_pow2_8(v);
  else
    return fast_exp8(v);
}

// RowLse<float>::shifted_sum<float>: sum_k exp(A[cols[k]] - c[k] * inv_eps - shift) (cols null:
// A[k]), the exponent in base 2 (fast_pow2_8), partial sums in float over blocks of 256 entries, the
// blocks added in double. `Keep`: the terms are also stored to terms[0, len) (KeptTerms,
// kernels.hpp), the sum unchanged to the bit. E = double: RowLse<float>::shifted_sum<double> (the
// exact stages), the exponent formed in double and fast_exp(float)'s degree-7 polynomial.
template <bool Sparse, bool Keep = false, typename E = float>
__attribute__((target("avx2,fma"))) double lse_sum_avx2(const float* c, const int32_t* cols, int64_t len,
                                                        const E* A, E inv_eps, E shift, float* terms = nullptr) {
  const auto inv = exponent_coeff(inv_eps), sh = exponent_coeff(shift);
  const __m256i all = _mm256_set1_epi32(-1);
  double total = 0.0;
  constexpr int64_t kBlock = 256;
  for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < len ? j0 + kBlock : len;
    if (Sparse)
      prefetch_ahead(c, cols, j0, j1);
    else
      prefetch_dense_ahead(c, j0, j1);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t k = j0;
    // Four vectors at a time: each exponential is a chain of ~14 dependent operations, and two
    // chains at a time left the loop latency-bound on Zen 2 (dense, in cache: 0.56 ns an entry).
    for (; k + 32 <= j1; k += 32) {
      const __m256 e0 = row_exp8<E>(row_exponents8<Sparse, false>(c, cols, A, k, j1, inv, sh, all));
      const __m256 e1 = row_exp8<E>(row_exponents8<Sparse, false>(c, cols, A, k + 8, j1, inv, sh, all));
      const __m256 e2 = row_exp8<E>(row_exponents8<Sparse, false>(c, cols, A, k + 16, j1, inv, sh, all));
      const __m256 e3 = row_exp8<E>(row_exponents8<Sparse, false>(c, cols, A, k + 24, j1, inv, sh, all));
      if (Keep) {
        _mm256_storeu_ps(terms + k, e0);
        _mm256_storeu_ps(terms + k + 8, e1);
        _mm256_storeu_ps(terms + k + 16, e2);
        _mm256_storeu_ps(terms + k + 24, e3);
      }
      s0 = _mm256_add_ps(s0, e0);
      s1 = _mm256_add_ps(s1, e1);
      s2 = _mm256_add_ps(s2, e2);
      s3 = _mm256_add_ps(s3, e3);
    }
    for (; k + 16 <= j1; k += 16) {
      const __m256 e0 = row_exp8<E>(row_exponents8<Sparse, false>(c, cols, A, k, j1, inv, sh, all));
      const __m256 e1 = row_exp8<E>(row_exponents8<Sparse, false>(c, cols, A, k + 8, j1, inv, sh, all));
      if (Keep) {
        _mm256_storeu_ps(terms + k, e0);
        _mm256_storeu_ps(terms + k + 8, e1);
      }
      s0 = _mm256_add_ps(s0, e0);
      s1 = _mm256_add_ps(s1, e1);
    }
    for (; k < j1; k += 8) {
      const __m256i mask = first_lanes(j1 - k);
      const __m256 e = row_exp8<E>(row_exponents8<Sparse, true>(c, cols, A, k, j1, inv, sh, mask));
      if (Keep) _mm256_maskstore_ps(terms + k, mask, e);
      s0 = _mm256_add_ps(s0, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
    }
    total += static_cast<double>(hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3))));
  }
  return total;
}

// (Ai - c inv_eps - mx) log2 e, for col_lse_row_avx2 (inv and a come scaled by log2 e).
__attribute__((target("avx2,fma"), always_inline)) inline __m256 col_exponents8(__m256 cv, __m256 mv, __m256 inv,
                                                                             __m256 a) {
  return _mm256_fnmadd_ps(cv, inv, _mm256_fnmadd_ps(mv, _mm256_set1_ps(detail::kLog2e), a));
}

// ColLse<float>::shifted_row<float>: part[j] += exp(Ai - c[j] * inv_eps - mx[j]), j in [0, m), the
// exponent in base 2 (fast_pow2_8).
__attribute__((target("avx2,fma"))) inline void col_lse_row_avx2(const float* c, int64_t m, float Ai, float inv_eps,
                                                                 const float* mx, float* part) {
  const __m256 inv = exponent_coeff(inv_eps), a = exponent_coeff(Ai);
  int64_t j = 0;
  // Four vectors at a time (see lse_sum_avx2): 0.52-0.58 -> 0.44-0.47 ns an entry on Zen 2 (in cache,
  // 256 / 4096 columns).
  for (; j + 32 <= m; j += 32) {
    __m256 x[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) x[v] = col_exponents8(_mm256_loadu_ps(c + j + 8 * v), _mm256_loadu_ps(mx + j + 8 * v), inv, a);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      _mm256_storeu_ps(part + j + 8 * v, _mm256_add_ps(_mm256_loadu_ps(part + j + 8 * v), fast_pow2_8(x[v])));
  }
  for (; j + 8 <= m; j += 8) {
    const __m256 x = col_exponents8(_mm256_loadu_ps(c + j), _mm256_loadu_ps(mx + j), inv, a);
    _mm256_storeu_ps(part + j, _mm256_add_ps(_mm256_loadu_ps(part + j), fast_pow2_8(x)));
  }
  if (j < m) {
    const __m256i mask = first_lanes(m - j);
    const __m256 x = col_exponents8(_mm256_maskload_ps(c + j, mask), _mm256_maskload_ps(mx + j, mask), inv, a);
    const __m256 e = _mm256_and_ps(fast_pow2_8(x), _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(part + j, mask, _mm256_add_ps(_mm256_maskload_ps(part + j, mask), e));
  }
}

// KeptTerms::add_scaled (kernels.hpp) where AVX-512 does not run (the solver's float iteration now
// goes through the pattern's blocks instead, scatter_blocks_avx2; this stays add_scaled's CSR form
// and the roofline's CSR baseline): part[cols[k]] += r * terms[k], the
// columns distinct and ascending (a pattern's row). AVX2 has no scatter, but a pattern's rows are
// runs of consecutive columns (otce sorts the pixels by class and k-means cell: ~15-entry runs at
// N = 10^4), so a group of 4 whose columns are consecutive is one vector read-modify-write, and only
// the others go entry by entry (0.82 -> 0.43-0.50 ns an entry on Zen 2, ~15-entry runs). Every
// update is one fused multiply-add, whichever way it goes.
__attribute__((target("avx2,fma"))) inline void scatter_scaled_avx2(const float* terms, const int32_t* cols,
                                                                    int64_t len, float r, float* part) {
  const __m128 rv = _mm_set1_ps(r);
  int64_t k = 0;
  for (; k + 4 <= len; k += 4) {
    const int32_t j = cols[k];
    if (cols[k + 3] - j == 3) {
      _mm_storeu_ps(part + j, _mm_fmadd_ps(_mm_loadu_ps(terms + k), rv, _mm_loadu_ps(part + j)));
    } else {
      for (int64_t q = k; q < k + 4; ++q) part[cols[q]] = __builtin_fmaf(r, terms[q], part[cols[q]]);
    }
  }
  for (; k < len; ++k) part[cols[k]] = __builtin_fmaf(r, terms[k], part[cols[k]]);
}

// Lane permutations that pack the lanes a mask selects to the front, in order (AVX2 has no
// compress): idx8[mask] for 8 lanes (vpermps), idx4[mask] for 4 (vpermilps). 8.3 kB.
struct PackTables {
  alignas(32) int32_t idx8[256][8];
  alignas(16) int32_t idx4[16][4];
  constexpr PackTables() : idx8{}, idx4{} {
    for (int mask = 0; mask < 256; ++mask)
      for (int l = 0, at = 0; l < 8; ++l)
        if ((mask >> l) & 1) idx8[mask][at++] = l;
    for (int mask = 0; mask < 16; ++mask)
      for (int l = 0, at = 0; l < 4; ++l)
        if ((mask >> l) & 1) idx4[mask][at++] = l;
  }
};
inline constexpr PackTables kPack{};

// For each 8-bit mask: spread[mask] sends the first popcount(mask) lanes, in order, to the lanes
// the mask sets (vpermps, which reads an index's low 3 bits: the inverse of kPack.idx8), and has
// the sign bit set in those lanes (for vblendvps: one table for both). 8 kB.
struct SpreadTables {
  alignas(32) int32_t spread[256][8];
  constexpr SpreadTables() : spread{} {
    for (int mask = 0; mask < 256; ++mask)
      for (int l = 0, at = 0; l < 8; ++l)
        spread[mask][l] = (mask >> l) & 1 ? static_cast<int32_t>(static_cast<uint32_t>(at++) | 0x80000000u) : 0;
  }
};
inline constexpr SpreadTables kSpread{};

// The CSR row's entries through its 8-column blocks (BlockIndex, pattern_scan.hpp: nb blocks, the
// first columns `bcol`, the entries' lanes `bmask`). AVX2 has no gather worth using and no scatter:
// the row sum assembled its gathered potentials lane by lane (0.7 ns an entry on Zen 2) and the
// column update went entry by entry where 4 columns were not consecutive. A block's 8 potentials
// are one load, and its entries are consecutive in the row: the solver's patterns fill 64-83 % of
// their blocks' lanes (bench/RESULTS.md, session 34).
//
// gather_blocks_avx2: Ag[k] = A[cols[k]] for the row's entries, k in [0, len), a block's lanes packed
// (kPack.idx8) and stored whole (Ag has room for len + 8 floats). A is read up to the block of the
// last column: the caller pads it to a multiple of 8. Returns len.
__attribute__((target("avx2"))) inline int64_t gather_blocks_avx2(const int32_t* bcol, const uint8_t* bmask,
                                                                  int64_t nb, const float* A, float* Ag) {
  int64_t k = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const unsigned mask = bmask[b];
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx8[mask]));
    _mm256_storeu_ps(Ag + k, _mm256_permutevar8x32_ps(_mm256_loadu_ps(A + bcol[b]), perm));
    k += __builtin_popcount(mask);
  }
  return k;
}

// BlockIndex for one row (build_block_index, pattern_scan.hpp): the row's len columns (distinct,
// ascending) to its blocks' first columns (bc) and lane masks (bm); returns how many blocks. bc, bm
// and the scratch P take whole-vector stores: each needs room for the count + 8 (P: + 9). A block
// starts at an entry whose block differs from the entry before; its mask is the sum of its entries' lane bits
// (distinct bits), the difference of the row's running bit sum (P, < 2^31 for any row) at its start
// and at the next block's. So the loop over 8 entries at a time carries only a vector sum, and
// stores the blocks that start in the vector packed (kPack); a second loop forms the masks.
// (An OR carried from entry to entry, scalar or in vectors, ran 1.5 ns an entry on Zen 2.)
__attribute__((target("avx2,popcnt"))) inline int64_t block_index_row_avx2(const int32_t* cols, int64_t len,
                                                                           int32_t* bc, uint8_t* bm, int32_t* P) {
  const __m256i one = _mm256_set1_epi32(1), seven = _mm256_set1_epi32(7);
  const __m256i up1 = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6), lane3 = _mm256_set1_epi32(3),
                lane7 = _mm256_set1_epi32(7), upper = _mm256_setr_epi32(0, 0, 0, 0, -1, -1, -1, -1);
  __m256i carry = _mm256_setzero_si256();  // the bits of the entries before the vector, every lane
  int32_t prev_col = -8;                   // the entry before the vector (none: block -1)
  int64_t q = 0;
  for (int64_t k = 0; k < len; k += 8) {
    const int64_t nv = len - k < 8 ? len - k : 8;
    const __m256i valid = first_lanes(nv);
    const __m256i c = nv == 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + k))
                              : _mm256_maskload_epi32(cols + k, valid);
    const __m256i prev = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(c, up1), _mm256_set1_epi32(prev_col), 1);
    const __m256i blk = _mm256_srai_epi32(c, 3);
    const __m256i same = _mm256_cmpeq_epi32(blk, _mm256_srai_epi32(prev, 3));
    const unsigned starts = ~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(same))) & ((1u << nv) - 1u);
    const __m256i bits = _mm256_and_si256(_mm256_sllv_epi32(one, _mm256_and_si256(c, seven)), valid);
    // Inclusive running sum over the vector: within each 128-bit half, then the low half's total
    // added to the high half.
    __m256i x = _mm256_add_epi32(bits, _mm256_slli_si256(bits, 4));
    x = _mm256_add_epi32(x, _mm256_slli_si256(x, 8));
    x = _mm256_add_epi32(x, _mm256_and_si256(_mm256_permutevar8x32_epi32(x, lane3), upper));
    const __m256i before = _mm256_add_epi32(_mm256_sub_epi32(x, bits), carry);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx8[starts]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bc + q),
                        _mm256_permutevar8x32_epi32(_mm256_slli_epi32(blk, 3), perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + q), _mm256_permutevar8x32_epi32(before, perm));
    q += __builtin_popcount(starts);
    carry = _mm256_add_epi32(carry, _mm256_permutevar8x32_epi32(x, lane7));
    prev_col = cols[k + nv - 1];
  }
  P[q] = _mm256_cvtsi256_si32(carry);
  // Masks: P[b + 1] - P[b], their low bytes packed 8 at a time.
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
                                             -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  for (int64_t b = 0; b < q; b += 8) {
    const __m256i d = _mm256_shuffle_epi8(
        _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + b + 1)),
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + b))),
        low_bytes);
    const uint64_t packed = static_cast<uint32_t>(_mm256_cvtsi256_si32(d)) |
                            (static_cast<uint64_t>(static_cast<uint32_t>(_mm256_extract_epi32(d, 4))) << 32);
    std::memcpy(bm + b, &packed, 8);
  }
  return q;
}

// scatter_blocks_avx2: part[cols[k]] += r * terms[k] for the row's entries, a block at a time: its
// terms (consecutive from k; terms has room for len + 8 floats) spread to their lanes, the other
// lanes zeroed (kSpread), and one fused multiply-add on the block's 8 columns of part (padded to a
// multiple of 8), so each entry's update is the one scatter_scaled_avx2 makes and the others add 0.
__attribute__((target("avx2,fma"))) inline void scatter_blocks_avx2(const float* terms, const int32_t* bcol,
                                                                    const uint8_t* bmask, int64_t nb, float r,
                                                                    float* part) {
  const __m256 rv = _mm256_set1_ps(r);
  int64_t k = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const unsigned mask = bmask[b];
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSpread.spread[mask]));
    const __m256 t = _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(_mm256_loadu_ps(terms + k), perm),
                                      _mm256_castsi256_ps(perm));
    float* p = part + bcol[b];
    _mm256_storeu_ps(p, _mm256_fmadd_ps(t, rv, _mm256_loadu_ps(p)));
    k += __builtin_popcount(mask);
  }
}

__attribute__((target("avx2"), always_inline)) inline void store_lanes(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
__attribute__((target("avx2"), always_inline)) inline void store_lanes(float* p, __m128 v) { _mm_storeu_ps(p, v); }

// The compaction's store: the first `cnt` of W packed lanes, values pv (to ov) and column indices
// pc (their bits, to oc). `whole`: the caller's room takes all W slots, which are then stored as
// vectors (the slots past the kept ones are scratch); else lane by lane, since masked stores are
// microcoded on AMD (with them the AVX2 scans were slower than the compiler's clones).
template <int W, typename V>
__attribute__((target("avx2"), always_inline)) inline void store_packed_avx2(V pv, V pc, int64_t cnt, bool whole,
                                                                             float* ov, int32_t* oc) {
  if (whole) {
    store_lanes(ov, pv);
    store_lanes(reinterpret_cast<float*>(oc), pc);
    return;
  }
  alignas(32) float lv[W];
  alignas(32) int32_t lc[W];
  store_lanes(lv, pv);
  store_lanes(reinterpret_cast<float*>(lc), pc);
  for (int64_t l = 0; l < cnt; ++l) ov[l] = lv[l], oc[l] = lc[l];
}

// DenseRowScan<float>::fill (pattern_scan.hpp) in AVX2, as dense_fill_avx512: the first k entries
// of the dense row c[0, m) with c[j] - p_col[j] < th, their columns to oc and values to ov, in
// column order; returns how many were written. The same float subtraction and comparison as
// DenseRowScan's count; slots after the last one may be written, but none past oc + k / ov + k
// (the caller's room, as for fill).
__attribute__((target("avx2,fma"))) inline int64_t dense_fill_avx2(const float* c, int64_t m, const float* p_col,
                                                                   float th, int64_t k, int32_t* oc, float* ov) {
  const __m256 t = _mm256_set1_ps(th);
  const __m256i step = _mm256_set1_epi32(8);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t pos = 0;
  for (int64_t j = 0; j < m && pos < k; j += 8, idx = _mm256_add_epi32(idx, step)) {
    if ((j & 15) == 0) prefetch_dense_ahead(c, j, j + 1);  // one line, kPrefetchAhead entries ahead
    __m256 v, keep;
    if (j + 8 <= m) {
      v = _mm256_loadu_ps(c + j);
      keep = _mm256_cmp_ps(_mm256_sub_ps(v, _mm256_loadu_ps(p_col + j)), t, _CMP_LT_OQ);
    } else {
      const __m256i in = first_lanes(m - j);
      v = _mm256_maskload_ps(c + j, in);
      keep = _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(v, _mm256_maskload_ps(p_col + j, in)), t, _CMP_LT_OQ),
                           _mm256_castsi256_ps(in));
    }
    const int bits = _mm256_movemask_ps(keep);
    if (bits == 0) continue;
    const int64_t cnt = std::min<int64_t>(__builtin_popcount(bits), k - pos);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx8[bits]));
    store_packed_avx2<8>(_mm256_permutevar8x32_ps(v, perm),
                         _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(idx, perm)), cnt, pos + 8 <= k, ov + pos,
                         oc + pos);
    pos += cnt;
  }
  return pos;
}

// balance_classes' segment sums (sinkhorn.cpp) in AVX2: a pattern row's terms[0, len) summed over its
// runs of columns in one group, emit(d, sum) once per run in order. cols ascend; group d holds the
// columns [start[d], start[d + 1]) and group[j] is column j's. A run's entries are a prefix of the 8
// lanes from its first entry on (those below start[d + 1]), so each run takes its length / 8 + 1
// vector steps, where the scalar path found its end by a galloping and a binary search and summed
// it in a call of its own (~40 % and ~35 % of balance_classes at D = 19, N = 10^4, whose rows hold
// ~150 runs of ~15 entries; bench/RESULTS.md, session 36). The sums are in float, in another order.
template <typename Emit>
__attribute__((target("avx2,fma"))) inline void group_sums_avx2(const int32_t* cols, const float* terms, int64_t len,
                                                                const int32_t* group, const int64_t* start,
                                                                const Emit& emit) {
  int64_t k = 0;
  while (k < len) {
    const int d = group[cols[k]];
    const __m256i end = _mm256_set1_epi32(static_cast<int32_t>(start[d + 1]));
    __m256 acc = _mm256_setzero_ps();
    for (;;) {
      const int64_t left = len - k;
      __m256i in_run;
      __m256 t;
      if (left >= 8) {
        in_run = _mm256_cmpgt_epi32(end, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + k)));
        t = _mm256_loadu_ps(terms + k);
      } else {
        const __m256i in = first_lanes(left);
        in_run = _mm256_and_si256(in, _mm256_cmpgt_epi32(end, _mm256_maskload_epi32(cols + k, in)));
        t = _mm256_maskload_ps(terms + k, in);
      }
      const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(in_run));
      acc = _mm256_add_ps(acc, _mm256_and_ps(t, _mm256_castsi256_ps(in_run)));
      if (bits != 0xFF) {
        k += __builtin_popcount(bits);
        break;
      }
      k += 8;
      if (k == len) break;
    }
    emit(d, static_cast<double>(hsum8(acc)));
  }
}

// plan_entries_above's compaction (sinkhorn.cpp) in AVX2, as compact_above_avx512: the entries of
// val[0, len) above `floor`, with their indices col[], written in order to out_val / out_col;
// returns how many. The row's share of the output holds exactly those (counted first), so whole
// vectors are stored only where 8 slots remain in it: nothing is written past the kept entries.
__attribute__((target("avx2,fma"))) inline int64_t compact_above_avx2(const float* val, const int32_t* col,
                                                                      int64_t len, float floor, int64_t room,
                                                                      int32_t* out_col, float* out_val) {
  const __m256 fl = _mm256_set1_ps(floor);
  int64_t at = 0;
  for (int64_t k = 0; k < len; k += 8) {
    __m256 v;
    __m256i ci;
    int bits;
    if (k + 8 <= len) {
      v = _mm256_loadu_ps(val + k);
      ci = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k));
      bits = _mm256_movemask_ps(_mm256_cmp_ps(v, fl, _CMP_GT_OQ));
    } else {
      const __m256i in = first_lanes(len - k);
      v = _mm256_maskload_ps(val + k, in);
      ci = _mm256_maskload_epi32(col + k, in);
      bits = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, fl, _CMP_GT_OQ), _mm256_castsi256_ps(in)));
    }
    if (bits == 0) continue;
    const int cnt = __builtin_popcount(bits);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx8[bits]));
    store_packed_avx2<8>(_mm256_permutevar8x32_ps(v, perm),
                         _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(ci, perm)), cnt, at + 8 <= room,
                         out_val + at, out_col + at);
    at += cnt;
  }
  return at;
}

// KeepBelow (pattern_scan.hpp) in AVX2, as keep_below_avx512: the entries k of a row with
// (double)val[k] - p_col[col[k]] < th, 4 at a time, the same double subtraction and comparison as
// the plain loops. `Store`: the kept entries are written in order to out_col / out_val, and within
// [0, stop) (KeepBelow::move's: the row's count, or its length in place) the slots after them may
// be written too; out may be the row itself (in place), at or before it: a group is loaded before
// its lanes are stored, at or before where it was read. Returns how many were kept.
template <bool Store>
__attribute__((target("avx2,fma"))) inline int64_t keep_below_avx2(const float* val, const int32_t* col, int64_t len,
                                                                   const double* p_col, double th, int64_t stop,
                                                                   int32_t* out_col, float* out_val) {
  const __m256d t = _mm256_set1_pd(th);
  int64_t at = 0;
  for (int64_t j0 = 0; j0 < len; j0 += kPrefetchBlock) {
    const int64_t j1 = j0 + kPrefetchBlock < len ? j0 + kPrefetchBlock : len;
    prefetch_ahead(val, col, j0, j1);
    for (int64_t k = j0; k < j1; k += 4) {
      const int64_t n = j1 - k < 4 ? j1 - k : 4;
      __m128 v;
      __m128i ci;
      __m256d pc;
      if (n == 4) {
        v = _mm_loadu_ps(val + k);
        ci = _mm_loadu_si128(reinterpret_cast<const __m128i*>(col + k));
        pc = _mm256_setr_pd(p_col[col[k]], p_col[col[k + 1]], p_col[col[k + 2]], p_col[col[k + 3]]);
      } else {
        alignas(16) float vq[4] = {0, 0, 0, 0};
        alignas(16) int32_t cq[4] = {0, 0, 0, 0};
        alignas(32) double pq[4] = {0, 0, 0, 0};
        for (int64_t l = 0; l < n; ++l) vq[l] = val[k + l], cq[l] = col[k + l], pq[l] = p_col[col[k + l]];
        v = _mm_load_ps(vq);
        ci = _mm_load_si128(reinterpret_cast<const __m128i*>(cq));
        pc = _mm256_load_pd(pq);
      }
      const int bits =
          _mm256_movemask_pd(_mm256_cmp_pd(_mm256_sub_pd(_mm256_cvtps_pd(v), pc), t, _CMP_LT_OQ)) & ((1 << n) - 1);
      const int cnt = __builtin_popcount(bits);
      if (Store && cnt > 0) {
        const __m128i perm = _mm_load_si128(reinterpret_cast<const __m128i*>(kPack.idx4[bits]));
        store_packed_avx2<4>(_mm_permutevar_ps(v, perm), _mm_permutevar_ps(_mm_castsi128_ps(ci), perm), cnt,
                             at + 4 <= stop, out_val + at, out_col + at);
      }
      at += cnt;
    }
  }
  return at;
}

// e^x on N vectors of 4 doubles: detail::fast_exp's reduction, clamps and exponent-bit scale, with
// its polynomial (Taylor to degree 13 on |r| <= ln2 / 2) evaluated by Estrin's scheme instead of
// Horner's rule. Horner's 13 dependent multiply-adds made each exponential a chain of ~90 cycles
// on Zen 2, longer than its FP scheduler could overlap: 1.85 ns an exponential, latency-bound (its
// ~17 multiply-adds on two FMA pipes allow ~0.9); this form: 1.24. Estrin's halves the depth for 3 more multiplies; the N evaluations advance
// together for the same reason. The sum is taken in another order than Horner's, so a value may
// differ from fast_exp(double)'s in its last bits (relative 1e-16 either way against e^x).
template <int N>
__attribute__((target("avx2,fma"), always_inline)) inline void fast_exp4d(__m256d* x) {
  const __m256d lo = _mm256_set1_pd(-708.0), shifter = _mm256_set1_pd(6755399441055744.0);
  __m256d keep[N], ns[N], r[N];
#pragma GCC unroll 4
  for (int v = 0; v < N; ++v) {
    keep[v] = _mm256_cmp_pd(x[v], lo, _CMP_GE_OQ);  // below: flushed to 0
    const __m256d xv = _mm256_min_pd(_mm256_max_pd(x[v], lo), splat(709.0));
    ns[v] = _mm256_fmadd_pd(xv, splat(1.4426950408889634074), shifter);
    const __m256d n = _mm256_sub_pd(ns[v], shifter);
    r[v] = _mm256_fnmadd_pd(n, splat(6.93147180369123816490e-01), xv);
    r[v] = _mm256_fnmadd_pd(n, splat(1.90821492927058770002e-10), r[v]);
  }
#pragma GCC unroll 4
  for (int v = 0; v < N; ++v) {
    const __m256d r1 = r[v], r2 = _mm256_mul_pd(r1, r1), r4 = _mm256_mul_pd(r2, r2), r8 = _mm256_mul_pd(r4, r4);
    // a_i = 1 / i!, in pairs a_2k + a_2k+1 r, then pairs of those in r^2, r^4, r^8.
    const __m256d q0 = _mm256_fmadd_pd(r1, splat(1.0), splat(1.0));
    const __m256d q1 = _mm256_fmadd_pd(r1, splat(1.0 / 6.0), splat(0.5));
    const __m256d q2 = _mm256_fmadd_pd(r1, splat(1.0 / 120.0), splat(1.0 / 24.0));
    const __m256d q3 = _mm256_fmadd_pd(r1, splat(1.0 / 5040.0), splat(1.0 / 720.0));
    const __m256d q4 = _mm256_fmadd_pd(r1, splat(1.0 / 362880.0), splat(1.0 / 40320.0));
    const __m256d q5 = _mm256_fmadd_pd(r1, splat(1.0 / 39916800.0), splat(1.0 / 3628800.0));
    const __m256d q6 = _mm256_fmadd_pd(r1, splat(1.0 / 6227020800.0), splat(1.0 / 479001600.0));
    const __m256d s0 = _mm256_fmadd_pd(q1, r2, q0), s1 = _mm256_fmadd_pd(q3, r2, q2);
    const __m256d s2 = _mm256_fmadd_pd(q5, r2, q4);
    const __m256d t0 = _mm256_fmadd_pd(s1, r4, s0), t1 = _mm256_fmadd_pd(q6, r4, s2);
    const __m256d p = _mm256_fmadd_pd(t1, r8, t0);
    // ns's low mantissa bits hold n (offset by 2^51, which the shift by 52 drops): 2^n is (n + 1023) << 52.
    const __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_castpd_si256(ns[v]), _mm256_set1_epi64x(1023)), 52);
    x[v] = _mm256_and_pd(_mm256_mul_pd(p, _mm256_castsi256_pd(e)), keep[v]);
  }
}

// plan_row_avx2's exponents of the 4 entries at k: base + B[cols[k + l]] - c[k + l] * inv_eps, l < 4.
__attribute__((target("avx2,fma"), always_inline)) inline __m256d plan_exponents4(const float* c, const int32_t* cols,
                                                                                  int64_t k, __m256d base,
                                                                                  const double* B, __m256d inv) {
  const int32_t* q = cols + k;
  const __m256d bv = _mm256_setr_pd(B[q[0]], B[q[1]], B[q[2]], B[q[3]]);
  return _mm256_fnmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(c + k)), inv, _mm256_add_pd(base, bv));
}

// Stores the 4 exponentials rounded to float to out[0, 4) and adds them to col_part[q[l]]. The lanes
// by extraction: a 32-byte store read back as 8-byte loads does not forward on some CPUs.
__attribute__((target("avx2,fma"), always_inline)) inline void plan_store4(__m256d e, const int32_t* q, float* out,
                                                                           double* col_part) {
  _mm_storeu_ps(out, _mm256_cvtpd_ps(e));
  const __m128d lo = _mm256_castpd256_pd128(e), hi = _mm256_extractf128_pd(e, 1);
  col_part[q[0]] += _mm_cvtsd_f64(lo);
  col_part[q[1]] += _mm_cvtsd_f64(_mm_unpackhi_pd(lo, lo));
  col_part[q[2]] += _mm_cvtsd_f64(hi);
  col_part[q[3]] += _mm_cvtsd_f64(_mm_unpackhi_pd(hi, hi));
}

// PlanSums<float>::run (blocked.cpp) where AVX-512 does not run: over a dense run of w entries,
// p_j = exp(base + B_j - c_j * inv_eps) in double; s[0] += sum p, s[1] += sum p V_j (V given),
// s[2] += sum p^2 V2_j (V2 given). The compiler's clone evaluates fast_exp's Horner chain one
// vector at a time, latency-bound on Zen 2 (see fast_exp4d).
template <bool WithV, bool WithV2>
__attribute__((target("avx2,fma"))) inline void plan_sums_avx2(const float* c, int64_t w, double base, const double* B,
                                                               double inv_eps, const double* V, const double* V2,
                                                               double* s) {
  const __m256d inv = _mm256_set1_pd(inv_eps), bs = _mm256_set1_pd(base);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd();
  auto add = [&](__m256d p, int64_t j) __attribute__((target("avx2,fma"), always_inline)) {
    s0 = _mm256_add_pd(s0, p);
    if (WithV) s1 = _mm256_fmadd_pd(p, _mm256_loadu_pd(V + j), s1);
    if (WithV2) s2 = _mm256_fmadd_pd(_mm256_mul_pd(p, p), _mm256_loadu_pd(V2 + j), s2);
  };
  int64_t j = 0;
  constexpr int kV = 4;
  for (; j + 4 * kV <= w; j += 4 * kV) {
    __m256d e[kV];
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v)
      e[v] = _mm256_fnmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(c + j + 4 * v)), inv,
                              _mm256_add_pd(bs, _mm256_loadu_pd(B + j + 4 * v)));
    fast_exp4d<kV>(e);
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) add(e[v], j + 4 * v);
  }
  double r0 = 0.0, r1 = 0.0, r2 = 0.0;  // the last 0-15 entries, one at a time
  for (; j < w; ++j) {
    __m256d e = _mm256_set1_pd(base + B[j] - static_cast<double>(c[j]) * inv_eps);
    fast_exp4d<1>(&e);
    const double p = _mm256_cvtsd_f64(e);
    r0 += p;
    if (WithV) r1 += p * V[j];
    if (WithV2) r2 += p * p * V2[j];
  }
  alignas(32) double l0[4], l1[4], l2[4];
  _mm256_store_pd(l0, s0);
  _mm256_store_pd(l1, s1);
  _mm256_store_pd(l2, s2);
  s[0] += ((l0[0] + l0[2]) + (l0[1] + l0[3])) + r0;
  s[1] += ((l1[0] + l1[2]) + (l1[1] + l1[3])) + r1;
  s[2] += ((l2[0] + l2[2]) + (l2[1] + l2[3])) + r2;
}

// PlanRow<float>::fill (sinkhorn.cpp) where AVX-512 does not run: out[k] = exp(base + B[cols[k]] -
// c[k] * inv_eps) rounded to float, each added in double to col_part[cols[k]], and the row's sum
// returned. The compiler's AVX2 clone of the plain loop gathers B and col_part and stores the
// column sums lane by lane (19 % of a D = 256 draw on Zen 2, ~11 ns an entry by that profile; this
// form 2.4 ns in a scratch benchmark); here B is read by
// scalar loads and col_part updated by scalar read-modify-writes (AVX2 has no scatter; a row's
// columns are distinct, so no two lanes meet).
__attribute__((target("avx2,fma"))) inline double plan_row_avx2(const float* c, const int32_t* cols, int64_t len,
                                                                double base, const double* B, double inv_eps,
                                                                float* out, double* col_part) {
  const __m256d inv = _mm256_set1_pd(inv_eps), bs = _mm256_set1_pd(base);
  __m256d s = _mm256_setzero_pd();
  alignas(32) double lanes[4];
  for (int64_t j0 = 0; j0 < len; j0 += kPrefetchBlock) {
    const int64_t j1 = j0 + kPrefetchBlock < len ? j0 + kPrefetchBlock : len;
    prefetch_ahead(c, cols, j0, j1);
    int64_t k = j0;
    // Groups of kV x 4 entries, their exponentials evaluated together (fast_exp4d).
    constexpr int kV = 4;
    for (; k + 4 * kV <= j1; k += 4 * kV) {
      __m256d e[kV];
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) e[v] = plan_exponents4(c, cols, k + 4 * v, bs, B, inv);
      fast_exp4d<kV>(e);
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) {
        plan_store4(e[v], cols + k + 4 * v, out + k + 4 * v, col_part);
        s = _mm256_add_pd(s, e[v]);
      }
    }
    for (; k + 4 <= j1; k += 4) {
      __m256d e = plan_exponents4(c, cols, k, bs, B, inv);
      fast_exp4d<1>(&e);
      plan_store4(e, cols + k, out + k, col_part);
      s = _mm256_add_pd(s, e);
    }
    if (k < j1) {  // the block's last 1-3 entries, the other lanes zero
      const int64_t rest = j1 - k;
      alignas(32) double bq[4] = {0, 0, 0, 0};
      alignas(16) float cq[4] = {0, 0, 0, 0};
      for (int64_t l = 0; l < rest; ++l) bq[l] = B[cols[k + l]], cq[l] = c[k + l];
      const __m256d keep = _mm256_castsi256_pd(
          _mm256_cmpgt_epi64(_mm256_set1_epi64x(rest), _mm256_setr_epi64x(0, 1, 2, 3)));
      __m256d e = _mm256_fnmadd_pd(_mm256_cvtps_pd(_mm_load_ps(cq)), inv, _mm256_add_pd(bs, _mm256_load_pd(bq)));
      fast_exp4d<1>(&e);
      e = _mm256_and_pd(e, keep);
      _mm256_store_pd(lanes, e);
      for (int64_t l = 0; l < rest; ++l) {
        out[k + l] = static_cast<float>(lanes[l]);
        col_part[cols[k + l]] += lanes[l];
      }
      s = _mm256_add_pd(s, e);
    }
  }
  _mm256_store_pd(lanes, s);
  return (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
}

}  // namespace
}  // namespace segtransfer
#endif
