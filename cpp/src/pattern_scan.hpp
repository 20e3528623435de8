// Internal to the core (not installed): the truncated kernel's storage (SparseRows) and its build
// from the dense cost (build_sparse), the pass that every pattern not filtered from a previous one
// costs. In a header of its own so that the C++ tests can compare the one-thread and parallel
// builds directly.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "segtransfer/sinkhorn.hpp"
#include "kernels.hpp"
#include "pool.hpp"

namespace segtransfer {
namespace {

// Kernel rows kept after truncation: entries with C_ij - f_i - g_j < tau * eps (CSR layout).
template <typename T>
struct SparseRows {
  std::vector<int64_t> ptr;
  detail::KernelVector<int32_t> col;
  detail::KernelVector<T> val;
};

// One dense row of build_sparse: entries with c_j - p_col_j < th, the difference formed in the
// storage precision T (see build_sparse for why that still keeps every entry the cutoff asks for).
// Target-cloned like the log-sum-exp loops.
template <typename T>
struct DenseRowScan {
  SEGTRANSFER_HOT static int64_t count(const T* c, int64_t m, const T* p_col, T th) {
    int64_t k = 0;
#pragma omp simd reduction(+ : k)
    for (int64_t j = 0; j < m; ++j) k += (c[j] - p_col[j] < th) ? 1 : 0;
    return k;
  }
  // Writes the row's first k kept entries (k from count, or m: all) in column order; returns how
  // many. Branch-free compaction (every entry up to the last kept one is written, the cursor
  // advances on the kept ones: at 15 % density a branchy loop mispredicts often), except that
  // blocks of 16 entries with none kept, found by a vectorised count, are skipped: at the last
  // stage's 3 % density most blocks are. With k above the row's count, one slot past its kept
  // entries may be written.
  SEGTRANSFER_HOT static int64_t fill(const T* c, int64_t m, const T* p_col, T th, int64_t k, int32_t* oc, T* ov) {
    constexpr int64_t kSpan = 16;
    int64_t pos = 0, j = 0;
    for (; j + kSpan <= m && pos < k; j += kSpan) {
      int hits = 0;
#pragma omp simd reduction(+ : hits)
      for (int64_t t = j; t < j + kSpan; ++t) hits += (c[t] - p_col[t] < th) ? 1 : 0;
      if (hits == 0) continue;
      for (int64_t t = j; t < j + kSpan && pos < k; ++t) {
        oc[pos] = static_cast<int32_t>(t);
        ov[pos] = c[t];
        pos += (c[t] - p_col[t] < th) ? 1 : 0;
      }
    }
    for (; j < m && pos < k; ++j) {
      oc[pos] = static_cast<int32_t>(j);
      ov[pos] = c[j];
      pos += (c[j] - p_col[j] < th) ? 1 : 0;
    }
    return pos;
  }
  // fill's AVX-512 form where this CPU has it (nothing written past the kept entries there).
  static int64_t fill_any(const T* c, int64_t m, const T* p_col, T th, int64_t k, int32_t* oc, T* ov) {
#ifdef SEGTRANSFER_AVX512_LSE
    if constexpr (std::is_same_v<T, float>)
      if (avx512_lse_available()) return dense_fill_avx512(c, m, p_col, th, k, oc, ov);
#endif
    return fill(c, m, p_col, th, k, oc, ov);
  }
};

// build_sparse on one thread, in one pass over the dense matrix where it can: each row is scanned
// and written at once, into storage sized from a count of every 16th row (with room to spare);
// should the rows outgrow it, the rest are counted first and the storage grows to the exact size.
// The two-pass build reads the 400 MB cost of an N = 10^4 draw twice; its count was ~6 % of a
// K = 10 call's CPU time at D = 19 (one thread per draw). Where the sample puts the kernel near
// `max_density` the count comes first, as in the parallel build, and stops as soon as the kept
// entries pass the limit. Same pattern and same return value as the two-pass build.
template <typename T>
bool build_sparse_serial(const RowMatrix<T>& mat, const T* pcp, const T* thp, double max_density, SparseRows<T>& out) {
  const int64_t n = mat.rows(), m = mat.cols();
  const double limit = max_density * static_cast<double>(n) * static_cast<double>(m);
  int64_t* ptr = out.ptr.data();
  ptr[0] = 0;
  int64_t sampled = 0, sampled_rows = 0;
  for (int64_t i = 0; i < n; i += 16, ++sampled_rows) sampled += DenseRowScan<T>::count(mat.data() + i * m, m, pcp, thp[i]);
  const double estimate = static_cast<double>(sampled) * static_cast<double>(n) / static_cast<double>(sampled_rows);
  int64_t i = 0, pos = 0;
  if (estimate <= 0.8 * limit) {
    // Emptied first: growing storage then copies nothing; its capacity (and pages) are reused.
    const auto cap = static_cast<int64_t>(std::min(estimate * 1.1 + 2.0 * static_cast<double>(m),
                                                   static_cast<double>(n) * static_cast<double>(m)));
    out.col.clear();
    out.val.clear();
    out.col.resize(cap);
    out.val.resize(cap);
    for (; i < n && pos + m <= cap; ++i) {
      const int64_t k = DenseRowScan<T>::fill_any(mat.data() + i * m, m, pcp, thp[i], m, out.col.data() + pos,
                                                  out.val.data() + pos);
      if (k == 0) return false;
      pos += k;
      ptr[i + 1] = pos;
      if (static_cast<double>(pos) > limit) return false;
    }
    if (i == n) {
      out.col.resize(pos);
      out.val.resize(pos);
      return true;
    }
  }
  // Rows [i, n) counted (stopping once the total passes the limit), then filled at their places.
  if (i == 0) {  // nothing to keep: growing copies nothing
    out.col.clear();
    out.val.clear();
  }
  for (int64_t r = i; r < n; ++r) {
    const int64_t k = DenseRowScan<T>::count(mat.data() + r * m, m, pcp, thp[r]);
    if (k == 0) return false;
    ptr[r + 1] = ptr[r] + k;
    if (static_cast<double>(ptr[r + 1]) > limit) return false;
  }
  out.col.resize(ptr[n]);
  out.val.resize(ptr[n]);
  for (int64_t r = i; r < n; ++r)
    DenseRowScan<T>::fill_any(mat.data() + r * m, m, pcp, thp[r], ptr[r + 1] - ptr[r], out.col.data() + ptr[r],
                              out.val.data() + ptr[r]);
  return true;
}

// Builds the truncated pattern of `mat` (rows x cols) for potentials (p_row, p_col) in two passes
// over the dense matrix: every row is counted (vectorised), then filled at its final place, both in
// parallel over rows, so the result is identical for any thread count. `out` keeps its capacity
// from one build to the next (fresh pages cost this VM more than the scan). Returns false when the
// kernel is denser than `max_density` (the dense loop is then faster, and a nearly dense pattern is
// not worth its memory) or a row would be empty.
// The test c_ij - p_col_j < p_row_i + cutoff runs in T: in float the scan reads 4-byte potentials
// that stay in L1 and tests 16 lanes at once, 0.45 -> 0.32 ns an entry on the 10^4 x 10^4 cost
// (bench/RESULTS.md, session 14). scan_threshold raises the threshold past its roundings, so every
// entry left out satisfies C - p_row - p_col >= cutoff exactly, which Pattern's margins rely on
// (cost_bound: max |C|).
template <typename T>
bool build_sparse(const RowMatrix<T>& mat, const double* p_row, const double* p_col, double cutoff, double cost_bound,
                  double max_density, int nt, SparseRows<T>& out) {
  const int64_t n = mat.rows(), m = mat.cols();
  thread_local std::vector<T> pc, th;
  pc.resize(m);
  th.resize(n);
  double p_max = 0.0, th_max = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    pc[j] = static_cast<T>(p_col[j]);
    p_max = std::max(p_max, std::fabs(p_col[j]));
  }
  for (int64_t i = 0; i < n; ++i) th_max = std::max(th_max, std::fabs(p_row[i] + cutoff));
  const double magnitude = cost_bound + 2.0 * p_max + th_max;
  for (int64_t i = 0; i < n; ++i) th[i] = scan_threshold<T>(p_row[i] + cutoff, magnitude);
  const T* pcp = pc.data();
  const T* thp = th.data();
  out.ptr.resize(n + 1);
  if (nt == 1) return build_sparse_serial(mat, pcp, thp, max_density, out);
  int64_t* count = out.ptr.data();
  count[0] = 0;
  bool empty_row = false;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|| : empty_row)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = DenseRowScan<T>::count(mat.data() + i * m, m, pcp, thp[i]);
    count[i + 1] = k;
    empty_row = empty_row || k == 0;
  }
  if (empty_row) return false;
  for (int64_t i = 0; i < n; ++i) count[i + 1] += count[i];
  if (static_cast<double>(count[n]) > max_density * static_cast<double>(n) * static_cast<double>(m)) return false;
  out.col.resize(count[n]);
  out.val.resize(count[n]);
#ifdef SEGTRANSFER_AVX512_LSE
  if constexpr (std::is_same_v<T, float>) {
    if (avx512_lse_available()) {  // compress in registers, as compact_above_avx512
#pragma omp parallel for num_threads(nt) schedule(static)
      for (int64_t i = 0; i < n; ++i)
        dense_fill_avx512(mat.data() + i * m, m, pcp, thp[i], count[i + 1] - count[i], out.col.data() + count[i],
                          out.val.data() + count[i]);
      return true;
    }
  }
#endif
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    DenseRowScan<T>::fill(mat.data() + i * m, m, pcp, thp[i], count[i + 1] - count[i], out.col.data() + count[i],
                          out.val.data() + count[i]);
  return true;
}

}  // namespace
}  // namespace segtransfer
