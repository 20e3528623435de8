// Internal to the core (not installed): the truncated kernel's storage (SparseRows), its build from
// the dense cost (build_sparse), the pass that every pattern not filtered from a previous one costs,
// and its filters (filter_rows, filter_in_place, filter_serial). In a header of their own so that
// the C++ tests can compare the one-thread and parallel forms directly.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Where a CSR pattern's entries lie in blocks of 8 aligned columns, for the AVX2 float iteration
// (fused_iteration, sinkhorn.cpp; see gather_blocks_avx2 for why): row i's blocks are
// [ptr[i], ptr[i + 1]), in column order; block b covers columns col[b] .. col[b] + 7 (col[b] a
// multiple of 8), and its entries are the bits of mask[b] (bit l: column col[b] + l), which are
// consecutive entries of the row. 5 bytes a block, ~1 an entry.
struct BlockIndex {
  std::vector<int64_t> ptr;
  detail::KernelVector<int32_t> col;
  detail::KernelVector<uint8_t> mask;
};

// B from R's columns (a SparseRows, columns ascending in each row as every pattern's are), for m
// columns. One parallel pass over the columns, each row's blocks written where it has room for as
// many as it could touch (+ 8 for whole-vector stores), then moved together in one serial pass over
// the blocks: a pass counting the blocks first cost as much again (the columns stream from memory),
// and the iterations read the gapped layout ~8 % slower (Zen 2, bench/RESULTS.md session 34).
// `vectors`: the AVX2 row fill where it runs (the tests also run the plain one).
template <typename Rows>
void build_block_index(const Rows& R, int64_t m, int nt, BlockIndex& B, bool vectors = true) {
  const int64_t n = static_cast<int64_t>(R.ptr.size()) - 1;
  const int64_t* rp = R.ptr.data();
  const int32_t* rc = R.col.data();
  std::vector<int64_t> room(n + 1, 0), count(n);
  for (int64_t i = 0; i < n; ++i) room[i + 1] = room[i] + std::min(rp[i + 1] - rp[i], (m + 7) / 8) + 8;
  B.col.resize(room[n]);
  B.mask.resize(room[n]);
  const int64_t* bp = room.data();
  int64_t* bn = count.data();
  int32_t* bc = B.col.data();
  uint8_t* bm = B.mask.data();
  bool done = false;
  (void)vectors;
#ifdef SEGTRANSFER_AVX2_LSE
  if (vectors && cpu_has_avx2_fma()) {
#pragma omp parallel num_threads(nt)
    {
      std::vector<int32_t> scratch(m + 9);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i)
        bn[i] = block_index_row_avx2(rc + rp[i], rp[i + 1] - rp[i], bc + bp[i], bm + bp[i], scratch.data());
    }
    done = true;
  }
#endif
  if (!done) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      int64_t q = bp[i] - 1;
      int32_t last = -1;
      unsigned bits = 0;
      for (int64_t k = rp[i]; k < rp[i + 1]; ++k) {
        const int32_t blk = rc[k] >> 3;
        const bool fresh = blk != last;
        q += fresh;
        bits = (fresh ? 0u : bits) | (1u << (rc[k] & 7));
        last = blk;
        bc[q] = blk << 3;
        bm[q] = static_cast<uint8_t>(bits);
      }
      bn[i] = q + 1 - bp[i];
    }
  }
  B.ptr.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    B.ptr[i + 1] = B.ptr[i] + bn[i];
    // Leftward (ptr[i] <= room[i]): memmove.
    std::memmove(bc + B.ptr[i], bc + bp[i], bn[i] * sizeof(int32_t));
    std::memmove(bm + B.ptr[i], bm + bp[i], bn[i]);
  }
  B.col.resize(B.ptr[n]);
  B.mask.resize(B.ptr[n]);
}

// One dense row of build_sparse: entries with c_j - p_col_j < th, the difference formed in the
// storage precision T (see build_sparse for why that still keeps every entry the cutoff asks for).
// Target-cloned like the log-sum-exp loops.
template <typename T>
struct DenseRowScan {
  SEGTRANSFER_HOT static int64_t count(const T* c, int64_t m, const T* p_col, T th) {
    int64_t k = 0;
    for (int64_t j0 = 0; j0 < m; j0 += kPrefetchBlock) {  // prefetched (prefetch_dense_ahead)
      const int64_t j1 = std::min(m, j0 + kPrefetchBlock);
      prefetch_dense_ahead(c, j0, j1);
      int32_t kb = 0;  // a 32-bit count vectorises (CountAbove, sinkhorn.cpp)
#pragma omp simd reduction(+ : kb)
      for (int64_t j = j0; j < j1; ++j) kb += (c[j] - p_col[j] < th) ? 1 : 0;
      k += kb;
    }
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
  // fill, or its AVX-512 or AVX2 form where this CPU has it (compressed in registers, as
  // compact_above_avx512; nothing written past the kept entries in AVX-512, nothing past the k
  // asked for in AVX2: the caller's room either way).
  static int64_t fill_any(const T* c, int64_t m, const T* p_col, T th, int64_t k, int32_t* oc, T* ov) {
#ifdef SEGTRANSFER_AVX512_LSE
    if constexpr (std::is_same_v<T, float>) {
      if (avx512_lse_available()) return dense_fill_avx512(c, m, p_col, th, k, oc, ov);
      if (cpu_has_avx2_fma()) return dense_fill_avx2(c, m, p_col, th, k, oc, ov);
    }
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
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    DenseRowScan<T>::fill_any(mat.data() + i * m, m, pcp, thp[i], count[i + 1] - count[i], out.col.data() + count[i],
                              out.val.data() + count[i]);
  return true;
}

// The share of the entries with C_ij - p_row_i - p_col_j < cutoff, estimated on every `stride`-th
// row (a few ms at N = 10^4 with stride 16): whether a stage's kernel would be sparse, before
// building it at another cutoff (sinkhorn.cpp, handover_truncation).
template <typename T>
double sampled_density(const RowMatrix<T>& mat, const double* p_row, const double* p_col, double cutoff,
                       int64_t stride) {
  const int64_t n = mat.rows(), m = mat.cols();
  thread_local std::vector<T> pc;
  pc.resize(m);
  for (int64_t j = 0; j < m; ++j) pc[j] = static_cast<T>(p_col[j]);
  int64_t kept = 0, rows = 0;
  for (int64_t i = 0; i < n; i += stride, ++rows)
    kept += DenseRowScan<T>::count(mat.data() + i * m, m, pc.data(), static_cast<T>(p_row[i] + cutoff));
  return static_cast<double>(kept) / (static_cast<double>(rows) * static_cast<double>(m));
}

// One row of the filters: the entries k with (double)val[k] - p_col[col[k]] < th, counted or moved
// to oc / ov in order; keep_below_avx512 / keep_below_avx2 where this CPU has them (float storage), else the plain
// loops. `stop` (move): the branch-free plain loop writes every entry it reads at the cursor, which
// advances on the kept ones, and ends once `stop` are kept, so with stop = the row's count nothing
// is written past them; with stop = len the slot after them may be written, at or before the entry
// just read (in place). The AVX-512 form writes the kept entries only; the AVX2 one whole groups of
// 4 while they end within `stop`, so again nothing past `stop`, in place at or before the group
// just read. Returns how many.
template <typename T>
struct KeepBelow {
  static int64_t count(const T* val, const int32_t* col, int64_t len, const double* p_col, double th) {
#ifdef SEGTRANSFER_AVX512_LSE
    if constexpr (std::is_same_v<T, float>) {
      if (avx512_lse_available()) return keep_below_avx512<false>(val, col, len, p_col, th, nullptr, nullptr);
      if (cpu_has_avx2_fma()) return keep_below_avx2<false>(val, col, len, p_col, th, 0, nullptr, nullptr);
    }
#endif
    int64_t k = 0;
    prefetch_ahead(val, col, 0, len);
    for (int64_t e = 0; e < len; ++e) k += (static_cast<double>(val[e]) - p_col[col[e]] < th) ? 1 : 0;
    return k;
  }
  static int64_t move(const T* val, const int32_t* col, int64_t len, const double* p_col, double th, int64_t stop,
                      int32_t* oc, T* ov) {
#ifdef SEGTRANSFER_AVX512_LSE
    if constexpr (std::is_same_v<T, float>) {
      if (avx512_lse_available()) return keep_below_avx512<true>(val, col, len, p_col, th, oc, ov);
      if (cpu_has_avx2_fma()) return keep_below_avx2<true>(val, col, len, p_col, th, stop, oc, ov);
    }
#endif
    int64_t at = 0;
    prefetch_ahead(val, col, 0, len);
    for (int64_t e = 0; e < len && at < stop; ++e) {
      const int32_t c = col[e];
      const T v = val[e];
      oc[at] = c;
      ov[at] = v;
      at += (static_cast<double>(v) - p_col[c] < th) ? 1 : 0;
    }
    return at;
  }
};

// Row pointers (ptr[0] = 0) of the entries of `in` with C - p_row - p_col < cutoff. The same
// function filters the CSC copy with the potentials swapped. Returns false if a row would be empty.
template <typename T>
bool count_kept(const SparseRows<T>& in, const double* p_row, const double* p_col, double cutoff, int nt,
                std::vector<int64_t>& ptr) {
  const int64_t n = static_cast<int64_t>(in.ptr.size()) - 1;
  ptr.assign(n + 1, 0);
  bool empty_row = false;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|| : empty_row)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = in.ptr[i];
    const int64_t k = KeepBelow<T>::count(in.val.data() + b, in.col.data() + b, in.ptr[i + 1] - b, p_col,
                                          p_row[i] + cutoff);
    ptr[i + 1] = k;
    empty_row = empty_row || k == 0;
  }
  if (empty_row) return false;
  for (int64_t i = 0; i < n; ++i) ptr[i + 1] += ptr[i];
  return true;
}

// Moves the kept entries of rows [i0, i1) of `in` to out_col/out_val from `at` on, in order;
// `kept` holds count_kept's row pointers, so no row writes past its share of the output (another
// thread's; KeepBelow::move). In place (out = in) the cursor never passes the entry being read.
// Branch-free: the branchy form mispredicted on about every other entry (a filter keeps 30-60 % of
// them).
template <typename T>
int64_t move_kept(const SparseRows<T>& in, int64_t i0, int64_t i1, const double* p_row, const double* p_col,
                  double cutoff, const int64_t* kept, int32_t* out_col, T* out_val, int64_t at) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = in.ptr[i];
    at += KeepBelow<T>::move(in.val.data() + b, in.col.data() + b, in.ptr[i + 1] - b, p_col, p_row[i] + cutoff,
                             kept[i + 1] - kept[i], out_col + at, out_val + at);
  }
  return at;
}

// The filter on one thread, in one pass: the entries of `in` with C - p_row - p_col < cutoff moved
// to `out`, which may be `in` itself (every entry is written at or before where it was read), each
// row right after the last, without counting them first (count_kept was ~2 % of a K = 10 call's CPU
// time at D = 19, one thread per draw). A copy gets storage for every entry of `in` (pages never
// written cost nothing). Returns false if a row would be empty: `out` is then half-filtered
// (in place: the pattern must be rebuilt).
template <typename T>
bool filter_serial(const SparseRows<T>& in, const double* p_row, const double* p_col, double cutoff,
                   SparseRows<T>& out) {
  const int64_t n = static_cast<int64_t>(in.ptr.size()) - 1;
  if (&out != &in) {
    out.ptr.resize(n + 1);
    out.col.clear();  // growing copies nothing
    out.val.clear();
    out.col.resize(in.ptr[n]);
    out.val.resize(in.ptr[n]);
  }
  int64_t at = 0, begin = in.ptr[0];
  out.ptr[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t end = in.ptr[i + 1];  // read before out.ptr[i + 1] (in place: the same slot) is set
    // stop = the row's length: the slot after its kept entries may be written (KeepBelow::move),
    // which is at or before the entry just read.
    const int64_t k = KeepBelow<T>::move(in.val.data() + begin, in.col.data() + begin, end - begin, p_col,
                                         p_row[i] + cutoff, end - begin, out.col.data() + at, out.val.data() + at);
    if (k == 0) return false;
    at += k;
    out.ptr[i + 1] = at;
    begin = end;
  }
  out.col.resize(at);
  out.val.resize(at);
  return true;
}

// Keeps the entries of `in` with C - p_row - p_col < cutoff, in a copy. Returns false if a row would
// be empty.
template <typename T>
bool filter_rows(const SparseRows<T>& in, const double* p_row, const double* p_col, double cutoff, int nt,
                 SparseRows<T>& out) {
  if (nt == 1) return filter_serial(in, p_row, p_col, cutoff, out);
  const int64_t n = static_cast<int64_t>(in.ptr.size()) - 1;
  if (!count_kept(in, p_row, p_col, cutoff, nt, out.ptr)) return false;
  out.col.resize(out.ptr[n]);
  out.val.resize(out.ptr[n]);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    move_kept(in, i, i + 1, p_row, p_col, cutoff, out.ptr.data(), out.col.data(), out.val.data(), out.ptr[i]);
  return true;
}

// The same in place, given count_kept's pointers. No second copy of the pattern exists at any time
// (at N = 3 x 10^4 an early sparse stage's pattern is GBs). Each chunk of rows compacts towards
// its own start (it never writes past what it has read), then the chunks close their gaps in order.
template <typename T>
void filter_in_place(SparseRows<T>& s, std::vector<int64_t>& kept_ptr, const double* p_row, const double* p_col,
                     double cutoff, int nt) {
  const int64_t n = static_cast<int64_t>(s.ptr.size()) - 1;
  const int64_t nq = std::min<int64_t>(std::max(nt, 1), n);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t q = 0; q < nq; ++q) {
    const int64_t i0 = n * q / nq, i1 = n * (q + 1) / nq;
    move_kept(s, i0, i1, p_row, p_col, cutoff, kept_ptr.data(), s.col.data(), s.val.data(), s.ptr[i0]);
  }
  for (int64_t q = 1; q < nq; ++q) {
    const int64_t i0 = n * q / nq, i1 = n * (q + 1) / nq, len = kept_ptr[i1] - kept_ptr[i0];
    std::memmove(s.col.data() + kept_ptr[i0], s.col.data() + s.ptr[i0], len * sizeof(int32_t));
    std::memmove(s.val.data() + kept_ptr[i0], s.val.data() + s.ptr[i0], len * sizeof(T));
  }
  std::swap(s.ptr, kept_ptr);
  s.col.resize(s.ptr[n]);
  s.val.resize(s.ptr[n]);
}

}  // namespace
}  // namespace segtransfer
