// C++ unit tests of the core, without Python: built with SEGTRANSFER_TESTS=ON (and under the
// sanitizers). Each check compares with an independent formula or a known exact answer.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "segtransfer/blocked.hpp"
#include "segtransfer/errors.hpp"
#include "segtransfer/fastexp.hpp"
#include "segtransfer/otce.hpp"
#include "segtransfer/sampling.hpp"
#include "../src/dense_newton.hpp"  // the CUDA solver's Newton driver (internal)
#include "../src/floyd_sampler.hpp"  // the draw shared with the CUDA sampler (internal)
#include "../src/kernels.hpp"  // the log-sum-exp loops themselves (internal)
#include "../src/pattern_scan.hpp"  // the truncated kernel's build (internal)
#include "../src/point_cost.hpp"  // the cost tiles (internal)
#include "../src/pool.hpp"  // the kernel storage pool (internal)

using namespace segtransfer;

static int failures = 0, passed = 0;
#define CHECK(cond)                                                         \
  do {                                                                      \
    if (cond) {                                                             \
      ++passed;                                                             \
    } else {                                                                \
      ++failures;                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                       \
  } while (0)

static void test_fast_exp() {
  for (double x = -700; x <= 0; x += 0.37) {
    const double ref = std::exp(x);
    CHECK(std::fabs(detail::fast_exp(x) - ref) <= 4e-16 * ref);
  }
  for (float x = -86.f; x <= 0.f; x += 0.013f) {
    const double ref = std::exp(static_cast<double>(x));
    CHECK(std::fabs(detail::fast_exp(x) - ref) <= 3e-7 * ref);
  }
  CHECK(detail::fast_exp(-1e4) == 0.0);
  CHECK(detail::fast_exp(-1e4f) == 0.0f);
  // The intermediate stages' exponential: its polynomial's 2.6e-6 plus float rounding (measured
  // 2.7e-6 at worst over [-80, 80] in steps of 1e-4), across the whole range down to the flush and up
  // to the clamp (a degree-4 Taylor polynomial, 5.6e-5, would fail it).
  double worst = 0.0;
  for (float x = -86.9f; x <= 88.f; x += 0.00731f) {
    const double ref = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(detail::fast_exp_lowp(x) - ref) / ref);
  }
  CHECK(worst <= 3e-6);
  CHECK(worst >= 1e-7);  // it is the cheaper polynomial, not fast_exp
  CHECK(detail::fast_exp_lowp(-1e4f) == 0.0f);
  CHECK(detail::fast_exp_lowp(1e4f) == detail::fast_exp_lowp(88.f));
}

// The cost against a direct sum of squared differences in long double, on sizes that leave
// partial register blocks and tiles (rows not a multiple of 4, columns not of 16 or 256), including
// coincident points (cost 0 up to rounding, never negative). The bound: the expansion
// |x|^2 + |y|^2 - 2 x.y of centred points loses a few ulps of |x|^2 + |y|^2 per dimension.
template <typename T>
static void check_squared_euclidean() {
  std::mt19937_64 rng(11);
  std::normal_distribution<double> z(3.0, 2.0);
  const double ulp = std::numeric_limits<T>::epsilon();
  for (int64_t d : {1, 3, 19, 40}) {
    const int64_t n = 37, m = 301;
    std::vector<T> x(n * d), y(m * d);
    for (T& v : x) v = static_cast<T>(z(rng));
    for (T& v : y) v = static_cast<T>(z(rng));
    for (int64_t k = 0; k < d; ++k) y[5 * d + k] = x[2 * d + k];  // a coincident pair
    RowMatrix<T> cost;
    const CostRange range = squared_euclidean<T>(x.data(), n, y.data(), m, d, cost);
    CHECK(cost.rows() == n && cost.cols() == m);
    // The range it reports is the matrix's, exactly (sinkhorn_log takes it instead of a scan).
    CHECK(range.valid && range.min == static_cast<double>(cost.minCoeff()) &&
          range.max == static_cast<double>(cost.maxCoeff()));
    std::vector<long double> mean(d, 0.0L);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < d; ++k) mean[k] += x[i * d + k];
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < d; ++k) mean[k] += y[j * d + k];
    for (long double& v : mean) v /= static_cast<long double>(n + m);
    double worst = 0.0;
    bool nonneg = true;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        long double ref = 0.0L, xx = 0.0L, yy = 0.0L;
        for (int64_t k = 0; k < d; ++k) {
          const long double u = x[i * d + k], v = y[j * d + k];
          ref += (u - v) * (u - v);
          xx += (u - mean[k]) * (u - mean[k]);
          yy += (v - mean[k]) * (v - mean[k]);
        }
        const double bound = 4.0 * static_cast<double>(d + 2) * ulp * static_cast<double>(xx + yy);
        worst = std::max(worst, std::fabs(static_cast<double>(cost(i, j)) - static_cast<double>(ref)) / bound);
        nonneg = nonneg && cost(i, j) >= T(0);
      }
    }
    CHECK(worst <= 1.0);
    CHECK(nonneg);
  }
}

// sinkhorn_log given the cost's range (as squared_euclidean reports it) solves exactly as it does
// when it scans the matrix for it: the same potentials to the bit. And where the points overflow
// float (|x|^2 ~ 1e40) the range squared_euclidean reports is either the matrix's or marked
// unknown, never a wrong one.
template <typename T>
static void check_cost_range_solve() {
  std::mt19937_64 rng(12);
  std::normal_distribution<double> z(0.0, 1.0);
  const int64_t n = 180, m = 150, d = 3;
  std::vector<T> x(n * d), y(m * d);
  for (T& v : x) v = static_cast<T>(z(rng));
  for (T& v : y) v = static_cast<T>(z(rng) + 0.5);
  RowMatrix<T> cost;
  const CostRange range = squared_euclidean<T>(x.data(), n, y.data(), m, d, cost);
  CHECK(range.valid);
  const std::vector<double> a(n, 1.0 / n), b(m, 1.0 / m);
  SinkhornOptions opt;
  opt.epsilon = 0.01;
  std::vector<double> f1(n), g1(m), f2(n), g2(m);
  const SinkhornReport r1 = sinkhorn_log<T>(cost, a.data(), b.data(), opt, f1.data(), g1.data());
  const SinkhornReport r2 = sinkhorn_log<T>(cost, a.data(), b.data(), opt, f2.data(), g2.data(), nullptr, nullptr, &range);
  CHECK(r1.converged && f1 == f2 && g1 == g2 && r1.iterations == r2.iterations);
  if constexpr (std::is_same_v<T, float>) {
    std::vector<T> big(x);
    for (int64_t k = 0; k < d; ++k) big[7 * d + k] = T(1e20);
    const CostRange r = squared_euclidean<T>(big.data(), n, y.data(), m, d, cost);
    bool nan = false;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) nan = nan || std::isnan(cost(i, j));
    CHECK(nan ? !r.valid : (r.valid && r.min == static_cast<double>(cost.minCoeff()) &&
                            r.max == static_cast<double>(cost.maxCoeff())));
  }
}

static void test_cost_range_solve() {
  check_cost_range_solve<float>();
  check_cost_range_solve<double>();
}

// The stored and the blocked solver rely on every cost tile being bit-identical whichever kernel
// computed it (AVX2 or AVX-512 register blocks, where this CPU has them, or the portable loop) and
// for the transposed problem: n = 39 or 40 rows (register blocks of 6, 4 and 8 rows, and leftover
// rows) x 301 columns (groups of 16 and leftover columns), D = 19 and 256, float and double.
template <typename T>
static void check_cost_tiles_identical(int64_t d, int64_t n) {
  std::mt19937 rng(11);
  std::normal_distribution<T> z(T(0), T(3));
  const int64_t m = 301;
  std::vector<T> x(n * d), y(m * d);
  for (T& v : x) v = z(rng);
  for (T& v : y) v = z(rng);
  const PointCost<T> pc(x.data(), n, y.data(), m, d);
  const PointCost<T> pt = PointCost<T>::transposed(pc);
  std::vector<T> fast(n * m), portable(n * m), trans(m * n);
  pc.rows(0, n, fast.data());
  for (int64_t j0 = 0; j0 < m; j0 += kCostTile)
    cost_tile(pc.x.data(), n, d, pc.yt.data() + j0, m, std::min(kCostTile, m - j0), pc.xx.data(), pc.yy.data() + j0,
              portable.data() + j0, m);
  pt.rows(0, m, trans.data());
  // The chain every form computes, one entry at a time: fma(-2 x_k, y_k, .) from 0 over k, then the
  // norms, clamped at 0. A single row goes through the leftover loop alone.
  std::vector<T> one(m);
  pc.rows(n - 1, n, one.data());
  bool same = true;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      T acc = T(0);
      for (int64_t k = 0; k < d; ++k) acc = std::fma(T(-2) * pc.x[i * d + k], pc.yt[k * m + j], acc);
      const T c = acc + (pc.xx[i] + pc.yy[j]);
      const T naive = c > T(0) ? c : T(0);
      same = same && fast[i * m + j] == naive && portable[i * m + j] == naive && trans[j * n + i] == naive &&
             (i != n - 1 || one[j] == naive);
    }
  CHECK(same);
#ifdef SEGTRANSFER_AVX2_TILES
  // Each intrinsics form this CPU can run, whichever `fast` took (AVX-512 where there is AVX-512).
  if (!pc.yp.empty()) {
    using Tile = int64_t (*)(const T*, int64_t, int64_t, const T*, int64_t, const T*, const T*, T*, int64_t);
    std::vector<Tile> forms;
    if constexpr (std::is_same<T, float>::value) {
      forms.push_back(&cost_tile_avx2);
      if (avx512_tiles_available()) forms.push_back(&cost_tile_avx512);
    } else {
      forms.push_back(&cost_tile_avx512_f64);  // (packed for double only where AVX-512 runs)
    }
    for (Tile form : forms) {
      std::vector<T> out(n * m);
      const int64_t wv = m - m % 16;
      const int64_t r = form(pc.x.data(), n, d, pc.yp.data(), wv, pc.xx.data(), pc.yy.data(), out.data(), m);
      cost_tile_rest(pc.x.data(), n, d, pc.yt.data(), m, m, pc.xx.data(), pc.yy.data(), out.data(), m, r, wv);
      CHECK(r > 0);
      CHECK(out == portable);
    }
  }
#endif
}

static void test_squared_euclidean() {
  check_squared_euclidean<float>();
  check_squared_euclidean<double>();
  for (const int64_t d : {19, 256})
    for (const int64_t n : {39, 40}) {
      check_cost_tiles_identical<float>(d, n);
      check_cost_tiles_identical<double>(d, n);
    }
}

#ifdef SEGTRANSFER_AVX2_LSE
// fast_pow2_8 against exp2 (in double) of its float argument, lane by lane: the polynomial's bound
// (fast_exp_lowp's, 3e-6), zero below 2^-125.5 and for NaN and -inf, 2^127 from 127 up (+inf
// included); and fast_exp8 (fast_exp's degree-7 polynomial) against std::exp: a few float ulp.
__attribute__((target("avx2,fma"))) static void check_fast_exp8() {
  for (float x0 = -130.f; x0 <= 128.f; x0 += 8 * 0.0131f) {
    alignas(32) float x[8], e[8];
    for (int l = 0; l < 8; ++l) x[l] = x0 + l * 0.0131f;
    _mm256_store_ps(e, fast_pow2_8(_mm256_load_ps(x)));
    for (int l = 0; l < 8; ++l) {
      const double ref = x[l] < -125.5f ? 0.0 : std::exp2(std::min(127.0, static_cast<double>(x[l])));  // clamped
      CHECK(std::fabs(e[l] - ref) <= 3e-6 * ref);
    }
  }
  alignas(32) float x[8], e[8];
  const float special[4] = {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::infinity(), -1e30f};
  for (int l = 0; l < 8; ++l) x[l] = special[l % 4];
  _mm256_store_ps(e, fast_pow2_8(_mm256_load_ps(x)));
  for (int l = 0; l < 8; ++l)
    CHECK(l % 4 == 2 ? std::fabs(e[l] - std::exp2(127.0)) <= 3e-6 * std::exp2(127.0) : e[l] == 0.0f);
  for (float x0 = -90.f; x0 <= 88.f; x0 += 8 * 0.0131f) {
    for (int l = 0; l < 8; ++l) x[l] = x0 + l * 0.0131f;
    _mm256_store_ps(e, fast_exp8(_mm256_load_ps(x)));
    for (int l = 0; l < 8; ++l) {
      const double ref = x[l] < -87.f ? 0.0 : std::exp(std::min(88.0, static_cast<double>(x[l])));
      CHECK(std::fabs(e[l] - ref) <= 5e-7 * ref);
    }
  }
}
#endif

#ifdef SEGTRANSFER_AVX512_LSE
// fast_exp16 against std::exp lane by lane, as check_fast_exp8, but not clamped at 88 (it scales
// by vscalefps): e^x up to the largest float, +inf beyond, 0 below e^-87 and for NaN.
SEGTRANSFER_AVX512_TARGET static void check_fast_exp16() {
  for (float x0 = -90.f; x0 <= 88.f; x0 += 16 * 0.0131f) {
    alignas(64) float x[16], e[16];
    for (int l = 0; l < 16; ++l) x[l] = x0 + l * 0.0131f;
    _mm512_store_ps(e, fast_exp16(_mm512_load_ps(x)));
    for (int l = 0; l < 16; ++l) {
      const double ref = x[l] < -87.f ? 0.0 : std::exp(static_cast<double>(x[l]));
      CHECK(std::fabs(e[l] - ref) <= 3e-6 * ref);
    }
  }
  alignas(64) float x[16], e[16];
  const float special[6] = {88.7f, 89.f, 100.f, 1e30f, -1e30f, std::numeric_limits<float>::quiet_NaN()};
  for (int l = 0; l < 16; ++l) x[l] = special[l % 6];
  _mm512_store_ps(e, fast_exp16(_mm512_load_ps(x)));
  for (int l = 0; l < 16; ++l) {
    if (l % 6 == 0) CHECK(std::fabs(e[l] - std::exp(88.7)) <= 3e-6 * std::exp(88.7));
    if (l % 6 >= 1 && l % 6 <= 3) CHECK(std::isinf(e[l]) && e[l] > 0);
    if (l % 6 >= 4) CHECK(e[l] == 0.0f);
  }
  // Bit-identical, wherever e^x is a normal float, to the form it replaced (fast_exp_lowp's
  // operations as fused multiply-adds, the scale built in the exponent bits), written here with
  // std::fma: fast_exp_lowp itself rounds differently where the compiler does not contract it.
  const auto reference = [](float v) {
    const float ns = std::fma(v, 1.44269504088896341f, 12582912.0f);
    const float n = ns - 12582912.0f;
    float r = std::fma(-n, 0.693145751953125f, v);
    r = std::fma(-n, 1.42860682030941723212e-6f, r);
    float q = detail::kExpLowpPoly[0];
    for (int k = 1; k < 5; ++k) q = std::fma(q, r, detail::kExpLowpPoly[k]);
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return q * scale;
  };
  for (float x0 = -87.f; x0 <= 88.f; x0 += 16 * 0.0037f) {
    for (int l = 0; l < 16; ++l) x[l] = x0 + l * 0.0037f;
    _mm512_store_ps(e, fast_exp16(_mm512_load_ps(x)));
    for (int l = 0; l < 16; ++l) CHECK(e[l] == reference(x[l]) || x[l] > 88.f);
  }
}
#endif

// The float-exponent sums of the intermediate stages (RowLse::sum_lowp, ColLse::sum_row_lowp) --
// the path this CPU takes, and every other one it can run: the AVX-512 and AVX2 intrinsics
// (lse_avx512.hpp, lse_avx2.hpp) and the compiler's clones -- against sums of std::exp in double, on dense and sparse rows whose lengths leave partial vectors
// and 256-entry blocks, with entries flushed below e^-87. Bound: the exponent is formed in float
// (|A|, |c / eps| <= ~60: 60 * 2^-24 = 4e-6 absolute, the same relative on each term; the AVX2 loops'
// base-2 exponent, scaled by log2 e, rounds ~3 times on values of <= 90: ~1e-5 at worst), fast_exp_lowp's
// 3e-6 and float partial sums of <= 256 terms (256 * 6e-8 = 1.5e-5 at worst, ~1e-6 typically):
// 3e-5 relative. An overflowing row must come out infinite (the callers then take the exact path).
static void test_lse_kernels() {
#ifdef SEGTRANSFER_AVX2_LSE
  if (cpu_has_avx2_fma()) check_fast_exp8();
#endif
#ifdef SEGTRANSFER_AVX512_LSE
  if (avx512_lse_available()) check_fast_exp16();
#endif
  // Every form of the row sum this CPU can run (cols null: a dense row), and of the column row update.
  using RowSum = double (*)(const float*, const int32_t*, int64_t, const float*, float, float);
  using ColRow = void (*)(const float*, int64_t, float, float, const float*, float*);
  using ColScatter = void (*)(const float*, const int32_t*, int64_t, float, float, const float*, float*);
  std::vector<RowSum> row_sums{&RowLse<float>::sum_lowp, &RowLse<float>::sum_lowp_clones};
  std::vector<ColRow> col_rows{&ColLse<float>::sum_row_lowp, &ColLse<float>::sum_row_lowp_clones};
  std::vector<ColScatter> col_scatters{&ColLse<float>::sum_sparse_row_lowp};
#ifdef SEGTRANSFER_AVX2_LSE
  if (cpu_has_avx2_fma()) {
    row_sums.push_back([](const float* c, const int32_t* q, int64_t len, const float* A, float ie, float sh) {
      return q ? lse_sum_avx2<true>(c, q, len, A, ie, sh) : lse_sum_avx2<false>(c, q, len, A, ie, sh);
    });
    col_rows.push_back(&col_lse_row_avx2);
  }
#endif
#ifdef SEGTRANSFER_AVX512_LSE
  if (avx512_lse_available()) {
    row_sums.push_back([](const float* c, const int32_t* q, int64_t len, const float* A, float ie, float sh) {
      return q ? lse_sum_avx512<true>(c, q, len, A, ie, sh) : lse_sum_avx512<false>(c, q, len, A, ie, sh);
    });
    col_rows.push_back(&col_lse_row_avx512);
  }
#endif
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> uc(0.f, 60.f), ua(-5.f, 5.f);
  const int64_t m = 4000;
  std::vector<float> A(m);
  for (float& v : A) v = ua(rng);
  const float inv_eps = 0.9f, shift = -20.f;  // exponents in about [-59, 25]; some below -87 when c is large
  for (int64_t len : {0, 1, 7, 8, 15, 16, 17, 255, 256, 257, 1000, 3001}) {
    std::vector<float> c(len);
    std::vector<int32_t> cols(len);
    for (int64_t k = 0; k < len; ++k) {
      c[k] = uc(rng) * (k % 5 == 0 ? 2.5f : 1.0f);  // every fifth far out: flushed or tiny
      cols[k] = static_cast<int32_t>((k * 7919) % m);
    }
    for (bool sparse : {false, true}) {
      double ref = 0.0;
      for (int64_t k = 0; k < len; ++k) {
        const double x = static_cast<double>(A[sparse ? cols[k] : k]) - static_cast<double>(c[k]) * inv_eps - shift;
        if (x >= -87.0) ref += std::exp(x);
      }
      for (RowSum sum : row_sums) {
        const double got = sum(c.data(), sparse ? cols.data() : nullptr, len, A.data(), inv_eps, shift);
        CHECK(std::fabs(got - ref) <= 3e-5 * ref);
      }
      // The exact stages' form (exponent in double, rounded to float, fast_exp(float)): the rounding
      // of an exponent up to ~60 puts 60 * 2^-24 ~ 4e-6 relative on a term; bound 1e-5. Each form
      // this CPU runs (the dispatching sum, the compiler's clones, the AVX2 loop).
      std::vector<double> Ad(A.begin(), A.end());
      const double ie = inv_eps, sh = shift;
      std::vector<double> exact{RowLse<float>::sum(c.data(), sparse ? cols.data() : nullptr, len, Ad.data(), ie, sh),
                                RowLse<float>::sum_clones(c.data(), sparse ? cols.data() : nullptr, len, Ad.data(), ie, sh)};
#ifdef SEGTRANSFER_AVX2_LSE
      if (cpu_has_avx2_fma())
        exact.push_back(sparse ? lse_sum_avx2<true, false, double>(c.data(), cols.data(), len, Ad.data(), ie, sh)
                               : lse_sum_avx2<false, false, double>(c.data(), nullptr, len, Ad.data(), ie, sh));
#endif
      for (double got : exact) CHECK(std::fabs(got - ref) <= 1e-5 * ref);
    }
    // Column form: part[j] += exp(Ai - c[j] * inv_eps - mx[j]) on a row of length len.
    std::vector<float> mx(len), before(len);
    for (int64_t j = 0; j < len; ++j) {
      mx[j] = ua(rng) - 20.f;
      before[j] = static_cast<float>(j % 3);
    }
    const float Ai = 1.5f;
    for (ColRow row : col_rows) {
      std::vector<float> part = before;
      row(c.data(), len, Ai, inv_eps, mx.data(), part.data());
      for (int64_t j = 0; j < len; ++j) {
        const double x = double(Ai) - double(c[j]) * inv_eps - double(mx[j]);
        const double ref = before[j] + (x >= -87.0 ? std::exp(x) : 0.0);
        CHECK(std::fabs(part[j] - ref) <= 3e-5 * ref + 1e-30);
      }
    }
    // Sparse column form: part[cols[k]] += exp(Ai - c[k] * inv_eps - mx[cols[k]]) over a row whose
    // columns are distinct (ascending, as a pattern's); the other slots stay as they were.
    std::vector<int32_t> asc(len);
    for (int64_t k = 0; k < len; ++k) asc[k] = static_cast<int32_t>(2 * k + (k % 3 == 0));
    const int64_t width = len > 0 ? asc[len - 1] + 1 : 1;
    std::vector<float> wide_mx(width), wide_before(width);
    for (int64_t j = 0; j < width; ++j) {
      wide_mx[j] = ua(rng) - 20.f;
      wide_before[j] = static_cast<float>(j % 4);
    }
    for (ColScatter scatter : col_scatters) {
      std::vector<float> part = wide_before;
      scatter(c.data(), asc.data(), len, Ai, inv_eps, wide_mx.data(), part.data());
      std::vector<double> ref(wide_before.begin(), wide_before.end());
      for (int64_t k = 0; k < len; ++k) {
        const double x = double(Ai) - double(c[k]) * inv_eps - double(wide_mx[asc[k]]);
        if (x >= -87.0) ref[asc[k]] += std::exp(x);
      }
      bool close = true;
      for (int64_t j = 0; j < width; ++j) close = close && std::fabs(part[j] - ref[j]) <= 3e-5 * ref[j] + 1e-30;
      CHECK(close);
    }
    // KeptTerms: its sum is sum_lowp's to the bit, its terms are that sum's, and add_scaled adds
    // r times them to their columns.
    if (KeptTerms::available()) {
      std::vector<float> terms(len + 1, -7.f);
      const double kept = KeptTerms::sum(c.data(), cols.data(), len, A.data(), inv_eps, shift, terms.data());
      CHECK(kept == RowLse<float>::sum_lowp(c.data(), cols.data(), len, A.data(), inv_eps, shift));
      bool same = terms[len] == -7.f;  // nothing past the row
      double total = 0.0;
      for (int64_t k = 0; k < len; ++k) {
        const double x = static_cast<double>(A[cols[k]]) - static_cast<double>(c[k]) * inv_eps - shift;
        same = same && std::fabs(terms[k] - (x >= -87.0 ? std::exp(x) : 0.0)) <= 3e-5 * std::exp(x) + 1e-30;
        total += terms[k];
      }
      CHECK(same);
      CHECK(std::fabs(total - kept) <= 1e-6 * kept);
      std::vector<float> part = wide_before;
      KeptTerms::add_scaled(terms.data(), asc.data(), len, 0.25f, part.data());
      std::vector<double> ref(wide_before.begin(), wide_before.end());
      for (int64_t k = 0; k < len; ++k) ref[asc[k]] += 0.25 * terms[k];
      bool close = true;
      for (int64_t j = 0; j < width; ++j) close = close && std::fabs(part[j] - ref[j]) <= 1e-6 * ref[j] + 1e-30;
      CHECK(close);
      // A dense row (cols null): the same, its terms in column order.
      std::fill(terms.begin(), terms.end(), -7.f);
      const double dense = KeptTerms::sum(c.data(), nullptr, len, A.data(), inv_eps, shift, terms.data());
      CHECK(dense == RowLse<float>::sum_lowp(c.data(), nullptr, len, A.data(), inv_eps, shift));
      bool dense_same = terms[len] == -7.f;
      for (int64_t k = 0; k < len; ++k) {
        const double x = static_cast<double>(A[k]) - static_cast<double>(c[k]) * inv_eps - shift;
        dense_same = dense_same && std::fabs(terms[k] - (x >= -87.0 ? std::exp(x) : 0.0)) <= 3e-5 * std::exp(x) + 1e-30;
      }
      CHECK(dense_same);
    }
  }
  // Overflow: terms clamped at e^88 (~1.7e38) sum past FLT_MAX to inf, never to a finite wrong value.
  std::vector<float> c(40, 0.f);
  std::vector<float> big(m, 150.f);
  std::vector<int32_t> cols(40);
  for (int k = 0; k < 40; ++k) cols[k] = 3 * k;
  for (RowSum sum : row_sums) {
    CHECK(std::isinf(sum(c.data(), nullptr, 40, big.data(), 1.f, 0.f)));
    CHECK(std::isinf(sum(c.data(), cols.data(), 40, big.data(), 1.f, 0.f)));
  }
}

// The pattern scan's fill in AVX-512 and AVX2 (dense_fill_avx512, dense_fill_avx2; each where this
// CPU runs it) against the plain test c - p < th in float: the same columns and values in order,
// nothing written past the k asked for, and the count returned, on row lengths that leave partial
// vectors, thresholds from none to all kept, and k at, below and above (m: every kept entry, as the
// one-pass build asks) the row's count. `scratch` (AVX2): the slots after the kept entries may be
// written, up to the k asked for.
using DenseFill = int64_t (*)(const float*, int64_t, const float*, float, int64_t, int32_t*, float*);
static void check_dense_fill(DenseFill fill, bool scratch) {
  std::mt19937_64 rng(29);
  std::uniform_real_distribution<float> uv(0.f, 10.f);
  for (int64_t m : {1, 7, 8, 9, 15, 16, 17, 100, 1000}) {
    std::vector<float> c(m), p(m);
    for (int64_t j = 0; j < m; ++j) {
      c[j] = uv(rng);
      p[j] = uv(rng) - 5.f;
    }
    for (float th : {-100.f, 0.f, 3.f, 8.f, 100.f}) {
      std::vector<int32_t> want_col;
      std::vector<float> want_val;
      for (int64_t j = 0; j < m; ++j)
        if (c[j] - p[j] < th) {
          want_col.push_back(static_cast<int32_t>(j));
          want_val.push_back(c[j]);
        }
      const int64_t kept = static_cast<int64_t>(want_col.size());
      for (int64_t limit : {kept, kept / 2, m}) {  // m: as many as the row keeps (the one-pass build)
        const int64_t k = std::min(limit, kept);
        std::vector<int32_t> oc(k + 20, -5);
        std::vector<float> ov(k + 20, -5.f);
        CHECK(fill(c.data(), m, p.data(), th, limit, oc.data(), ov.data()) == k);
        bool same = true;
        for (int64_t q = 0; q < k; ++q) same = same && oc[q] == want_col[q] && ov[q] == want_val[q];
        for (int64_t q = scratch ? std::min(limit, k + 20) : k; q < k + 20; ++q) same = same && oc[q] == -5 && ov[q] == -5.f;
        CHECK(same);
      }
    }
  }
}

static void test_dense_fill() {
#ifdef SEGTRANSFER_AVX512_LSE
  if (avx512_lse_available()) check_dense_fill(dense_fill_avx512, false);
  if (cpu_has_avx2_fma()) check_dense_fill(dense_fill_avx2, true);
#endif
}

// The pattern filters' row loop in AVX-512 and AVX2 (keep_below_avx512, keep_below_avx2; each where
// this CPU runs it) against the plain test (double)val - p_col[col] < th: the same count, the same
// entries in order, nothing written past them (stop = the count), also in place (out = the row
// itself, stop = its length), on lengths that leave partial groups and prefetch blocks of 256,
// densities from none to all kept.
template <typename Count, typename Move>
static void check_keep_below(Count count, Move move) {
  std::mt19937_64 rng(37);
  std::uniform_real_distribution<float> uv(0.f, 10.f);
  std::uniform_real_distribution<double> up(-5.0, 5.0);
  const int64_t width = 3000;
  std::vector<double> p_col(width);
  for (double& v : p_col) v = up(rng);
  for (int64_t len : {0, 1, 3, 4, 5, 7, 8, 9, 255, 256, 257, 999}) {
    std::vector<float> val(len);
    std::vector<int32_t> col(len);
    for (int64_t k = 0; k < len; ++k) {
      val[k] = uv(rng);
      col[k] = static_cast<int32_t>(3 * k + (k % 2));
    }
    for (double th : {-100.0, 0.0, 5.0, 12.0, 100.0}) {
      std::vector<float> want_val;
      std::vector<int32_t> want_col;
      for (int64_t k = 0; k < len; ++k)
        if (static_cast<double>(val[k]) - p_col[col[k]] < th) {
          want_val.push_back(val[k]);
          want_col.push_back(col[k]);
        }
      const int64_t kept = static_cast<int64_t>(want_val.size());
      CHECK(count(val.data(), col.data(), len, p_col.data(), th) == kept);
      std::vector<float> out_val(kept + 20, -5.f);
      std::vector<int32_t> out_col(kept + 20, -5);
      CHECK(move(val.data(), col.data(), len, p_col.data(), th, kept, out_col.data(), out_val.data()) == kept);
      bool same = true;
      for (int64_t q = 0; q < kept; ++q) same = same && out_val[q] == want_val[q] && out_col[q] == want_col[q];
      for (int64_t q = kept; q < kept + 20; ++q) same = same && out_val[q] == -5.f && out_col[q] == -5;
      // In place: the kept entries at the row's front, the rest of the row as it was.
      std::vector<float> v2 = val;
      std::vector<int32_t> c2 = col;
      CHECK(move(v2.data(), c2.data(), len, p_col.data(), th, len, c2.data(), v2.data()) == kept);
      for (int64_t q = 0; q < kept; ++q) same = same && v2[q] == want_val[q] && c2[q] == want_col[q];
      CHECK(same);
    }
  }
}

static void test_keep_below() {
#ifdef SEGTRANSFER_AVX512_LSE
  if (avx512_lse_available())
    check_keep_below(
        [](const float* v, const int32_t* c, int64_t len, const double* p, double th) {
          return keep_below_avx512<false>(v, c, len, p, th, nullptr, nullptr);
        },
        [](const float* v, const int32_t* c, int64_t len, const double* p, double th, int64_t, int32_t* oc,
           float* ov) { return keep_below_avx512<true>(v, c, len, p, th, oc, ov); });
  if (cpu_has_avx2_fma())
    check_keep_below(
        [](const float* v, const int32_t* c, int64_t len, const double* p, double th) {
          return keep_below_avx2<false>(v, c, len, p, th, 0, nullptr, nullptr);
        },
        keep_below_avx2<true>);
#endif
}

// BlockIndex (build_block_index, AVX2 and plain row fills, one and two threads) against the blocks
// read off each row's columns; then, where fused_iteration runs through it
// (KeptTerms::blocks_available()), sum_blocks and add_scaled_blocks against the CSR row's sum and
// add_scaled: the same sum, terms and column sums to the bit (the same operations on the same
// values: only how the potentials are gathered and the terms scattered differs). Rows from empty
// to full, with runs and single entries, lengths that leave partial vectors, and column counts
// that are and are not multiples of 8.
static void test_block_index() {
  struct Rows {
    std::vector<int64_t> ptr{0};
    std::vector<int32_t> col;
    std::vector<float> val;
  };
  std::mt19937_64 rng(31);
  std::uniform_real_distribution<float> uc(0.f, 30.f);
  for (int64_t m : {5, 37, 64, 1003}) {
    Rows R;
    std::vector<char> on(m);
    for (double density : {0.0, 0.02, 0.3, 0.8, 1.0}) {
      for (int rep = 0; rep < 4; ++rep) {
        // Runs of random length at random starts, up to the density asked for.
        std::fill(on.begin(), on.end(), 0);
        std::uniform_int_distribution<int64_t> start(0, m - 1), run(1, 20);
        for (int64_t placed = 0; placed < density * m;) {
          const int64_t s0 = start(rng), r = run(rng);
          for (int64_t j = s0; j < std::min(m, s0 + r); ++j) placed += !on[j], on[j] = 1;
        }
        if (rep == 3 && m > 8) on[m - 1] = 1;  // the last column: a block the padding completes
        for (int64_t j = 0; j < m; ++j)
          if (on[j]) R.col.push_back(static_cast<int32_t>(j)), R.val.push_back(uc(rng));
        R.ptr.push_back(static_cast<int64_t>(R.col.size()));
      }
    }
    const int64_t n = static_cast<int64_t>(R.ptr.size()) - 1;
    // The blocks of each row, read off its columns.
    std::vector<std::vector<std::pair<int32_t, unsigned>>> want(n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = R.ptr[i]; k < R.ptr[i + 1]; ++k) {
        const int32_t first = R.col[k] / 8 * 8;
        if (want[i].empty() || want[i].back().first != first) want[i].push_back({first, 0u});
        want[i].back().second |= 1u << (R.col[k] - first);
      }
    for (bool vectors : {true, false})
      for (int nt : {1, 2}) {
        BlockIndex B;
        build_block_index(R, m, nt, B, vectors);
        bool same = static_cast<int64_t>(B.ptr.size()) == n + 1 && B.ptr[0] == 0;
        for (int64_t i = 0; same && i < n; ++i) {
          same = B.ptr[i + 1] - B.ptr[i] == static_cast<int64_t>(want[i].size());
          for (size_t q = 0; same && q < want[i].size(); ++q)
            same = B.col[B.ptr[i] + q] == want[i][q].first && B.mask[B.ptr[i] + q] == want[i][q].second;
        }
        CHECK(same);
      }
#ifdef SEGTRANSFER_AVX512_LSE
    if (!KeptTerms::blocks_available()) continue;
    BlockIndex B;
    build_block_index(R, m, 2, B);
    const int64_t m_pad = (m + 7) / 8 * 8;
    std::vector<float> A(m_pad, 0.f);
    std::uniform_real_distribution<float> ua(-3.f, 3.f);
    for (int64_t j = 0; j < m; ++j) A[j] = ua(rng);
    std::vector<float> part_csr(m_pad, 0.5f), part_blk(m_pad, 0.5f);
    bool same = true;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k0 = R.ptr[i], len = R.ptr[i + 1] - k0, b0 = B.ptr[i], nb = B.ptr[i + 1] - b0;
      std::vector<float> t_csr(len + 8, -7.f), t_blk(len + 8, -7.f), gathered(len + 8);
      const double s_csr = KeptTerms::sum(R.val.data() + k0, R.col.data() + k0, len, A.data(), 0.7f, 1.5f, t_csr.data());
      const double s_blk = KeptTerms::sum_blocks(R.val.data() + k0, len, B.col.data() + b0, B.mask.data() + b0, nb,
                                                 A.data(), 0.7f, 1.5f, t_blk.data(), gathered.data());
      same = same && s_csr == s_blk;
      for (int64_t k = 0; k < len; ++k) same = same && t_csr[k] == t_blk[k];
      const float r = 0.25f + 0.01f * static_cast<float>(i % 7);
      KeptTerms::add_scaled(t_csr.data(), R.col.data() + k0, len, r, part_csr.data());
      KeptTerms::add_scaled_blocks(t_blk.data(), B.col.data() + b0, B.mask.data() + b0, nb, r, part_blk.data());
    }
    for (int64_t j = 0; j < m; ++j) same = same && part_csr[j] == part_blk[j];
    for (int64_t j = m; j < m_pad; ++j) same = same && part_blk[j] == 0.5f;  // the padding gains nothing
    CHECK(same);
#endif
  }
}

// The blocked solver's capture filter in AVX-512 (capture_keep_avx512) against the plain one with the
// same fused multiply-add: the same columns in order, nothing written past them, on widths that
// leave partial groups of 8 and thresholds from none to all kept.
static void test_capture_keep() {
#ifdef SEGTRANSFER_AVX512_LSE
  if (!avx512_lse_available()) return;
  std::mt19937_64 rng(37);
  std::uniform_real_distribution<float> uc(0.f, 80.f);
  std::uniform_real_distribution<double> uG(-3.0, 3.0);
  const double inv_eps = 9.5;
  bool same = true;
  int64_t kept_total = 0, seen = 0;
  for (int64_t m : {0, 1, 7, 8, 9, 255, 256, 1001}) {
    std::vector<float> c(m);
    std::vector<double> G(m);
    for (int64_t j = 0; j < m; ++j) c[j] = uc(rng), G[j] = uG(rng);
    for (double th : {-1e9, -400.0, -200.0, -20.0, 10.0}) {
      std::vector<int32_t> want;
      for (int64_t j = 0; j < m; ++j)
        if (std::fma(-static_cast<double>(c[j]), inv_eps, G[j]) > th) want.push_back(static_cast<int32_t>(j));
      std::vector<int32_t> got(m + 16, -5);
      const int64_t k = capture_keep_avx512(c.data(), m, G.data(), inv_eps, th, got.data());
      same = same && k == static_cast<int64_t>(want.size());
      for (int64_t q = 0; q < k && same; ++q) same = got[q] == want[q];
      for (int64_t q = k; q < m + 16; ++q) same = same && got[q] == -5;
      kept_total += k;
      seen += m;
    }
  }
  CHECK(same);
  CHECK(kept_total > 0 && kept_total < seen);  // the thresholds kept some and dropped some
#endif
}

// Newton's operator count and compaction in AVX-512 (count_above_avx512, compact_above_avx512)
// and AVX2 (compact_above_avx2, given the row's count as its room), each where this CPU runs it,
// against the plain filter: the same count, the same entries in order, nothing written past them,
// on lengths that leave partial vectors and densities from none to all kept.
static void test_compact_above() {
#ifdef SEGTRANSFER_AVX512_LSE
  const bool avx512 = avx512_lse_available(), avx2 = cpu_has_avx2_fma();
  if (!avx512 && !avx2) return;
  std::mt19937_64 rng(23);
  std::uniform_real_distribution<float> uv(0.f, 1.f);
  for (int64_t len : {0, 1, 15, 16, 17, 33, 1000}) {
    std::vector<float> val(len);
    std::vector<int32_t> col(len);
    for (int64_t k = 0; k < len; ++k) {
      val[k] = uv(rng);
      col[k] = static_cast<int32_t>(3 * k + 1);
    }
    for (float floor : {-1.f, 0.1f, 0.5f, 0.97f, 2.f}) {
      std::vector<float> want_val;
      std::vector<int32_t> want_col;
      for (int64_t k = 0; k < len; ++k)
        if (val[k] > floor) {
          want_val.push_back(val[k]);
          want_col.push_back(col[k]);
        }
      const int64_t kept = static_cast<int64_t>(want_val.size());
      for (int form = 0; form < 2; ++form) {
        if (form == 0 ? !avx512 : !avx2) continue;
        std::vector<float> out_val(kept + 20, -5.f);
        std::vector<int32_t> out_col(kept + 20, -5);
        if (form == 0) {
          CHECK(compact_above_avx512(val.data(), col.data(), len, floor, out_col.data(), out_val.data()) == kept);
          CHECK(count_above_avx512(val.data(), len, floor) == kept);
        } else {
          CHECK(compact_above_avx2(val.data(), col.data(), len, floor, kept, out_col.data(), out_val.data()) == kept);
        }
        bool same = true;
        for (int64_t q = 0; q < kept; ++q) same = same && out_val[q] == want_val[q] && out_col[q] == want_col[q];
        for (int64_t q = kept; q < kept + 20; ++q) same = same && out_val[q] == -5.f && out_col[q] == -5;
        CHECK(same);
      }
    }
  }
#endif
}

// balance_classes' segment sums in AVX2 (group_sums_avx2, where this CPU runs it) against a plain
// loop: the same runs (group and order) and their sums in double within float's rounding of a sum
// of that length (positive terms), on rows whose lengths leave partial vectors, with groups of 1
// column to many vectors' worth, runs cut at every lane position, and empty groups in between.
static void test_group_sums() {
#ifdef SEGTRANSFER_AVX2_LSE
  if (!cpu_has_avx2_fma()) return;
  std::mt19937_64 rng(29);
  std::uniform_real_distribution<float> uv(0.f, 1.f);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t m = 1 + static_cast<int64_t>(rng() % 3000);
    std::vector<int64_t> start{0};  // group boundaries: widths 1 .. 60
    while (start.back() < m) start.push_back(std::min<int64_t>(m, start.back() + 1 + static_cast<int64_t>(rng() % 60)));
    std::vector<int32_t> group(m);
    for (size_t d = 0; d + 1 < start.size(); ++d)
      for (int64_t j = start[d]; j < start[d + 1]; ++j) group[j] = static_cast<int32_t>(d);
    const double keep = trial % 3 == 0 ? 1.0 : (trial % 3 == 1 ? 0.5 : 0.05);
    std::vector<int32_t> cols;
    for (int64_t j = 0; j < m; ++j)
      if (uv(rng) < keep) cols.push_back(static_cast<int32_t>(j));
    const int64_t len = static_cast<int64_t>(cols.size());
    std::vector<float> terms(len);
    for (auto& t : terms) t = uv(rng) * (uv(rng) < 0.1f ? 1e-20f : 1.f);
    std::vector<std::pair<int, double>> want, got;
    std::vector<int64_t> run_len;
    for (int64_t k = 0; k < len; ++k) {
      if (k == 0 || group[cols[k]] != group[cols[k - 1]]) {
        want.emplace_back(group[cols[k]], 0.0);
        run_len.push_back(0);
      }
      want.back().second += static_cast<double>(terms[k]);
      ++run_len.back();
    }
    group_sums_avx2(cols.data(), terms.data(), len, group.data(), start.data(),
                    [&](int d, double sum) { got.emplace_back(d, sum); });
    CHECK(got.size() == want.size());
    bool same = got.size() == want.size();
    for (size_t r = 0; same && r < want.size(); ++r)
      same = got[r].first == want[r].first &&
             std::fabs(got[r].second - want[r].second) <= 6e-8 * static_cast<double>(run_len[r] + 8) * want[r].second;
    CHECK(same);
  }
#endif
}

// Newton's plan rows in AVX-512 and AVX2 (plan_row_avx512, plan_row_avx2; each where this CPU runs
// it) against std::exp in double: each value (rounded to float), the column sums accumulated over
// several rows, and the row sums, on lengths that leave partial groups of 8 (4) and prefetch blocks
// of 256, with exponents from below the flush (-708) to a little above 0. Bound: fast_exp's 4e-16 relative (test_fast_exp) plus the roundings of forming
// the exponent (|x| <= 800: 800 * 2^-53 ~ 1e-13 absolute in x, the same relative on the value) and
// of adding <= ~1000 positive terms in double (1e-13): 4e-13 relative on every sum. Entries below
// e^-708 must come out 0 exactly.
using PlanRowFill = double (*)(const float*, const int32_t*, int64_t, double, const double*, double, float*, double*);
static void check_plan_rows(PlanRowFill plan_row) {
  std::mt19937_64 rng(29);
  const int64_t m = 1500;
  std::uniform_real_distribution<double> uB(-3.0, 3.0);
  std::uniform_real_distribution<float> uc(0.f, 80.f);
  std::vector<double> B(m);
  for (double& v : B) v = uB(rng);
  const double inv_eps = 9.5;  // c * inv_eps reaches 760: some entries below the flush
  std::vector<double> col_part(m, 0.0), want_col(m, 0.0);
  bool values_ok = true, sums_ok = true, flushed_ok = true;
  int64_t flushed = 0;
  for (int64_t len : {0, 1, 7, 8, 9, 255, 256, 257, 600, 1000}) {
    std::vector<int32_t> cols(m);
    for (int64_t j = 0; j < m; ++j) cols[j] = static_cast<int32_t>(j);
    std::shuffle(cols.begin(), cols.end(), rng);
    cols.resize(len);  // distinct columns, in no particular order
    std::vector<float> c(len), out(len + 8, -7.f);
    for (float& v : c) v = uc(rng);
    const double base = uB(rng);
    double want = 0.0;
    for (int64_t k = 0; k < len; ++k) {
      const double x = base + B[cols[k]] - static_cast<double>(c[k]) * inv_eps;
      const double e = x < -708.0 ? 0.0 : std::exp(x);
      want += e;
      want_col[cols[k]] += e;
    }
    const double got = plan_row(c.data(), cols.data(), len, base, B.data(), inv_eps, out.data(), col_part.data());
    sums_ok = sums_ok && std::fabs(got - want) <= 4e-13 * want;
    for (int64_t k = 0; k < len; ++k) {
      const double x = base + B[cols[k]] - static_cast<double>(c[k]) * inv_eps;
      if (x < -708.5) {
        ++flushed;
        flushed_ok = flushed_ok && out[k] == 0.0f;
      } else if (x > -708.0) {
        const float ref = static_cast<float>(std::exp(x));
        // float rounding of a value within 4e-13 of e^x: the nearest float, or its neighbour
        // where e^x sits within 4e-13 of a rounding boundary.
        values_ok = values_ok && (out[k] == ref || std::fabs(out[k] - ref) <= 1.2e-7 * ref);
      }
    }
    for (int64_t k = len; k < len + 8; ++k) values_ok = values_ok && out[k] == -7.f;  // nothing past the row
  }
  CHECK(values_ok);
  CHECK(sums_ok);
  CHECK(flushed_ok);
  CHECK(flushed > 100);  // the flush was exercised
  bool cols_ok = true;
  for (int64_t j = 0; j < m; ++j) cols_ok = cols_ok && std::fabs(col_part[j] - want_col[j]) <= 4e-13 * want_col[j];
  CHECK(cols_ok);
}

static void test_plan_rows() {
#ifdef SEGTRANSFER_AVX512_LSE
  if (avx512_lse_available()) check_plan_rows(plan_row_avx512);
  if (cpu_has_avx2_fma()) check_plan_rows(plan_row_avx2);
  // The blocked solver's dense plan sums in AVX2 (plan_sums_avx2) against std::exp in double, with
  // and without the weighted sums, on widths that leave partial groups of 16, exponents from below
  // the flush (-708) to a little above 0; the same 4e-13 bound (positive terms and weights).
  if (cpu_has_avx2_fma()) {
    std::mt19937_64 rng(41);
    std::uniform_real_distribution<double> uB(-3.0, 3.0), uV(0.5, 2.0);
    std::uniform_real_distribution<float> uc(0.f, 80.f);
    const double inv_eps = 9.5;
    bool ok = true;
    for (int64_t w : {0, 1, 3, 4, 15, 16, 17, 255, 256}) {
      std::vector<float> c(w);
      std::vector<double> B(w), V(w), V2(w);
      for (int64_t j = 0; j < w; ++j) c[j] = uc(rng), B[j] = uB(rng), V[j] = uV(rng), V2[j] = uV(rng);
      const double base = uB(rng);
      double want[3] = {0.0, 0.0, 0.0};
      for (int64_t j = 0; j < w; ++j) {
        const double x = base + B[j] - static_cast<double>(c[j]) * inv_eps;
        const double e = x < -708.0 ? 0.0 : std::exp(x);
        want[0] += e;
        want[1] += e * V[j];
        want[2] += e * e * V2[j];
      }
      // Called twice: the second call adds to what the first left (the sums double).
      double all[3] = {0.0, 0.0, 0.0}, one[3] = {0.0, 0.0, -1.0}, none[3] = {0.0, -1.0, -1.0};
      for (int call = 0; call < 2; ++call) {
        plan_sums_avx2<true, true>(c.data(), w, base, B.data(), inv_eps, V.data(), V2.data(), all);
        plan_sums_avx2<true, false>(c.data(), w, base, B.data(), inv_eps, V.data(), nullptr, one);
        plan_sums_avx2<false, false>(c.data(), w, base, B.data(), inv_eps, nullptr, nullptr, none);
      }
      for (int q = 0; q < 3; ++q) ok = ok && std::fabs(all[q] - 2.0 * want[q]) <= 8e-13 * want[q];
      ok = ok && std::fabs(one[0] - 2.0 * want[0]) <= 8e-13 * want[0] &&
           std::fabs(one[1] - 2.0 * want[1]) <= 8e-13 * want[1] && one[2] == -1.0;
      ok = ok && std::fabs(none[0] - 2.0 * want[0]) <= 8e-13 * want[0] && none[1] == -1.0 && none[2] == -1.0;
    }
    CHECK(ok);
  }
#endif
}

// build_sparse on one thread (one pass into storage sized from every 16th row, or count first)
// against the parallel two-pass build (two threads): the same return value and, when it succeeds,
// the same pattern, entry for entry. Cases: densities from 1 % to past max_density (0.35), rows
// that outgrow the sampled estimate (every 16th row nearly empty, the others not: the rest is then
// counted and the storage grown), an empty row, and storage reused from a larger and a smaller
// previous build. Sizes leave partial vectors and a last partial group of 16 rows.
template <typename T>
static void check_pattern_build() {
  std::mt19937_64 rng(31);
  const int64_t n = 301, m = 259;
  std::uniform_real_distribution<double> uc(0.0, 10.0), up(-1.0, 1.0);
  RowMatrix<T> cost(n, m);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) cost(i, j) = static_cast<T>(uc(rng));
  std::vector<double> p_col(m), base(n);
  for (double& v : p_col) v = up(rng);
  for (double& v : base) v = up(rng);
  for (int64_t i = 0; i < n; ++i) cost(i, (3 * i) % m) = T(-5);  // no row empty above cutoff -3
  SparseRows<T> one, two;
  int built = 0, refused = 0;
  // (cutoff, sparse_rows): every 16th row's threshold far below the others' when sparse_rows.
  const std::pair<double, bool> cases[] = {{-2.0, false}, {0.5, false}, {2.0, false}, {3.2, false}, {4.0, false},
                                           {6.0, false}, {2.5, true},  {5.0, true},  {0.5, false}, {-12.0, false}};
  for (const auto& [cutoff, sparse_rows] : cases) {
    std::vector<double> p_row(n);
    for (int64_t i = 0; i < n; ++i) p_row[i] = (sparse_rows && i % 16 == 0) ? base[i] - 3.0 : base[i];
    const bool ok1 = build_sparse(cost, p_row.data(), p_col.data(), cutoff, 10.0, 0.35, 1, one);
    const bool ok2 = build_sparse(cost, p_row.data(), p_col.data(), cutoff, 10.0, 0.35, 2, two);
    CHECK(ok1 == ok2);
    if (!(ok1 && ok2)) {
      ++refused;
      continue;
    }
    ++built;
    CHECK(one.ptr == two.ptr);
    CHECK(one.col.size() == static_cast<size_t>(two.ptr[n]) && one.val.size() == one.col.size());
    bool same = one.col.size() == two.col.size();
    for (size_t k = 0; same && k < one.col.size(); ++k) same = one.col[k] == two.col[k] && one.val[k] == two.val[k];
    CHECK(same);
  }
  CHECK(built == 6);    // 1 % to 32 % dense (3.2: counted first), and outgrown (2.5 with sparse rows) ...
  CHECK(refused == 4);  // ... too dense (4, 6, 5 with sparse rows: once outgrown) and empty rows (-12)
}

static void test_pattern_build() {
  check_pattern_build<float>();
  check_pattern_build<double>();
}

// The pattern filters: on one thread in one pass (filter_serial, into a copy and in place) against
// the parallel count-then-move forms on two threads (filter_rows, filter_in_place) and a plain
// evaluation of the test (double)C - p_row - p_col < cutoff: the same pattern entry for entry, or
// the same refusal when a row would be empty. Row lengths leave partial groups of 8 and prefetch
// blocks of 256; cutoffs keep from a few entries to all of them.
template <typename T>
static void check_pattern_filters() {
  std::mt19937_64 rng(37);
  const int64_t n = 203, m = 700;
  std::uniform_real_distribution<double> uc(0.0, 10.0), up(-1.0, 1.0);
  SparseRows<T> in;
  in.ptr.assign(1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = 1 + static_cast<int64_t>(rng() % 600);
    std::vector<int32_t> cols(m);
    for (int64_t j = 0; j < m; ++j) cols[j] = static_cast<int32_t>(j);
    std::shuffle(cols.begin(), cols.end(), rng);
    std::sort(cols.begin(), cols.begin() + len);
    for (int64_t k = 0; k < len; ++k) {
      in.col.push_back(cols[k]);
      in.val.push_back(static_cast<T>(k == 0 ? -5.0 : uc(rng)));  // each row's first entry kept above -3
    }
    in.ptr.push_back(static_cast<int64_t>(in.col.size()));
  }
  std::vector<double> p_row(n), p_col(m);
  for (double& v : p_row) v = up(rng);
  for (double& v : p_col) v = up(rng);
  int kept_cases = 0, refused = 0;
  for (double cutoff : {-2.0, 0.5, 3.0, 7.0, 20.0, -12.0}) {
    SparseRows<T> want;  // the plain test
    want.ptr.assign(1, 0);
    bool empty = false;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t e = in.ptr[i]; e < in.ptr[i + 1]; ++e)
        if (static_cast<double>(in.val[e]) - p_col[in.col[e]] < p_row[i] + cutoff) {
          want.col.push_back(in.col[e]);
          want.val.push_back(in.val[e]);
        }
      empty = empty || static_cast<int64_t>(want.col.size()) == want.ptr.back();
      want.ptr.push_back(static_cast<int64_t>(want.col.size()));
    }
    auto same = [&](const SparseRows<T>& got) {
      bool ok = got.ptr == want.ptr && got.col.size() == want.col.size() && got.val.size() == want.val.size();
      for (size_t k = 0; ok && k < want.col.size(); ++k) ok = got.col[k] == want.col[k] && got.val[k] == want.val[k];
      return ok;
    };
    SparseRows<T> one, two, inplace1 = in, inplace2 = in;
    const bool ok1 = filter_rows(in, p_row.data(), p_col.data(), cutoff, 1, one);
    const bool ok2 = filter_rows(in, p_row.data(), p_col.data(), cutoff, 2, two);
    const bool ok3 = filter_serial(inplace1, p_row.data(), p_col.data(), cutoff, inplace1);
    std::vector<int64_t> kept_ptr;
    const bool ok4 = count_kept(inplace2, p_row.data(), p_col.data(), cutoff, 2, kept_ptr);
    if (ok4) filter_in_place(inplace2, kept_ptr, p_row.data(), p_col.data(), cutoff, 2);
    CHECK(ok1 == !empty && ok2 == !empty && ok3 == !empty && ok4 == !empty);
    if (empty) {
      ++refused;
      continue;
    }
    ++kept_cases;
    CHECK(same(one));
    CHECK(same(two));
    CHECK(same(inplace1));
    CHECK(same(inplace2));
  }
  CHECK(kept_cases == 5 && refused == 1);  // -12: rows left empty
}

static void test_pattern_filters() {
  check_pattern_filters<float>();
  check_pattern_filters<double>();
}

// build_sparse's test in float (scan_threshold): on values where the exact test c - p < th is
// decided within a few float roundings, an entry left out must fail the exact test, and an entry
// the exact test keeps must be kept; a far-off threshold stays far off.
static void test_scan_threshold() {
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<double> mag(-3.0, 4.0), unit(-1.0, 1.0), tiny(-64.0, 64.0);
  int64_t wrong = 0, near = 0;
  for (int trial = 0; trial < 200000; ++trial) {
    const double scale = std::pow(10.0, mag(rng));
    const float c = static_cast<float>(std::fabs(unit(rng)) * scale);
    const double p = unit(rng) * scale;
    // A threshold within a few ulps of the difference, or at either side of it.
    const double th = static_cast<double>(c) - p + tiny(rng) * std::ldexp(std::max(static_cast<double>(std::fabs(c)), std::fabs(p)), -24);
    const double magnitude = std::fabs(c) + 2.0 * std::fabs(p) + std::fabs(th);
    const bool kept = c - static_cast<float>(p) < scan_threshold<float>(th, magnitude);
    const bool exact = static_cast<double>(c) - p < th;
    near += kept != exact ? 1 : 0;
    wrong += (!kept && exact) ? 1 : 0;
  }
  CHECK(wrong == 0);
  CHECK(near > 0);  // the cases did probe the rounding (the raise keeps a few extra entries)
  CHECK(!(10.0f - 1.0f < scan_threshold<float>(8.0, 20.0)));
  CHECK(scan_threshold<double>(0.1, 1e6) == 0.1);
}

// The pool behind the kernels' storage (pool.hpp): a block freed inside a scope serves the next
// request it fits (a slightly larger one too, not one under a quarter of it); a request no kept
// block fits gives back the smaller kept blocks; nothing is kept outside a scope or after it.
static void test_block_pool() {
  using detail::BlockPool;
  using detail::KernelVector;
  BlockPool& pool = BlockPool::local();
  const size_t mb = size_t(1) << 20, n = 8 * mb / sizeof(float);
  {
    KernelVector<float> v(n);
  }
  CHECK(pool.kept_bytes() == 0);  // no scope: freed
  {
    const detail::PoolScope scope;
    const float* first;
    {
      KernelVector<float> v(n, 1.f);
      first = v.data();
    }
    CHECK(pool.kept_bytes() >= 8 * mb);
    {
      KernelVector<float> v(n + n / 20);  // 5 % larger: the same block
      CHECK(v.data() == first);
      CHECK(pool.kept_bytes() == 0);
    }
    {
      KernelVector<float> v(n / 5);  // under a quarter: a block of its own, the kept one stays
      CHECK(v.data() != first);
      CHECK(pool.kept_bytes() >= 8 * mb);
    }
    {
      const detail::PoolScope inner;  // nested: the outer scope still owns what is kept
    }
    CHECK(pool.kept_bytes() >= 8 * mb);
    {
      KernelVector<int32_t> big(4 * n);  // no kept block fits: the smaller ones are given back
      CHECK(pool.kept_bytes() < 8 * mb);
      big[4 * n - 1] = 7;
    }
    CHECK(pool.kept_bytes() >= 32 * mb);
    KernelVector<float> small(10);  // below the pooled size: plain allocation
    CHECK(small.size() == 10);
  }
  CHECK(pool.kept_bytes() == 0);  // released with the outermost scope
}

// The shared Floyd draw (open-addressing table, also run by the CUDA sampler) against an independent
// Floyd with std::set and its own splitmix64 + Lemire generator (the sampler's original form): the
// same positions, hence the same pixels for a seed, as before the table existed.
static void test_floyd_table() {
  struct Reference {
    uint64_t state;
    uint64_t next() {
      uint64_t z = (state += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      return z ^ (z >> 31);
    }
    uint64_t below(uint64_t bound) {
      unsigned __int128 prod = static_cast<unsigned __int128>(next()) * bound;
      while (static_cast<uint64_t>(prod) < (0 - bound) % bound) prod = static_cast<unsigned __int128>(next()) * bound;
      return static_cast<uint64_t>(prod >> 64);
    }
  };
  const int64_t cases[][2] = {{1, 1}, {2, 1}, {10, 9}, {1000, 1}, {1000, 500}, {1000, 999}, {5000, 4096},
                              {int64_t(1) << 40, 3000}, {(int64_t(1) << 62) + 12345, 100}};
  for (const auto& c : cases)
    for (uint64_t seed : {uint64_t(0), uint64_t(3), ~uint64_t(0)})
      for (int64_t k : {0, 1, 9}) {
        const int64_t nv = c[0], n = c[1];
        const uint64_t state = floyd::repeat_state(seed, k);
        const int bits = floyd::table_bits(n);
        CHECK((int64_t(1) << bits) >= 2 * n && (int64_t(1) << bits) < 4 * std::max<int64_t>(n, 1) + 2);
        std::vector<int64_t> slots(size_t(1) << bits, floyd::kEmpty);
        floyd::draw(state, nv, n, slots.data(), bits);
        std::set<int64_t> got;
        int64_t filled = 0;
        for (int64_t s : slots)
          if (s != floyd::kEmpty) {
            ++filled;
            got.insert(s);
          }
        Reference mixer{seed};
        Reference rng{Reference{mixer.next() ^ static_cast<uint64_t>(k)}.next()};
        std::set<int64_t> want;
        for (int64_t j = nv - n; j < nv; ++j) {
          const auto t = static_cast<int64_t>(rng.below(static_cast<uint64_t>(j + 1)));
          if (!want.insert(t).second) want.insert(j);
        }
        CHECK(filled == n);  // distinct: every value sits in one slot only
        CHECK(got == want);
        CHECK(*got.begin() >= 0 && *got.rbegin() < nv);
      }
}

// Uniformity of the draws: every valid pixel is taken with probability n / nv (chi-square over the
// pixels), and a pair with probability n (n - 1) / (nv (nv - 1)); ignored pixels never. Bounds are
// 6 standard deviations, so the test fails by chance with probability < 1e-8 (it is deterministic anyway).
static void test_sampling_uniform() {
  const int64_t P = 60, n = 10, R = 20000;
  std::vector<int32_t> code(P);
  for (int64_t p = 0; p < P; ++p) code[p] = (p % 6 == 5) ? -1 : static_cast<int32_t>(p % 4);
  const int64_t nv = count_valid(code.data(), P);
  CHECK(nv == 50);
  const auto draw = sample_pixels(code.data(), P, n, R, 11, "labels");
  std::vector<double> hits(P, 0.0);
  double pair = 0.0;
  for (int64_t k = 0; k < R; ++k) {
    bool first = false, second = false;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = draw[k * n + i];
      hits[p] += 1.0;
      first = first || p == 0;
      second = second || p == 1;
    }
    pair += first && second;
  }
  const double expect = double(R) * n / nv;
  double chi2 = 0.0;
  for (int64_t p = 0; p < P; ++p) {
    if (code[p] < 0) {
      CHECK(hits[p] == 0.0);
      continue;
    }
    chi2 += (hits[p] - expect) * (hits[p] - expect) / expect;
  }
  // chi2 over 50 cells of a fixed-size draw: about chi-square with 49 degrees of freedom scaled by
  // (1 - n/nv) (the cells are negatively correlated), mean <= 49 and sd <= 9.9.
  CHECK(chi2 < 49.0 + 6.0 * 9.9);
  CHECK(chi2 > 5.0);  // a draw that always takes the same pixels would give a huge chi2, a rigged one ~0
  const double q = double(n) * (n - 1) / (double(nv) * (nv - 1));
  CHECK(std::abs(pair - R * q) < 6.0 * std::sqrt(R * q * (1 - q)));
}

// The AVX2 block loops read and write 8 columns from a multiple of 8: from 64-byte aligned storage
// (the cost's rows, AlignedVector) such an access stays within one cache line. Guards the
// build's EIGEN_MAX_ALIGN_BYTES=64 (CMakeLists.txt) as much as the allocator.
static void test_cache_alignment() {
  for (int64_t cols : {1, 7, 8, 1000, 10000}) {
    RowMatrix<float> c(3, cols);
    RowMatrix<double> d(2, cols);
    CHECK(reinterpret_cast<std::uintptr_t>(c.data()) % 64 == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(d.data()) % 64 == 0);
    AlignedVector<float> v(static_cast<size_t>(cols) + 3);
    AlignedVector<double> w(static_cast<size_t>(cols));
    CHECK(reinterpret_cast<std::uintptr_t>(v.data()) % 64 == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(w.data()) % 64 == 0);
  }
}

static void test_sampling() {
  std::vector<int32_t> code(1000);
  for (int i = 0; i < 1000; ++i) code[i] = (i % 7 == 0) ? -1 : i % 3;
  const auto s1 = sample_pixels(code.data(), 1000, 200, 3, 5, "labels");
  const auto s2 = sample_pixels(code.data(), 1000, 200, 3, 5, "labels");
  CHECK(s1 == s2);
  bool distinct = true, valid = true;
  for (int k = 0; k < 3; ++k)
    for (int i = 0; i < 200; ++i) {
      valid = valid && code[s1[k * 200 + i]] >= 0;
      if (i) distinct = distinct && s1[k * 200 + i] > s1[k * 200 + i - 1];
    }
  CHECK(valid);
  CHECK(distinct);
  CHECK(!std::equal(s1.begin(), s1.begin() + 200, s1.begin() + 200));
  // Repeat k does not depend on how many repeats were asked for (a larger K extends a call's draws),
  // and another seed gives other draws.
  const auto s5 = sample_pixels(code.data(), 1000, 200, 5, 5, "labels");
  CHECK(std::equal(s1.begin(), s1.end(), s5.begin()));
  const auto other = sample_pixels(code.data(), 1000, 200, 3, 6, "labels");
  CHECK(!std::equal(s1.begin(), s1.begin() + 200, other.begin()));
  bool threw = false;
  try {
    sample_pixels(code.data(), 1000, 999, 1, 0, "labels");
  } catch (const InvalidArgument&) {
    threw = true;
  }
  CHECK(threw);
}

// Two well separated clusters relabelled bijectively: the plan keeps clusters apart, H(Yt|Ys) = 0.
static void test_otce_bijection() {
  const int64_t n = 200, d = 3;
  std::mt19937_64 rng(1);
  std::normal_distribution<double> nz(0.0, 0.3);
  std::vector<double> xs(n * d), xt(n * d);
  std::vector<int32_t> ys(n), yt(n);
  for (int64_t i = 0; i < n; ++i) {
    ys[i] = i % 2;
    yt[i] = 1 - ys[i];
    for (int k = 0; k < d; ++k) {
      xs[i * d + k] = nz(rng) + (ys[i] ? 20.0 : 0.0);
      xt[i * d + k] = nz(rng) + (ys[i] ? 20.0 : 0.0);
    }
  }
  PixelView<double> vs{xs.data(), 1, n, d, n * d, d, 1}, vt{xt.data(), 1, n, d, n * d, d, 1};
  std::vector<int64_t> idx(n);
  for (int64_t i = 0; i < n; ++i) idx[i] = i;
  SinkhornOptions opt;
  opt.tol = 1e-9;
  const OTCEResult r = otce<double>(vs, ys.data(), 2, idx.data(), n, vt, yt.data(), 2, idx.data(), n, 1, opt, 0.0);
  CHECK(r.converged[0] == 1);
  CHECK(r.marginal_error[0] <= 1e-9);
  CHECK(r.conditional_entropy[0] < 1e-9);
  CHECK(std::fabs(r.joint[1] - 0.5) < 1e-8 && std::fabs(r.joint[2] - 0.5) < 1e-8);
}

static void test_conditional_entropy() {
  const double indep[4] = {0.25, 0.25, 0.25, 0.25};
  CHECK(std::fabs(conditional_entropy(indep, 2, 2) - std::log(2.0)) < 1e-15);
  const double det[4] = {0.5, 0.0, 0.0, 0.5};
  CHECK(conditional_entropy(det, 2, 2) == 0.0);
}

// ---- the paths the sanitizer build exists for: every way in and out of a solve, on small inputs.

template <typename E, typename F>
static bool throws(F&& f) {
  try {
    f();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

static std::vector<double> normal(std::mt19937_64& rng, int64_t count, double scale) {
  std::normal_distribution<double> nz(0.0, scale);
  std::vector<double> v(count);
  for (double& x : v) x = nz(rng);
  return v;
}

// Strided views the bindings pass without copying: (B, D, H, W) maps read channel-last, and a
// negatively strided table (data pointer at its last row). Both must equal the contiguous table.
static void test_strided_views() {
  const int64_t b = 2, d = 3, h = 4, w = 5, p = h * w, n = b * p;
  std::mt19937_64 rng(2);
  const std::vector<double> maps = normal(rng, b * d * p, 1.0), tgt = normal(rng, 40 * d, 1.0);
  std::vector<double> table(n * d), reversed(n * d);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t q = 0; q < p; ++q) table[(i * p + q) * d + c] = maps[(i * d + c) * p + q];
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c) reversed[(n - 1 - r) * d + c] = table[r * d + c];
  std::vector<int32_t> code(n), tcode(40);
  for (int64_t i = 0; i < n; ++i) code[i] = static_cast<int32_t>(i % 3);
  for (int64_t i = 0; i < 40; ++i) tcode[i] = static_cast<int32_t>(i % 2);
  std::vector<int64_t> idx(n), tidx(40);
  for (int64_t i = 0; i < n; ++i) idx[i] = i;
  for (int64_t i = 0; i < 40; ++i) tidx[i] = i;
  const PixelView<double> vmaps{maps.data(), b, p, d, d * p, 1, p};
  const PixelView<double> vtable{table.data(), 1, n, d, n * d, d, 1};
  const PixelView<double> vt{tgt.data(), 1, 40, d, 40 * d, d, 1};
  // Reversed rows: pixel i of the view is row n-1-i of `reversed`, i.e. row i of `table`.
  const PixelView<double> vrev{reversed.data() + (n - 1) * d, 1, n, d, 0, -d, 1};
  SinkhornOptions opt;
  opt.epsilon = 0.5;
  const OTCEResult r1 = otce<double>(vtable, code.data(), 3, idx.data(), n, vt, tcode.data(), 2, tidx.data(), 40, 1,
                                     opt, 0.0);
  const OTCEResult r2 = otce<double>(vmaps, code.data(), 3, idx.data(), n, vt, tcode.data(), 2, tidx.data(), 40, 1,
                                     opt, 0.0);
  const OTCEResult r3 = otce<double>(vrev, code.data(), 3, idx.data(), n, vt, tcode.data(), 2, tidx.data(), 40, 1,
                                     opt, 0.0);
  CHECK(r1.converged[0] == 1);
  CHECK(r1.joint == r2.joint && r1.joint == r3.joint);
  CHECK(r1.conditional_entropy == r2.conditional_entropy && r1.conditional_entropy == r3.conditional_entropy);
}

// Small epsilon on clustered points: the kernel turns sparse and the last stage runs Newton-CG; float
// and double, weighted marginals, several repeats with ignored pixels.
static void test_sparse_and_newton_paths() {
  std::mt19937_64 rng(3);
  const int64_t n = 300, m = 260, d = 2;
  std::vector<double> x = normal(rng, n * d, 0.3), y = normal(rng, m * d, 0.3);
  for (int64_t i = 0; i < n; ++i) x[i * d] += 4.0 * (i % 3);
  for (int64_t j = 0; j < m; ++j) y[j * d] += 4.0 * (j % 3);
  std::vector<double> a(n), bw(m);
  double sa = 0, sb = 0;
  for (int64_t i = 0; i < n; ++i) sa += a[i] = 1.0 + (i % 5);
  for (int64_t j = 0; j < m; ++j) sb += bw[j] = 1.0 + (j % 7);
  for (double& v : a) v /= sa;
  for (double& v : bw) v /= sb;
  SinkhornOptions opt;
  opt.epsilon = 0.01;
  opt.tol = 1e-8;
  const TransportResult r = transport_points<double>(x.data(), n, y.data(), m, d, a.data(), bw.data(), opt, 0.0);
  CHECK(std::isfinite(r.transport_cost));
  CHECK(r.report.iterations > 0);
  const std::vector<float> xf(x.begin(), x.end()), yf(y.begin(), y.end());
  const TransportResult rf = transport_points<float>(xf.data(), n, yf.data(), m, d, nullptr, nullptr, opt, 0.0);
  CHECK(std::isfinite(rf.transport_cost));

  std::vector<int32_t> code(n), tcode(m);
  for (int64_t i = 0; i < n; ++i) code[i] = (i % 11 == 0) ? -1 : static_cast<int32_t>(i % 3);
  for (int64_t j = 0; j < m; ++j) tcode[j] = static_cast<int32_t>(j % 3);
  const auto is = sample_pixels(code.data(), n, 100, 3, 7, "source_labels");
  const auto it = sample_pixels(tcode.data(), m, 90, 3, 8, "target_labels");
  const PixelView<float> vs{xf.data(), 1, n, d, n * d, d, 1}, vt{yf.data(), 1, m, d, m * d, d, 1};
  opt.epsilon = 0.05;
  const OTCEResult o = otce<float>(vs, code.data(), 3, is.data(), 100, vt, tcode.data(), 3, it.data(), 90, 3, opt, 0.0);
  CHECK(o.repeats == 3 && o.joint.size() == 27u);
  for (double h : o.conditional_entropy) CHECK(std::isfinite(h) && h >= 0 && h <= std::log(3.0) + 1e-9);
}

// A last stage too dense for a pattern (here every entry within the cutoff) and above kSmallProblem
// runs dense Sinkhorn; with dense_last_iterations = 1 it starts again on a full kernel with Newton,
// with max_iter it never does. Both routes must reach the same converged answer.
static void test_dense_last_stage_fallback() {
  std::mt19937_64 rng(17);
  const int64_t n = 1100, m = 1000, d = 2;
  const std::vector<double> x = normal(rng, n * d, 1.0), y = normal(rng, m * d, 1.0);
  SinkhornOptions opt;
  opt.epsilon = 2.0;
  opt.tol = 1e-10;
  opt.dense_last_iterations = opt.max_iter;
  const TransportResult dense = transport_points<double>(x.data(), n, y.data(), m, d, nullptr, nullptr, opt, 0.0);
  opt.dense_last_iterations = 1;
  const TransportResult full = transport_points<double>(x.data(), n, y.data(), m, d, nullptr, nullptr, opt, 0.0);
  CHECK(dense.report.converged && full.report.converged);
  CHECK(dense.report.newton_steps == 0 && full.report.newton_steps > 0);
  CHECK(std::abs(dense.transport_cost - full.transport_cost) <= 1e-9 * std::abs(dense.transport_cost));
  // Potentials agree up to the constant shared between f and g.
  const double shift = full.f[0] - dense.f[0];
  double worst = 0.0;
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::abs(full.f[i] - dense.f[i] - shift));
  for (int64_t j = 0; j < m; ++j) worst = std::max(worst, std::abs(full.g[j] - dense.g[j] + shift));
  CHECK(worst < 1e-7);
}

// A small problem's last stage whose pattern fails on an empty row or column runs dense Sinkhorn for
// a few iterations, then builds its pattern and finishes with Newton. Here no epsilon scaling: the
// one stage starts from zero potentials at cost / eps ~ 10^3, where most rows and columns have no
// entry within the cutoff. Dense Sinkhorn alone took 212 iterations here, and had crawled on a
// harder draw (session 29: a 719 x 719 draw whose last stage lost a column after a drift took
// 49,665 dense iterations). Same answer as the scaled solve.
static void test_small_last_stage_fallback() {
  std::mt19937_64 rng(23);
  const int64_t n = 300, m = 280, d = 2;
  const std::vector<double> x = normal(rng, n * d, 1.0), y = normal(rng, m * d, 1.0);
  SinkhornOptions opt;
  opt.epsilon = 0.02;
  opt.tol = 1e-8;
  const TransportResult ref = transport_points<double>(x.data(), n, y.data(), m, d, nullptr, nullptr, opt, 0.0);
  opt.eps_scaling = false;
  const TransportResult r = transport_points<double>(x.data(), n, y.data(), m, d, nullptr, nullptr, opt, 0.0);
  std::printf("    unscaled: %lld iterations, %lld Newton steps, error %.2g\n", static_cast<long long>(r.report.iterations),
              static_cast<long long>(r.report.newton_steps), r.report.marginal_error);
  CHECK(ref.report.converged && r.report.converged);
  CHECK(r.report.newton_steps > 0 && r.report.iterations < 2000);
  CHECK(std::abs(ref.transport_cost - r.transport_cost) <= 1e-6 * std::abs(ref.transport_cost));
}

// A small draw with many classes (1,200 pixels a side, 29 source and 10 target classes, D = 8): its
// (class, cell) balancing groups are coarsened until the coarse problem is small against the plan
// (coarse_affordable, otce.cpp; ~29 x 18 cells here would make 500 x 300 groups). The groups only
// steer the solver: the scores must agree with those solved without class balancing.
static void test_otce_many_classes() {
  std::mt19937_64 rng(31);
  const int64_t n = 1200, d = 8;
  const std::vector<double> x = normal(rng, n * d, 1.0), y = normal(rng, n * d, 1.0);
  const std::vector<float> xf(x.begin(), x.end()), yf(y.begin(), y.end());
  std::vector<int32_t> code(n), tcode(n);
  for (int64_t i = 0; i < n; ++i) code[i] = static_cast<int32_t>((i * 7) % 29);
  for (int64_t j = 0; j < n; ++j) tcode[j] = static_cast<int32_t>((j * 3) % 10);
  const auto is = sample_pixels(code.data(), n, n, 2, 5, "source_labels");
  const auto it = sample_pixels(tcode.data(), n, n, 2, 6, "target_labels");
  const PixelView<float> vs{xf.data(), 1, n, d, n * d, d, 1}, vt{yf.data(), 1, n, d, n * d, d, 1};
  SinkhornOptions opt;
  opt.epsilon = 0.1;
  opt.tol = 1e-8;
  const OTCEResult on = otce<float>(vs, code.data(), 29, is.data(), n, vt, tcode.data(), 10, it.data(), n, 2, opt, 0.0);
  opt.class_balance = false;
  const OTCEResult off = otce<float>(vs, code.data(), 29, is.data(), n, vt, tcode.data(), 10, it.data(), n, 2, opt, 0.0);
  for (int k = 0; k < 2; ++k) {
    CHECK(on.converged[k] && off.converged[k]);
    // Two plans within L1 ~2e-8 of the solution: entropies of their joints agree to ~1e-6.
    CHECK(std::abs(on.conditional_entropy[k] - off.conditional_entropy[k]) <= 1e-6);
  }
}

// Pixels with one class and bit-identical features are solved as one point of their summed mass
// (otce.cpp, merge_duplicates). The score must equal the one from transport_points' plan on every
// pixel, made bit-distinct (the k-th repeat of a point moved by k ulps: costs move by ~1e-15
// relative) so that nothing merges there: below 10^6 entries and above, where the merged points
// are also split into balancing groups that carry their weights. Some repeats carry another
// class, so that identical features across classes stay apart.
static void test_otce_duplicates() {
  std::mt19937_64 rng(41);
  for (const int64_t distinct : {120, 1100}) {
    const int64_t n = distinct + distinct / 4, d = 3, classes = 4;
    const std::vector<double> base = normal(rng, distinct * d, 1.0);
    std::vector<double> x(n * d), apart(n * d);
    std::vector<int32_t> code(n);
    std::vector<int> copies(distinct, 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = i < distinct ? i : static_cast<int64_t>(rng() % distinct);
      std::copy(base.begin() + p * d, base.begin() + (p + 1) * d, x.begin() + i * d);
      std::copy(base.begin() + p * d, base.begin() + (p + 1) * d, apart.begin() + i * d);
      for (int k = 0; k < copies[p]; ++k) apart[i * d] = std::nextafter(apart[i * d], 1e300);
      ++copies[p];
      code[i] = static_cast<int32_t>((p + (i >= distinct && i % 5 == 0 ? 1 : 0)) % classes);
    }
    const auto all = sample_pixels(code.data(), n, n, 1, 3, "source_labels");  // every pixel once
    const PixelView<double> view{x.data(), 1, n, d, n * d, d, 1};
    SinkhornOptions opt;
    opt.epsilon = 0.3;
    opt.tol = 1e-11;
    const OTCEResult merged = otce<double>(view, code.data(), classes, all.data(), n, view, code.data(), classes,
                                           all.data(), n, 1, opt, 0.0);
    const TransportResult whole =
        transport_points<double>(apart.data(), n, apart.data(), n, d, nullptr, nullptr, opt, 0.0);
    CHECK(merged.converged[0] && whole.report.converged);
    std::vector<double> joint(classes * classes, 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double c = 0.0;
        for (int64_t k = 0; k < d; ++k) c += (apart[i * d + k] - apart[j * d + k]) * (apart[i * d + k] - apart[j * d + k]);
        joint[code[i] * classes + code[j]] += std::exp((whole.f[i] + whole.g[j] - c) / opt.epsilon) / (n * n);
      }
    const double h = conditional_entropy(joint.data(), classes, classes);
    CHECK(std::abs(merged.conditional_entropy[0] - h) <= 1e-9);
    CHECK(std::abs(merged.transport_cost[0] - whole.transport_cost) <= 1e-9 * whole.transport_cost);
    // transport_points merges the duplicates too (whatever their class) and copies the potentials
    // back: f_i + g_j as without merging (the gauge removed through the pair).
    const TransportResult same = transport_points<double>(x.data(), n, x.data(), n, d, nullptr, nullptr, opt, 0.0);
    CHECK(same.report.converged);
    CHECK(std::abs(same.transport_cost - whole.transport_cost) <= 1e-9 * whole.transport_cost);
    double worst = 0.0;
    for (int64_t i = 0; i < n; ++i)
      worst = std::max(worst, std::abs((same.f[i] + same.g[0]) - (whole.f[i] + whole.g[0])) / opt.epsilon);
    CHECK(worst <= 1e-7);
  }
}

// Above 10^7 entries the fallback used not to apply: 3,200 x 3,200 points at eps = 0.1 keep ~62 % of
// the entries in the last stage, above the 50 % a last-stage pattern starts with. With the default
// dense_last_iterations Newton finishes the stage; the dense route (never falling back) must reach
// the same answer.
static void test_dense_last_stage_fallback_large() {
  std::mt19937_64 rng(17);
  const int64_t n = 3200, d = 2;
  const std::vector<double> x = normal(rng, n * d, 1.0), y = normal(rng, n * d, 1.0);
  SinkhornOptions opt;
  opt.epsilon = 0.1;
  opt.tol = 1e-9;
  const TransportResult fallback = transport_points<double>(x.data(), n, y.data(), n, d, nullptr, nullptr, opt, 0.0);
  opt.dense_last_iterations = opt.max_iter;
  const TransportResult dense = transport_points<double>(x.data(), n, y.data(), n, d, nullptr, nullptr, opt, 0.0);
  CHECK(fallback.report.converged && dense.report.converged);
  CHECK(fallback.report.newton_steps > 0 && dense.report.newton_steps == 0);
  CHECK(std::abs(dense.transport_cost - fallback.transport_cost) <= 1e-8 * std::abs(dense.transport_cost));
}

// Above 2 x multiscale_points points per side the dense early stages run on a subsample and are
// extended by the c-transform (multiscale); a 2000-point subsample and float keep the test small.
static void test_multiscale_path() {
  std::mt19937_64 rng(4);
  const int64_t n = 4100, d = 2;
  const std::vector<double> xd = normal(rng, n * d, 1.0), yd = normal(rng, n * d, 1.0);
  const std::vector<float> x(xd.begin(), xd.end()), y(yd.begin(), yd.end());
  SinkhornOptions opt;
  opt.multiscale_points = 2000;
  opt.epsilon = 0.05;
  opt.tol = 1e-5;
  const TransportResult r = transport_points<float>(x.data(), n, y.data(), n, d, nullptr, nullptr, opt, 0.0);
  CHECK(std::isfinite(r.transport_cost) && r.report.iterations > 0);
}

// The tol the cluster checks certify to: 1e-7 in double; in float the exponentials' ~3e-7
// relative error floors the certified error near 1e-7 (see check_class_balance), so 1e-5.
template <typename T>
constexpr double cluster_tol() {
  return sizeof(T) == 8 ? 1e-7 : 1e-5;
}

// A labelled two-sided problem made of Gaussian clusters, one class per cluster (rows and columns
// sorted by class), for the tests that compare two solver paths on the same cost.
template <typename T>
struct ClusterProblem {
  int64_t n = 0, m = 0;
  std::vector<int32_t> row_class;
  std::vector<int64_t> col_start{0};
  std::vector<T> x, y;  // the points (d = 2), for the blocked solver
  RowMatrix<T> cost;
  std::vector<double> a, b;
  PlanClasses classes() const { return {row_class.data(), 3, col_start.data(), 3}; }
};

// Three clusters of `ns[c]` source and `nt[c]` target points around centres[c] (d = 2), the targets
// shifted by `offset`, spread `sd`.
template <typename T>
static ClusterProblem<T> cluster_problem(uint64_t seed, const double (&centre)[3][2], const int64_t (&ns)[3],
                                         const int64_t (&nt)[3], double sd, double offset) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> z(0.0, sd);
  ClusterProblem<T> p;
  std::vector<T>& x = p.x;
  std::vector<T>& y = p.y;
  for (int c = 0; c < 3; ++c) {
    for (int64_t i = 0; i < ns[c]; ++i) {
      for (int k = 0; k < 2; ++k) x.push_back(static_cast<T>(centre[c][k] + z(rng)));
      p.row_class.push_back(c);
    }
    for (int64_t j = 0; j < nt[c]; ++j)
      for (int k = 0; k < 2; ++k) y.push_back(static_cast<T>(centre[c][k] + offset + z(rng)));
    p.col_start.push_back(p.col_start.back() + nt[c]);
  }
  p.n = static_cast<int64_t>(p.row_class.size());
  p.m = p.col_start.back();
  squared_euclidean<T>(x.data(), p.n, y.data(), p.m, 2, p.cost);
  p.a.assign(p.n, 1.0 / p.n);
  p.b.assign(p.m, 1.0 / p.m);
  return p;
}

// The same problem solved with `opt` and with `opt` changed by `vary`.
struct TwoSolves {
  SinkhornReport on, off;
  std::vector<double> f_on, f_off;
};

template <typename T, typename Vary>
static TwoSolves solve_twice(const ClusterProblem<T>& p, const SinkhornOptions& opt, Vary vary) {
  const PlanClasses cls = p.classes();
  TwoSolves s;
  s.f_on.resize(p.n);
  s.f_off.resize(p.n);
  std::vector<double> g(p.m);
  s.on = sinkhorn_log<T>(p.cost, p.a.data(), p.b.data(), opt, s.f_on.data(), g.data(), &cls);
  SinkhornOptions other = opt;
  vary(other);
  s.off = sinkhorn_log<T>(p.cost, p.a.data(), p.b.data(), other, s.f_off.data(), g.data(), &cls);
  return s;
}

// Two solves of the same problem that both certify to tol must agree. Joint entries: each a sum of
// plan entries, two plans within L1 distance ~2 tol of the solution. Potentials up to the constant
// (f + c, g - c), so f - mean(f) is compared: a point's marginal off by at most tol (L1) is off by at
// most tol * n relative to its mass 1/n, which moves its potential by about eps * tol * n. Returns
// the largest potential difference. `slack` widens that bound where weakly coupled clusters make
// the potentials more sensitive: their error is eps L^+ r for a marginal error r, with L the plan's
// graph Laplacian, whose small eigenvalues (one per weak link between clusters) amplify it.
static double check_same_solution(const TwoSolves& s, const SinkhornOptions& opt, double slack = 1.0) {
  const std::vector<double>& f1 = s.f_on;
  const std::vector<double>& f2 = s.f_off;
  const int64_t n = static_cast<int64_t>(f1.size());
  CHECK(s.on.converged && s.off.converged);
  CHECK(s.on.marginal_error <= opt.tol && s.off.marginal_error <= opt.tol);
  CHECK(s.on.joint.size() == s.off.joint.size());
  for (size_t k = 0; k < s.on.joint.size(); ++k) CHECK(std::fabs(s.on.joint[k] - s.off.joint[k]) <= 4 * opt.tol);
  double m1 = 0, m2 = 0, worst = 0;
  for (int64_t i = 0; i < n; ++i) { m1 += f1[i] / n; m2 += f2[i] / n; }
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs((f1[i] - m1) - (f2[i] - m2)));
  CHECK(worst / opt.epsilon <= slack * opt.tol * static_cast<double>(n));
  return worst;
}

// Class balancing (a coarse, per-class shift of the potentials) changes the path, not the answer:
// three well separated clusters per side, each a class, with unequal proportions, so that mass has
// to cross between clusters through entries of ~e^-300. Plain Sinkhorn moves it there at a crawl.
// Both runs must certify to tol and agree (check_same_solution; potentials measured at 3.8e-7 of the
// 1.2e-6 bound in double, 3.0e-4 of 1.2e-3 in float); the balanced run needs far fewer iterations
// (measured: 266 against 1886 in double, 176 against 1089 in float).
template <typename T>
static void check_class_balance() {
  const double centre[3][2] = {{0, 0}, {4, 0}, {0, 4}};
  const int64_t ns[3] = {60, 40, 20}, nt[3] = {35, 45, 40};
  SinkhornOptions opt;
  opt.epsilon = 0.05;
  // float: its exponentials carry ~3e-7 relative error, which floors the certified error near 1e-7.
  opt.tol = sizeof(T) == 8 ? 1e-8 : 1e-5;
  opt.newton = false;  // Newton would hide the difference (it moves clusters too)
  opt.class_balance = true;
  const TwoSolves s = solve_twice(cluster_problem<T>(6, centre, ns, nt, 0.4, 0.3), opt, [](SinkhornOptions& o) {
    o.class_balance = false;
    o.max_iter = 2000000;
  });
  check_same_solution(s, opt);
  CHECK(5 * s.on.iterations < s.off.iterations);
}

// Newton's preconditioner with the extra coarse vector (deflation_vector, TwoLevelPreconditioner):
// the vector has no component along any group's indicator and unit length, is d minus its groups'
// means up to that scale, and is refused where d is constant on every group. With E = Z^T S Z
// assembled as newton_polish does (Z: 5 groups' indicators and the vector; S a random symmetric
// positive definite 40 x 40 matrix) the coarse correction alone must return z for r = S z whenever
// z lies in Z's span (Z E^-1 Z^T S Z c = Z c), to 1e-8 relative (factor()'s ridge perturbs E by 1e-10
// of its largest diagonal entry, which E's spread of scales magnifies); with the diagonal part too the
// operator must stay symmetric and positive.
static void test_deflation() {
  const int64_t n = 40;
  const int groups = 5;
  std::mt19937 rng(45);
  std::normal_distribution<double> gauss(0.0, 1.0);
  std::vector<int32_t> row_class(n);
  for (int64_t i = 0; i < n; ++i) row_class[i] = static_cast<int32_t>((i * 7) % groups);  // interleaved
  std::vector<double> d(n), v;
  for (double& e : d) e = gauss(rng);
  CHECK(deflation_vector(d, row_class.data(), groups, v));
  std::vector<double> sum(groups, 0.0), mean(groups, 0.0), cnt(groups, 0.0);
  double norm2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    sum[row_class[i]] += v[i];
    mean[row_class[i]] += d[i];
    cnt[row_class[i]] += 1.0;
    norm2 += v[i] * v[i];
  }
  bool centred = true, proportional = true;
  for (int c = 0; c < groups; ++c) centred = centred && std::fabs(sum[c]) <= 1e-12;
  double scale = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double r = d[i] - mean[row_class[i]] / cnt[row_class[i]];
    if (scale == 0.0 && std::fabs(r) > 1e-3) scale = v[i] / r;
    proportional = proportional && std::fabs(v[i] - scale * r) <= 1e-12;
  }
  CHECK(centred);
  CHECK(proportional && scale > 0.0);
  CHECK(std::fabs(norm2 - 1.0) <= 1e-12);
  std::vector<double> flat(n);
  for (int64_t i = 0; i < n; ++i) flat[i] = 0.5 + row_class[i];
  std::vector<double> unused;
  CHECK(!deflation_vector(flat, row_class.data(), groups, unused));

  Eigen::MatrixXd B(n, n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) B(i, j) = gauss(rng);
  const Eigen::MatrixXd S = B * B.transpose() + Eigen::MatrixXd::Identity(n, n);
  Eigen::MatrixXd Z = Eigen::MatrixXd::Zero(n, groups + 1);
  for (int64_t i = 0; i < n; ++i) {
    Z(i, row_class[i]) = 1.0;
    Z(i, groups) = v[i];
  }
  TwoLevelPreconditioner pre;
  pre.E = Z.transpose() * S * Z;
  pre.extra = v;
  pre.with_extra = true;
  pre.factor();
  std::vector<double> zero(n, 0.0), dinv(n), r(n), out(n);
  for (int64_t i = 0; i < n; ++i) dinv[i] = 1.0 / S(i, i);
  Eigen::VectorXd c(groups + 1);
  for (int k = 0; k <= groups; ++k) c[k] = gauss(rng);
  const Eigen::VectorXd z = Z * c, Sz = S * z;
  for (int64_t i = 0; i < n; ++i) r[i] = Sz[i];
  pre.apply(r, out, zero, true, row_class.data());
  double diff = 0.0, ref = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::fabs(out[i] - z[i]));
    ref = std::max(ref, std::fabs(z[i]));
  }
  CHECK(diff <= 1e-8 * ref);  // 8e-10 measured: factor()'s ridge, 1e-10 of E's largest diagonal entry
  std::vector<double> r2(n), out2(n);
  for (int64_t i = 0; i < n; ++i) {
    r[i] = gauss(rng);
    r2[i] = gauss(rng);
  }
  pre.apply(r, out, dinv, true, row_class.data());
  pre.apply(r2, out2, dinv, true, row_class.data());
  double a12 = 0.0, a21 = 0.0, a11 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    a12 += r2[i] * out[i];
    a21 += r[i] * out2[i];
    a11 += r[i] * out[i];
  }
  CHECK(std::fabs(a12 - a21) <= 1e-10 * (std::fabs(a12) + std::fabs(a11)));
  CHECK(a11 > 0.0);
}

// coarse_newton (the coarse step of class balancing) against plain linear-domain Sinkhorn run to
// 1e-14 on the same small problem: 7 row and 11 column groups, couplings from e^-30 to 1, two
// blocks joined only by couplings of e^-8 (what makes Sinkhorn slow), one row group and one column
// group without mass (left alone). The plans must agree entry by entry (the scalings only up to
// the gauge (u + k, v - k), which Newton fixes at a zero mass-weighted mean column shift).
static void test_coarse_newton() {
  const int R = 7, Q = 11;
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  std::vector<double> K(R * Q), A(R), B(Q);
  std::vector<char> row_on(R, 1), col_on(Q, 1);
  row_on[3] = 0;
  col_on[7] = 0;
  for (int c = 0; c < R; ++c)
    for (int d = 0; d < Q; ++d) {
      double logk = -30.0 * uni(rng);
      if ((c < 3) != (d < 5)) logk -= 8.0;  // the two blocks' weak links
      K[c * Q + d] = row_on[c] && col_on[d] ? std::exp(logk) : 0.0;
    }
  double ta = 0.0, tb = 0.0;
  for (int c = 0; c < R; ++c) ta += A[c] = row_on[c] ? 0.2 + uni(rng) : 0.0;
  for (int d = 0; d < Q; ++d) tb += B[d] = col_on[d] ? 0.2 + uni(rng) : 0.0;
  for (double& v : A) v /= ta;
  for (double& v : B) v /= tb;
  std::vector<double> eu(R, 1.0), ev(Q, 1.0);
  CHECK(coarse_newton(K, A, B, row_on, col_on, 1e-12, eu, ev));
  // The reference: Sinkhorn sweeps to 1e-14.
  std::vector<double> ru(R, 1.0), rv(Q, 1.0);
  double err = 1.0;
  int sweeps = 0;
  for (; sweeps < 5000000 && err > 1e-14; ++sweeps) {
    for (int c = 0; c < R; ++c) {
      if (!row_on[c]) continue;
      double acc = 0.0;
      for (int d = 0; d < Q; ++d) acc += K[c * Q + d] * rv[d];
      ru[c] = A[c] / acc;
    }
    err = 0.0;
    for (int d = 0; d < Q; ++d) {
      if (!col_on[d]) continue;
      double acc = 0.0;
      for (int c = 0; c < R; ++c) acc += K[c * Q + d] * ru[c];
      err += std::fabs(acc * rv[d] - B[d]);
      rv[d] = B[d] / acc;
    }
  }
  CHECK(err <= 1e-14);
  CHECK(sweeps > 100);  // the weak links make it a problem worth solving by Newton
  double row_err = 0.0, col_err = 0.0, worst = 0.0, gauge = 0.0;
  for (int c = 0; c < R; ++c) {
    double acc = 0.0;
    for (int d = 0; d < Q; ++d) {
      const double p = eu[c] * K[c * Q + d] * ev[d], q = ru[c] * K[c * Q + d] * rv[d];
      acc += p;
      if (q > 0) worst = std::max(worst, std::fabs(p - q) / q);
    }
    row_err += std::fabs(acc - A[c]);
  }
  for (int d = 0; d < Q; ++d) {
    double acc = 0.0;
    for (int c = 0; c < R; ++c) acc += eu[c] * K[c * Q + d] * ev[d];
    col_err += std::fabs(acc - B[d]);
    gauge += B[d] * std::log(ev[d]);
  }
  CHECK(row_err + col_err <= 1e-12);
  CHECK(worst <= 1e-9);  // every coupling, relative (the plan is unique; the scalings are not)
  CHECK(std::fabs(gauge) <= 1e-12);
  CHECK(eu[3] == 1.0 && ev[7] == 1.0);  // the groups without mass keep their scaling
}

// The dense Newton driver (dense_newton.cpp) with a CPU backend: the plan's products computed
// directly from a stored cost, as the CUDA backend streams them. K clustered problems with weak links
// between clusters (Sinkhorn's slow case), rows grouped by class; the driver must reach 1e-10 in few
// steps, leave the inactive problem alone, and agree with long plain Sinkhorn.
namespace {
struct CpuDenseBackend : DenseNewtonBackend {
  int64_t K, n, m;
  int G;
  double eps;
  const std::vector<double>& C;
  const double *a, *b;
  const int64_t* starts;
  std::vector<double> f, g;
  CpuDenseBackend(int64_t K_, int64_t n_, int64_t m_, int G_, double eps_, const std::vector<double>& C_,
                  const double* a_, const double* b_, const int64_t* s_)
      : K(K_), n(n_), m(m_), G(G_), eps(eps_), C(C_), a(a_), b(b_), starts(s_), f(K_ * n_), g(K_ * m_) {}
  int64_t approximate_calls = 0, dropped = 0;
  // approximate: entries through float, the rounding a GPU's float exponentials bring (and more), and
  // only those above e^-30 a_i b_j, as the CUDA backend's pattern keeps them.
  double p(int64_t k, int64_t i, int64_t j, bool approximate = false) {
    const double x = (f[k * n + i] + g[k * m + j] - C[(k * n + i) * m + j]) / eps;
    const double v = a[i] * b[j] * std::exp(x);
    if (!approximate) return v;
    if (!(x > -30.0)) {
      ++dropped;
      return 0.0;
    }
    return static_cast<double>(static_cast<float>(v));
  }
  void set_potentials(const std::vector<double>& ff, const std::vector<double>& gg,
                      const std::vector<int>& on) override {
    for (int64_t k = 0; k < K; ++k)
      if (on[k]) {
        std::copy(ff.begin() + k * n, ff.begin() + (k + 1) * n, f.begin() + k * n);
        std::copy(gg.begin() + k * m, gg.begin() + (k + 1) * m, g.begin() + k * m);
      }
  }
  void sums(const std::vector<int>& on, std::vector<double>& r, std::vector<double>& c) override {
    std::vector<double> ones_n(K * n, 1.0), ones_m(K * m, 1.0);
    row_products(on, ones_m, false, false, r);
    col_products(on, ones_n, false, c);
  }
  void col_products(const std::vector<int>& on, const std::vector<double>& v, bool approximate,
                    std::vector<double>& out) override {
    approximate_calls += approximate ? 1 : 0;
    for (int64_t k = 0; k < K; ++k)
      if (on[k])
        for (int64_t j = 0; j < m; ++j) {
          double acc = 0.0;
          for (int64_t i = 0; i < n; ++i) acc += p(k, i, j, approximate) * v[k * n + i];
          out[k * m + j] = acc;
        }
  }
  void row_products(const std::vector<int>& on, const std::vector<double>& w, bool squared, bool approximate,
                    std::vector<double>& out) override {
    approximate_calls += approximate ? 1 : 0;
    for (int64_t k = 0; k < K; ++k)
      if (on[k])
        for (int64_t i = 0; i < n; ++i) {
          double acc = 0.0;
          for (int64_t j = 0; j < m; ++j) {
            const double pij = p(k, i, j, approximate);
            acc += (squared ? pij * pij : pij) * w[k * m + j];
          }
          out[k * n + i] = acc;
        }
  }
  void class_column_sums(const std::vector<int>& on, std::vector<double>& U) override {
    for (int64_t k = 0; k < K; ++k)
      if (on[k])
        for (int cl = 0; cl < G; ++cl)
          for (int64_t i = starts[k * (G + 1) + cl]; i < starts[k * (G + 1) + cl + 1]; ++i)
            for (int64_t j = 0; j < m; ++j) U[(k * m + j) * G + cl] += p(k, i, j, true);
  }
};
}  // namespace

static void test_dense_newton() {
  const int64_t K = 3, n = 90, m = 100;
  const int G = 3, dim = 3;
  const double eps = 0.05;
  std::mt19937 rng(5);
  std::normal_distribution<double> nor(0.0, 1.0);
  std::vector<double> C(K * n * m), a(n, 1.0 / n), b(m, 1.0 / m);
  std::vector<int64_t> starts(K * (G + 1));
  for (int64_t k = 0; k < K; ++k) {
    std::vector<double> xs(n * dim), ys(m * dim);
    for (int64_t i = 0; i < n; ++i)  // rows grouped by class: class = i * G / n
      for (int d = 0; d < dim; ++d) xs[i * dim + d] = 2.5 * (d == (i * G / n) % dim) + 0.3 * nor(rng);
    for (int64_t j = 0; j < m; ++j)
      for (int d = 0; d < dim; ++d) ys[j * dim + d] = 2.5 * (d == static_cast<int>(j % G)) + 0.35 * nor(rng) + 0.1 * k;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) {
        double s = 0.0;
        for (int d = 0; d < dim; ++d) s += (xs[i * dim + d] - ys[j * dim + d]) * (xs[i * dim + d] - ys[j * dim + d]);
        C[(k * n + i) * m + j] = s;
      }
    for (int cl = 0; cl <= G; ++cl) starts[k * (G + 1) + cl] = cl * n / G;
  }
  // Start: plain log-domain Sinkhorn, 30 iterations (far from converged at this epsilon).
  std::vector<double> f(K * n, 0.0), g(K * m, 0.0);
  auto sweep = [&](int64_t k, std::vector<double>& ff, std::vector<double>& gg) {
    for (int64_t i = 0; i < n; ++i) {
      double mx = -1e300, acc = 0.0;
      for (int64_t j = 0; j < m; ++j) mx = std::max(mx, (gg[k * m + j] - C[(k * n + i) * m + j]) / eps + std::log(b[j]));
      for (int64_t j = 0; j < m; ++j) acc += std::exp((gg[k * m + j] - C[(k * n + i) * m + j]) / eps + std::log(b[j]) - mx);
      ff[k * n + i] = -eps * (mx + std::log(acc));
    }
    for (int64_t j = 0; j < m; ++j) {
      double mx = -1e300, acc = 0.0;
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, (ff[k * n + i] - C[(k * n + i) * m + j]) / eps + std::log(a[i]));
      for (int64_t i = 0; i < n; ++i) acc += std::exp((ff[k * n + i] - C[(k * n + i) * m + j]) / eps + std::log(a[i]) - mx);
      gg[k * m + j] = -eps * (mx + std::log(acc));
    }
  };
  for (int64_t k = 0; k < K; ++k)
    for (int it = 0; it < 30; ++it) sweep(k, f, g);
  CpuDenseBackend be(K, n, m, G, eps, C, a.data(), b.data(), starts.data());
  be.set_potentials(f, g, std::vector<int>(K, 1));
  std::vector<double> r0(K * n), c0(K * m);
  be.sums(std::vector<int>(K, 1), r0, c0);
  double start_err = 0.0;
  for (int64_t i = 0; i < n; ++i) start_err += std::fabs(r0[i] - a[i]);
  for (int64_t j = 0; j < m; ++j) start_err += std::fabs(c0[j] - b[j]);
  CHECK(start_err > 1e-4);  // problem 0 starts far from the target

  const DenseNewtonProblem prob{K, n, m, a.data(), b.data(), eps, starts.data(), G};
  std::vector<int> active{1, 0, 1};  // problem 1 is not polished
  const std::vector<double> f_before = f, g_before = g;
  int polls = 0;
  const DenseNewtonStats st =
      dense_newton(be, prob, std::vector<double>(K, 1e-10), active, f, g, 40, [&] {
        ++polls;
        return false;
      });
  CHECK(polls > 0);
  CHECK(be.approximate_calls == 0);  // a target below 1e-7: exact products (dense_newton_tight)
  for (int64_t k : {0, 2}) {
    CHECK(st.error[k] <= 1e-10);
    CHECK(st.steps[k] >= 1 && st.steps[k] <= 25);
    CHECK(st.products[k] >= 1);
  }
  CHECK(st.steps[1] == 0 && !std::isfinite(st.error[1]));
  {  // stopped at once (interrupt, timeout): returns the start, and the backend holds it
    std::vector<double> fs = f_before, gs = g_before;
    be.set_potentials(fs, gs, std::vector<int>(K, 1));
    const DenseNewtonStats st0 =
        dense_newton(be, prob, std::vector<double>(K, 1e-10), {1, 0, 0}, fs, gs, 40, [] { return true; });
    CHECK(st0.steps[0] == 0 && st0.error[0] > 1e-4);
    CHECK(fs == f_before && gs == g_before && be.f == f_before && be.g == g_before);
    be.set_potentials(f, g, std::vector<int>(K, 1));
  }
  CHECK(std::equal(f.begin() + n, f.begin() + 2 * n, f_before.begin() + n));
  CHECK(std::equal(g.begin() + m, g.begin() + 2 * m, g_before.begin() + m));
  // The backend holds what the driver returned; the marginals measured independently.
  for (int64_t k : {0, 2}) {
    CHECK(std::equal(be.f.begin() + k * n, be.f.begin() + (k + 1) * n, f.begin() + k * n));
    double e = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      double acc = 0.0;
      for (int64_t j = 0; j < m; ++j) acc += a[i] * b[j] * std::exp((f[k * n + i] + g[k * m + j] - C[(k * n + i) * m + j]) / eps);
      e += std::fabs(acc - a[i]);
    }
    for (int64_t j = 0; j < m; ++j) {
      double acc = 0.0;
      for (int64_t i = 0; i < n; ++i) acc += a[i] * b[j] * std::exp((f[k * n + i] + g[k * m + j] - C[(k * n + i) * m + j]) / eps);
      e += std::fabs(acc - b[j]);
    }
    CHECK(e <= 1e-10);
    // Against long plain Sinkhorn (the plan is unique): transport costs to 1e-9 relative.
    std::vector<double> rf(K * n, 0.0), rg(K * m, 0.0);
    // (each sweep leaves the columns exact: its row error is the plan's marginal error)
    double ref_err = 1.0;
    for (int it = 0; it < 40000 && ref_err > 1e-13; ++it) {
      sweep(k, rf, rg);
      if (it % 100 != 99) continue;
      ref_err = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        double acc = 0.0;
        for (int64_t j = 0; j < m; ++j) acc += a[i] * b[j] * std::exp((rf[k * n + i] + rg[k * m + j] - C[(k * n + i) * m + j]) / eps);
        ref_err += std::fabs(acc - a[i]);
      }
    }
    CHECK(ref_err <= 1e-13);
    double cost_newton = 0.0, cost_ref = 0.0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) {
        const double c = C[(k * n + i) * m + j];
        cost_newton += c * a[i] * b[j] * std::exp((f[k * n + i] + g[k * m + j] - c) / eps);
        cost_ref += c * a[i] * b[j] * std::exp((rf[k * n + i] + rg[k * m + j] - c) / eps);
      }
    CHECK(std::fabs(cost_newton - cost_ref) <= 1e-9 * cost_ref);
  }
}

// The dense Newton driver at a tight target on a very sparse plan (cost / eps up to ~10^3, a few
// non-negligible entries a row, nearly separate components): the CG products' float rounding against
// exact sums had stalled the stored CPU solver above 1e-10 (newton_polish); the driver must reach
// 1e-11 on the CPU backend that rounds and truncates like the CUDA one. (300 x 300 points at
// eps = 0.1, as the Python test test_tight_tol_on_a_very_sparse_plan_converges.)
static void test_dense_newton_tight() {
  const int64_t K = 1, n = 300, m = 300;
  const int dim = 19;
  std::mt19937 rng(3);
  std::normal_distribution<double> nor(0.0, 1.0);
  std::vector<double> xs(n * dim), ys(m * dim), C(n * m), a(n, 1.0 / n), b(m, 1.0 / m);
  for (auto& v : xs) v = nor(rng);
  for (auto& v : ys) v = nor(rng) + 0.1;
  double cmax = 0.0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      double s = 0.0;
      for (int d = 0; d < dim; ++d) s += (xs[i * dim + d] - ys[j * dim + d]) * (xs[i * dim + d] - ys[j * dim + d]);
      C[i * m + j] = s;
      cmax = std::max(cmax, s);
    }
  const double eps = 0.1;
  // Start: epsilon-scaled plain log-domain Sinkhorn down to eps (the driver polishes, it does not
  // anneal).
  std::vector<double> f(n, 0.0), g(m, 0.0);
  auto sweep = [&](double e) {
    for (int64_t i = 0; i < n; ++i) {
      double mx = -1e300, acc = 0.0;
      for (int64_t j = 0; j < m; ++j) mx = std::max(mx, (g[j] - C[i * m + j]) / e + std::log(b[j]));
      for (int64_t j = 0; j < m; ++j) acc += std::exp((g[j] - C[i * m + j]) / e + std::log(b[j]) - mx);
      f[i] = -e * (mx + std::log(acc));
    }
    for (int64_t j = 0; j < m; ++j) {
      double mx = -1e300, acc = 0.0;
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, (f[i] - C[i * m + j]) / e + std::log(a[i]));
      for (int64_t i = 0; i < n; ++i) acc += std::exp((f[i] - C[i * m + j]) / e + std::log(a[i]) - mx);
      g[j] = -e * (mx + std::log(acc));
    }
  };
  for (double e = cmax; e > eps; e *= 0.5)
    for (int it = 0; it < 20; ++it) sweep(e);
  for (int it = 0; it < 50; ++it) sweep(eps);
  const int64_t starts[2] = {0, n};
  CpuDenseBackend be(K, n, m, 1, eps, C, a.data(), b.data(), starts);
  be.set_potentials(f, g, {1});
  const DenseNewtonProblem prob{K, n, m, a.data(), b.data(), eps, starts, 1};
  // First to a loose target, where CG runs on truncated, float-rounded products...
  const DenseNewtonStats loose = dense_newton(be, prob, {1e-6}, {1}, f, g, 60, [] { return false; });
  CHECK(loose.error[0] <= 1e-6 && be.approximate_calls > 0 && be.dropped > 0);
  // ... then to 1e-11, on exact products (with float ones: 60 steps, stalled at 9.3e-10).
  const int64_t approximate_before = be.approximate_calls;
  const DenseNewtonStats st = dense_newton(be, prob, {1e-11}, {1}, f, g, 60, [] { return false; });
  CHECK(st.error[0] <= 1e-11 && st.steps[0] <= 30);
  CHECK(be.approximate_calls == approximate_before);
}

static void test_class_balance() {
  check_class_balance<double>();
  check_class_balance<float>();
}

// Class balancing on two threads: a problem above 10^7 entries, where the solver's loops (the
// balancing's chunked group masses among them) run on every thread it is given. One thread and two
// give bit-identical potentials, tables and iteration counts (the chunks' masses are added in a
// fixed order). 40 iterations are enough to run several balancings; convergence is not the point.
template <typename T>
static void check_class_balance_threads() {
  const double centre[3][2] = {{0, 0}, {4, 0}, {0, 4}};
  const int64_t ns[3] = {1400, 1100, 900}, nt[3] = {1000, 1300, 1100};
  const ClusterProblem<T> p = cluster_problem<T>(5, centre, ns, nt, 0.4, 0.3);
  CHECK(static_cast<double>(p.n) * static_cast<double>(p.m) > 1e7);
  SinkhornOptions opt;
  opt.epsilon = 0.05;
  opt.max_iter = 40;
  opt.num_threads = 1;
  const TwoSolves s = solve_twice(p, opt, [](SinkhornOptions& o) { o.num_threads = 2; });
  // It converges at 39 (the last step spans two factors: newton_long_last_step) or runs to 40.
  CHECK(s.on.iterations == s.off.iterations && s.on.iterations >= 30 && s.on.iterations <= 40);
  CHECK(s.f_on == s.f_off && s.on.joint == s.off.joint);
}

static void test_class_balance_threads() {
  check_class_balance_threads<double>();
  check_class_balance_threads<float>();
}

// The class balancing folded into the float iterations that end a block (fold_balancing) against
// balance_classes' pass of its own after them: the same problem as check_class_balance_threads
// (three clusters of unequal sizes, whose classes Sinkhorn balances slowly), solved to the default
// tol. Both certify and agree (check_same_solution); the folded run did fold (its intermediate
// stages run on float exponents: 11 times), the other did not, and it needs at most 1.3x the
// other's iterations (measured: 38 against 38). Double storage never folds (no fused float
// iterations), so its two solves are the same.
template <typename T>
static void check_fold_balancing() {
  const double centre[3][2] = {{0, 0}, {4, 0}, {0, 4}};
  const int64_t ns[3] = {1400, 1100, 900}, nt[3] = {1000, 1300, 1100};
  const ClusterProblem<T> p = cluster_problem<T>(5, centre, ns, nt, 0.4, 0.3);
  SinkhornOptions opt;
  opt.epsilon = 0.05;
  opt.tol = sizeof(T) == 8 ? 1e-8 : 1e-5;  // float: see check_class_balance
  const TwoSolves s = solve_twice(p, opt, [](SinkhornOptions& o) { o.fold_balancing = false; });
  check_same_solution(s, opt);
  CHECK(s.off.folded_balancings == 0);
  if constexpr (std::is_same_v<T, float>) {
    CHECK(s.on.folded_balancings > 0);
    CHECK(10 * s.on.iterations <= 13 * s.off.iterations);
  } else {
    CHECK(s.on.folded_balancings == 0 && s.f_on == s.f_off);
  }
  std::printf("    fold_balancing (%s): %lld iterations (%lld folded) against %lld\n", sizeof(T) == 8 ? "double" : "float",
              (long long)s.on.iterations, (long long)s.on.folded_balancings, (long long)s.off.iterations);
}

static void test_fold_balancing() {
  check_fold_balancing<double>();
  check_fold_balancing<float>();
}

// The hard regime of test_float_stages and test_newton_cg_floor: three clusters 6 apart (cost / eps
// up to ~10^4 at eps = 0.01), of unequal sizes, so that mass crosses between them through entries
// of ~e^-300.
template <typename T>
static ClusterProblem<T> separated_clusters() {
  const double centre[3][2] = {{0, 0}, {6, 0}, {12, 0}};
  const int64_t ns[3] = {400, 300, 200}, nt[3] = {250, 300, 250};
  return cluster_problem<T>(8, centre, ns, nt, 0.5, 0.2);
}

// Intermediate stages of a float problem form their exponents in float (float_stage_exponents),
// and so does the last stage's Sinkhorn phase before Newton: that changes the path, not the answer,
// which Newton (in double exponents) and the certificate fix. Hard regime: clusters 6 apart at eps = 0.01 (cost / eps up to
// ~10^4), 11 dense and 4 sparse intermediate stages. Both runs certify to tol and agree
// (check_same_solution).
static void test_float_stages() {
  SinkhornOptions opt;
  opt.epsilon = 0.01;
  opt.tol = 1e-5;
  opt.multiscale_points = 0;  // every stage on the full problem
  const TwoSolves s = solve_twice(separated_clusters<float>(), opt,
                                  [](SinkhornOptions& o) { o.float_stage_exponents = false; });
  CHECK(s.on.stages > s.on.dense_stages + 1);  // sparse stages before the last one
  const double worst = check_same_solution(s, opt);
  CHECK(worst > 0);  // the float path ran (rounding differs)
  CHECK(std::fabs(s.on.transport_cost - s.off.transport_cost) <=
        std::expm1(2 * worst / opt.epsilon) * s.off.transport_cost);
}

// Newton's CG operator on the plan entries above newton_cg_floor of the smallest mass changes the
// steps, not the answer: the hard regime of test_float_stages (a sparse last stage whose Newton
// rounds move mass between clusters joined by entries of ~e^-300), solved with every entry, with
// the default floor and with one 5000x higher (whose operator drops entries that matter: the
// direction's residual against every entry must send the solve back to all of them, as it does
// after its second step: 13 vs 12 Newton steps in double, where without that check it took 897).
// Both certify to tol and agree (check_same_solution).
template <typename T>
static void check_newton_cg_floor() {
  SinkhornOptions opt;
  opt.epsilon = 0.01;
  opt.tol = cluster_tol<T>();
  opt.multiscale_points = 0;
  const ClusterProblem<T> p = separated_clusters<T>();
  for (double floor : {SinkhornOptions{}.newton_cg_floor, 5e-3}) {
    SinkhornOptions o = opt;
    o.newton_cg_floor = floor;
    const TwoSolves s = solve_twice(p, o, [](SinkhornOptions& q) { q.newton_cg_floor = 0.0; });
    check_same_solution(s, o);
    CHECK(s.on.newton_steps > 0 && s.off.newton_steps > 0);
    // Without the fall-back to every entry the high floor took 897 steps; with it, 10-12 (and the
    // bound that lets Newton skip that check must not hide these left-out entries).
    CHECK(s.on.newton_steps <= 2 * s.off.newton_steps + 5);
    if (std::getenv("SEGTRANSFER_DEBUG"))
      std::fprintf(stderr, "newton_cg_floor %g vs 0: %lld vs %lld Newton steps, %lld vs %lld CG iterations\n", floor,
                   static_cast<long long>(s.on.newton_steps), static_cast<long long>(s.off.newton_steps),
                   static_cast<long long>(s.on.cg_iterations), static_cast<long long>(s.off.cg_iterations));
  }
  SinkhornOptions bad = opt;
  bad.newton_cg_floor = -1e-6;
  std::vector<double> f(p.n), g(p.m);
  CHECK(throws<InvalidArgument>([&]() { sinkhorn_log<T>(p.cost, p.a.data(), p.b.data(), bad, f.data(), g.data()); }));
}

static void test_newton_cg_floor() {
  check_newton_cg_floor<double>();
  check_newton_cg_floor<float>();
}

// left_out_product_bound (kernels.hpp) against |S_all x - S_op x|_2 formed with dense matrices:
// random plans whose rows mix large entries with many below the floor (and a few rows and columns
// with most of their mass left out), float values, exact double sums on the diagonal, and
// directions of either sign. The bound must hold every time. How tight it is matters only to speed
// (an overestimate costs a product Newton could have skipped): within 50x here.
static void test_left_out_product_bound() {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t n = 5 + trial % 17, m = 4 + (trial * 7) % 19;
    const double lambda = trial % 3 == 0 ? 0.0 : 1e-3;
    std::vector<double> P(n * m);
    for (auto& v : P) v = u(rng) < 0.3 ? u(rng) : 1e-6 * u(rng) * (trial % 5 == 0 ? 1e3 : 1.0);
    const float floor = 1e-5f;
    std::vector<double> d1(n, 0.0), d2(m, 0.0), inv_c(m), x(n), op_col(m, 0.0), w_op(m, 0.0), w_all(m, 0.0);
    std::vector<int64_t> ptr(n + 1, 0);
    std::vector<float> val;
    std::vector<int32_t> col;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        d1[i] += P[i * m + j];
        d2[j] += P[i * m + j];
        if (static_cast<float>(P[i * m + j]) > floor) {
          val.push_back(static_cast<float>(P[i * m + j]));
          col.push_back(static_cast<int32_t>(j));
        }
      }
      ptr[i + 1] = static_cast<int64_t>(val.size());
    }
    for (int64_t j = 0; j < m; ++j) inv_c[j] = 1.0 / ((1.0 + lambda) * d2[j]);
    for (auto& v : x) v = (u(rng) - 0.5) * (trial % 4 == 0 ? 100.0 : 1.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = ptr[i]; k < ptr[i + 1]; ++k) {
        op_col[col[k]] += static_cast<double>(val[k]);
        w_op[col[k]] += static_cast<double>(val[k]) * x[i];
      }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) w_all[j] += static_cast<double>(static_cast<float>(P[i * m + j])) * x[i];
    for (int64_t j = 0; j < m; ++j) {
      w_op[j] *= inv_c[j];
      w_all[j] *= inv_c[j];
    }
    double diff2 = 0.0;  // the diagonal terms cancel: only the products with P differ
    for (int64_t i = 0; i < n; ++i) {
      double all = 0.0, op = 0.0;
      for (int64_t j = 0; j < m; ++j) all += static_cast<double>(static_cast<float>(P[i * m + j])) * w_all[j];
      for (int64_t k = ptr[i]; k < ptr[i + 1]; ++k) op += static_cast<double>(val[k]) * w_op[col[k]];
      diff2 += (all - op) * (all - op);
    }
    std::vector<double> rho;
    const double bound = left_out_product_bound(ptr.data(), col.data(), val.data(), n, m, d1.data(), d2.data(),
                                                inv_c.data(), op_col.data(), x.data(), w_op.data(), rho);
    CHECK(std::sqrt(diff2) <= bound);
    CHECK(std::isfinite(bound) && (diff2 == 0 || bound <= 50 * std::sqrt(diff2)));  // 3-14x on these plans
  }
}

// The multiscale start (a strided subsample's epsilon-scaling, its potentials extended to every
// point) only changes where the full problem starts: the same certified plan as without it, on
// clusters of unequal sizes (so the subsample's class masses are off) at cost / eps up to ~6,000.
// Compared through the plan (joint label masses within 4 tol, as in check_same_solution, and the
// transport cost within tol times the largest cost), not the potentials: across clusters the
// truncated plan is disconnected, so each cluster's potentials carry their own constant. Fewer
// stages on the full problem show the multiscale path was taken.
template <typename T>
static void check_multiscale_same_plan() {
  const double centre[3][2] = {{0, 0}, {3, 0}, {6, 0}};
  const int64_t ns[3] = {700, 600, 500}, nt[3] = {600, 650, 550};
  SinkhornOptions opt;
  opt.epsilon = 0.01;
  opt.tol = cluster_tol<T>();
  opt.multiscale_points = 400;
  const ClusterProblem<T> p = cluster_problem<T>(9, centre, ns, nt, 0.6, 0.2);
  const auto same_plan = [&](const TwoSolves& t) {
    CHECK(t.on.converged && t.off.converged);
    CHECK(t.on.joint.size() == 9 && t.off.joint.size() == 9);
    for (size_t k = 0; k < t.on.joint.size() && k < t.off.joint.size(); ++k)
      CHECK(std::fabs(t.on.joint[k] - t.off.joint[k]) <= 4 * opt.tol);
    CHECK(std::fabs(t.on.transport_cost - t.off.transport_cost) <= opt.tol * static_cast<double>(p.cost.maxCoeff()));
  };
  const TwoSolves s = solve_twice(p, opt, [](SinkhornOptions& o) { o.multiscale_points = 0; });
  same_plan(s);
  CHECK(s.on.stages < s.off.stages);
  if (std::getenv("SEGTRANSFER_DEBUG"))
    std::fprintf(stderr, "multiscale on / off: %lld / %lld iterations, %d / %d stages, W_D %.9g / %.9g\n",
                 static_cast<long long>(s.on.iterations), static_cast<long long>(s.off.iterations), s.on.stages,
                 s.off.stages, s.on.transport_cost, s.off.transport_cost);
  // The first full stage's looser target (handover_tol) against stage_tol there: the same plan.
  same_plan(solve_twice(p, opt, [](SinkhornOptions& o) { o.handover_tol = o.stage_tol; }));
  // Its thinner kernel (handover_truncation; this hand-over stage at eps = 0.16 is sparse, ~28 % of
  // the entries at stage_truncation) against the usual one: the same plan.
  same_plan(solve_twice(p, opt, [](SinkhornOptions& o) { o.handover_truncation = o.stage_truncation; }));
  SinkhornOptions bad = opt;
  bad.handover_tol = 0.0;
  std::vector<double> f(p.n), g(p.m);
  CHECK(throws<InvalidArgument>([&]() { sinkhorn_log<T>(p.cost, p.a.data(), p.b.data(), bad, f.data(), g.data()); }));
}

// The same on logit-like points (as the benchmark's: 19 classes, each a prototype with one dominant
// coordinate, plus noise; sources and targets from the same classes, sorted by class), where the
// multiscale start does seed the stage extrapolation (its first full stage moved the potentials
// 4.8 against 7.8 from the stage before; with n = 1,300 it was 19.1 against 18.8, not seeded): the
// same transport cost as without the multiscale start, within tol times the largest cost.
template <typename T>
static void check_multiscale_logits() {
  const int64_t n = 2000, m = 1950, d = 19;
  std::mt19937_64 rng(21);
  std::normal_distribution<double> z(0.0, 1.0);
  std::uniform_real_distribution<double> mag(5.0, 15.0);
  std::vector<double> proto(d * d);
  for (int64_t c = 0; c < d; ++c)
    for (int64_t k = 0; k < d; ++k) proto[c * d + k] = (k == c ? mag(rng) : 0.0) + 0.3 * z(rng);
  auto points = [&](int64_t count, double shift) {
    std::vector<T> v(count * d);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t c = (i * d) / count;  // sorted by class, as otce sorts pixels
      for (int64_t k = 0; k < d; ++k) v[i * d + k] = static_cast<T>(proto[c * d + k] + shift + z(rng));
    }
    return v;
  };
  const std::vector<T> x = points(n, 0.0), y = points(m, 0.1);
  RowMatrix<T> cost;
  squared_euclidean<T>(x.data(), n, y.data(), m, d, cost);
  std::vector<double> a(n, 1.0 / n), b(m, 1.0 / m), f1(n), g1(m), f2(n), g2(m);
  SinkhornOptions opt;
  opt.epsilon = 0.1;
  opt.tol = cluster_tol<T>();
  opt.multiscale_points = 400;
  const SinkhornReport on = sinkhorn_log<T>(cost, a.data(), b.data(), opt, f1.data(), g1.data());
  SinkhornOptions off_opt = opt;
  off_opt.multiscale_points = 0;
  const SinkhornReport off = sinkhorn_log<T>(cost, a.data(), b.data(), off_opt, f2.data(), g2.data());
  CHECK(on.converged && off.converged);
  CHECK(on.stages < off.stages);
  CHECK(std::fabs(on.transport_cost - off.transport_cost) <= opt.tol * static_cast<double>(cost.maxCoeff()));
  if (std::getenv("SEGTRANSFER_DEBUG"))
    std::fprintf(stderr, "logits multiscale on / off: %lld / %lld iterations, %d / %d stages, W_D %.9g / %.9g\n",
                 static_cast<long long>(on.iterations), static_cast<long long>(off.iterations), on.stages, off.stages,
                 on.transport_cost, off.transport_cost);
  SinkhornOptions bad = opt;
  bad.handover_truncation = 0.0;
  std::vector<double> f3(n), g3(m);
  CHECK(throws<InvalidArgument>([&]() { sinkhorn_log<T>(cost, a.data(), b.data(), bad, f3.data(), g3.data()); }));
}

// SinkhornOptions::parallel_min_entries: problems below it get one thread whatever was asked (their
// barriers stall on a loaded machine), larger ones what was asked; both solvers refuse a negative or
// NaN value. (That small problems give the same bits on any thread count is checked with it at 0:
// check_blocked.)
static void test_parallel_min_entries() {
  SinkhornOptions three;
  three.num_threads = 3;
  CHECK(!three.parallel(10, 10) && three.parallel(400, 300));
#ifdef _OPENMP
  CHECK(threads_for(three, 10, 10) == 1);
  CHECK(threads_for(three, 400, 300) == 3);
  three.parallel_min_entries = 0.0;
  CHECK(threads_for(three, 10, 10) == 3);
#else
  CHECK(threads_for(three, 400, 300) == 1);
#endif
  const int64_t n = 5, d = 2;
  std::vector<double> x(n * d), y(n * d);
  for (int64_t k = 0; k < n * d; ++k) x[k] = 0.1 * k, y[k] = 0.3 - 0.05 * k;
  RowMatrix<double> cost;
  squared_euclidean<double>(x.data(), n, y.data(), n, d, cost);
  std::vector<double> a(n, 1.0 / n), f(n), g(n);
  for (const double bad_value : {-1.0, std::numeric_limits<double>::quiet_NaN()}) {
    SinkhornOptions bad;
    bad.parallel_min_entries = bad_value;
    CHECK(throws<InvalidArgument>([&]() { sinkhorn_log<double>(cost, a.data(), a.data(), bad, f.data(), g.data()); }));
    CHECK(throws<InvalidArgument>(
        [&]() { sinkhorn_blocked<double>(x.data(), n, y.data(), n, d, a.data(), a.data(), bad, f.data(), g.data()); }));
  }
}

// Stage extrapolation (each stage starts from the potentials extrapolated linearly in epsilon)
// changes where a stage starts, not its fixed point: in the hard regime (clusters 6 apart at
// eps = 0.01, cost / eps up to ~10^4, every stage on the full problem) the runs with the default
// factor, without it and with the largest allowed factor (2, overshooting) all certify to tol and
// agree (check_same_solution). Measured: 68 iterations against 119 without and 130 at factor 2 in
// double, 66 / 117 / 128 in float.
template <typename T>
static void check_stage_extrapolation() {
  const double centre[3][2] = {{0, 0}, {6, 0}, {12, 0}};
  const int64_t ns[3] = {400, 300, 200}, nt[3] = {250, 300, 250};
  SinkhornOptions opt;
  opt.epsilon = 0.01;
  opt.tol = cluster_tol<T>();
  opt.multiscale_points = 0;
  const ClusterProblem<T> p = cluster_problem<T>(8, centre, ns, nt, 0.5, 0.2);
  for (double factor : {0.0, 2.0}) {
    const TwoSolves s = solve_twice(p, opt, [factor](SinkhornOptions& o) { o.stage_extrapolation = factor; });
    check_same_solution(s, opt);
    if (std::getenv("SEGTRANSFER_DEBUG"))
      std::fprintf(stderr, "extrapolation 1 vs %g: %lld vs %lld iterations\n", factor,
                   static_cast<long long>(s.on.iterations), static_cast<long long>(s.off.iterations));
  }
  SinkhornOptions bad = opt;
  bad.stage_extrapolation = -1;
  std::vector<double> f(p.n), g(p.m);
  CHECK(throws<InvalidArgument>([&]() { sinkhorn_log<T>(p.cost, p.a.data(), p.b.data(), bad, f.data(), g.data()); }));
}

// newton_long_last_step: where Newton finishes the last stage, the schedule leaves out the stage at
// epsilon / scaling_factor (the grid is otherwise the same), and only after another stage; without
// Newton, or with the option off, the whole grid. Then, as for the extrapolation, the stage left
// out changes where the last stage starts, not its fixed point: in the hard regime (clusters 6
// apart at eps = 0.01) both schedules certify to tol and agree (check_same_solution), with one
// stage fewer.
template <typename T>
static void check_long_last_step() {
  SinkhornOptions opt;
  opt.epsilon = 0.01;
  const std::vector<double> full = [&] {
    SinkhornOptions o = opt;
    o.newton_long_last_step = false;
    return stage_schedule(5.0, o);
  }();
  CHECK(full.size() == 10 && full.back() == 0.01 && full[full.size() - 2] == 0.02);  // 5.12, ..., 0.02, 0.01
  std::vector<double> expected = full;
  expected.erase(expected.end() - 2);
  CHECK(stage_schedule(5.0, opt) == expected);
  SinkhornOptions plain = opt;
  plain.newton = false;
  CHECK(stage_schedule(5.0, plain) == full);
  CHECK(stage_schedule(0.03, opt) == (std::vector<double>{0.04, 0.01}));  // 0.04, 0.02, 0.01 without it
  CHECK(stage_schedule(0.015, opt) == (std::vector<double>{0.02, 0.01}));  // one stage before: kept
  CHECK(stage_schedule(0.005, opt) == (std::vector<double>{0.01}));
  const double centre[3][2] = {{0, 0}, {6, 0}, {12, 0}};
  const int64_t ns[3] = {400, 300, 200}, nt[3] = {250, 300, 250};
  opt.tol = cluster_tol<T>();
  opt.multiscale_points = 0;
  const ClusterProblem<T> p = cluster_problem<T>(8, centre, ns, nt, 0.5, 0.2);
  const TwoSolves s = solve_twice(p, opt, [](SinkhornOptions& o) { o.newton_long_last_step = false; });
  check_same_solution(s, opt);
  CHECK(s.on.stages + 1 == s.off.stages);
  if (std::getenv("SEGTRANSFER_DEBUG"))
    std::fprintf(stderr, "long last step on / off: %lld / %lld iterations, %lld / %lld Newton steps\n",
                 static_cast<long long>(s.on.iterations), static_cast<long long>(s.off.iterations),
                 static_cast<long long>(s.on.newton_steps), static_cast<long long>(s.off.newton_steps));
}

static void test_stage_extrapolation() {
  check_stage_extrapolation<double>();
  check_stage_extrapolation<float>();
  check_multiscale_same_plan<double>();
  check_multiscale_same_plan<float>();
  check_multiscale_logits<double>();
  check_multiscale_logits<float>();
  check_long_last_step<double>();
  check_long_last_step<float>();
}

// The blocked solver (cost recomputed in panels, never stored) against sinkhorn_log on the stored
// cost: both certify to tol and agree (check_same_solution), with and without class balancing, and
// in the hard regime (clusters 6 apart at eps = 0.01: cost / eps up to ~10^4). n = 123, m = 121 leave
// partial panels, tiles and uneven lanes. Its results are bit-identical for 1 and 3 threads; an
// exhausted iteration budget reports finite numbers, not converged; the interrupt stops it.
template <typename T>
static void check_blocked() {
  const double centre[3][2] = {{0, 0}, {4, 0}, {0, 4}};
  const int64_t ns[3] = {60, 40, 23}, nt[3] = {35, 45, 41};
  SinkhornOptions opt;
  opt.epsilon = 0.05;
  opt.tol = sizeof(T) == 8 ? 1e-8 : 1e-5;  // float: see check_class_balance
  const ClusterProblem<T> p = cluster_problem<T>(6, centre, ns, nt, 0.4, 0.3);
  const PlanClasses cls = p.classes();
  auto blocked = [&](const ClusterProblem<T>& q, const SinkhornOptions& o, std::vector<double>& f) {
    const PlanClasses c = q.classes();
    std::vector<double> g(q.m);
    f.resize(q.n);
    return sinkhorn_blocked<T>(q.x.data(), q.n, q.y.data(), q.m, 2, q.a.data(), q.b.data(), o, f.data(), g.data(),
                               &c);
  };
  auto stored = [&](const ClusterProblem<T>& q, const SinkhornOptions& o, std::vector<double>& f) {
    const PlanClasses c = q.classes();
    std::vector<double> g(q.m);
    f.resize(q.n);
    return sinkhorn_log<T>(q.cost, q.a.data(), q.b.data(), o, f.data(), g.data(), &c);
  };
  TwoSolves s;
  s.on = blocked(p, opt, s.f_on);
  s.off = stored(p, opt, s.f_off);
  const double worst = check_same_solution(s, opt);
  CHECK(std::fabs(s.on.transport_cost - s.off.transport_cost) <=
        std::expm1(2 * worst / opt.epsilon + 4 * opt.tol) * s.off.transport_cost);

  SinkhornOptions plain = opt;
  plain.class_balance = false;
  plain.max_iter = 1000000;
  TwoSolves u;
  u.on = blocked(p, plain, u.f_on);
  u.off = stored(p, opt, u.f_off);
  check_same_solution(u, opt);
  CHECK(s.on.iterations < u.on.iterations);  // balancing helps the blocked solver too

  // Newton's CG products on the truncated copy of the plan (the default) or recomputed (no memory
  // for the copy): the same answer.
  SinkhornOptions recompute = opt;
  recompute.blocked_plan_bytes = 0;
  TwoSolves rc;
  rc.on = blocked(p, recompute, rc.f_on);
  rc.off = blocked(p, opt, rc.f_off);
  check_same_solution(rc, opt);
  CHECK(rc.on.newton_steps > 0 && rc.off.newton_steps > 0);

  // Intermediate stages with exponents formed in float (the default for float storage) or in
  // double: the same answer, the last stage and the certificate being in double either way.
  SinkhornOptions double_stages = opt;
  double_stages.float_stage_exponents = false;
  TwoSolves fs;
  fs.on = blocked(p, opt, fs.f_on);
  fs.off = blocked(p, double_stages, fs.f_off);
  check_same_solution(fs, opt);

  SinkhornOptions one = opt, three = opt;
  one.num_threads = 1;
  three.num_threads = 3;
  three.parallel_min_entries = 0;  // threads on this small problem too
  TwoSolves t;
  t.on = blocked(p, one, t.f_on);
  t.off = blocked(p, three, t.f_off);
  CHECK(t.f_on == t.f_off && t.on.joint == t.off.joint && t.on.iterations == t.off.iterations);

  const double far[3][2] = {{0, 0}, {6, 0}, {12, 0}};
  const int64_t hs[3] = {90, 70, 50}, ht[3] = {60, 70, 60};
  SinkhornOptions hard = opt;
  hard.epsilon = 0.01;
  hard.tol = cluster_tol<T>();
  const ClusterProblem<T> h = cluster_problem<T>(8, far, hs, ht, 0.5, 0.2);
  TwoSolves hh;
  hh.on = blocked(h, hard, hh.f_on);
  hh.off = stored(h, hard, hh.f_off);
  check_same_solution(hh, hard, 4.0);  // measured: 1.2x the plain bound in double, 1.3x in float
  SinkhornOptions hard_recompute = hard;
  hard_recompute.blocked_plan_bytes = 0;
  hh.on = blocked(h, hard_recompute, hh.f_on);
  check_same_solution(hh, hard, 4.0);

  SinkhornOptions few = opt;
  few.max_iter = 3;
  std::vector<double> f;
  const SinkhornReport r = blocked(p, few, f);
  CHECK(!r.converged && std::isfinite(r.marginal_error) && r.joint.size() == 9);
  for (double v : f) CHECK(std::isfinite(v));
  (void)cls;

  SinkhornOptions stop = opt;
  stop.interrupt = []() { return true; };
  CHECK(throws<Interrupted>([&]() { blocked(p, stop, f); }));
}

static void test_blocked() {
  check_blocked<double>();
  check_blocked<float>();
}

// transport_points groups unlabelled points by k-means cells (at >= 10^6 entries) and sorts them
// by cell for the solver: the potentials must come back in the caller's order. Grouped and plain
// solves of the same problem (points in a random order, four imbalanced clusters) must agree
// point by point, up to the additive constant, within the bound check_same_solution explains.
template <typename T>
static void check_transport_grouping() {
  std::mt19937_64 rng(7);
  const int64_t n = 1100, m = 1000, d = 3;
  const double centre[4][3] = {{0, 0, 0}, {3, 0, 0}, {0, 3, 0}, {0, 0, 3}};
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::normal_distribution<double> z(0.0, 0.5);
  auto cloud = [&](int64_t count, const double* weight) {
    std::vector<T> p;
    for (int64_t i = 0; i < count; ++i) {
      const double r = u(rng);
      int c = 0;
      while (c < 3 && r > weight[c]) ++c;
      for (int k = 0; k < d; ++k) p.push_back(static_cast<T>(centre[c][k] + z(rng)));
    }
    return p;
  };
  const double wx[3] = {0.4, 0.7, 0.9}, wy[3] = {0.2, 0.5, 0.7};  // cumulative cluster weights
  const std::vector<T> x = cloud(n, wx), y = cloud(m, wy);
  SinkhornOptions opt;
  opt.epsilon = 0.05;
  opt.tol = sizeof(T) == 8 ? 1e-8 : 1e-5;
  const TransportResult on = transport_points<T>(x.data(), n, y.data(), m, d, nullptr, nullptr, opt, 0.0);
  opt.class_balance = false;
  const TransportResult off = transport_points<T>(x.data(), n, y.data(), m, d, nullptr, nullptr, opt, 0.0);
  CHECK(on.report.converged && off.report.converged);
  CHECK(on.report.joint.size() == 1u);
  double shift = 0, worst = 0;
  for (int64_t i = 0; i < n; ++i) shift += (on.f[i] - off.f[i]) / n;
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(on.f[i] - off.f[i] - shift));
  for (int64_t j = 0; j < m; ++j) worst = std::max(worst, std::fabs(on.g[j] - off.g[j] + shift));
  CHECK(worst / opt.epsilon <= opt.tol * static_cast<double>(n));
  // Every plan entry moves by a factor within exp(+-2 worst / eps), and so does <pi, C>.
  CHECK(std::fabs(on.transport_cost - off.transport_cost) <= std::expm1(2 * worst / opt.epsilon) * off.transport_cost);
}

static void test_transport_grouping() {
  check_transport_grouping<double>();
  check_transport_grouping<float>();
}

// otce splits every class by k-means cells for balancing (at >= 10^6 entries), which re-sorts the
// pixels inside each class: the joint label table, entropy and cost must not notice. Labels follow
// four clusters only partly (two classes share a cluster, 10 % label noise). Grouped and plain
// solves must agree to what two plans certified to tol can differ by: joint entries (summing to 1)
// within 4 tol as in check_same_solution; H(Yt|Ys) = -sum P log(P / P_s) moves by at most
// sum |dP| (|log(P / P_s)| + 1), under 40 tol for entries above 1e-4 (all are, here), and so does
// W_D relative to itself. Measured: joint 1.8e-10, H 6.6e-11, W_D 1.5e-9 (relative) in double;
// 2.9e-8, 1.5e-8, 4.4e-8 in float.
template <typename T>
static void check_otce_grouping() {
  std::mt19937_64 rng(8);
  const int64_t n = 1100, m = 1000, d = 3;
  const double centre[4][3] = {{0, 0, 0}, {3, 0, 0}, {0, 3, 0}, {0, 0, 3}};
  std::uniform_int_distribution<int> cl(0, 3);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::normal_distribution<double> z(0.0, 0.5);
  std::vector<T> xs, xt;
  std::vector<int32_t> ys, yt;
  for (int64_t i = 0; i < n; ++i) {
    const int c = u(rng) < 0.5 ? 0 : cl(rng);
    for (int k = 0; k < d; ++k) xs.push_back(static_cast<T>(centre[c][k] + z(rng)));
    ys.push_back(u(rng) < 0.1 ? cl(rng) % 3 : c % 3);
  }
  for (int64_t j = 0; j < m; ++j) {
    const int c = cl(rng);
    for (int k = 0; k < d; ++k) xt.push_back(static_cast<T>(centre[c][k] + 0.2 + z(rng)));
    yt.push_back(c / 2);
  }
  const PixelView<T> vs{xs.data(), 1, n, d, n * d, d, 1}, vt{xt.data(), 1, m, d, m * d, d, 1};
  std::vector<int64_t> is(n), it(m);
  for (int64_t i = 0; i < n; ++i) is[i] = i;
  for (int64_t j = 0; j < m; ++j) it[j] = j;
  SinkhornOptions opt;
  opt.epsilon = 0.05;
  opt.tol = sizeof(T) == 8 ? 1e-8 : 1e-5;
  opt.num_threads = 1;
  const OTCEResult on = otce<T>(vs, ys.data(), 3, is.data(), n, vt, yt.data(), 2, it.data(), m, 1, opt, 0.0);
  opt.class_balance = false;
  const OTCEResult off = otce<T>(vs, ys.data(), 3, is.data(), n, vt, yt.data(), 2, it.data(), m, 1, opt, 0.0);
  CHECK(on.converged[0] && off.converged[0]);
  double worst = 0;
  for (size_t k = 0; k < on.joint.size(); ++k) worst = std::max(worst, std::fabs(on.joint[k] - off.joint[k]));
  CHECK(worst <= 4 * opt.tol);
  CHECK(std::fabs(on.conditional_entropy[0] - off.conditional_entropy[0]) <= 40 * opt.tol);
  CHECK(std::fabs(on.transport_cost[0] - off.transport_cost[0]) <= 40 * opt.tol * off.transport_cost[0]);
}

static void test_otce_grouping() {
  check_otce_grouping<double>();
  check_otce_grouping<float>();
}

// FloorWatch: `patience` records without a 0.1 % gain end a stage only near float64's floor;
// `far_patience` such records end it anywhere; a gain restarts both counts.
static void test_floor_watch() {
  FloorWatch near(1.0, 1.0, 2), far(1.0, 1.0, 2, 4);  // floor 2.2e-16: 1e-3 is far above it
  CHECK(!near.stuck(1e-3) && !far.stuck(1e-3));
  for (int k = 0; k < 10; ++k) CHECK(!near.stuck(1e-3));
  CHECK(!far.stuck(1e-3) && !far.stuck(1e-3) && !far.stuck(0.9999e-3));  // 3 records without a gain
  CHECK(far.stuck(1e-3));                                                 // the 4th
  CHECK(!far.stuck(0.5e-3) && far.progressed());                          // a gain restarts the count
  FloorWatch low(1.0, 1.0, 2);
  CHECK(!low.stuck(1e-14) && !low.stuck(1e-14) && low.stuck(1e-14));      // near the floor: patience 2
}

// shift_imbalanced_component: the component most short of columns grows as the Hungarian tree does,
// exactly: the least shift that makes an entry leaving it as tight as its row's best entry inside,
// then the same for the tree grown by the component that entry reaches, until the imbalance is down
// to min_imbalance. Components here (n = m = 5, uniform masses): A = rows {0, 1, 2} + column {0}
// (+2/5, short of columns), B = row {3} + columns {1, 2}, C = row {4} + columns {3, 4} (-1/5 each).
// A row-major rows x cols cost as shift_imbalanced_component reads it: row i in place, column j
// gathered into a buffer (valid until the next call).
struct DenseCostView {
  const std::vector<double>& c;
  int64_t rows, cols;
  mutable std::vector<double> column;
  const double* row(int64_t i) const { return c.data() + i * cols; }
  const double* col(int64_t j) const {
    column.resize(rows);
    for (int64_t i = 0; i < rows; ++i) column[i] = c[i * cols + j];
    return column.data();
  }
};

static void test_component_shift() {
  const int64_t n = 5, m = 5;
  const std::vector<double> a(n, 0.2), b(m, 0.2);
  const std::vector<std::pair<int64_t, int64_t>> pairs = {{0, 0}, {1, 0}, {2, 0}, {3, 1}, {3, 2}, {4, 3}, {4, 4}};
  const auto entries = [&](const auto& visit) {
    for (const auto& [i, j] : pairs) visit(i, j);
  };
  const std::vector<double> C = {0, 5, 7, 9, 9,  //
                                 1, 4, 9, 9, 9,  //
                                 2, 9, 9, 3.5, 9,  //
                                 9, 0, 0, 9, 9,  //
                                 9, 9, 9, 0, 0};
  std::vector<double> f(n, 0.0), g(m, 0.0);
  const DenseCostView view{C, n, m};
  const auto row = [&](int64_t i) { return view.row(i); };
  const auto col = [&](int64_t j) { return view.col(j); };
  // Rows 0, 1, 2 leave A at 5 - 0, 4 - 1, 3.5 - 2 above their best inside: the shift is 1.5, by row
  // 2's entry into C. A + C is short by 1/5, within 0.25: done.
  CHECK(shift_imbalanced_component(n, m, a.data(), b.data(), 0.25, entries, row, col, f.data(), g.data(), false));
  CHECK(f[0] == 1.5 && f[1] == 1.5 && f[2] == 1.5 && f[3] == 0.0 && f[4] == 0.0);
  CHECK(g[0] == -1.5 && g[1] == 0.0 && g[2] == 0.0 && g[3] == 0.0 && g[4] == 0.0);
  // With 0.05 the tree A + C takes a second step: row 1's entry into B, 4 - 1 = 3 above its best
  // inside, now 3 - 1.5 = 1.5 away (row 4's are 9): 1.5 more for A, 1.5 for C (joined at 1.5).
  std::fill(f.begin(), f.end(), 0.0);
  std::fill(g.begin(), g.end(), 0.0);
  CHECK(shift_imbalanced_component(n, m, a.data(), b.data(), 0.05, entries, row, col, f.data(), g.data(), false));
  CHECK(f[0] == 3.0 && f[1] == 3.0 && f[2] == 3.0 && f[3] == 0.0 && f[4] == 1.5);
  CHECK(g[0] == -3.0 && g[1] == 0.0 && g[2] == 0.0 && g[3] == -1.5 && g[4] == -1.5);
  // Below min_imbalance (2/5 here), nothing moves.
  std::fill(f.begin(), f.end(), 0.0);
  std::fill(g.begin(), g.end(), 0.0);
  CHECK(!shift_imbalanced_component(n, m, a.data(), b.data(), 0.5, entries, row, col, f.data(), g.data(), false));
  CHECK(std::all_of(f.begin(), f.end(), [](double v) { return v == 0.0; }));
  CHECK(std::all_of(g.begin(), g.end(), [](double v) { return v == 0.0; }));
  // The transposed problem with row masses (0.2, 0.25, 0.25, 0.15, 0.15): A' (row 0, columns 0-2) is
  // short of rows by 0.4, B' (rows 1, 2, column 3) short of columns by 0.3, C' (rows 3, 4, column 4)
  // by 0.1. B' grows: its rows leave it at 4 (row 1 into column 1) and 7 above their best: 4, into
  // A'; then short of rows, so done.
  std::vector<double> Ct(n * m);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) Ct[j * n + i] = C[i * m + j];
  const std::vector<double> at = {0.2, 0.25, 0.25, 0.15, 0.15};
  const auto entries_t = [&](const auto& visit) {
    for (const auto& [i, j] : pairs) visit(j, i);
  };
  const DenseCostView view_t{Ct, m, n};
  const auto row_t = [&](int64_t i) { return view_t.row(i); };
  const auto col_t = [&](int64_t j) { return view_t.col(j); };
  CHECK(shift_imbalanced_component(n, m, at.data(), b.data(), 0.25, entries_t, row_t, col_t, f.data(), g.data(), false));
  CHECK(f[0] == 0.0 && f[1] == 4.0 && f[2] == 4.0 && f[3] == 0.0 && f[4] == 0.0);
  CHECK(g[0] == 0.0 && g[1] == 0.0 && g[2] == 0.0 && g[3] == -4.0 && g[4] == 0.0);
  // One component holding everything (balanced): nothing to do.
  const auto all = [&](const auto& visit) {
    for (int64_t i = 0; i < n; ++i) visit(i, i);
    for (int64_t i = 0; i + 1 < n; ++i) visit(i, i + 1);
  };
  CHECK(!shift_imbalanced_component(n, m, a.data(), b.data(), 0.0, all, row, col, f.data(), g.data(), false));
  // Two components short of columns in one call (n = m = 6, masses 1/6): A = rows {0, 1} + column 0
  // and C = rows {3, 4} + column 3 (+1/6 each), B = row 2 + columns {1, 2} and D = row 5 + columns
  // {4, 5} (-1/6 each). A's way out is row 0 into B at 2, C's is row 3 into D at 3; every other
  // entry costs 9. Both trees grow, each by its own shift (one call left C to a later round).
  {
    const int64_t k = 6;
    const std::vector<double> w(k, 1.0 / 6.0);
    std::vector<double> C2(k * k, 9.0);
    for (const auto& [i, j] : std::vector<std::pair<int64_t, int64_t>>{{0, 0}, {1, 0}, {2, 1}, {2, 2}, {3, 3}, {4, 3}, {5, 4}, {5, 5}})
      C2[i * k + j] = 0.0;
    C2[0 * k + 1] = 2.0;
    C2[3 * k + 4] = 3.0;
    const auto entries2 = [&](const auto& visit) {
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j)
          if (C2[i * k + j] == 0.0) visit(i, j);
    };
    const DenseCostView view2{C2, k, k};
    const auto row2 = [&](int64_t i) { return view2.row(i); };
    const auto col2 = [&](int64_t j) { return view2.col(j); };
    std::vector<double> f2(k, 0.0), g2(k, 0.0);
    CHECK(shift_imbalanced_component(k, k, w.data(), w.data(), 0.05, entries2, row2, col2, f2.data(), g2.data(), false));
    CHECK(f2 == (std::vector<double>{2, 2, 0, 3, 3, 0}));
    CHECK(g2 == (std::vector<double>{-2, 0, 0, -3, 0, 0}));
  }
  // The mirror: no component short of columns by more than min_imbalance (0.15), one short of rows by
  // more. n = m = 3, a = (0.3, 0.3, 0.4), b = (0.2, 0.2, 0.6): A = row 0 + column 0 (+0.1), B = row 1
  // + column 1 (+0.1), C = row 2 + column 2 (-0.2). C grows on the transposed problem: column 2's way
  // out is row 0 at 2 (row 1's at 5): g_2 + 2, f_2 - 2, and C + A is short of rows by 0.1 only.
  {
    const int64_t k = 3;
    const std::vector<double> a3 = {0.3, 0.3, 0.4}, b3 = {0.2, 0.2, 0.6};
    const std::vector<double> C3 = {0, 9, 2,  //
                                    9, 0, 5,  //
                                    9, 9, 0};
    const auto entries3 = [&](const auto& visit) {
      for (int64_t i = 0; i < k; ++i) visit(i, i);
    };
    const DenseCostView view3{C3, k, k};
    const auto row3 = [&](int64_t i) { return view3.row(i); };
    const auto col3 = [&](int64_t j) { return view3.col(j); };
    std::vector<double> f3(k, 0.0), g3(k, 0.0);
    CHECK(shift_imbalanced_component(k, k, a3.data(), b3.data(), 0.15, entries3, row3, col3, f3.data(), g3.data(), false));
    CHECK(f3 == (std::vector<double>{0, 0, -2}));
    CHECK(g3 == (std::vector<double>{0, 0, 2}));
    // Below min_imbalance on both sides: nothing moves.
    std::fill(f3.begin(), f3.end(), 0.0);
    std::fill(g3.begin(), g3.end(), 0.0);
    CHECK(!shift_imbalanced_component(k, k, a3.data(), b3.data(), 0.25, entries3, row3, col3, f3.data(), g3.data(), false));
  }
}

// The certificates add what float64 rounding can hide (certificate_rounding): 2 (4 M + terms + 8)
// 2^-53 with M = (max|C| + max|f| + max|g|) / eps; non-finite potentials make it non-finite. A
// solve asked for a tol below that floor can then never report converged (early_exits checks it).
static void test_certificate_rounding() {
  const double f[2] = {1.0, -2.0}, g[1] = {3.0};
  const double r = certificate_rounding(100.0, f, 2, g, 1, 0.1, 2);
  CHECK(r == 2.0 * (4.0 * (100.0 + 2.0 + 3.0) / 0.1 + 2.0 + 8.0) * 0x1p-53);
  CHECK(r > 0 && r < 1e-12);
  const double bad[1] = {std::numeric_limits<double>::quiet_NaN()};
  CHECK(!std::isfinite(certificate_rounding(100.0, f, 2, bad, 1, 0.1, 2)));
  // A converged solve reports at least that term.
  std::mt19937_64 rng(11);
  const int64_t n = 120, d = 3;
  std::vector<double> x = normal(rng, n * d, 2.0), y = normal(rng, n * d, 2.0);
  SinkhornOptions opt;
  opt.epsilon = 0.05;
  opt.tol = 1e-9;
  const TransportResult t = transport_points<double>(x.data(), n, y.data(), n, d, nullptr, nullptr, opt, 0.0);
  CHECK(t.report.converged);
  CHECK(t.report.marginal_error >= 2.0 * (static_cast<double>(n) + 8.0) * 0x1p-53);
}

// Where float64's rounding alone exceeds tol, no certificate can pass: below twice that rounding
// (newton_settle) the last stage's Newton goes on only while its steps halve the error, and the
// solve ends there, unconverged, with a certified error of a few times it. 1,200 points on a line,
// ~600 apart, in float32 at eps = 0.1 (cost / eps ~1e8, rounding ~1.5e-7 against tol 1e-8), five
// seeds, stored and blocked: 11 s and 222,000 CG iterations aimed at tol (errors 1.3-3.0e-7), 2.5 s
// and 34,000 with the rule (1.8-4.8e-7). A draw of 1,202 such points had crawled through Newton
// steps of up to 20,000 CG iterations for 40 s (session 48).
static void test_tol_below_rounding() {
  CHECK(newton_settle(1.6e-7, 1e-8) == 3.2e-7 && newton_settle(1e-11, 1e-6) == 0.0);
  int64_t cg = 0;
  for (const uint64_t seed : {0, 1, 2, 3, 5}) {
    std::mt19937_64 rng(seed);
    const int64_t n = 1200;
    const std::vector<double> xd = normal(rng, n, 600.0), yd = normal(rng, n, 600.0);
    const std::vector<float> x(xd.begin(), xd.end()), y(yd.begin(), yd.end());
    SinkhornOptions opt;
    opt.epsilon = 0.1;
    opt.tol = 1e-8;
    for (const bool blocked : {false, true}) {
      opt.blocked = blocked;
      const TransportResult t = transport_points<float>(x.data(), n, y.data(), n, 1, nullptr, nullptr, opt, 0.0);
      CHECK(!t.report.converged && !t.report.timed_out && t.report.iterations < opt.max_iter);
      CHECK(t.report.marginal_error > opt.tol && t.report.marginal_error < 1e-6);
      cg += t.report.cg_iterations;
    }
  }
  CHECK(cg < 100000);
}

// StallBackoff: a loop that keeps setting new bests is left alone; one that stops doing so loses half
// of omega - 1 every kPatience (5) blocks until omega is 1, and its cap follows omega down.
static void test_stall_backoff() {
  StallBackoff falling;
  double omega = 1.9, cap = 1.9;
  for (int k = 0; k < 40; ++k) CHECK(!falling.record(std::pow(0.8, k), omega, cap));
  CHECK(omega == 1.9 && cap == 1.9);
  StallBackoff flat;
  int backoffs = 0;
  for (int k = 0; k < 4; ++k) backoffs += flat.record(1.5e-6, omega, cap);  // the first sets the best
  CHECK(backoffs == 0 && omega == 1.9);
  for (int k = 0; k < 2; ++k) backoffs += flat.record(1.45e-6, omega, cap);  // within 10 %: no progress
  CHECK(backoffs == 1 && std::abs(omega - 1.45) < 1e-15 && cap == omega);
  for (int k = 0; k < 100; ++k) backoffs += flat.record(1.4e-6, omega, cap);
  CHECK(omega == 1.0 && cap == 1.0 && backoffs == 6);  // 1.45, 1.225, 1.1125, 1.056, 1.028, then 1
  // The solves that cycled (float32 demo draws) are checked in the Python suite:
  // test_otce.py::test_no_cycle_of_overrelaxation_and_balancing.
}

// accept_block: an over-relaxed block is undone when its error rose against the last accepted
// block's, when it overflowed, or when it ends above kRunawayError, the most a plain Sinkhorn iterate
// can be off; the last also when there is no block to compare with (block_err infinite, as the CPU
// loops leave it after each balancing and pattern refresh). Plain Sinkhorn (omega = 1) is only
// undone on an overflow.
static void test_accept_block() {
  const double inf = std::numeric_limits<double>::infinity();
  double block_err = inf, omega = 1.9, cap = 1.9;
  CHECK(accept_block(3.9, block_err, omega, cap) && block_err == 3.9 && omega == 1.9);
  block_err = inf;
  CHECK(!accept_block(10.0, block_err, omega, cap));
  CHECK(block_err == inf && std::abs(omega - 1.45) < 1e-15 && std::abs(cap - 1.85) < 1e-15);
  CHECK(!accept_block(1e36, block_err, omega, cap) && std::abs(omega - 1.225) < 1e-15);
  CHECK(!accept_block(std::nan(""), block_err, omega, cap));
  block_err = 0.5;
  CHECK(!accept_block(0.6, block_err, omega, cap));  // rose against the last accepted block
  CHECK(accept_block(0.4, block_err, omega, cap) && block_err == 0.4);
  double plain = 1.0, plain_cap = 1.0, plain_err = inf;
  CHECK(accept_block(10.0, plain_err, plain, plain_cap) && plain == 1.0);
  CHECK(!accept_block(inf, plain_err, plain, plain_cap) && plain == 1.0);
}

// next_certificate_target: an estimate the certificate contradicted is asked for tenfold less; one
// it confirmed, failing on float64's rounding alone, is asked for what would pass (tol less the
// rounding, with a 10 % margin), never more than before; where the rounding alone exceeds tol,
// tenfold less.
static void test_next_certificate_target() {
  CHECK(next_certificate_target(5e-7, 8e-7, 1e-11, 1e-6) == 0.1 * 5e-7);         // optimistic estimate
  CHECK(std::abs(next_certificate_target(5e-7, 4.96e-7, 7.3e-7, 1e-6) - 0.9 * 2.7e-7) < 1e-20);
  CHECK(std::abs(next_certificate_target(5e-7, 6e-7, 7.3e-7, 1e-6) - 5e-8) < 1e-20);  // both: the lower
  CHECK(next_certificate_target(5e-7, 4e-7, 2e-6, 1e-6) == 0.1 * 5e-7);          // nothing can pass
  CHECK(next_certificate_target(5e-7, 4e-7, std::numeric_limits<double>::infinity(), 1e-6) == 0.1 * 5e-7);
  CHECK(next_certificate_target(5e-7, 4e-7, std::nan(""), 1e-6) == 0.1 * 5e-7);
}

// Every early exit: max_iter, timeout, interrupt, refusals; each must unwind without leaking.
static void test_early_exits() {
  std::mt19937_64 rng(5);
  const int64_t n = 200, d = 4;
  std::vector<double> x = normal(rng, n * d, 3.0), y = normal(rng, n * d, 3.0);
  SinkhornOptions opt;
  opt.epsilon = 1e-3;
  opt.tol = 1e-12;
  opt.max_iter = 3;
  TransportResult r = transport_points<double>(x.data(), n, y.data(), n, d, nullptr, nullptr, opt, 0.0);
  CHECK(!r.report.converged && r.report.iterations <= 3);
  // tol = 1e-12 is below this problem's float64 floor, so a solve with unbounded max_iter stops
  // where its error stalls, not converged, without timing out (SinkhornReport has no flag for it).
  opt.max_iter = 1000000000;
  const auto t_stall = std::chrono::steady_clock::now();
  r = transport_points<double>(x.data(), n, y.data(), n, d, nullptr, nullptr, opt, 0.0);
  CHECK(!r.report.converged && !r.report.timed_out && r.report.iterations < opt.max_iter);
  const double stall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_stall).count();
  // The timeout and the interrupt on a larger problem, whose stall takes far longer than either.
  const int64_t nl = 1200;
  std::vector<double> xl = normal(rng, nl * d, 3.0), yl = normal(rng, nl * d, 3.0);
  opt.timeout = 0.05;
  const auto t_long = std::chrono::steady_clock::now();
  r = transport_points<double>(xl.data(), nl, yl.data(), nl, d, nullptr, nullptr, opt, 0.0);
  CHECK(r.report.timed_out && !r.report.converged);
  std::fprintf(stderr, "  (stall of the small problem after %.3f s; the larger one timed out after %.3f s)\n", stall_s,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t_long).count());
  opt.timeout = 0.0;
  int polls = 0;
  opt.interrupt = [&polls]() { return ++polls >= 2; };
  CHECK(throws<Interrupted>([&] { transport_points<double>(xl.data(), nl, yl.data(), nl, d, nullptr, nullptr, opt, 0.0); }));
  opt.interrupt = nullptr;
  opt.max_iter = 100;
  CHECK(throws<OutOfMemory>([&] { transport_points<double>(x.data(), n, y.data(), n, d, nullptr, nullptr, opt, 1e3); }));
  opt.epsilon = 1e-300;
  CHECK(throws<InvalidArgument>([&] { transport_points<double>(x.data(), n, y.data(), n, d, nullptr, nullptr, opt, 0.0); }));
  opt.epsilon = 0.1;
  // Costs beyond float32 within one side (points +-1e20 apart); two sets each of one point value
  // however far apart are solved (their offset is the separable part, in double: centre_sides).
  std::vector<float> big(n * d, 1e20f), small(n * d, 0.0f);
  {
    const TransportResult far = transport_points<float>(big.data(), n, small.data(), n, d, nullptr, nullptr, opt, 0.0);
    CHECK(far.report.converged && std::fabs(far.transport_cost / (1e40 * d) - 1.0) < 1e-6);
  }
  for (int64_t i = 0; i < n; i += 2) big[i * d] = -1e20f;
  CHECK(throws<InvalidArgument>([&] { transport_points<float>(big.data(), n, small.data(), n, d, nullptr, nullptr, opt, 0.0); }));
  std::vector<int32_t> code(n, 0);
  code[0] = 1;
  std::vector<int64_t> idx(n);
  for (int64_t i = 0; i < n; ++i) idx[i] = i;
  x[5 * d + 1] = std::nan("");
  const PixelView<double> vs{x.data(), 1, n, d, n * d, d, 1}, vt{y.data(), 1, n, d, n * d, d, 1};
  CHECK(throws<InvalidArgument>([&] { otce<double>(vs, code.data(), 2, idx.data(), n, vt, code.data(), 2, idx.data(), n, 1, opt, 0.0); }));
  // n * repeats beyond int64: refused before the size wraps around.
  CHECK(throws<OutOfMemory>([&] { sample_pixels(code.data(), n, 16, int64_t(1) << 60, 0, "source_labels"); }));
  CHECK(throws<InvalidArgument>([&] { sample_pixels(code.data(), n, 0, 1, 0, "source_labels"); }));
}

// Each test prints its wall time on stderr, so a slow sanitizer run shows where the time goes.
// Arguments name the tests to run (e.g. `segtransfer_tests multiscale_path` to reproduce one
// sanitizer report quickly); none runs them all. An unknown name is an error, not a silent pass.
int main(int argc, char** argv) {
  struct Test {
    const char* name;
    void (*run)();
  };
  const Test tests[] = {
      {"fast_exp", test_fast_exp},
      {"squared_euclidean", test_squared_euclidean},
      {"cost_range_solve", test_cost_range_solve},
      {"lse_kernels", test_lse_kernels},
      {"block_pool", test_block_pool},
      {"scan_threshold", test_scan_threshold},
      {"compact_above", test_compact_above},
      {"group_sums", test_group_sums},
      {"block_index", test_block_index},
      {"plan_rows", test_plan_rows},
      {"capture_keep", test_capture_keep},
      {"pattern_build", test_pattern_build},
      {"pattern_filters", test_pattern_filters},
      {"dense_fill", test_dense_fill},
      {"keep_below", test_keep_below},
      {"sampling", test_sampling},
      {"cache_alignment", test_cache_alignment},
      {"floyd_table", test_floyd_table},
      {"sampling_uniform", test_sampling_uniform},
      {"otce_bijection", test_otce_bijection},
      {"conditional_entropy", test_conditional_entropy},
      {"strided_views", test_strided_views},
      {"sparse_and_newton_paths", test_sparse_and_newton_paths},
      {"multiscale_path", test_multiscale_path},
      {"coarse_newton", test_coarse_newton},
      {"deflation", test_deflation},
      {"dense_newton", test_dense_newton},
      {"dense_newton_tight", test_dense_newton_tight},
      {"dense_last_stage_fallback", test_dense_last_stage_fallback},
      {"small_last_stage_fallback", test_small_last_stage_fallback},
      {"otce_many_classes", test_otce_many_classes},
      {"otce_duplicates", test_otce_duplicates},
      {"dense_last_stage_fallback_large", test_dense_last_stage_fallback_large},
      {"class_balance", test_class_balance},
      {"class_balance_threads", test_class_balance_threads},
      {"parallel_min_entries", test_parallel_min_entries},
      {"fold_balancing", test_fold_balancing},
      {"float_stages", test_float_stages},
      {"newton_cg_floor", test_newton_cg_floor},
      {"left_out_product_bound", test_left_out_product_bound},
      {"stage_extrapolation", test_stage_extrapolation},
      {"blocked", test_blocked},
      {"transport_grouping", test_transport_grouping},
      {"otce_grouping", test_otce_grouping},
      {"floor_watch", test_floor_watch},
      {"component_shift", test_component_shift},
      {"certificate_rounding", test_certificate_rounding},
      {"early_exits", test_early_exits},
      {"stall_backoff", test_stall_backoff},
      {"accept_block", test_accept_block},
      {"next_certificate_target", test_next_certificate_target},
      {"tol_below_rounding", test_tol_below_rounding},
  };
  for (int i = 1; i < argc; ++i) {
    bool known = false;
    for (const Test& t : tests) known = known || std::strcmp(argv[i], t.name) == 0;
    if (!known) {
      std::fprintf(stderr, "unknown test '%s'; the tests are:", argv[i]);
      for (const Test& t : tests) std::fprintf(stderr, " %s", t.name);
      std::fprintf(stderr, "\n");
      return 2;
    }
  }
  for (const Test& t : tests) {
    bool selected = argc == 1;
    for (int i = 1; i < argc; ++i) selected = selected || std::strcmp(argv[i], t.name) == 0;
    if (!selected) continue;
    const auto t0 = std::chrono::steady_clock::now();
    t.run();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "  %-26s %8.2f s\n", t.name, s);
  }
  std::printf("%d passed, %d failed\n", passed, failures);
  return failures ? 1 : 0;
}
