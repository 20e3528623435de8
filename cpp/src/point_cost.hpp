// Internal to the core (not installed): the squared-Euclidean cost computed from the points, tile
// by tile, shared by the stored solver's cost matrix (squared_euclidean, sinkhorn.cpp) and the
// blocked solver, which recomputes it at every pass (blocked.cpp). One routine for both, so that
// the two modes see bit-identical costs.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels.hpp"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(SEGTRANSFER_NO_CLONES)
// -Wmaybe-uninitialized off for the intrinsics header: see lse_avx2.hpp.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define SEGTRANSFER_AVX2_TILES 1
#endif

namespace segtransfer {
namespace {

// Columns per tile: a tile's slice of y^T (d x 256) stays in L1/L2 while a panel's rows use it.
constexpr int64_t kCostTile = 256;

// Whether this CPU runs cost_tile_avx2 (and so whether PointCost packs y for it).
inline bool avx2_tiles_available() {
#ifdef SEGTRANSFER_AVX2_TILES
  return cpu_has_avx2_fma();
#else
  return false;
#endif
}

// The entries a tile's blocks left over (rows >= r, and columns >= wv of the rows < r), one at a
// time with the blocks' operations in the same order.
// Runs of up to 64 columns a row, swept by dimension: the same chain per entry as one entry at a
// time, but reading y^T along its rows; entry by entry, the blocked solver's single-row recomputes
// (its safe log-sum-exp form) took 23 % of a float64 D = 256 blocked draw. One row at a time, a
// 4,000 x 4,000 cost at D = 256: 2.8 -> 32 GFLOP/s (float), 2.5 -> 16 (double).
template <typename T>
SEGTRANSFER_HOT void cost_tile_rest(const T* x, int64_t rows, int64_t d, const T* yt, int64_t ld, int64_t w, const T* xx,
                                   const T* yy, T* out, int64_t ldo, int64_t r, int64_t wv) {
  constexpr int64_t kRun = 64;
  T acc[kRun];
  for (int64_t rr = 0; rr < rows; ++rr) {
    for (int64_t j0 = rr < r ? wv : 0; j0 < w; j0 += kRun) {
      const int64_t c = std::min(kRun, w - j0);
      std::fill(acc, acc + c, T(0));
      for (int64_t k = 0; k < d; ++k) {
        const T u = T(-2) * x[rr * d + k];
        const T* yk = yt + k * ld + j0;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) acc[j] = std::fma(u, yk[j], acc[j]);
      }
      for (int64_t j = 0; j < c; ++j) {
        const T v = acc[j] + (xx[rr] + yy[j0 + j]);
        out[rr * ldo + j0 + j] = v > T(0) ? v : T(0);
      }
    }
  }
}

#ifdef SEGTRANSFER_AVX2_TILES
// A register block's kR rows of x times -2 (exact: a power of two), interleaved by dimension
// (xs[kR k + q]), so that each product's factor is one broadcast load: scaling and broadcasting in
// registers cost a multiply and a shuffle per row and dimension and held the AVX2 kernel to half
// the FMA rate. The kernels keep xs in a thread-local buffer, read through a local pointer (no
// thread-local lookup or reload in their loops).
template <int kR, typename T>
inline T* interleave_rows(const T* x0, int64_t d) {
  thread_local std::vector<T> buf;
  buf.resize(static_cast<size_t>(kR) * d);
  T* const xs = buf.data();
  for (int64_t k = 0; k < d; ++k)
    for (int q = 0; q < kR; ++q) xs[kR * k + q] = T(-2) * x0[q * d + k];
  return xs;
}

// The float tile with AVX2 + FMA intrinsics: blocks of 6 rows x 16 columns whose 12 accumulators
// stay in registers (then one of 4 rows for the rest of a 16-row panel). The portable form below
// keeps its accumulator arrays on the stack (GCC 12 vectorises the column loop but not the arrays
// away: every fma loads and stores its accumulator), which ran 3-4x below the FMA rate. Same fma
// chain per entry, in the same order, as the portable form and its leftover loop: bit-identical
// values, so either can serve any tile.
// Why 6 rows: an FMA's latency (5 cycles on Zen 2) times its two pipes needs 10 independent
// accumulators; 4 x 16 had 8 and ran at half the FMA rate (D = 256, the 10^4 x 10^4 cost on one
// Zen 2 thread: 51 GFLOP/s against 102 for bare FMAs; 6 x 16 in panels of 24 rows with the
// prefetch below: 72), and 6 x 16 leaves 3 of the 16 registers for the two loads of y and the
// broadcast.
// `yp`: the tile's columns packed in groups of 16 (group g at yp + 16 g d, d rows of 16 values; see
// PointCost::pack), so that a block reads one contiguous run instead of d rows of y^T m apart: at
// D = 256 the strided reads held the kernel to a quarter of the FMA rate.
template <int kR>
__attribute__((target("avx2,fma"), always_inline)) inline void cost_block_avx2(const float* xs, int64_t d,
                                                                               const float* yp, int64_t wv,
                                                                               const float* xx, const float* yy,
                                                                               float* out, int64_t ldo) {
  constexpr int64_t kW = 16;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t j0 = 0; j0 < wv; j0 += kW) {
    const float* yb = yp + j0 * d;
    __m256 a[kR][2];
#pragma GCC unroll 8
    for (int q = 0; q < kR; ++q) {
      const __m256 u = _mm256_broadcast_ss(xs + q);
      a[q][0] = _mm256_fmadd_ps(u, _mm256_loadu_ps(yb), zero);
      a[q][1] = _mm256_fmadd_ps(u, _mm256_loadu_ps(yb + 8), zero);
    }
    for (int64_t k = 1; k < d; ++k) {
      const float* yk = yb + 16 * k;
      // y's group streams from L2 (16 kB at D = 256, one per block and group); the hardware
      // prefetcher alone left the FMAs waiting: 65 -> 72 GFLOP/s on Zen 2 with this.
      _mm_prefetch(reinterpret_cast<const char*>(yk + 16 * 16), _MM_HINT_T0);
      const __m256 v0 = _mm256_loadu_ps(yk), v1 = _mm256_loadu_ps(yk + 8);
#pragma GCC unroll 8
      for (int q = 0; q < kR; ++q) {
        const __m256 u = _mm256_broadcast_ss(xs + kR * k + q);
        a[q][0] = _mm256_fmadd_ps(u, v0, a[q][0]);
        a[q][1] = _mm256_fmadd_ps(u, v1, a[q][1]);
      }
    }
#pragma GCC unroll 8
    for (int q = 0; q < kR; ++q) {
      const __m256 xr = _mm256_set1_ps(xx[q]);
      float* o = out + q * ldo + j0;
      for (int h = 0; h < 2; ++h) {
        const __m256 c = _mm256_add_ps(a[q][h], _mm256_add_ps(xr, _mm256_loadu_ps(yy + j0 + 8 * h)));
        _mm256_storeu_ps(o + 8 * h, _mm256_max_ps(c, zero));  // NaN or -0 -> +0, as c > 0 ? c : 0
      }
    }
  }
}

// Blocks cover columns [0, wv), wv a multiple of 16; returns the rows they covered.
__attribute__((target("avx2,fma"))) int64_t cost_tile_avx2(const float* x, int64_t rows, int64_t d, const float* yp,
                                                             int64_t wv, const float* xx, const float* yy, float* out,
                                                             int64_t ldo) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6)
    cost_block_avx2<6>(interleave_rows<6>(x + r * d, d), d, yp, wv, xx + r, yy, out + r * ldo, ldo);
  for (; r + 4 <= rows; r += 4)
    cost_block_avx2<4>(interleave_rows<4>(x + r * d, d), d, yp, wv, xx + r, yy, out + r * ldo, ldo);
  return r;
}

// The same with AVX-512: blocks of 8 rows x 16 columns, one register per row, so that each load of
// y feeds eight multiply-adds (the AVX2 block's 4 x 16 in two halves fed four). Same fma chain per
// entry, in the same order: bit-identical to the other forms. D = 256, the 10^4 x 10^4 cost on one
// thread of the Xeon VM: 0.66-0.69 -> 0.49 s, 77 -> 104 GFLOP/s (bench/RESULTS.md, session 14);
// 32 columns a block: 0.47-0.50 -> 0.44-0.46 s (session 17).
__attribute__((target("avx512f,fma"))) int64_t cost_tile_avx512(const float* x, int64_t rows, int64_t d,
                                                                const float* yp, int64_t wv, const float* xx,
                                                                const float* yy, float* out, int64_t ldo) {
  constexpr int64_t kW = 16, kR = 8;
  const __m512 zero = _mm512_setzero_ps();
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) {
    const float* const xs = interleave_rows<kR>(x + r * d, d);
    int64_t j0 = 0;
    // Two groups of 16 columns at a time: 16 independent accumulators, where 8 barely covered the
    // two FMA units' latency (4 cycles x 2), and two loads of y for 16 multiply-adds.
    for (; j0 + 2 * kW <= wv; j0 += 2 * kW) {
      const float* yb0 = yp + j0 * d;
      const float* yb1 = yb0 + kW * d;
      __m512 a0[kR], a1[kR];
      {
        const __m512 v0 = _mm512_loadu_ps(yb0), v1 = _mm512_loadu_ps(yb1);
        for (int q = 0; q < kR; ++q) {
          const __m512 u = _mm512_set1_ps(xs[q]);
          a0[q] = _mm512_fmadd_ps(u, v0, zero);
          a1[q] = _mm512_fmadd_ps(u, v1, zero);
        }
      }
      for (int64_t k = 1; k < d; ++k) {
        const __m512 v0 = _mm512_loadu_ps(yb0 + kW * k), v1 = _mm512_loadu_ps(yb1 + kW * k);
        for (int q = 0; q < kR; ++q) {
          const __m512 u = _mm512_set1_ps(xs[kR * k + q]);
          a0[q] = _mm512_fmadd_ps(u, v0, a0[q]);
          a1[q] = _mm512_fmadd_ps(u, v1, a1[q]);
        }
      }
      const __m512 y0 = _mm512_loadu_ps(yy + j0), y1 = _mm512_loadu_ps(yy + j0 + kW);
      for (int q = 0; q < kR; ++q) {
        const __m512 xr = _mm512_set1_ps(xx[r + q]);
        float* o = out + (r + q) * ldo + j0;
        _mm512_storeu_ps(o, _mm512_max_ps(_mm512_add_ps(a0[q], _mm512_add_ps(xr, y0)), zero));  // NaN or -0 -> +0
        _mm512_storeu_ps(o + kW, _mm512_max_ps(_mm512_add_ps(a1[q], _mm512_add_ps(xr, y1)), zero));
      }
    }
    for (; j0 < wv; j0 += kW) {
      const float* yb = yp + j0 * d;
      __m512 a[kR];
      const __m512 v = _mm512_loadu_ps(yb);
      for (int q = 0; q < kR; ++q) a[q] = _mm512_fmadd_ps(_mm512_set1_ps(xs[q]), v, zero);
      for (int64_t k = 1; k < d; ++k) {
        const __m512 vk = _mm512_loadu_ps(yb + kW * k);
        for (int q = 0; q < kR; ++q) a[q] = _mm512_fmadd_ps(_mm512_set1_ps(xs[kR * k + q]), vk, a[q]);
      }
      const __m512 yv = _mm512_loadu_ps(yy + j0);
      for (int q = 0; q < kR; ++q) {
        const __m512 c = _mm512_add_ps(a[q], _mm512_add_ps(_mm512_set1_ps(xx[r + q]), yv));
        _mm512_storeu_ps(out + (r + q) * ldo + j0, _mm512_max_ps(c, zero));  // NaN or -0 -> +0
      }
    }
  }
  return r;
}

// The double tile in AVX-512: blocks of 8 rows x 16 columns (two registers a row) on the same
// packed groups of 16 columns, with the portable form's fma chain per entry: bit-identical to it.
// That form keeps its accumulators on the stack as the float one did: a 4,000 x 4,000 cost in
// 16-row panels on one Zen 5 thread ran at 59 GFLOP/s (D = 256) and 43 (D = 19); this one at 122
// and 89 (the blocked solver's float64 passes are mostly this; float: 245 GFLOP/s).
__attribute__((target("avx512f,fma"))) int64_t cost_tile_avx512_f64(const double* x, int64_t rows, int64_t d,
                                                                    const double* yp, int64_t wv, const double* xx,
                                                                    const double* yy, double* out, int64_t ldo) {
  constexpr int64_t kG = 16, kR = 8;  // a packed group's columns; rows a block
  const __m512d zero = _mm512_setzero_pd();
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) {
    const double* const xs = interleave_rows<kR>(x + r * d, d);
    for (int64_t j0 = 0; j0 < wv; j0 += kG) {
      const double* yb = yp + j0 * d;
      __m512d a0[kR], a1[kR];
      {
        const __m512d v0 = _mm512_loadu_pd(yb), v1 = _mm512_loadu_pd(yb + 8);
        for (int q = 0; q < kR; ++q) {
          const __m512d u = _mm512_set1_pd(xs[q]);
          a0[q] = _mm512_fmadd_pd(u, v0, zero);
          a1[q] = _mm512_fmadd_pd(u, v1, zero);
        }
      }
      for (int64_t k = 1; k < d; ++k) {
        const __m512d v0 = _mm512_loadu_pd(yb + kG * k), v1 = _mm512_loadu_pd(yb + kG * k + 8);
        for (int q = 0; q < kR; ++q) {
          const __m512d u = _mm512_set1_pd(xs[kR * k + q]);
          a0[q] = _mm512_fmadd_pd(u, v0, a0[q]);
          a1[q] = _mm512_fmadd_pd(u, v1, a1[q]);
        }
      }
      const __m512d y0 = _mm512_loadu_pd(yy + j0), y1 = _mm512_loadu_pd(yy + j0 + 8);
      for (int q = 0; q < kR; ++q) {
        const __m512d xr = _mm512_set1_pd(xx[r + q]);
        double* o = out + (r + q) * ldo + j0;
        _mm512_storeu_pd(o, _mm512_max_pd(_mm512_add_pd(a0[q], _mm512_add_pd(xr, y0)), zero));  // NaN or -0 -> +0
        _mm512_storeu_pd(o + 8, _mm512_max_pd(_mm512_add_pd(a1[q], _mm512_add_pd(xr, y1)), zero));
      }
    }
  }
  return r;
}

#endif

// Whether this CPU runs cost_tile_avx512 and cost_tile_avx512_f64.
inline bool avx512_tiles_available() {
#ifdef SEGTRANSFER_AVX2_TILES
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

// out[r][j] = max(0, (-2 x_r . y_j) + (xx_r + yy_j)) for r < rows and j < w; x: rows x d
// (row-major), yt: d x ld (y^T). A block of 4 rows x 16 (float) or 32 (double) columns accumulates over the
// d products (each load of y^T feeds four rows); the sum is symmetric in (x, y), so the transposed
// problem's tiles hold bit-identical values. Every product is an explicit fused multiply-add, so the
// block and the leftover entries round alike (with contraction left to the compiler, 194 of a row's
// 2,000 entries differed between a 16-row tile and the same row alone, and Newton's row and column
// sums then described different plans). Accumulating in memory instead (o[j] += x * y[j], one row
// sweep per dimension) ran at half this speed.
// The first product initialises the accumulators (fma(u, v, 0), what the leftover entries
// compute too): zeroing them first compiled to four `rep stos` per block, a quarter of the
// function's time on an AVX2 machine (a blocked N = 10^4 draw there: 35.5 -> 31 s).
// `yp` (may be null): the same columns packed for the intrinsics kernels (PointCost::pack).
template <typename T>
SEGTRANSFER_HOT void cost_tile(const T* x, int64_t rows, int64_t d, const T* yt, int64_t ld, int64_t w,
                               const T* xx, const T* yy, T* out, int64_t ldo, const T* yp = nullptr) {
  constexpr int64_t kW = std::is_same<T, float>::value ? 16 : 32;  // float: cost_tile_avx2's width too
  const int64_t wv = d > 0 ? w - w % kW : 0;
#ifdef SEGTRANSFER_AVX2_TILES
  // The intrinsics kernels, on packed groups of 16 columns: `covered`, the rows their blocks took.
  int64_t covered = -1;
  const int64_t w16 = d > 0 ? w - w % 16 : 0;
  if constexpr (std::is_same<T, double>::value) {
    if (yp != nullptr && avx512_tiles_available()) covered = cost_tile_avx512_f64(x, rows, d, yp, w16, xx, yy, out, ldo);
  } else {
    if (yp != nullptr && avx2_tiles_available())
      covered = (avx512_tiles_available() ? &cost_tile_avx512 : &cost_tile_avx2)(x, rows, d, yp, w16, xx, yy, out, ldo);
  }
  if (covered >= 0) {
    const int64_t r = covered;
    cost_tile_rest(x, r, d, yt, ld, w, xx, yy, out, ldo, r, w16);  // their rows' columns past w16
    // Rows left over from the register blocks (panels of fewer rows: the blocked solver's single
    // rows) take the portable blocks below.
    if (r < rows) cost_tile(x + r * d, rows - r, d, yt, ld, w, xx + r, yy, out + r * ldo, ldo, static_cast<const T*>(nullptr));
    return;
  }
#endif
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T* x0 = x + r * d;
    for (int64_t j0 = 0; j0 < wv; j0 += kW) {
      T a0[kW], a1[kW], a2[kW], a3[kW];
      {
        const T u0 = T(-2) * x0[0], u1 = T(-2) * x0[d], u2 = T(-2) * x0[2 * d], u3 = T(-2) * x0[3 * d];
        const T* yk = yt + j0;
#pragma omp simd
        for (int64_t j = 0; j < kW; ++j) {
          const T v = yk[j];
          a0[j] = std::fma(u0, v, T(0));
          a1[j] = std::fma(u1, v, T(0));
          a2[j] = std::fma(u2, v, T(0));
          a3[j] = std::fma(u3, v, T(0));
        }
      }
      for (int64_t k = 1; k < d; ++k) {
        const T u0 = T(-2) * x0[k], u1 = T(-2) * x0[d + k], u2 = T(-2) * x0[2 * d + k], u3 = T(-2) * x0[3 * d + k];
        const T* yk = yt + k * ld + j0;
#pragma omp simd
        for (int64_t j = 0; j < kW; ++j) {
          const T v = yk[j];
          a0[j] = std::fma(u0, v, a0[j]);
          a1[j] = std::fma(u1, v, a1[j]);
          a2[j] = std::fma(u2, v, a2[j]);
          a3[j] = std::fma(u3, v, a3[j]);
        }
      }
      const T* acc[4] = {a0, a1, a2, a3};
      for (int q = 0; q < 4; ++q) {
        T* o = out + (r + q) * ldo + j0;
        const T xr = xx[r + q];
#pragma omp simd
        for (int64_t j = 0; j < kW; ++j) {
          const T c = acc[q][j] + (xr + yy[j0 + j]);
          o[j] = c > T(0) ? c : T(0);
        }
      }
    }
  }
  cost_tile_rest(x, rows, d, yt, ld, w, xx, yy, out, ldo, r, wv);
}

// The points centred on their joint mean (which keeps the expansion's cancellation small), y
// transposed, and both sides' squared norms: any tile of the cost from them (squared_euclidean
// fills the stored matrix with it; the blocked solver recomputes its panels).
template <typename T>
struct PointCost {
  int64_t n = 0, m = 0, d = 0;
  std::vector<T> x, yt, xx, yy;
  std::vector<T> yp;  // yt's full groups of 16 columns packed for the intrinsics kernels (see pack)

  PointCost() = default;
  PointCost(const T* px, int64_t n_, const T* py, int64_t m_, int64_t d_) : n(n_), m(m_), d(d_) {
    std::vector<double> mean(d, 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < d; ++k) mean[k] += static_cast<double>(px[i * d + k]);
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < d; ++k) mean[k] += static_cast<double>(py[j * d + k]);
    for (double& v : mean) v /= static_cast<double>(n + m);
    x.resize(static_cast<size_t>(n) * d);
    yt.resize(static_cast<size_t>(m) * d);
    xx.assign(n, T(0));
    yy.assign(m, T(0));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < d; ++k) {
        const T v = static_cast<T>(static_cast<double>(px[i * d + k]) - mean[k]);
        x[i * d + k] = v;
        xx[i] += v * v;
      }
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < d; ++k) {
        const T v = static_cast<T>(static_cast<double>(py[j * d + k]) - mean[k]);
        yt[k * m + j] = v;
        yy[j] += v * v;
      }
    pack();
  }

  // yp from yt: for each full group of 16 columns, its d x 16 values contiguous, in the order the
  // register blocks read them; only where an intrinsics kernel runs (float: AVX2 or AVX-512;
  // double: AVX-512).
  void pack() {
    yp.clear();
    if (std::is_same<T, float>::value ? !avx2_tiles_available() : !avx512_tiles_available()) return;
    const int64_t groups = m / 16;
    yp.resize(static_cast<size_t>(groups) * 16 * d);
    for (int64_t gr = 0; gr < groups; ++gr)
      for (int64_t k = 0; k < d; ++k)
        for (int64_t c = 0; c < 16; ++c) yp[(gr * d + k) * 16 + c] = yt[k * m + gr * 16 + c];
  }

  // The transposed problem (y's points as rows), from the same centred values: its tiles hold
  // bit-identical costs (cost_tile is symmetric), so row and column sums describe one plan.
  static PointCost transposed(const PointCost& c) {
    PointCost t;
    t.n = c.m;
    t.m = c.n;
    t.d = c.d;
    t.x.resize(c.yt.size());
    t.yt.resize(c.x.size());
    for (int64_t j = 0; j < c.m; ++j)
      for (int64_t k = 0; k < c.d; ++k) t.x[j * c.d + k] = c.yt[k * c.m + j];
    for (int64_t i = 0; i < c.n; ++i)
      for (int64_t k = 0; k < c.d; ++k) t.yt[k * c.n + i] = c.x[i * c.d + k];
    t.xx = c.yy;
    t.yy = c.xx;
    t.pack();
    return t;
  }

  // Rows [i0, i0 + rows) x columns [j0, j0 + w) into out (leading dimension ldo).
  void tile(int64_t i0, int64_t rows, int64_t j0, int64_t w, T* out, int64_t ldo) const {
    const T* packed = !yp.empty() && j0 % 16 == 0 ? yp.data() + j0 * d : nullptr;
    cost_tile(x.data() + i0 * d, rows, d, yt.data() + j0, m, w, xx.data() + i0, yy.data() + j0, out, ldo, packed);
  }
  // Rows [i0, i1) into out ((i1 - i0) x m, row-major).
  void rows(int64_t i0, int64_t i1, T* out) const {
    for (int64_t j0 = 0; j0 < m; j0 += kCostTile) tile(i0, i1 - i0, j0, std::min(kCostTile, m - j0), out + j0, m);
  }
};

}  // namespace
}  // namespace segtransfer
