// Internal to the core (not installed): the float log-sum-exp loops of the intermediate stages
// (RowLse::sum_lowp, ColLse::sum_row_lowp in kernels.hpp), and the compaction of Newton's operator
// (plan_entries_above in sinkhorn.cpp), written with AVX-512 intrinsics, for CPUs with the
// x86-64-v4 feature set.
//
// Why by hand: GCC 12's x86-64-v4 clone of the sparse sum loads its 16 gathered potentials one by
// one and spills the block's partial sums to the stack, and nothing prefetches the value and index
// streams, whose scalar-load gathers hide them from the hardware prefetchers. On the 2-vCPU Xeon
// (Sapphire Rapids class) VM a 10^4 x 3000 sparse sum (240 MB, out of cache) took 1.08 ns an entry
// with the clone and 0.65 here (0.82 without the prefetch); the dense form 1.02 -> 0.69
// (bench/RESULTS.md, session 14). The potentials are still loaded one by one: vgatherdps was no
// faster there (0.72 ns), and CPUs with the Gather Data Sampling microcode fix run it several times
// slower.
//
// Each exponential is detail::fast_exp_lowp(float)'s operations on 16 lanes; only the order in which
// partial sums are added differs from the clones, a float rounding difference far inside what the
// lowp stages tolerate (kernels.hpp). (The AVX2 loops form theirs in base 2, lse_avx2.hpp.)
#pragma once
#include <algorithm>
#include <cstdint>

#include "lse_avx2.hpp"
#include "segtransfer/fastexp.hpp"

#ifdef SEGTRANSFER_AVX2_LSE
#define SEGTRANSFER_AVX512_LSE 1
#define SEGTRANSFER_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512cd,fma")))

namespace segtransfer {
namespace {

// True where this CPU has what the compiler's x86-64-v4 clones need (and these loops use).
inline bool avx512_lse_available() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  }();
  return yes;
}

// detail::fast_exp_lowp(float) on 16 lanes (see fastexp.hpp for the method and its error), with
// the scale 2^n applied by vscalefps instead of built in the exponent bits: that makes the lower
// clamp (which kept the bit construction in range) and three integer and multiply operations
// unnecessary, 14 -> 10 operations; in cache, a dense sum ran at 0.15 instead of 0.19 ns an entry
// (bench/RESULTS.md, session 17). Results are bit-identical to that form wherever e^x is a
// normal float (the same n, r and polynomial; p 2^n is exact either way); below e^-87 both give 0
// (the `keep` mask), and above 89 this gives +inf where the clamped form gave e^88 (a sum there
// has left range anyway).
SEGTRANSFER_AVX512_TARGET __attribute__((always_inline)) inline __m512 fast_exp16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);  // below: flushed to 0
  x = _mm512_min_ps(x, _mm512_set1_ps(89.0f));  // keeps the rounding trick below exact
  const __m512 shifter = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(detail::kLog2e), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  using detail::kExpLowpPoly;
  __m512 p = _mm512_set1_ps(kExpLowpPoly[0]);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpLowpPoly[1]));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpLowpPoly[2]));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpLowpPoly[3]));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpLowpPoly[4]));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// A[q[l]] for the lanes l that `mask` sets (0 elsewhere).
SEGTRANSFER_AVX512_TARGET __attribute__((always_inline)) inline __m512 load_gathered16(const float* A,
                                                                                       const int32_t* q,
                                                                                       __mmask16 mask) {
  if (mask == 0xFFFF) {
    const __m128 a0 = _mm_setr_ps(A[q[0]], A[q[1]], A[q[2]], A[q[3]]);
    const __m128 a1 = _mm_setr_ps(A[q[4]], A[q[5]], A[q[6]], A[q[7]]);
    const __m128 a2 = _mm_setr_ps(A[q[8]], A[q[9]], A[q[10]], A[q[11]]);
    const __m128 a3 = _mm_setr_ps(A[q[12]], A[q[13]], A[q[14]], A[q[15]]);
    const __m512 lo = _mm512_insertf32x4(_mm512_castps128_ps512(a0), a1, 1);
    return _mm512_insertf32x4(_mm512_insertf32x4(lo, a2, 2), a3, 3);
  }
  alignas(64) float g[16] = {};
  for (int l = 0; l < 16; ++l)
    if ((mask >> l) & 1) g[l] = A[q[l]];
  return _mm512_load_ps(g);
}

// 16 exponents A[col] - c * inv_eps - shift from entries [k, k + 16) where `mask` is set.
template <bool Sparse>
SEGTRANSFER_AVX512_TARGET __attribute__((always_inline)) inline __m512 row_exponents16(
    const float* c, const int32_t* cols, const float* A, int64_t k, __m512 inv, __m512 shift, __mmask16 mask) {
  const __m512 cv = mask == 0xFFFF ? _mm512_loadu_ps(c + k) : _mm512_maskz_loadu_ps(mask, c + k);
  __m512 av;
  if (Sparse)
    av = load_gathered16(A, cols + k, mask);
  else
    av = mask == 0xFFFF ? _mm512_loadu_ps(A + k) : _mm512_maskz_loadu_ps(mask, A + k);
  return _mm512_sub_ps(_mm512_fnmadd_ps(cv, inv, av), shift);
}

// Lanes [0, min(count, 16)) of 16 set (first_lanes, lse_avx2.hpp, for 8): a loop's last group.
inline __mmask16 first_lanes16(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// Stores the lanes of v and ids that `keep` selects, packed at the front, to ov and oc: `count` of
// them (at most popcount(keep)), so nothing is written past them. Compressed in registers and
// stored under a mask: compress-to-memory is microcoded and slow on some CPUs.
SEGTRANSFER_AVX512_TARGET __attribute__((always_inline)) inline void store_packed(__mmask16 keep, int64_t count, __m512 v,
                                                                               __m512i ids, float* ov, int32_t* oc) {
  const __mmask16 out = first_lanes16(count);
  _mm512_mask_storeu_ps(ov, out, _mm512_maskz_compress_ps(keep, v));
  _mm512_mask_storeu_epi32(oc, out, _mm512_maskz_compress_epi32(keep, ids));
}

// RowLse<float>::shifted_sum<float>: sum_k exp(A[cols[k]] - c[k] * inv_eps - shift) (cols null:
// A[k]), partial sums in float over blocks of 256 entries, the blocks added in double. `Keep`: the
// terms are also stored to terms[0, len) (KeptTerms, kernels.hpp), the sum unchanged to the bit.
template <bool Sparse, bool Keep = false>
SEGTRANSFER_AVX512_TARGET double lse_sum_avx512(const float* c, const int32_t* cols, int64_t len, const float* A,
                                                float inv_eps, float shift, float* terms = nullptr) {
  const __m512 inv = _mm512_set1_ps(inv_eps), sh = _mm512_set1_ps(shift);
  double total = 0.0;
  constexpr int64_t kBlock = 256;
  for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < len ? j0 + kBlock : len;
    if (Sparse)
      prefetch_ahead(c, cols, j0, j1);
    else
      prefetch_dense_ahead(c, j0, j1);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t k = j0;
    for (; k + 32 <= j1; k += 32) {
      const __m512 e0 = fast_exp16(row_exponents16<Sparse>(c, cols, A, k, inv, sh, 0xFFFF));
      const __m512 e1 = fast_exp16(row_exponents16<Sparse>(c, cols, A, k + 16, inv, sh, 0xFFFF));
      if (Keep) {
        _mm512_storeu_ps(terms + k, e0);
        _mm512_storeu_ps(terms + k + 16, e1);
      }
      s0 = _mm512_add_ps(s0, e0);
      s1 = _mm512_add_ps(s1, e1);
    }
    for (; k < j1; k += 16) {
      const __mmask16 mask = first_lanes16(j1 - k);
      const __m512 e = fast_exp16(row_exponents16<Sparse>(c, cols, A, k, inv, sh, mask));
      if (Keep) _mm512_mask_storeu_ps(terms + k, mask, e);
      s0 = _mm512_mask_add_ps(s0, mask, s0, e);
    }
    total += static_cast<double>(_mm512_reduce_add_ps(_mm512_add_ps(s0, s1)));
  }
  return total;
}

// ColLse<float>::shifted_row<float>: part[j] += exp(Ai - c[j] * inv_eps - mx[j]), j in [0, m).
SEGTRANSFER_AVX512_TARGET inline void col_lse_row_avx512(const float* c, int64_t m, float Ai, float inv_eps,
                                                         const float* mx, float* part) {
  const __m512 inv = _mm512_set1_ps(inv_eps), a = _mm512_set1_ps(Ai);
  for (int64_t j = 0; j < m; j += 16) {
    prefetch_dense_ahead(c, j, j + 1);  // one line, kPrefetchAhead entries ahead
    const __mmask16 mask = first_lanes16(m - j);
    const __m512 x =
        _mm512_sub_ps(_mm512_fnmadd_ps(_mm512_maskz_loadu_ps(mask, c + j), inv, a), _mm512_maskz_loadu_ps(mask, mx + j));
    _mm512_mask_storeu_ps(part + j, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, part + j), fast_exp16(x)));
  }
}

// KeptTerms::add_scaled: part[cols[k]] += r * terms[k], k in [0, len), the columns distinct (a
// truncated row's): the 16 lanes of a group never scatter to the same slot, so a gather, an add and
// a scatter are the update.
SEGTRANSFER_AVX512_TARGET inline void scatter_scaled_avx512(const float* terms, const int32_t* cols, int64_t len,
                                                            float r, float* part) {
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 mask = first_lanes16(len - k);
    const __m512i idx = _mm512_maskz_loadu_epi32(mask, cols + k);
    const __m512 old = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, part, 4);
    _mm512_mask_i32scatter_ps(part, mask, idx, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, terms + k), rv, old), 4);
  }
}

// DenseRowScan<float>::fill (pattern_scan.hpp) in AVX-512: the first k entries of the dense row c[0, m)
// with c[j] - p_col[j] < th, their columns to oc and values to ov, in column order; returns how many
// were written (k, or the row's count if smaller). The same float subtraction and comparison as
// DenseRowScan's count, so the two agree on every entry; nothing is written past the last one
// (store_packed).
SEGTRANSFER_AVX512_TARGET inline int64_t dense_fill_avx512(const float* c, int64_t m, const float* p_col, float th,
                                                           int64_t k, int32_t* oc, float* ov) {
  const __m512 t = _mm512_set1_ps(th);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t pos = 0;
  for (int64_t j = 0; j < m && pos < k; j += 16, idx = _mm512_add_epi32(idx, step)) {
    prefetch_dense_ahead(c, j, j + 1);
    const __mmask16 in = first_lanes16(m - j);
    const __m512 v = _mm512_maskz_loadu_ps(in, c + j);
    const __mmask16 keep =
        _mm512_mask_cmp_ps_mask(in, _mm512_sub_ps(v, _mm512_maskz_loadu_ps(in, p_col + j)), t, _CMP_LT_OQ);
    if (keep == 0) continue;
    const int64_t cnt = std::min<int64_t>(__builtin_popcount(keep), k - pos);
    store_packed(keep, cnt, v, idx, ov + pos, oc + pos);
    pos += cnt;
  }
  return pos;
}

// detail::fast_exp(double) on 8 lanes: the same reduction and polynomial, the scale 2^n applied by
// vscalefpd (as fast_exp16). Bit-identical to the scalar form wherever e^x is a normal double;
// +inf above 709, where the scalar form clamps.
SEGTRANSFER_AVX512_TARGET __attribute__((always_inline)) inline __m512d fast_exp8d(__m512d x) {
  const __mmask8 keep = _mm512_cmp_pd_mask(x, _mm512_set1_pd(-708.0), _CMP_GE_OQ);  // below: flushed to 0
  x = _mm512_min_pd(x, _mm512_set1_pd(710.0));
  const __m512d shifter = _mm512_set1_pd(6755399441055744.0);
  const __m512d n = _mm512_sub_pd(_mm512_fmadd_pd(x, _mm512_set1_pd(1.4426950408889634074), shifter), shifter);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93147180369123816490e-01), x);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.90821492927058770002e-10), r);
  __m512d p = _mm512_set1_pd(1.0 / 6227020800.0);
  for (const double coef : {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                            1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0})
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(coef));
  return _mm512_maskz_scalef_pd(keep, p, n);
}

// Lanes [0, min(count, 8)) of 8 set: a loop's last group of doubles.
inline __mmask8 first_lanes8(int64_t count) {
  return count >= 8 ? __mmask8(0xFF) : static_cast<__mmask8>((1u << count) - 1);
}

// A[q[l]] for the lanes l that `mask` sets (0 elsewhere), doubles; idx holds q[0, 8): scalar loads
// for a full group (as load_gathered16), a masked gather for the last one.
SEGTRANSFER_AVX512_TARGET __attribute__((always_inline)) inline __m512d load_gathered8d(const double* A,
                                                                                        const int32_t* q,
                                                                                        __m256i idx, __mmask8 mask) {
  if (mask == 0xFF) return _mm512_setr_pd(A[q[0]], A[q[1]], A[q[2]], A[q[3]], A[q[4]], A[q[5]], A[q[6]], A[q[7]]);
  return _mm512_mask_i32gather_pd(_mm512_setzero_pd(), mask, idx, A, 8);
}

// The loop of the double-precision sparse loops below: a row's entries [0, len) in groups of 8
// (body(k, mask, idx): the group at k, its lanes, its columns), the value and index streams
// prefetched a block at a time (prefetch_ahead).
template <typename Body>
SEGTRANSFER_AVX512_TARGET __attribute__((always_inline)) inline void sparse_groups8(const float* val,
                                                                                    const int32_t* cols,
                                                                                    int64_t len, Body&& body) {
  for (int64_t j0 = 0; j0 < len; j0 += kPrefetchBlock) {
    const int64_t j1 = j0 + kPrefetchBlock < len ? j0 + kPrefetchBlock : len;
    prefetch_ahead(val, cols, j0, j1);
    for (int64_t k = j0; k < j1; k += 8) {
      const __mmask8 mask = first_lanes8(j1 - k);
      body(k, mask, _mm256_maskz_loadu_epi32(mask, cols + k));
    }
  }
}

// Stores the 8 exponentials e (lanes `mask`) rounded to float to out[0, 8) and adds each in double to
// col_part[q[l]]: by extraction and scalar read-modify-writes (a truncated row's columns are
// distinct, so no two lanes meet). A gather and a scatter were the update until session 45: on the
// Zen 4 VM they made plan_row_avx512 slower than the AVX2 loop (2.9 against 2.5 ns an entry,
// scratch benchmark below); on the Xeon of session 14 the scatter had been the faster form, but
// that form's gather is also what the Gather Data Sampling microcode fix slows down (see the top).
SEGTRANSFER_AVX512_TARGET __attribute__((always_inline)) inline void plan_store8(__m512d e, const int32_t* q,
                                                                              __mmask8 mask, float* out,
                                                                              double* col_part) {
  _mm256_mask_storeu_ps(out, mask, _mm512_cvtpd_ps(e));
  if (mask != 0xFF) {
    alignas(64) double t[8];
    _mm512_store_pd(t, e);
    for (int l = 0; l < 8; ++l)
      if ((mask >> l) & 1) col_part[q[l]] += t[l];
    return;
  }
  const __m256d lo = _mm512_castpd512_pd256(e), hi = _mm512_extractf64x4_pd(e, 1);
  const __m128d l0 = _mm256_castpd256_pd128(lo), l1 = _mm256_extractf128_pd(lo, 1);
  const __m128d h0 = _mm256_castpd256_pd128(hi), h1 = _mm256_extractf128_pd(hi, 1);
  col_part[q[0]] += _mm_cvtsd_f64(l0);
  col_part[q[1]] += _mm_cvtsd_f64(_mm_unpackhi_pd(l0, l0));
  col_part[q[2]] += _mm_cvtsd_f64(l1);
  col_part[q[3]] += _mm_cvtsd_f64(_mm_unpackhi_pd(l1, l1));
  col_part[q[4]] += _mm_cvtsd_f64(h0);
  col_part[q[5]] += _mm_cvtsd_f64(_mm_unpackhi_pd(h0, h0));
  col_part[q[6]] += _mm_cvtsd_f64(h1);
  col_part[q[7]] += _mm_cvtsd_f64(_mm_unpackhi_pd(h1, h1));
}

// PlanRow<float>::fill (sinkhorn.cpp): out[k] = exp(base + B[cols[k]] - c[k] * inv_eps) rounded to
// float, each added in double to col_part[cols[k]], and the row's sum returned. B is read by scalar
// loads (load_gathered8d). The exponentials of 4 groups of 8 are evaluated together, as
// plan_row_avx2 does, so that their Horner chains overlap. On the Zen 4 VM of session 45 (a
// 10^4 x 1588 pattern, 7 interleaved rounds, median): 2.90 ns an entry for the previous form (one
// group at a time, gather and scatter), 2.03 for this one, 2.49 for plan_row_avx2; the same loop
// without the column sums 1.50 and without the exponentials as well 1.17 (the streams' reads).
SEGTRANSFER_AVX512_TARGET inline double plan_row_avx512(const float* c, const int32_t* cols, int64_t len, double base,
                                                        const double* B, double inv_eps, float* out,
                                                        double* col_part) {
  const __m512d inv = _mm512_set1_pd(inv_eps), bs = _mm512_set1_pd(base);
  __m512d s = _mm512_setzero_pd();
  constexpr int kV = 4;
  for (int64_t j0 = 0; j0 < len; j0 += kPrefetchBlock) {
    const int64_t j1 = j0 + kPrefetchBlock < len ? j0 + kPrefetchBlock : len;
    prefetch_ahead(c, cols, j0, j1);
    int64_t k = j0;
    for (; k + 8 * kV <= j1; k += 8 * kV) {
      __m512d e[kV];
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) {
        const int32_t* q = cols + k + 8 * v;
        const __m512d bv = _mm512_setr_pd(B[q[0]], B[q[1]], B[q[2]], B[q[3]], B[q[4]], B[q[5]], B[q[6]], B[q[7]]);
        e[v] = _mm512_fnmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(c + k + 8 * v)), inv, _mm512_add_pd(bs, bv));
      }
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) e[v] = fast_exp8d(e[v]);
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) {
        plan_store8(e[v], cols + k + 8 * v, 0xFF, out + k + 8 * v, col_part);
        s = _mm512_add_pd(s, e[v]);
      }
    }
    for (; k < j1; k += 8) {
      const __mmask8 mask = first_lanes8(j1 - k);
      const __m256i idx = _mm256_maskz_loadu_epi32(mask, cols + k);
      const __m512d bv = load_gathered8d(B, cols + k, idx, mask);
      const __m512d cv = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mask, c + k));
      const __m512d e = _mm512_maskz_mov_pd(mask, fast_exp8d(_mm512_fnmadd_pd(cv, inv, _mm512_add_pd(bs, bv))));
      plan_store8(e, cols + k, mask, out + k, col_part);
      s = _mm512_add_pd(s, e);
    }
  }
  alignas(64) double lanes[8];  // _mm512_reduce_add_pd trips GCC 12's -Wuninitialized in its header
  _mm512_store_pd(lanes, s);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

// A pattern's filter (KeepBelow, pattern_scan.hpp): the entries
// k of a row with (double)val[k] - p_col[col[k]] < th, 8 at a time, the same double subtraction and
// comparison as the plain loops, so they agree on every entry. `Store`: the kept entries are written
// in order to out_col / out_val, and nothing else; out may be the row itself (in place), at or
// before it: a group is loaded before its kept lanes are stored, at or before where it was read.
// Returns how many were kept. The plain loops compare one entry at a time (count_kept and move_kept
// were 1.8 % and 2.5 % of a K = 10 call's CPU time at D = 19); with this and the one-pass filter
// (filter_serial) that call took 13.8 -> 13.2 s.
template <bool Store>
SEGTRANSFER_AVX512_TARGET inline int64_t keep_below_avx512(const float* val, const int32_t* col, int64_t len,
                                                           const double* p_col, double th, int32_t* out_col,
                                                           float* out_val) {
  const __m512d t = _mm512_set1_pd(th);
  int64_t at = 0;
  sparse_groups8(val, col, len, [&](int64_t k, __mmask8 in, __m256i idx) SEGTRANSFER_AVX512_TARGET {
    const __m256 v = _mm256_maskz_loadu_ps(in, val + k);
    const __m512d pc = load_gathered8d(p_col, col + k, idx, in);
    const __mmask8 keep = _mm512_mask_cmp_pd_mask(in, _mm512_sub_pd(_mm512_cvtps_pd(v), pc), t, _CMP_LT_OQ);
    const int cnt = __builtin_popcount(keep);
    if (Store && cnt > 0) {
      const __mmask8 out = first_lanes8(cnt);
      _mm256_mask_storeu_ps(out_val + at, out, _mm256_maskz_compress_ps(keep, v));
      _mm256_mask_storeu_epi32(out_col + at, out, _mm256_maskz_compress_epi32(keep, idx));
    }
    at += cnt;
  });
  return at;
}

// How many of val[0, len) are above `floor` (plan_entries_above's count, sinkhorn.cpp).
SEGTRANSFER_AVX512_TARGET inline int64_t count_above_avx512(const float* val, int64_t len, float floor) {
  const __m512 fl = _mm512_set1_ps(floor);
  int64_t c = 0;
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 in = first_lanes16(len - k);
    c += __builtin_popcount(_mm512_mask_cmp_ps_mask(in, _mm512_maskz_loadu_ps(in, val + k), fl, _CMP_GT_OQ));
  }
  return c;
}

// The entries of val[0, len) above `floor`, with their indices col[], written in order to
// out_val / out_col (Newton's operator, plan_entries_above in sinkhorn.cpp); returns how many.
// Nothing is written past the kept entries (the next row's share; store_packed).
SEGTRANSFER_AVX512_TARGET inline int64_t compact_above_avx512(const float* val, const int32_t* col, int64_t len,
                                                              float floor, int32_t* out_col, float* out_val) {
  const __m512 fl = _mm512_set1_ps(floor);
  int64_t at = 0;
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 in = first_lanes16(len - k);
    const __m512 v = _mm512_maskz_loadu_ps(in, val + k);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(in, v, fl, _CMP_GT_OQ);
    if (keep == 0) continue;
    const int cnt = __builtin_popcount(keep);
    store_packed(keep, cnt, v, _mm512_maskz_loadu_epi32(in, col + k), out_val + at, out_col + at);
    at += cnt;
  }
  return at;
}

// Newton's captured plan in the blocked solver (CaptureRow::keep, blocked.cpp): the columns j of one
// dense cost row with G_j - c_j inv_eps > th, written in order to idx; returns how many. The plain
// loop compares one column at a time (5 % of a blocked N = 10^4, D = 19 draw's samples). The
// difference is one fused multiply-add, as the compiler contracts the plain loop in its FMA clones;
// a capture only has to agree with itself (its entries feed CG's products, never the residuals).
SEGTRANSFER_AVX512_TARGET inline int64_t capture_keep_avx512(const float* c, int64_t m, const double* G, double inv_eps,
                                                             double th, int32_t* idx) {
  const __m512d ie = _mm512_set1_pd(inv_eps), t = _mm512_set1_pd(th);
  const __m256i eight = _mm256_set1_epi32(8);
  __m256i cols = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t k = 0;
  for (int64_t j = 0; j < m; j += 8, cols = _mm256_add_epi32(cols, eight)) {
    const __mmask8 in = first_lanes8(m - j);
    const __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(in, c + j));
    const __mmask8 keep = _mm512_mask_cmp_pd_mask(in, _mm512_fnmadd_pd(v, ie, _mm512_maskz_loadu_pd(in, G + j)), t,
                                                  _CMP_GT_OQ);
    if (keep == 0) continue;
    const int cnt = __builtin_popcount(keep);
    // Register compress and a masked store: vpcompressd to memory is microcoded on Zen 4.
    _mm256_mask_storeu_epi32(idx + k, first_lanes8(cnt), _mm256_maskz_compress_epi32(keep, cols));
    k += cnt;
  }
  return k;
}

}  // namespace
}  // namespace segtransfer
#endif
