// Roofline of the dense log-domain Sinkhorn iteration on this machine: measures (a) sustained DRAM
// read bandwidth, (b) the throughput of the solver's own exp (detail::fast_exp, compiled with the
// same target clones as sinkhorn.cpp), (c) seconds per dense iteration through the public API, and
// compares (c) with the limits (a) and (b) put on it. Usage: segtransfer_roofline [N] [D] [threads]
// (N = M; threads omitted: 1 and 2).
//
// `segtransfer_roofline sparse [entries per row] [threads]`: the same for the loop that dominates a
// solve now, the truncated-kernel float iteration of the intermediate stages (see sparse_main).
// Where the 8-column blocks run it also times them without the exponential (scaling_row): what an
// iteration in the scaling domain would cost, for comparison.
//
// What one dense float iteration does (sinkhorn.cpp, half_step with sp == nullptr):
//  - rows (RowLse::run per row): one pass that streams the row from DRAM and takes M exps, shifted
//    by the row's own potential (the max-then-sum fallback only runs when that over/underflows,
//    e.g. in the first iterations from zero potentials, which the 20-vs-40 difference cancels).
//  - columns (dense_column_lse): one sum_row sweep over all of C with the exps, shifted likewise
//    (C is 400 MB at N = 10^4, so it comes from DRAM again).
//  Total: 2 * N*M*sizeof(float) bytes from DRAM and 2 * N*M exps (args formed in double).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../cpp/src/kernels.hpp"  // the solver's row loops themselves (internal), for `sparse`
#include "../cpp/src/pattern_scan.hpp"  // BlockIndex
#include "segtransfer/fastexp.hpp"
#include "segtransfer/sinkhorn.hpp"

// Same dispatch as the solver's hot loops (see SEGTRANSFER_HOT in sinkhorn.cpp): without it this
// file would measure the baseline x86-64 (SSE2) build of fast_exp, not what the solver runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SEGTRANSFER_NO_CLONES)
#define ROOF_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ROOF_HOT
#endif

using namespace segtransfer;
using Clock = std::chrono::steady_clock;
static double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
// Tells the compiler the array may have changed, so repeated calls on it cannot be hoisted/merged.
static inline void clobber() { asm volatile("" ::: "memory"); }

template <typename T>
struct Kernels {
  // (a) 4 x 16 independent accumulators: one accumulator would make the loop add-latency bound.
  ROOF_HOT static T sum(const T* x, int64_t len) {
    T acc[64] = {};
    int64_t j = 0;
    for (; j + 64 <= len; j += 64)
#pragma omp simd
      for (int k = 0; k < 64; ++k) acc[k] += x[j + k];
    T s = 0;
    for (; j < len; ++j) s += x[j];
    for (int k = 0; k < 64; ++k) s += acc[k];
    return s;
  }
  // (b) the bare exp, vectorised the way RowLse/ColLse vectorise it (omp simd over fast_exp).
  ROOF_HOT static T exp_sum(const T* x, int64_t len) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) s += detail::fast_exp(x[j]);
    return s;
  }
  // (b') RowLse's pass-2 body: exponent formed in double from a T cost, then exp in T. This is the
  // per-entry compute the hot loop really pays, so it is the fairer compute ceiling.
  ROOF_HOT static T lse_body(const T* c, const double* A, int64_t len, double inv_eps, double mx) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) s += detail::fast_exp(static_cast<T>(A[j] - static_cast<double>(c[j]) * inv_eps - mx));
    return s;
  }
};

// Sustained read bandwidth, GB/s, best of 5 sweeps over an array much larger than the 32 MB L3.
static double read_bandwidth(const std::vector<float>& x, int nt) {
  const int64_t len = static_cast<int64_t>(x.size()), chunk = 1 << 16;  // 256 KB per task
  double best = 0, sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    double s = 0;
    const auto t0 = Clock::now();
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : s)
    for (int64_t j0 = 0; j0 < len; j0 += chunk) s += Kernels<float>::sum(x.data() + j0, std::min(chunk, len - j0));
    best = std::max(best, 4.0 * len / since(t0) / 1e9);
    sink += s;
  }
  if (sink == 1.2345) std::printf(" ");  // keeps the sums alive
  return best;
}

// Values per second over per-thread 16K arrays (L2-resident, as the solver's rows are), best of 3.
template <typename T>
static double exp_rate(int nt, bool body) {
  const int64_t len = 16384, reps = 4000;
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> u(-20.0, 0.0), uc(10.0, 500.0);
  std::vector<T> x(len * nt), c(len * nt);
  std::vector<double> A(len * nt);
  for (int64_t k = 0; k < len * nt; ++k) x[k] = static_cast<T>(u(rng)), c[k] = static_cast<T>(uc(rng)), A[k] = uc(rng);
  double best = 0, sink = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double s = 0;
    const auto t0 = Clock::now();
#pragma omp parallel num_threads(nt) reduction(+ : s)
    {
      int id = 0;
#ifdef _OPENMP
      id = omp_get_thread_num();
#endif
      for (int64_t r = 0; r < reps; ++r) {
        clobber();
        s += body ? Kernels<T>::lse_body(c.data() + id * len, A.data() + id * len, len, 1.0, 520.0)
                  : Kernels<T>::exp_sum(x.data() + id * len, len);
      }
    }
    best = std::max(best, static_cast<double>(len) * reps * nt / since(t0));
    sink += s;
  }
  if (sink == 1.2345) std::printf(" ");
  return best;
}

// Seconds per dense iteration: (time(iters2) - time(iters1)) / (iters2 - iters1), each the best of
// 2 solves, so the setup (max cost, allocations) and the final certifying pass cancel out.
static double dense_iteration(const RowMatrix<float>& cost, int nt, int64_t it1, int64_t it2) {
  const int64_t n = cost.rows(), m = cost.cols();
  std::vector<double> a(n, 1.0 / n), b(m, 1.0 / m), f(n), g(m);
  SinkhornOptions opt;
  opt.epsilon = 1.0;
  opt.eps_scaling = false;
  opt.truncation = 0;  // dense kernel: every iteration runs the dense loops
  opt.newton = false;
  opt.multiscale_points = 0;
  opt.overrelaxation = 1.0;  // plain Sinkhorn: no snapshot/undo blocks changing the work done
  opt.tol = 1e-30;           // never reached: exactly max_iter iterations
  opt.num_threads = nt;
  double t[2];
  for (int k = 0; k < 2; ++k) {
    opt.max_iter = k == 0 ? it1 : it2;
    t[k] = 1e300;
    for (int rep = 0; rep < 2; ++rep) {
      const auto t0 = Clock::now();
      const SinkhornReport r = sinkhorn_log<float>(cost, a.data(), b.data(), opt, f.data(), g.data());
      t[k] = std::min(t[k], since(t0));
      if (r.iterations != opt.max_iter) std::fprintf(stderr, "warning: %lld iterations, not %lld\n",
                                                     (long long)r.iterations, (long long)opt.max_iter);
    }
  }
  return (t[1] - t[0]) / static_cast<double>(it2 - it1);
}

// --- sparse: the truncated kernel's float iteration ----------------------------------------------
// fused_iteration (sinkhorn.cpp) does, for every row of the pattern (CSR, float values and int32
// columns), the row's float log-sum-exp that keeps its terms (KeptTerms::sum) and then adds those
// terms, scaled, to the column sums (KeptTerms::add_scaled): one exponential per entry for both
// half-steps. Where AVX-512 does not run it takes the same row sum (RowLse::sum_lowp) and a second
// exponential per entry for the columns (ColLse::sum_sparse_row_lowp); so does this benchmark. The
// per-row rest (a log, an expm1, the potentials' update) is left out: ~10^4 of each against ~10^7
// entries.
struct SparseRowsF {
  std::vector<int64_t> ptr;
  std::vector<int32_t> col;
  std::vector<float> val;
};

// Rows of runs of `run` consecutive columns at random starts, sorted and distinct, ~per_row
// entries a row: the solver's patterns have this shape because otce sorts the pixels by class and
// k-means cell (~150 segments of ~15 entries a row at N = 10^4, bench/RESULTS.md, session 20).
// Values in [0, 25] with A = 0 and eps = 1: every exponent in [-25, 0], as a converging stage's are.
static SparseRowsF make_rows(int64_t n, int64_t m, int64_t per_row, int64_t run, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> start(0, m - run);
  std::uniform_real_distribution<float> value(0.0f, 25.0f);
  SparseRowsF r;
  r.ptr.assign(1, 0);
  std::vector<char> on(m);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(on.begin(), on.end(), per_row >= m ? 1 : 0);
    for (int64_t k = 0; per_row < m && k < (per_row + run - 1) / run; ++k) std::fill_n(on.begin() + start(rng), run, 1);
    for (int64_t j = 0; j < m; ++j)
      if (on[j]) r.col.push_back(static_cast<int32_t>(j)), r.val.push_back(value(rng));
    r.ptr.push_back(static_cast<int64_t>(r.col.size()));
  }
  return r;
}

// The same row work in the scaling domain (Schmitzer's stabilised sparse scaling), for comparison
// only: the row's stored kernel values K (here the pattern's values) times the gathered column
// scalings v (Af), u = 1 / that sum, and u K added to the column sums through the blocks; no
// exponential. What the loop costs without its exponential (bench/RESULTS.md, session 38).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma")))
#endif
static float scaling_row(const float* K, int64_t len, const int32_t* bcol, const uint8_t* bmask, int64_t nb,
                         const float* v, float* gathered, float* part) {
#ifdef SEGTRANSFER_AVX512_LSE
  gather_blocks_avx2(bcol, bmask, nb, v, gathered);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t k = 0;
  for (; k + 32 <= len; k += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(K + k), _mm256_loadu_ps(gathered + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(K + k + 8), _mm256_loadu_ps(gathered + k + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(K + k + 16), _mm256_loadu_ps(gathered + k + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(K + k + 24), _mm256_loadu_ps(gathered + k + 24), s3);
  }
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; k < len; ++k) s += K[k] * gathered[k];
  scatter_blocks_avx2(K, bcol, bmask, nb, 1e-4f / (1.0f + s), part);
  return s;
#else
  (void)K, (void)len, (void)bcol, (void)bmask, (void)nb, (void)v, (void)gathered, (void)part;
  return 0.0f;
#endif
}

// One pass of the iteration's row work over `rows` (see above); returns the rows' sums' total.
// `blocks` (rows' BlockIndex): the form fused_iteration runs where KeptTerms::blocks_available().
static double sparse_pass(const SparseRowsF& rows, const BlockIndex* blocks, const float* Af, size_t Af_len,
                          const float* mx, float* terms, float* gathered, float* part, bool scaling = false) {
  const int64_t n = static_cast<int64_t>(rows.ptr.size()) - 1;
  const bool kept = KeptTerms::available();
  double total = 0.0;
  if (blocks != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k0 = rows.ptr[i], len = rows.ptr[i + 1] - k0, b0 = blocks->ptr[i], nb = blocks->ptr[i + 1] - b0;
      const int32_t* bcol = blocks->col.data() + b0;
      const uint8_t* bmask = blocks->mask.data() + b0;
      if (scaling) {
        total += scaling_row(rows.val.data() + k0, len, bcol, bmask, nb, Af, gathered, part);
        continue;
      }
      total += KeptTerms::sum_blocks(rows.val.data() + k0, len, bcol, bmask, nb, Af, 1.0f, 0.0f, terms, gathered);
      KeptTerms::add_scaled_blocks(terms, bcol, bmask, nb, 1e-4f, part);
    }
    return total;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k0 = rows.ptr[i], len = rows.ptr[i + 1] - k0;
    const float* c = rows.val.data() + k0;
    // A full row (entries per row = M) runs as the dense stages do: no column indices.
    const int32_t* cols = len == static_cast<int64_t>(Af_len) ? nullptr : rows.col.data() + k0;
    if (kept) {
      total += KeptTerms::sum(c, cols, len, Af, 1.0f, 0.0f, terms);
      KeptTerms::add_scaled(terms, cols, len, 1e-4f, part);
    } else {
      total += RowLse<float>::sum_lowp(c, cols, len, Af, 1.0f, 0.0f);
      if (cols == nullptr)
        ColLse<float>::sum_row_lowp(c, len, 0.0f, 1.0f, mx, part);
      else
        ColLse<float>::sum_sparse_row_lowp(c, cols, len, 0.0f, 1.0f, mx, part);
    }
  }
  return total;
}

// Seconds per pass, best of 5 (each the slowest thread's), with each of `nt` threads running its own copy of the work at
// once (as otce's workers run their own draws side by side). `in_cache`: a 64-row pattern that
// stays in L2 and is passed over repeatedly, the loop's own ceiling without DRAM.
static double sparse_time(int nt, int64_t n, int64_t m, int64_t per_row, bool in_cache, bool use_blocks,
                          int64_t& entries, double* fill = nullptr, bool scaling = false) {
  constexpr int kReps = 5;
  std::vector<double> slowest(kReps, 0.0);  // per repetition, its slowest thread's time
  double sink = 0.0;
  int64_t nnz = 0;
#pragma omp parallel num_threads(nt) reduction(+ : sink) reduction(max : nnz)
  {
    int id = 0;
#ifdef _OPENMP
    id = omp_get_thread_num();
#endif
    const int64_t rows_n = in_cache ? 64 : n, passes = in_cache ? (n + 63) / 64 : 1;
    const SparseRowsF rows = make_rows(rows_n, m, per_row, 15, 1000 + id);  // first touch by its thread
    nnz = rows.ptr.back() * passes;
    BlockIndex blocks;
    if (use_blocks) {
      build_block_index(rows, m, 1, blocks);
      if (fill != nullptr && id == 0)
        *fill = static_cast<double>(rows.ptr.back()) / (8.0 * static_cast<double>(blocks.ptr.back()));
    }
    // Padded to a multiple of 8 columns, with room for whole-vector reads and writes, as
    // fused_iteration's buffers are for the blocks.
    std::vector<float> Af(m + 8, 0.0f), mx(m, 0.0f), terms(m + 16), gathered(m + 16), part(m + 8, 0.0f);
    for (int rep = 0; rep < kReps; ++rep) {
#pragma omp barrier
      const auto t0 = Clock::now();
      for (int64_t p = 0; p < passes; ++p) {
        clobber();
        sink += sparse_pass(rows, use_blocks ? &blocks : nullptr, Af.data(), m, mx.data(), terms.data(), gathered.data(),
                            part.data(), scaling);
      }
      const double t = since(t0);
#pragma omp barrier
#pragma omp critical
      slowest[rep] = std::max(slowest[rep], t);
    }
    sink += part[0];
  }
  if (sink == 1.2345) std::printf(" ");
  entries = nnz;
  return *std::min_element(slowest.begin(), slowest.end());
}

// Exponentials per second of the cheapest loop that takes them the solver's way: the dense float
// row sum (RowLse::sum_lowp without columns) over L1-resident rows, per thread, nt at once.
static double dense_lowp_rate(int nt) {
  const int64_t len = 4096, reps = 20000;
  double best = 0.0, sink = 0.0;
  for (int r = 0; r < 3; ++r) {
    double s = 0.0;
    const auto t0 = Clock::now();
#pragma omp parallel num_threads(nt) reduction(+ : s)
    {
      std::vector<float> c(len), Af(len, 0.0f);
      for (int64_t k = 0; k < len; ++k) c[k] = 25.0f * static_cast<float>(k) / len;
      for (int64_t q = 0; q < reps; ++q) {
        clobber();
        s += RowLse<float>::sum_lowp(c.data(), nullptr, len, Af.data(), 1.0f, 0.0f);
      }
    }
    best = std::max(best, static_cast<double>(len) * reps * nt / since(t0));
    sink += s;
  }
  if (sink == 1.2345) std::printf(" ");
  return best;
}

// Limits per entry and thread: t_stream = the 8 bytes (value and column index; 4 for full rows,
// which the dense stages run without indices) it streams from DRAM
// at the bandwidth one thread gets when nt threads read at once; t_exp = one exponential at the
// dense L1 loop's rate. Classic roofline: limit = max(t_stream, t_exp). The gathered potentials
// and the column sums (2 x 40 KB at N = 10^4) stay in L1/L2 and are not counted as traffic.
static int sparse_main(int argc, char** argv) {
  const int64_t per_row = argc > 2 ? std::atoll(argv[2]) : 1557;
  std::vector<int> threads = argc > 3 ? std::vector<int>{std::atoi(argv[3])} : std::vector<int>{1, 2};
  const int64_t n = 10000, m = 10000;
  if (per_row < 15 || per_row > m || threads[0] < 1)
    return std::fprintf(stderr, "usage: segtransfer_roofline sparse [15 <= entries per row <= 10000] [threads>=1]\n"), 2;
  std::vector<float> big(200'000'000);  // 800 MB, as in main
#pragma omp parallel for num_threads(threads.back()) schedule(static)
  for (int64_t j = 0; j < static_cast<int64_t>(big.size()); ++j) big[j] = static_cast<float>(j & 1023) * 1e-3f;
  bool avx512 = false;
#ifdef SEGTRANSFER_AVX512_LSE
  avx512 = avx512_lse_available();
#endif
  const char* kept = !KeptTerms::available()         ? "off: two exps an entry"
                     : !KeptTerms::blocks_available() ? "on, CSR only"
                     : avx512                         ? "on: AVX-512, with and without the 8-column blocks"
                                                      : "on: AVX2, with and without the 8-column blocks";
  std::printf("sparse float iteration (KeptTerms %s), N = M = %lld, ~%lld entries a row in 15-column runs\n", kept,
              (long long)n, (long long)per_row);
  std::printf("\n| threads | form | entries/thread (M) | BW GB/s (all) | exp G/s/thread | t_stream ns | t_exp ns | limit ns |"
              " measured ns | limit/measured | in-cache ns | in-cache/measured |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const int nt : threads) {
    const double bw = read_bandwidth(big, nt) * 1e9;
    const double rate = dense_lowp_rate(nt) / nt;
    // Form 2: the blocks without the exponential (scaling_row), for comparison (no solver runs it).
    for (const int form_id : {0, 1, 2}) {
      const bool use_blocks = form_id > 0, scaling = form_id == 2;
      if (use_blocks && !KeptTerms::blocks_available()) continue;
      int64_t entries = 0, entries_c = 0;
      double fill = 1.0;
      const double t = sparse_time(nt, n, m, per_row, false, use_blocks, entries, &fill, scaling);
      const double tc = sparse_time(nt, n, m, per_row, true, use_blocks, entries_c, nullptr, scaling);
      const double ns = 1e9 * t / entries, ns_c = 1e9 * tc / entries_c;
      // The same limit for both forms: the blocks' index (5 bytes a block) counts against them.
      const double t_stream = (per_row == m ? 4.0 : 8.0) / (bw / nt) * 1e9, t_exp = 1e9 / rate,
                   limit = std::max(t_stream, t_exp);
      char form[48];
      std::snprintf(form, sizeof form,
                    scaling      ? "blocks, no exp (scaling domain)"
                    : use_blocks ? "CSR through blocks (%.0f %% filled)"
                                 : "CSR",
                    100.0 * fill);
      std::printf("| %d | %s | %.1f | %.1f | %.2f | %.3f | %.3f | %.3f | %.3f | %.2f | %.3f | %.2f |\n", nt, form,
                  entries / 1e6, bw / 1e9, rate / 1e9, t_stream, t_exp, limit, ns, limit / ns, ns_c, ns_c / ns);
      std::fflush(stdout);
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "sparse") return sparse_main(argc, argv);
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 10000;
  const int64_t d = argc > 2 ? std::atoll(argv[2]) : 19;
  std::vector<int> threads = argc > 3 ? std::vector<int>{std::atoi(argv[3])} : std::vector<int>{1, 2};
  if (n < 100 || d < 1 || threads[0] < 1) return std::fprintf(stderr, "usage: %s [N>=100] [D>=1] [threads>=1]\n", argv[0]), 2;
  // Clustered points as in bench_sinkhorn.cpp: costs ~150 within a cluster, ~350 across.
  std::mt19937_64 rng(42);
  std::normal_distribution<double> noise(0.0, 2.0);
  std::uniform_int_distribution<int> label(0, 18);
  auto make = [&](std::vector<float>& x, double shift) {
    x.resize(n * d);
    for (int64_t i = 0; i < n; ++i) {
      const int y = label(rng);
      for (int64_t k = 0; k < d; ++k) x[i * d + k] = static_cast<float>(noise(rng) + (k == y % d ? 10.0 : 0.0) + shift);
    }
  };
  std::vector<float> xs, xt;
  make(xs, 0.0);
  make(xt, 0.5);
  RowMatrix<float> cost;
  squared_euclidean<float>(xs.data(), n, xt.data(), n, d, cost);
  const double nm = static_cast<double>(n) * n, bytes = 2.0 * nm * sizeof(float), exps = 2.0 * nm;
  std::printf("N=M=%lld D=%lld cost in [%.1f, %.1f]; per iteration %.2f GB read, %.3f G exps\n", (long long)n,
              (long long)d, cost.minCoeff(), cost.maxCoeff(), bytes / 1e9, exps / 1e9);

  std::vector<float> big(200'000'000);  // 800 MB; first touch in parallel, as it will be read
#pragma omp parallel for num_threads(threads.back()) schedule(static)
  for (int64_t j = 0; j < static_cast<int64_t>(big.size()); ++j) big[j] = static_cast<float>(j & 1023) * 1e-3f;

  if (nm <= 1e7) std::printf("note: n*m <= 1e7, the solver runs this loop on one thread whatever `threads`\n");
  std::printf("\n%-4s %8s %9s %9s %9s | %8s %8s %8s %8s | %8s %6s %6s\n", "thr", "BW GB/s", "exp32 G/s",
              "exp64 G/s", "lse32 G/s", "t_bw ms", "t_exp ms", "max ms", "model ms", "meas ms", "r_max", "r_mdl");
  std::vector<std::vector<double>> rows;
  for (const int nt : threads) {
    const double bw = read_bandwidth(big, nt) * 1e9;
    const double e32 = exp_rate<float>(nt, false), e64 = exp_rate<double>(nt, false), lse = exp_rate<float>(nt, true);
    const double t_it = dense_iteration(cost, nt, 20, 40);
    // Limits. t_bw: the 2 sweeps of C at full bandwidth. t_exp: the 2 N M exps at the rate of the
    // real loop body (lse32), not of the bare exp. Classic roofline: max(t_bw, t_exp), as if reads
    // and exps overlapped perfectly. Both sweeps stream and exp at once, so the phase model is
    //   t_model = 2 * max(1 sweep, N M exps)  (= t_max here, kept as a column for comparison).
    const double t_bw = bytes / bw, t_exp = exps / lse, sweep = t_bw / 2, half = t_exp / 2;
    const double t_max = std::max(t_bw, t_exp), t_model = 2 * std::max(sweep, half);
    std::printf("%-4d %8.1f %9.2f %9.2f %9.2f | %8.1f %8.1f %8.1f %8.1f | %8.1f %6.2f %6.2f\n", nt, bw / 1e9,
                e32 / 1e9, e64 / 1e9, lse / 1e9, 1e3 * t_bw, 1e3 * t_exp, 1e3 * t_max, 1e3 * t_model, 1e3 * t_it,
                t_max / t_it, t_model / t_it);
    std::printf("     (sum bound t_bw + t_exp = %.1f ms, ratio %.2f; bare-exp32 limit %.1f ms)\n",
                1e3 * (t_bw + t_exp), (t_bw + t_exp) / t_it, 1e3 * exps / e32);
    std::fflush(stdout);
    rows.push_back({double(nt), bw / 1e9, e32 / 1e9, e64 / 1e9, lse / 1e9, 1e3 * t_bw, 1e3 * t_exp, 1e3 * t_max,
                    1e3 * (t_bw + t_exp), 1e3 * t_model, 1e3 * t_it, t_max / t_it, t_model / t_it});
  }
  // Markdown rows (also valid CSV after stripping the bars) for bench/RESULTS.md-style notes.
  std::printf("\n| N | D | threads | BW GB/s | exp32 G/s | exp64 G/s | lse32 G/s | GB/iter | Gexp/iter | t_bw ms |"
              " t_exp ms | max ms | sum ms | model ms | measured ms | max/meas | model/meas |\n");
  for (const auto& r : rows)
    std::printf("| %lld | %lld | %.0f | %.1f | %.2f | %.2f | %.2f | %.2f | %.3f | %.1f | %.1f | %.1f | %.1f | %.1f |"
                " %.1f | %.2f | %.2f |\n", (long long)n, (long long)d, r[0], r[1], r[2], r[3], r[4], bytes / 1e9,
                exps / 1e9, r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12]);
  return 0;
}
