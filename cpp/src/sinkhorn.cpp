#include "segtransfer/sinkhorn.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <cstdio>
#include <cstdlib>


#include "segtransfer/errors.hpp"
#include "segtransfer/fastexp.hpp"
#include "kernels.hpp"
#include "pattern_scan.hpp"
#include "pool.hpp"
#include "point_cost.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace segtransfer {
namespace {

using Clock = std::chrono::steady_clock;
// Patterns are built keeping entries up to (truncation + slack) * eps: the slack lets the next
// stages filter them instead of rescanning the dense cost (see Pattern).
constexpr double kPatternSlack = 5.0;
constexpr double kSmallProblem = 1e6;  // entries (n x m) of a problem whose kernel may stay full
// An intermediate stage also hands over after this many pattern refreshes without a 0.1 % gain (see
// kIntermediateStallIterations, stopping.hpp).
constexpr int kIntermediateStalledRounds = 3;
// Dense iterations of an intermediate stage whose pattern was lost (see the stage loop): enough for
// the benchmark-like problems whose dense stages take 5-22, few against the thousands such a stage
// crawled for.
constexpr int64_t kLostPatternIterations = 100;
// A dense last stage whose Sinkhorn has not reached tol within
// SinkhornOptions::dense_last_iterations falls back to a sparse kernel and Newton (up to
// kLastDenseUpTo entries): a full one up to kFullFallback entries (dense_bytes counts it), above
// that one up to kFallbackDensity, which keeps the fallback's kernel, plan values and Newton
// operator within what dense_bytes counts for such a problem (N = 10^4 at eps = 3, D = 256, 70 % of
// the entries: peak RSS 1.9 GB in float32, 3.4 GB in float64, against 2.0 / 3.2 GB counted with the
// data). Denser kernels keep the dense Sinkhorn, whose float32 sums stall near 1e-7 (3,500 points a
// side at eps = 3, 99 % dense, tol 1e-9: 4.6e-7 until max_iter, where Newton on the full kernel
// stops at its floor); hence full kernels up to 4 x 10^7 entries (N ~ 6,300), not 10^7.
constexpr double kFullFallback = 4e7;
constexpr double kFallbackDensity = 0.7;
// The last stage, where Newton runs on the pattern, keeps one up to this density (the others: up to
// max_density) in problems of up to kLastDenseUpTo entries. At eps = 1, D = 256, N = 10^4 its kernel
// holds 41 % of the entries: dense, Sinkhorn needed ~400 iterations (38.6 s a draw on one thread);
// on the pattern, 5 Newton steps (4.6 s).
constexpr double kLastStageDensity = 0.5;
constexpr double kLastDenseUpTo = 1e8;

// out_j = log sum_i exp(A_i - C_ij / eps) for a dense row-major C (n x m). Rows are cut into fixed
// blocks of 256 (partial sums in T stay exact enough, as in RowLse), independent of the thread
// count, and the blocks' sums are added in order: the result is bit-identical for any thread count.
// `guess` (optional): values the results are expected near (the columns' own potentials, -g_j / eps),
// used as the shifts of a single summing sweep, as in RowLse::run; only if some column's shifted
// sum over- or underflows are the exact maxima found by a first sweep and the sum redone.
// `lowp`: the guessed sweep forms its exponents in float (RowLse::sum_lowp), shifts rounded to float.
// `row_sel` (optional, `n_sel` of them): only these rows of `mat`, A indexed by their position.
// `prep` (optional, without row_sel): called once for every row i before A[i] is read, from the
// thread that then reads the row, so that it may set A[i] from the row itself while the row is in
// cache (the multiscale hand-over extends f to row i from its subsampled columns there).
template <typename T>
void dense_column_lse(const RowMatrix<T>& mat, const double* A, double inv_eps, int nt, double* out,
                      const double* guess = nullptr, bool lowp = false, const int64_t* row_sel = nullptr,
                      int64_t n_sel = 0, const std::function<void(int64_t)>& prep = {}) {
  const int64_t n = row_sel != nullptr ? n_sel : mat.rows(), m = mat.cols();
  const auto row = [&](int64_t i) { return mat.data() + (row_sel != nullptr ? row_sel[i] : i) * m; };
  constexpr int64_t kRows = 256;
  const int64_t nb = (n + kRows - 1) / kRows;
  std::vector<double> blk(static_cast<size_t>(nb) * m, kNegInf), mx(m, kNegInf);
  std::vector<float> mxf;
  bool use_lowp = false;
  bool prep_pending = static_cast<bool>(prep);
  auto sum_sweep = [&]() {
    const bool prep_now = prep_pending;
    prep_pending = false;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
      std::vector<T> part(m, T(0));
      for (int64_t i = b * kRows; i < std::min(n, (b + 1) * kRows); ++i) {
        if (prep_now) prep(i);
        if (use_lowp)
          ColLse<T>::sum_row_lowp(row(i), m, static_cast<float>(A[i]), static_cast<float>(inv_eps), mxf.data(),
                                  part.data());
        else
          ColLse<T>::sum_row(row(i), m, A[i], inv_eps, mx.data(), part.data());
      }
      double* bs = blk.data() + b * m;
      for (int64_t j = 0; j < m; ++j) bs[j] = static_cast<double>(part[j]);
    }
    bool ok = true;
    for (int64_t j = 0; j < m; ++j) {
      double total = 0.0;
      for (int64_t b = 0; b < nb; ++b) total += blk[b * m + j];
      out[j] = mx[j] + std::log(total);
      ok = ok && total >= kShiftedMin && total < kPosInf;
    }
    return ok;
  };
  if (guess != nullptr) {
    bool finite = true;
    use_lowp = lowp && std::is_same<T, float>::value;
    if (use_lowp) mxf.resize(m);
    for (int64_t j = 0; j < m; ++j) {
      if (use_lowp) mxf[j] = static_cast<float>(guess[j]);
      mx[j] = use_lowp ? static_cast<double>(mxf[j]) : guess[j];  // the shift actually subtracted
      finite = finite && std::isfinite(guess[j]);
    }
    if (finite && sum_sweep()) return;
    use_lowp = false;
    std::fill(blk.begin(), blk.end(), kNegInf);
    std::fill(mx.begin(), mx.end(), kNegInf);
  }
  const bool prep_now = prep_pending;
  prep_pending = false;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    double* bm = blk.data() + b * m;
    for (int64_t i = b * kRows; i < std::min(n, (b + 1) * kRows); ++i) {
      if (prep_now) prep(i);
      ColLse<T>::max_row(row(i), m, A[i], inv_eps, bm);
    }
  }
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < m; ++j) mx[j] = std::max(mx[j], blk[b * m + j]);
  for (int64_t j = 0; j < m; ++j)
    if (!std::isfinite(mx[j])) mx[j] = std::isnan(mx[j]) ? mx[j] : 0.0;  // all -inf (or +inf) columns
  sum_sweep();
}

// The truncated kernel and the potentials it was built against. Every entry left out satisfies
// C_ij - f0_i - g0_j >= cutoff, so at potentials (f, g) it still satisfies
// C_ij - f_i - g_j >= cutoff - drift with drift = max_i (f_i - f0_i) + max_j (g_j - g0_j)
// (a constant moved between f and g cancels). That one number says, without looking at the dense
// cost, (a) whether a later stage's pattern is a subset of this one, so it can be filtered from it
// in O(nnz), and (b) how much plan mass the truncation can have dropped: at most exp(-margin / eps).
// The CSC copy exists only where something reads columns (`has_cols`): the last stage's Sinkhorn
// column half-steps, a fused iteration's fallback (csc() makes it then). The intermediate stages
// on float storage update the columns from the rows (fused_iteration) and Newton scatters its
// column products from the rows (column_products); their patterns had been transposed and
// filtered twice for nothing, 9 % of a K = 10 call's CPU time (RESULTS.md, session 16).
template <typename T>
struct Pattern {
  SparseRows<T> rows, cols;  // the same entries as CSR and, where has_cols, CSC
  std::vector<double> f0, g0;
  int64_t n_cols = 0;  // columns of the cost
  double cutoff = 0.0;
  double cost_bound = 0.0;  // max |C|, for build_sparse
  bool valid = false;
  bool has_cols = false;
  // Where the rows' entries lie in 8-column blocks, where fused_iteration uses that (row_blocks());
  // dropped whenever the rows change (commit, rebase). ~1 byte an entry.
  BlockIndex blocks;
  bool has_blocks = false;
  // A candidate pattern (see prepare_pattern); after a commit it holds the previous pattern's
  // storage, whose capacity the next candidate reuses.
  SparseRows<T> next_rows, next_cols;
  double next_cutoff = 0.0;
  bool next_has_cols = false;

  // Makes the candidate the pattern, built against (f, g). Swaps: `rows` and `cols` keep their
  // addresses, so references to them stay valid.
  void commit(const double* f, const double* g) {
    std::swap(rows, next_rows);
    std::swap(cols, next_cols);
    std::swap(has_cols, next_has_cols);
    rebase(f, g, next_cutoff);
    valid = true;
  }

  // The pattern now describes (f, g) with this cutoff (it was filtered in place for them).
  void rebase(const double* f, const double* g, double new_cutoff) {
    blocks = BlockIndex();
    has_blocks = false;
    f0.assign(f, f + (static_cast<int64_t>(rows.ptr.size()) - 1));
    g0.assign(g, g + n_cols);
    cutoff = new_cutoff;
  }

  // The CSC copy, transposed from the rows on first use (every column has an entry: the patterns
  // are only installed when they cover every column).
  const SparseRows<T>& csc(int nt);

  // The rows' BlockIndex, built on first use.
  const BlockIndex& row_blocks(int nt) {
    if (!has_blocks) build_block_index(rows, n_cols, nt, blocks), has_blocks = true;
    return blocks;
  }

  double margin(const double* f, const double* g) const {
    double df = -std::numeric_limits<double>::infinity(), dg = df;
    for (size_t i = 0; i < f0.size(); ++i) df = std::max(df, f[i] - f0[i]);
    for (size_t j = 0; j < g0.size(); ++j) dg = std::max(dg, g[j] - g0[j]);
    const double m = cutoff - (df + dg);
    return std::isnan(m) ? -std::numeric_limits<double>::infinity() : m;
  }

  // Upper bound on the plan mass outside the pattern at (f, g), tighter than exp(-margin / eps):
  // an entry left out has C - f - g >= cutoff - df_i - dg_j, so its mass is at most
  // a_i e^{df_i/eps} b_j e^{dg_j/eps} e^{-cutoff/eps}, and summing gives the product of two weighted
  // means instead of their maxima (a few potentials that moved far, as Newton's cluster moves
  // do, no longer spoil the bound for everyone).
  double outside_mass(const double* f, const double* g, const double* log_a, const double* log_b,
                      double eps) const {
    auto lse = [&](const std::vector<double>& p0, const double* p, const double* lw) {
      double mx = -std::numeric_limits<double>::infinity(), s = 0.0;
      for (size_t i = 0; i < p0.size(); ++i) mx = std::max(mx, lw[i] + (p[i] - p0[i]) / eps);
      if (!std::isfinite(mx)) return mx;
      for (size_t i = 0; i < p0.size(); ++i) s += std::exp(lw[i] + (p[i] - p0[i]) / eps - mx);
      return mx + std::log(s);
    };
    const double log_bound = lse(f0, f, log_a) + lse(g0, g, log_b) - cutoff / eps;
    return std::isnan(log_bound) ? std::numeric_limits<double>::infinity() : std::exp(log_bound);
  }
};

// The entries of every column in each of nq fixed chunks of R's rows (chunk q's counts at
// counts[q * m, (q + 1) * m)), counted in parallel over the chunks.
template <typename T>
void chunk_column_counts(const SparseRows<T>& R, int64_t m, int64_t nq, int nt, std::vector<int64_t>& counts) {
  const int64_t n = static_cast<int64_t>(R.ptr.size()) - 1;
  counts.assign(static_cast<size_t>(nq) * m, 0);
  // Every array through a local pointer, every bound computed once: the counts (int64_t) may alias
  // R.ptr, so the compiler otherwise reloads it and redoes the bound's division per entry (7 -> 2 ns
  // an entry, RESULTS.md, session 15).
  const int64_t* rptr = R.ptr.data();
  const int32_t* rcol = R.col.data();
  int64_t* cp = counts.data();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t q = 0; q < nq; ++q) {
    int64_t* cnt = cp + q * m;
    const int64_t k0 = rptr[n * q / nq], k1 = rptr[n * (q + 1) / nq];
    for (int64_t k = k0; k < k1; ++k) ++cnt[rcol[k]];
  }
}

// CSC from CSR by a counting sort over columns: rows stay ascending inside each column, which is
// the order a scan of the transposed dense matrix gives. Returns false if a column is empty.
template <typename T>
bool transpose_rows(const SparseRows<T>& R, int64_t m, int nt, SparseRows<T>& C) {
  const int64_t n = static_cast<int64_t>(R.ptr.size()) - 1, nnz = R.ptr[n];
  // Counted and scattered in parallel over fixed row chunks: chunk q writes each column's entries
  // after those of chunks < q, so every column keeps its rows ascending whatever the thread count.
  const int64_t nq = std::min<int64_t>(std::max(nt, 1), n);
  std::vector<int64_t> next;
  chunk_column_counts(R, m, nq, nt, next);
  // Local pointers for the scatter too: the output vectors' members may alias the counts.
  const int64_t* rptr = R.ptr.data();
  const int32_t* rcol = R.col.data();
  const T* rval = R.val.data();
  // Column starts, and each chunk's first slot in every column, from the chunks' counts.
  C.ptr.assign(m + 1, 0);
  for (int64_t j = 0; j < m; ++j) {
    int64_t at = C.ptr[j];
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t c = next[q * m + j];
      next[q * m + j] = at;
      at += c;
    }
    if (at == C.ptr[j]) return false;
    C.ptr[j + 1] = at;
  }
  C.col.resize(nnz);
  C.val.resize(nnz);
  // The scatter runs over tiles of kTile columns: a row's entries are sorted by column, so a cursor
  // per row walks them tile by tile, and the writes of a tile go to kTile streams that stay in cache
  // and the TLB. Whole rows at once wrote to m streams: 0.49 s for 2.8e7 entries on one thread, then
  // 0.30 s (0.11 s of it the first touch of the output). Same entry order as before.
  // A tile holds ~kSegment entries of an average row (128 columns at least): at 3 % density 256-column
  // tiles left ~8 entries a row visit, and the visits' overhead dominated. The next rows' segments
  // are prefetched: they lie a row's length apart, where the hardware prefetchers do not look.
  // Scratch benchmark (10^4 x 10^4, one thread): 10.4 -> 8.0 ns an entry at 25 % density, 11.8 ->
  // 8.5 at 3 % (RESULTS.md, session 15).
  constexpr int64_t kSegment = 32, kAhead = 8;
  const int64_t avg_row = std::max<int64_t>(1, nnz / std::max<int64_t>(n, 1));
  const int64_t kTile = std::clamp<int64_t>(kSegment * m / avg_row, 128, std::max<int64_t>(m, 128));
  int32_t* ccol = C.col.data();
  T* cval = C.val.data();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t q = 0; q < nq; ++q) {
    int64_t* nx = next.data() + q * m;
    const int64_t i0 = n * q / nq, i1 = n * (q + 1) / nq;
    std::vector<int64_t> cur_v(rptr + i0, rptr + i1);
    int64_t* cur = cur_v.data();
    for (int64_t j1 = kTile; j1 < m + kTile; j1 += kTile) {
      for (int64_t i = i0; i < i1; ++i) {
        if (i + kAhead < i1) {  // the rows' segments are far apart: the hardware prefetchers miss them
          const int64_t kp = cur[i + kAhead - i0];
          for (int64_t o = 0; o < kSegment; o += 16) {
            prefetch_line(rcol + kp + o);
            prefetch_line(rval + kp + o);
          }
        }
        int64_t k = cur[i - i0];
        const int64_t end = rptr[i + 1];
        for (; k < end; ++k) {
          const int32_t j = rcol[k];
          if (j >= j1) break;
          const int64_t dst = nx[j]++;
          ccol[dst] = static_cast<int32_t>(i);
          cval[dst] = rval[k];
        }
        cur[i - i0] = k;
      }
    }
  }
  return true;
}

template <typename T>
const SparseRows<T>& Pattern<T>::csc(int nt) {
  if (!has_cols) has_cols = transpose_rows(rows, n_cols, nt, cols);
  return cols;
}

// Whether every one of the m columns holds an entry of R (what transpose_rows checks too). Rows
// are visited with a stride, so that rows of every class (whose entries sit in their own classes'
// columns) come early, and the scan stops once every column is seen: on the benchmark's patterns
// after a small part of the entries, where counting every entry per column took 2.3 % of a K = 10
// call (RESULTS.md, session 17). Only a pattern that leaves a column empty is read whole.
template <typename T>
bool columns_covered(const SparseRows<T>& R, int64_t m) {
  const int64_t n = static_cast<int64_t>(R.ptr.size()) - 1;
  const int64_t* rptr = R.ptr.data();
  const int32_t* rcol = R.col.data();
  thread_local std::vector<unsigned char> seen;
  seen.assign(m, 0);
  unsigned char* sp = seen.data();
  int64_t left = m;
  constexpr int64_t kStride = 64;
  for (int64_t s = 0; s < kStride && left > 0; ++s)
    for (int64_t i = s; i < n && left > 0; i += kStride)
      for (int64_t k = rptr[i]; k < rptr[i + 1]; ++k) {  // a row's columns are distinct
        left -= sp[rcol[k]] == 0 ? 1 : 0;
        sp[rcol[k]] = 1;
      }
  return left == 0;
}

// The cutoff a pattern filtered from p may use for iterations at (f, g) that need every entry with
// C - f - g < keep: keep + slack, lowered to p's margin; none when p cannot vouch for those entries
// (no pattern, or potentials drifted beyond its margin).
template <typename T>
std::optional<double> filter_cutoff(const Pattern<T>& p, const double* f, const double* g, double keep,
                                    double slack) {
  if (!p.valid) return std::nullopt;
  const double margin = p.margin(f, g);
  if (!(margin >= keep)) return std::nullopt;
  return std::min(keep + slack, margin);
}

// The candidate's columns: the CSC copy when `with_cols` (filtered from p's own when it has one:
// the criterion is symmetric, so that filters to the transpose of the filtered CSR, rows still
// ascending in each column, at half the cost of a transposition), else only the check that every
// column keeps an entry. Returns false if one does not.
template <typename T>
bool prepare_columns(Pattern<T>& p, const double* f, const double* g, const std::optional<double>& filtered,
                     bool with_cols, int nt) {
  p.next_has_cols = with_cols;
  if (!with_cols) {
    p.next_cols.ptr.clear();  // keeps the storage's capacity for a later candidate
    return columns_covered(p.next_rows, p.n_cols);
  }
  if (filtered && p.has_cols) return filter_rows(p.cols, g, f, *filtered, nt, p.next_cols);
  return transpose_rows(p.next_rows, p.n_cols, nt, p.next_cols);
}

// Candidate pattern (p.next_rows, and p.next_cols if `with_cols`) for iterations that need every
// entry with C - f - g < keep: filtered from the current pattern when that provably contains them
// all (margin >= keep), else rebuilt from the dense cost with some slack above `keep`, so that the
// next stages (smaller eps, hence smaller `keep`) can filter instead of rescanning N x M entries.
// Returns false when the kernel is too dense or a row or column would be empty: the caller then
// runs a dense stage. The current pattern is left as it was; p.commit(f, g) installs the candidate.
template <typename T>
bool prepare_pattern(const RowMatrix<T>& cost, const double* f, const double* g, double keep, double slack,
                     double max_density, bool with_cols, int nt, Pattern<T>& p) {
  const std::optional<double> filtered = filter_cutoff(p, f, g, keep, slack);
  if (filtered && filter_rows(p.rows, f, g, *filtered, nt, p.next_rows) &&
      prepare_columns(p, f, g, filtered, with_cols, nt)) {
    p.next_cutoff = *filtered;
    return true;
  }
  const double cutoff = keep + slack;
  if (!build_sparse(cost, f, g, cutoff, p.cost_bound, max_density, nt, p.next_rows) ||
      !prepare_columns(p, f, g, std::nullopt, with_cols, nt))
    return false;
  p.next_cutoff = cutoff;
  return true;
}

// The pattern for a stage's iterations (see prepare_pattern), filtered in place where it can be.
template <typename T>
bool refresh_pattern(const RowMatrix<T>& cost, const double* f, const double* g, double keep, double slack,
                     double max_density, bool with_cols, int nt, Pattern<T>& p) {
  const std::optional<double> cutoff = filter_cutoff(p, f, g, keep, slack);
  std::vector<int64_t> row_ptr, col_ptr;
  const bool filter_cols = with_cols && p.has_cols;
  bool filtered = false;
  if (cutoff && nt == 1) {
    // One pass each (filter_serial); a row or column left empty leaves the pattern half-filtered,
    // so it is rebuilt below from the dense cost.
    filtered = filter_serial(p.rows, f, g, *cutoff, p.rows) && (!filter_cols || filter_serial(p.cols, g, f, *cutoff, p.cols));
    if (!filtered) p.valid = false;
  } else if (cutoff && count_kept(p.rows, f, g, *cutoff, nt, row_ptr) &&
             (!filter_cols || count_kept(p.cols, g, f, *cutoff, nt, col_ptr))) {
    filter_in_place(p.rows, row_ptr, f, g, *cutoff, nt);
    if (filter_cols) filter_in_place(p.cols, col_ptr, g, f, *cutoff, nt);
    filtered = true;
  }
  if (filtered) {
    if (!filter_cols) {
      p.cols = SparseRows<T>();
      p.has_cols = false;
    }
    p.rebase(f, g, *cutoff);
    // Every column must keep an entry; if one does not, the rebuild below decides (dense stage).
    bool covered;
    if (with_cols) {
      p.csc(nt);
      covered = p.has_cols;
    } else {
      covered = columns_covered(p.rows, p.n_cols);
    }
    if (covered) return true;
    p.valid = false;
  }
  // Rebuilt from the dense cost: the old pattern is needed neither for that nor by a dense stage,
  // should the new one be too dense. Its columns (CSC) are freed, so they do not add to the peak;
  // its rows' storage becomes the candidate's, which then fills pages already faulted in. Fresh
  // pages cost ~8 us each on the 2-vCPU VMs: the first draw of a call rebuilt its second pattern
  // (D = 256) in 0.31 s against 0.03 s for later draws, whose pool blocks were already touched.
  p.cols = SparseRows<T>();
  p.has_cols = false;
  p.next_rows = std::move(p.rows);
  p.next_rows.ptr.clear();
  p.next_rows.col.clear();
  p.next_rows.val.clear();
  p.rows = SparseRows<T>();
  p.valid = false;
  if (!prepare_pattern(cost, f, g, keep, slack, max_density, with_cols, nt, p)) return false;
  p.commit(f, g);
  // A stage's pattern replaces the previous one for good: its storage goes back to the system (at
  // N = 3 x 10^4 keeping it doubled the peak memory). Newton's relocations keep theirs (prepare and
  // commit directly), to rebuild without fresh pages.
  p.next_rows = SparseRows<T>();
  p.next_cols = SparseRows<T>();
  return true;
}

// log sum_k exp(A[cols[k]] - c[k] / eps) over one row (cols null: A[k]), shifted by the row's own
// potential: in float when `lowp` (the shift rounded to float is the one subtracted, and added
// back), exactly when not, or when that float sum over- or underflows. The one form of a row's sum
// for half_step and fused_iteration, which must agree to the bit.
// `terms` (float storage, lowp, KeptTerms::available()): the float sum's terms are kept there, and
// `kept` says whether that sum was the one used and the shift its terms carry.
// `blocks` (with terms): the row's BlockIndex entries, through which the float sum gathers
// (KeptTerms::sum_blocks, the same value to the bit).
struct KeptRow {
  bool used = false;
  float shift = 0.0f;  // each kept term is exp(Af[col] - c * inv_eps - shift)
};
struct RowBlocks {
  const int32_t* col;
  const uint8_t* mask;
  int64_t count;
  float* gathered;  // room for the row's length + 8
};
inline RowBlocks row_blocks_of(const BlockIndex& B, int64_t i, float* gathered) {
  return RowBlocks{B.col.data() + B.ptr[i], B.mask.data() + B.ptr[i], B.ptr[i + 1] - B.ptr[i], gathered};
}
template <typename T>
double row_lse(const T* c, const int32_t* cols, int64_t len, const double* A, const float* Af, double inv_eps,
               double pot, bool lowp, float* terms = nullptr, KeptRow* kept = nullptr,
               const RowBlocks* blocks = nullptr) {
  if (lowp) {
    const float shift = static_cast<float>(-pot * inv_eps);
    const float ie = static_cast<float>(inv_eps);
    double total;
    if constexpr (std::is_same_v<T, float>) {
      total = blocks != nullptr
                  ? KeptTerms::sum_blocks(c, len, blocks->col, blocks->mask, blocks->count, Af, ie, shift, terms,
                                          blocks->gathered)
              : terms != nullptr ? KeptTerms::sum(c, cols, len, Af, ie, shift, terms)
                                 : RowLse<T>::sum_lowp(c, cols, len, Af, ie, shift);
    } else {
      (void)blocks;
      total = RowLse<T>::sum_lowp(c, cols, len, Af, ie, shift);
    }
    if (total >= kShiftedMin && total < kPosInf) {
      if (kept != nullptr) *kept = KeptRow{terms != nullptr, shift};
      return static_cast<double>(shift) + std::log(total);
    }
  }
  return RowLse<T>::run(c, cols, len, A, inv_eps, -pot * inv_eps);
}

// The scaling update of one potential from its sum `lse` (row_lse, or a column's): returns the
// marginal error term w |e^x - 1| of x = lse + pot / eps, before the update pot -= omega eps x.
inline double scale_potential(double lse, double w, double eps, double omega, double& pot) {
  lse += pot * (1.0 / eps);
  pot -= omega * eps * lse;
  return w * std::fabs(std::expm1(lse));
}

// One half-step: pot_i <- pot_i - omega * eps * log sum_j w_j exp((pot_i + other_j - C_ij) / eps),
// over the rows of `mat` (by_cols = false) or its columns (by_cols = true); a sparse pattern `sp`
// is given in the matching layout (CSR for rows, CSC for columns). Returns the L1 error of this
// side's marginal *before* the update: sum_i w_i |e^{lse_i} - 1|.
// `lowp` (float storage only) forms the exponents in float (RowLse::sum_lowp, ColLse::sum_row_lowp):
// for intermediate stages, which stop at stage_tol (1e-2) and whose result the next stage refines.
template <typename T>
double half_step(const RowMatrix<T>& mat, bool by_cols, const SparseRows<T>* sp, const double* other,
                 const double* log_w_other, const double* w_self, double eps, double omega,
                 double* pot, std::vector<double>& err_rows, int nt, bool lowp = false) {
  const int64_t n = by_cols ? mat.cols() : mat.rows(), m = by_cols ? mat.rows() : mat.cols();
  const double inv_eps = 1.0 / eps;
  // Work buffers reused across calls; only pointers to them enter the parallel region (each
  // OpenMP thread would see its own, empty, thread_local instance).
  thread_local std::vector<double> A, lse_buf;
  thread_local std::vector<float> Af;
  exponent_offsets(other, log_w_other, m, inv_eps, A);
  const double* Ap = A.data();
  lowp = lowp && std::is_same<T, float>::value;
  const bool dense_cols = sp == nullptr && by_cols;
  if (lowp && !dense_cols) {  // dense_column_lse makes its own
    Af.resize(m);
    for (int64_t j = 0; j < m; ++j) Af[j] = static_cast<float>(A[j]);
  }
  const float* Afp = Af.data();
  if (dense_cols) {
    lse_buf.resize(2 * n);
    for (int64_t i = 0; i < n; ++i) lse_buf[n + i] = -pot[i] * inv_eps;
    dense_column_lse(mat, Ap, inv_eps, nt, lse_buf.data(), lse_buf.data() + n, lowp);
  }
  const double* lse_dense = lse_buf.data();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
  for (int64_t i = 0; i < n; ++i) {
    double lse;
    if (dense_cols) {
      lse = lse_dense[i];
    } else {
      const int64_t k0 = sp ? sp->ptr[i] : i * m, len = sp ? sp->ptr[i + 1] - k0 : m;
      const T* c = sp ? sp->val.data() + k0 : mat.data() + k0;
      const int32_t* cols = sp ? sp->col.data() + k0 : nullptr;
      lse = row_lse(c, cols, len, Ap, Afp, inv_eps, pot[i], lowp);
    }
    err_rows[i] = scale_potential(lse, w_self[i], eps, omega, pot[i]);
  }
  // Summed in a fixed order so that the result does not depend on the thread count.
  double err = 0.0;
  for (int64_t i = 0; i < n; ++i) err += err_rows[i];
  return err;
}

// A Sinkhorn iteration in one pass over the cost (float storage only, exponents in float: the
// intermediate stages), the same arithmetic as half_step on the rows, then on the columns: each row
// updates its f_i, then, while the row is still in cache, adds its terms at the new f_i to the
// columns' partial sums (in blocks of 256 rows whose sums are added in order, so the result does
// not depend on the thread count). The cost is read once instead of twice; the two passes were
// bound by memory bandwidth (0.69 ns an entry each at 10^4 x 10^4; RESULTS.md, session 15). On a
// truncated kernel (sp: CSR) the row's terms are scattered to the columns' sums, which then need
// no CSC pass. Where KeptTerms runs, a column's term is the row's own term times a per-row factor
// (one exponential per entry for both half-steps). The row half-step is half_step's to the bit;
// the column one has the same terms as half_step's, with other shifts (-Af_j) and added in another
// order: a float rounding difference, far inside what the lowp stages tolerate.
// Returns false, with f updated and g untouched, when some column's shifted sum over- or
// underflows: the caller then runs the column half-step, whose exact sweep handles it. Call it only
// with finite shifts (fused_guess_finite).
// `bp` (with sp, where KeptTerms::blocks_available()): where the rows' entries lie in 8-column
// blocks, through which the row sums gather and the column updates scatter (KeptTerms::sum_blocks,
// add_scaled_blocks: the same values to the bit).
// `bal` (optional; groups as balance_classes takes them, rows contiguous by group): the class
// balancing folded into the iteration, between its row and column halves. The rows' blocks are then
// cut at the row groups' bounds too, so that each block's column sums are one row group's plan
// masses at (new f, g): summed over each column group they are the coarse problem's masses, which
// balance_classes obtains from a pass of its own over the kernel (one exponential an entry, ~1.5
// iterations' time at N = 10^4). The coarse shifts (coarse_shift) then move f and g, and the
// column half-step uses the blocks' sums scaled by their group's factor. `balanced`: set to whether
// the shift was applied (false where the coarse problem was degenerate, as balance_classes returns).
template <typename T>
bool fused_iteration(const RowMatrix<T>& mat, const SparseRows<T>* sp, const BlockIndex* bp, const double* log_a,
                     const double* log_b, const double* a, const double* b, double eps, double omega, double* f,
                     double* g, std::vector<double>& err_rows, int nt, double& err_r, double& err_c,
                     const PlanClasses* bal = nullptr, bool* balanced = nullptr) {
  const int64_t n = mat.rows(), m = mat.cols();
  const double inv_eps = 1.0 / eps;
  const float inv_eps_f = static_cast<float>(inv_eps);
  constexpr int64_t kRows = 256;  // dense_column_lse's blocks
  thread_local std::vector<int64_t> starts;  // block q: rows [starts[q], starts[q + 1])
  starts.clear();
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || i - starts.back() == kRows || (bal != nullptr && bal->row_class[i] != bal->row_class[i - 1]))
      starts.push_back(i);
  starts.push_back(n);
  const int64_t nb = static_cast<int64_t>(starts.size()) - 1;
  const int64_t* startp = starts.data();
  if (balanced != nullptr) *balanced = false;
  thread_local std::vector<double> A;
  thread_local AlignedVector<float> Af;  // the blocks' 8-column loads (64-byte aligned)
  // Block q's column sums at blk[q * ld, q * ld + m), in the storage type the rows add them in (the
  // double totals below read them exactly as a copy to double would), each block's row starting on
  // a 64-byte boundary for the 8-column blocks' stores.
  thread_local AlignedVector<T> blk;
  thread_local std::vector<float> mxf;
  exponent_offsets(g, log_b, m, inv_eps, A);
  // The blocks read Af and write the column sums up to the block of the last column.
  const int64_t m_pad = bp != nullptr ? (m + 7) / 8 * 8 : m;
  Af.assign(m_pad, 0.0f);
  mxf.resize(m);
  // The columns' shifts: -Af_j (finite: fused_guess_finite), which KeptTerms' products carry (the
  // sums are then near b_j, not 1).
  for (int64_t j = 0; j < m; ++j) {
    Af[j] = static_cast<float>(A[j]);
    mxf[j] = -Af[j];
  }
  const bool keep_terms = std::is_same_v<T, float> && KeptTerms::available();
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  const int64_t ld = (m_pad + kLine - 1) / kLine * kLine;
  blk.resize(static_cast<size_t>(nb) * ld);
  const double* Ap = A.data();
  const float* Afp = Af.data();
  const float* mxfp = mxf.data();
  T* blkp = blk.data();
  double* errp = err_rows.data();
#pragma omp parallel num_threads(nt)
  {
  // Room for a row's terms and gathered potentials and the blocks' whole-vector reads and writes;
  // a thread's, reused from block to block (as from row to row: every row writes what it reads).
  // Allocated and zeroed per block, with the blocks' sums copied out to double, they had been 3.3 %
  // of a draw's instructions at N = 10^4, D = 19 (callgrind; RESULTS.md, session 50).
  AlignedVector<float> terms(keep_terms ? m_pad + 8 : 0), gathered(bp != nullptr ? m_pad + 8 : 0);
#pragma omp for schedule(static)
  for (int64_t q = 0; q < nb; ++q) {
    T* part = blkp + q * ld;
    std::fill(part, part + m_pad, T(0));
    for (int64_t i = startp[q]; i < startp[q + 1]; ++i) {
      const int64_t k0 = sp ? sp->ptr[i] : i * m, len = sp ? sp->ptr[i + 1] - k0 : m;
      const T* c = sp ? sp->val.data() + k0 : mat.data() + k0;
      const int32_t* cols = sp ? sp->col.data() + k0 : nullptr;
      KeptRow kept;
      const RowBlocks rb = bp != nullptr ? row_blocks_of(*bp, i, gathered.data()) : RowBlocks{};
      errp[i] = scale_potential(row_lse(c, cols, len, Ap, Afp, inv_eps, f[i], true, keep_terms ? terms.data() : nullptr,
                                        &kept, bp != nullptr ? &rb : nullptr),
                                a[i], eps, omega, f[i]);
      // Its terms in the columns' sums, exp(Ai - c / eps - mx_j) (exponent offsets as
      // exponent_offsets forms them): the kept term exp(Af_j - c / eps - shift) times exp(Ai + shift).
      const float Ai = static_cast<float>(f[i] * inv_eps + log_a[i]);
      if constexpr (std::is_same_v<T, float>) {
        if (kept.used) {
          const double r = std::exp(static_cast<double>(Ai) + static_cast<double>(kept.shift));
          if (bp != nullptr)
            KeptTerms::add_scaled_blocks(terms.data(), rb.col, rb.mask, rb.count, static_cast<float>(r), part);
          else
            KeptTerms::add_scaled(terms.data(), cols, len, static_cast<float>(r), part);
          continue;
        }
      }
      if (cols)
        ColLse<T>::sum_sparse_row_lowp(c, cols, len, Ai, inv_eps_f, mxfp, part);
      else
        ColLse<T>::sum_row_lowp(c, m, Ai, inv_eps_f, mxfp, part);
    }
  }
  }
  err_r = 0.0;
  for (int64_t i = 0; i < n; ++i) err_r += err_rows[i];
  // The blocks' weights in the column sums: 1, or after the coarse shift its row group's factor.
  std::vector<double> weight(nb, 1.0);
  if (bal != nullptr) {
    // blk[q][j] is the plan's mass at (f, g) on column j from block q's rows (the column shift
    // -Af_j cancels g_j / eps + log b_j, up to its float rounding).
    const int R = bal->row_classes, Q = bal->col_classes;
    std::vector<double> M(static_cast<size_t>(R) * Q, 0.0), u;
    for (int64_t q = 0; q < nb; ++q) {
      double* Mrow = M.data() + static_cast<size_t>(bal->row_class[startp[q]]) * Q;
      const T* bs = blk.data() + q * ld;
      for (int d = 0; d < Q; ++d) {
        double s = 0.0;
        for (int64_t j = bal->col_class_start[d]; j < bal->col_class_start[d + 1]; ++j) s += static_cast<double>(bs[j]);
        Mrow[d] += s;
      }
    }
    for (double& v : M) v = v > 0 ? std::log(v) : kNegInf;
    if (coarse_shift(M, log_a, log_b, n, eps, *bal, f, g, &u)) {
      for (int64_t q = 0; q < nb; ++q) weight[q] = std::exp(u[bal->row_class[startp[q]]]);
      if (balanced != nullptr) *balanced = true;
    }
  }
  // Block by block (each column's sum still in block order), reading blk in its layout.
  std::vector<double> totals(m, 0.0), lse_col(m);
  for (int64_t q = 0; q < nb; ++q) {
    const double w = weight[q];
    const T* bs = blk.data() + q * ld;
    for (int64_t j = 0; j < m; ++j) totals[j] += w * static_cast<double>(bs[j]);
  }
  for (int64_t j = 0; j < m; ++j) {
    const double total = totals[j];
    if (!(total >= kShiftedMin * b[j] && total < kPosInf)) return false;
    lse_col[j] = static_cast<double>(mxf[j]) + std::log(total);  // the shift actually subtracted
  }
  // Half the over-relaxation after a coarse shift. The shift has already moved the column groups'
  // masses, and the full factor on top of it overshot (D = 256, eps = 0.8: 32 instead of 22
  // iterations); none at all set off a growing oscillation in the next iterations where omega
  // sat at its cap (a 1,276-point draw at cost / eps up to 10^8: 1,014 iterations to the last stage
  // instead of 514; half: 547). RESULTS.md, session 39.
  const double omega_c = bal != nullptr ? 0.5 * (1.0 + omega) : omega;
  for (int64_t j = 0; j < m; ++j) err_rows[j] = scale_potential(lse_col[j], b[j], eps, omega_c, g[j]);
  err_c = 0.0;
  for (int64_t j = 0; j < m; ++j) err_c += err_rows[j];
  return true;
}

// Whether every -g_j / eps is finite in float (fused_iteration's shifts, -(g_j / eps + log b_j) in
// float, then are too); dense_column_lse makes the same check before its guessed sweep.
inline bool fused_guess_finite(const double* g, int64_t m, double eps) {
  const double inv_eps = 1.0 / eps;
  for (int64_t j = 0; j < m; ++j)
    if (!std::isfinite(static_cast<float>(-g[j] * inv_eps))) return false;
  return true;
}

// Sum of a run of KeptTerms' terms (balance_classes' segments, ~15 entries: inlined, as a call
// through target_clones' dispatch costs as much as the sum), in float.
inline double sum_terms(const float* t, int64_t len) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < len; ++k) s += t[k];
  return static_cast<double>(s);
}

// Coarse correction on the class level (a two-grid step): shifts every potential by a constant per
// class, f_i += alpha_c(i), g_j += beta_d(j), with (alpha, beta) the exact maximiser of the dual over
// such shifts. That maximiser solves a small scaling problem: find alpha, beta with
// sum_d M_cd e^{(alpha_c + beta_d)/eps} = A_c and sum_c ... = B_d, where M_cd is the plan's mass
// between row class c and column class d and A, B the classes' marginal masses. Why: Sinkhorn moves
// mass between weakly coupled clusters at a rate of (1 - 1e-3) per iteration or slower, and on
// segmentation features classes are such clusters; after the multiscale hand-over 88 % of the L1
// error sat between classes, and the full problem spent 250 dense iterations (18 s) removing it.
// The step is an exact block-coordinate ascent, so it never lowers the dual objective. `sp` (CSR)
// restricts the plan to a truncated pattern; its rows keep their columns in ascending order. One
// pass costs about a half-step: a row's sums are taken over its non-empty group segments only, and
// the masses are added in the linear domain (a binary search, a logarithm and an exponential per
// row and column group, ~190 groups at N = 10^4, had made a call cost five half-steps and 17 % of a
// draw; RESULTS.md, session 16). Returns false (and changes nothing) if the coarse problem is
// degenerate (a class without mass, non-finite masses).
template <typename T>
bool balance_classes(const RowMatrix<T>& mat, const SparseRows<T>* sp, const double* log_a, const double* log_b,
                     double eps, const PlanClasses& cls, int nt, double* f, double* g, bool lowp = false,
                     const BlockIndex* bp = nullptr) {
  const int64_t n = mat.rows(), m = mat.cols();
  const int R = cls.row_classes, Q = cls.col_classes;
  if (R < 2 && Q < 2) return false;
  const double inv_eps = 1.0 / eps;
  thread_local std::vector<double> A, M;
  thread_local AlignedVector<float> Af;
  thread_local std::vector<int32_t> col_group;
  thread_local std::vector<char> redo;
  exponent_offsets(g, log_b, m, inv_eps, A);
  const double* Ap = A.data();
  lowp = lowp && std::is_same<T, float>::value;
  if (lowp) {
    Af.assign(bp != nullptr ? (m + 7) / 8 * 8 : m, 0.0f);  // the blocks read up to a multiple of 8
    for (int64_t j = 0; j < m; ++j) Af[j] = static_cast<float>(A[j]);
  }
  const float* Afp = Af.data();
  if (sp != nullptr) {
    col_group.resize(m);
    for (int d = 0; d < Q; ++d)
      std::fill(col_group.begin() + cls.col_class_start[d], col_group.begin() + cls.col_class_start[d + 1], d);
  }
  const int32_t* groupp = col_group.data();
  // The masses accumulate in fixed chunks of rows, each into its own table, and the tables are added
  // in order: the result does not depend on the thread count. Chunk q's table holds the row classes
  // first_class[q] .. of its rows (Q columns each) at offset[q]; the callers sort rows by class, so
  // that is a class or a few, where 64 full R x Q tables had been cleared and added up per call
  // (120 MB with 600 x 400 groups). Classes outside a chunk's range would add only zeros to the
  // totals, which are the same bit for bit. (Plain locals, not thread_local like the buffers above:
  // the parallel loop's threads read them.)
  const int64_t chunks = std::min<int64_t>(n, 64);
  const size_t RQ = static_cast<size_t>(R) * Q;
  std::vector<size_t> offset(chunks + 1, 0);
  std::vector<int> first_class(chunks);
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t i0 = q * n / chunks, i1 = (q + 1) * n / chunks;
    int lo = R, hi = -1;
    for (int64_t i = i0; i < i1; ++i) {
      lo = std::min(lo, static_cast<int>(cls.row_class[i]));
      hi = std::max(hi, static_cast<int>(cls.row_class[i]));
    }
    first_class[q] = lo;
    offset[q + 1] = offset[q] + (hi >= lo ? static_cast<size_t>(hi - lo + 1) * Q : 0);
  }
  M.assign(offset[chunks], 0.0);
  redo.assign(n, 0);
  double* Mp = M.data();
  char* redop = redo.data();
  // Segment d of row i: its entries, dense or on the pattern (whose columns ascend).
  struct Segment {
    const T* c;
    const int32_t* cols;
    int64_t len;
    const double* A;
  };
  auto dense_segment = [&](int64_t i, int d) {
    const int64_t j0 = cls.col_class_start[d], j1 = cls.col_class_start[d + 1];
    return Segment{mat.data() + i * m + j0, nullptr, j1 - j0, Ap + j0};
  };
  // Float exponents where KeptTerms runs: each row's terms in one pass (KeptTerms::sum), then the
  // segments' sums from them, instead of a sum_lowp call per segment. A row of a stage's pattern
  // spans ~150 segments of ~15 entries (64 cells per class at N = 10^4), and those short calls
  // took 9 % of a K = 10 call's CPU time at D = 19 (bench/RESULTS.md, session 20). The same
  // terms, added in another order.
  const bool keep_terms = lowp && KeptTerms::available();
#ifdef SEGTRANSFER_AVX2_LSE
  const bool avx2_groups = keep_terms && sp != nullptr && cpu_has_avx2_fma();
#endif
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t q = 0; q < chunks; ++q) {
    std::vector<std::pair<int, double>> seg;  // the row's non-empty segments and their shifted sums
    seg.reserve(Q);
    // Room for the blocks' whole-vector writes (bp: KeptTerms::sum_blocks, the same terms).
    AlignedVector<float> terms(keep_terms ? m + 8 : 0), gathered(keep_terms && bp != nullptr ? m + 8 : 0);
    for (int64_t i = q * n / chunks; i < (q + 1) * n / chunks; ++i) {
      // One pass shifted by the row's expected total (-f_i / eps, as in half_step): segments whose
      // share of the row underflows the float exponential (below ~e^-87 of it) count as empty, which
      // the coarse problem does not notice. A row whose total leaves [kShiftedMin, inf) is redone
      // below, in the log domain, segment by segment with their maxima.
      // `lowp` (the stage's own setting, see half_step): exponents formed in float, the shift
      // rounded to float being the one subtracted. The coarse shift it feeds is a heuristic step
      // that the following iterations refine; its masses need no more than float's 1e-4.
      const double guess = lowp ? static_cast<double>(static_cast<float>(-f[i] * inv_eps)) : -f[i] * inv_eps;
      // Row i's entries (dense: all m, sparse: its pattern) from `row_c` on; with keep_terms their
      // terms are in `terms` and a segment's sum adds its own.
      const T* row_c = sp == nullptr ? mat.data() + i * m : sp->val.data() + sp->ptr[i];
      if constexpr (std::is_same_v<T, float>) {
        if (keep_terms && sp != nullptr && bp != nullptr) {
          const RowBlocks rb = row_blocks_of(*bp, i, gathered.data());
          KeptTerms::sum_blocks(row_c, sp->ptr[i + 1] - sp->ptr[i], rb.col, rb.mask, rb.count, Afp,
                                static_cast<float>(inv_eps), static_cast<float>(guess), terms.data(), rb.gathered);
        } else if (keep_terms)
          KeptTerms::sum(row_c, sp == nullptr ? nullptr : sp->col.data() + sp->ptr[i],
                         sp == nullptr ? m : sp->ptr[i + 1] - sp->ptr[i], Afp, static_cast<float>(inv_eps),
                         static_cast<float>(guess), terms.data());
      }
      auto shifted = [&](const Segment& sg) {
        if (keep_terms) return sum_terms(terms.data() + (sg.c - row_c), sg.len);
        return lowp ? RowLse<T>::sum_lowp(sg.c, sg.cols, sg.len, Afp + (sg.A - Ap), static_cast<float>(inv_eps),
                                          static_cast<float>(guess))
                    : RowLse<T>::sum(sg.c, sg.cols, sg.len, sg.A, inv_eps, guess);
      };
      seg.clear();
      double total = 0.0;
      if (sp == nullptr) {
        for (int d = 0; d < Q; ++d) {
          const Segment sg = dense_segment(i, d);
          if (sg.len > 0) seg.emplace_back(d, shifted(sg));
        }
#ifdef SEGTRANSFER_AVX2_LSE
      } else if (avx2_groups) {
        group_sums_avx2(sp->col.data() + sp->ptr[i], terms.data(), sp->ptr[i + 1] - sp->ptr[i], groupp,
                        cls.col_class_start, [&](int d, double sum) { seg.emplace_back(d, sum); });
#endif
      } else {
        // Only the non-empty segments: the next one is the group of the next entry's column, and its
        // end is found by a galloping search (segments hold a few to a few hundred entries; a
        // binary search per group, empty or not, took most of a call with ~190 column groups).
        const int32_t* k = sp->col.data() + sp->ptr[i];
        const int32_t* const row_end = sp->col.data() + sp->ptr[i + 1];
        while (k < row_end) {
          const int d = groupp[*k];
          const int32_t j1 = static_cast<int32_t>(cls.col_class_start[d + 1]);
          const int32_t* lo = k + 1;
          int64_t step = 1;
          while (row_end - lo > step && lo[step - 1] < j1) {
            lo += step;
            step *= 2;
          }
          const int32_t* e = std::lower_bound(lo, std::min(lo + step, row_end), j1);
          seg.emplace_back(d, shifted(Segment{sp->val.data() + (k - sp->col.data()), k, e - k, Ap}));
          k = e;
        }
      }
      for (const auto& sd : seg) total += sd.second;
      if (!(total >= kShiftedMin && total < kPosInf)) {
        redop[i] = 1;
        continue;
      }
      // exp(L) with L = log a_i + f_i / eps + guess + log(sum): the row's mass in each segment.
      const double scale = std::exp(log_a[i] + f[i] * inv_eps + guess);
      double* Mrow = Mp + offset[q] + static_cast<size_t>(cls.row_class[i] - first_class[q]) * Q;
      for (const auto& sd : seg) Mrow[sd.first] += scale * sd.second;
    }
  }
  std::vector<double> total(RQ, 0.0), logM(RQ, kNegInf);
  for (int64_t q = 0; q < chunks; ++q)
    for (size_t k = 0; k < offset[q + 1] - offset[q]; ++k)
      total[static_cast<size_t>(first_class[q]) * Q + k] += M[offset[q] + k];
  for (size_t k = 0; k < RQ; ++k)
    if (total[k] > 0) logM[k] = std::log(total[k]);
  for (int64_t i = 0; i < n; ++i) {
    if (!redop[i]) continue;
    const double base = log_a[i] + f[i] * inv_eps;
    double* Lrow = logM.data() + static_cast<size_t>(cls.row_class[i]) * Q;
    const int32_t* cur = sp ? sp->col.data() + sp->ptr[i] : nullptr;
    const int32_t* const row_end = sp ? sp->col.data() + sp->ptr[i + 1] : nullptr;
    for (int d = 0; d < Q; ++d) {
      Segment sg = dense_segment(i, d);
      if (sp != nullptr) {
        const int32_t* e = std::lower_bound(cur, row_end, static_cast<int32_t>(cls.col_class_start[d + 1]));
        sg = Segment{sp->val.data() + (cur - sp->col.data()), cur, e - cur, Ap};
        cur = e;
      }
      if (sg.len > 0) lse_add(Lrow[d], base + RowLse<T>::run(sg.c, sg.cols, sg.len, sg.A, inv_eps));
    }
  }
  return coarse_shift(logM, log_a, log_b, n, eps, cls, f, g);
}

// Plan values on the truncated pattern, in CSR order, with its row and column sums.
struct SparsePlan {
  // Entries in float: they only enter the Newton system (an inexact solve to a 10 % residual), and
  // the matrix-vector products of its CG loop are bound by the bytes they read. The sums, which
  // carry the marginal error, are accumulated in double before rounding.
  detail::KernelVector<float> by_row;
  std::vector<double> row_sum, col_sum;
};

// A pass over the n rows of a CSR matrix (nnz entries, m columns) that scatters to the columns:
// the rows are cut into fixed blocks, body(i0, i1, part) handles rows [i0, i1) adding into that
// block's own m partial sums `part` (zeroed), and out_j is the blocks' sums added in order, so the
// result does not depend on the thread count. Few blocks for few entries, since each costs 2m (its
// partial sums zeroed and added).
template <typename Body>
void scatter_row_blocks(int64_t n, int64_t nnz, int64_t m, int nt, double* out, const Body& body) {
  thread_local std::vector<double> parts;
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>({16, n, nnz / (32 * std::max<int64_t>(m, 1))}));
  parts.assign(static_cast<size_t>(nb) * m, 0.0);
  double* pp = parts.data();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t q = 0; q < nb; ++q) body(n * q / nb, n * (q + 1) / nb, pp + q * m);
  std::fill(out, out + m, 0.0);
  for (int64_t q = 0; q < nb; ++q)
    for (int64_t j = 0; j < m; ++j) out[j] += parts[q * m + j];
}

template <typename T>
struct PlanRow {
  // Entries of one row: exp(base + B[col] - c * inv_eps), in double (the Newton system and the
  // line search compare errors down to 1e-8 of the mass); returns their sum, and adds each to its
  // column's partial sum col_part[col] (the row's columns are distinct).
  static double fill(const T* c, const int32_t* cols, int64_t len, double base, const double* B, double inv_eps,
                     float* out, double* col_part) {
#ifdef SEGTRANSFER_AVX512_LSE
    if constexpr (std::is_same_v<T, float>) {
      if (avx512_lse_available()) return plan_row_avx512(c, cols, len, base, B, inv_eps, out, col_part);
      if (cpu_has_avx2_fma()) return plan_row_avx2(c, cols, len, base, B, inv_eps, out, col_part);
    }
#endif
    return fill_clones(c, cols, len, base, B, inv_eps, out, col_part);
  }
  SEGTRANSFER_HOT static double fill_clones(const T* c, const int32_t* cols, int64_t len, double base, const double* B,
                                            double inv_eps, float* out, double* col_part) {
    double s = 0.0;
    for (int64_t k0 = 0; k0 < len; k0 += kPrefetchBlock) {
      const int64_t k1 = std::min(len, k0 + kPrefetchBlock);
      prefetch_ahead(c, cols, k0, k1);
#pragma omp simd reduction(+ : s)
      for (int64_t k = k0; k < k1; ++k) {
        const double v = detail::fast_exp(base + B[cols[k]] - static_cast<double>(c[k]) * inv_eps);
        out[k] = static_cast<float>(v);
        col_part[cols[k]] += v;
        s += v;
      }
    }
    return s;
  }
};

// The plan on the pattern R (CSR) at (f, g): its values in R's order and its row and column sums
// (the columns' from the rows' values, scatter_row_blocks). Returns the L1
// marginal error on the pattern, summed in a fixed order (independent of the thread count).
template <typename T>
double evaluate_plan(const SparseRows<T>& R, int64_t m, const double* a, const double* b, const double* log_a,
                     const double* log_b, double eps, const double* f, const double* g, SparsePlan& p, int nt) {
  const double inv_eps = 1.0 / eps;
  const int64_t n = static_cast<int64_t>(R.ptr.size()) - 1;
  const int t = R.col.size() > 200000 ? nt : 1;
  thread_local std::vector<double> B;
  B.resize(m);
  for (int64_t j = 0; j < m; ++j) B[j] = log_b[j] + g[j] * inv_eps;
  p.by_row.resize(R.col.size());
  p.row_sum.resize(n);
  p.col_sum.resize(m);
  const double* Bp = B.data();
  float* vp = p.by_row.data();
  double* sp = p.row_sum.data();
  scatter_row_blocks(n, static_cast<int64_t>(R.col.size()), m, t, p.col_sum.data(),
                     [&](int64_t i0, int64_t i1, double* part) {
                       for (int64_t i = i0; i < i1; ++i) {
                         const int64_t k0 = R.ptr[i], len = R.ptr[i + 1] - k0;
                         sp[i] = PlanRow<T>::fill(R.val.data() + k0, R.col.data() + k0, len,
                                                  log_a[i] + f[i] * inv_eps, Bp, inv_eps, vp + k0, part);
                       }
                     });
  double err = 0.0;
  for (int64_t i = 0; i < n; ++i) err += std::fabs(p.row_sum[i] - a[i]);
  for (int64_t j = 0; j < m; ++j) err += std::fabs(p.col_sum[j] - b[j]);
  return err;
}

// out_j = sum_i val_ij v_i over the entries of a CSR matrix (ptr, col, val; n rows, m columns):
// the product with its transpose, scattered from the rows (scatter_row_blocks).
inline void column_products(const int64_t* ptr, const int32_t* col, const float* val, int64_t n, int64_t m,
                            const double* v, int nt, double* out) {
  scatter_row_blocks(n, ptr[n], m, nt, out, [&](int64_t i0, int64_t i1, double* part) {
    for (int64_t i = i0; i < i1; ++i) {
      const double vi = v[i];
      const int64_t k1 = ptr[i + 1];
      int64_t k = ptr[i];
      // Four at a time, all loads before the stores (a row's columns are distinct): 20 % faster
      // than the 8-lane gather and scatter of the vectorised loop in a scratch benchmark.
      for (; k + 4 <= k1; k += 4) {
        const int32_t c0 = col[k], c1 = col[k + 1], c2 = col[k + 2], c3 = col[k + 3];
        const double p0 = part[c0], p1 = part[c1], p2 = part[c2], p3 = part[c3];
        part[c0] = p0 + static_cast<double>(val[k]) * vi;
        part[c1] = p1 + static_cast<double>(val[k + 1]) * vi;
        part[c2] = p2 + static_cast<double>(val[k + 2]) * vi;
        part[c3] = p3 + static_cast<double>(val[k + 3]) * vi;
      }
      for (; k < k1; ++k) part[col[k]] += static_cast<double>(val[k]) * vi;
    }
  });
}

// sum_k val[k] x[col[k]] over k in [k0, k1): the CG loop's inner product, a gather that AVX-512
// and AVX2 vectorise (hence the clones).
struct SparseDot {
  SEGTRANSFER_HOT static double run(const float* val, const int32_t* col, int64_t k0, int64_t k1, const double* x) {
    double s = 0.0;
    for (int64_t b0 = k0; b0 < k1; b0 += kPrefetchBlock) {
      const int64_t b1 = std::min(k1, b0 + kPrefetchBlock);
      prefetch_ahead(val, col, b0, b1);
#pragma omp simd reduction(+ : s)
      for (int64_t k = b0; k < b1; ++k) s += static_cast<double>(val[k]) * x[col[k]];
    }
    return s;
  }
};

// The plan's entries above `floor` in one layout (CSR from the rows' values, or CSC from the
// columns'): the operator of Newton's CG loop. Counted, then filled, in parallel over rows.
struct PlanEntries {
  std::vector<int64_t> ptr;
  detail::KernelVector<int32_t> col;
  detail::KernelVector<float> val;
};

// How many of val[0, len) are above `floor`. The plain loop compiled to scalar compares (the
// vectoriser gives up on the 64-bit reduction): 2.1 ns an entry, a third of a D = 256 Newton step
// (RESULTS.md, session 15). Hence the 32-bit count in the clones, and AVX-512's popcount of masks.
struct CountAbove {
  static int64_t run(const float* val, int64_t len, float floor) {
#ifdef SEGTRANSFER_AVX512_LSE
    if (avx512_lse_available()) return count_above_avx512(val, len, floor);
#endif
    return run_clones(val, len, floor);
  }
  SEGTRANSFER_HOT static int64_t run_clones(const float* val, int64_t len, float floor) {
    int32_t c = 0;  // a row of the pattern holds fewer than 2^31 entries (int32_t column indices)
#pragma omp simd reduction(+ : c)
    for (int64_t k = 0; k < len; ++k) c += val[k] > floor ? 1 : 0;
    return c;
  }
};

inline void plan_entries_above(const std::vector<int64_t>& ptr, const detail::KernelVector<int32_t>& col,
                               const detail::KernelVector<float>& val, float floor, int nt, PlanEntries& out) {
  const int64_t n = static_cast<int64_t>(ptr.size()) - 1;
  out.ptr.resize(n + 1);
  out.ptr[0] = 0;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) out.ptr[i + 1] = CountAbove::run(val.data() + ptr[i], ptr[i + 1] - ptr[i], floor);
  for (int64_t i = 0; i < n; ++i) out.ptr[i + 1] += out.ptr[i];
  out.col.resize(out.ptr[n]);
  out.val.resize(out.ptr[n]);
  // Branch-free compaction, as move_kept's (a branch on the kept entries, 6-17 % of them, cost
  // 8 % of a D = 256 draw); a row stops at its last kept entry, so no write leaves its share.
#ifdef SEGTRANSFER_AVX512_LSE
  if (avx512_lse_available()) {  // 16 entries at a time (lse_avx512.hpp)
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i)
      compact_above_avx512(val.data() + ptr[i], col.data() + ptr[i], ptr[i + 1] - ptr[i], floor,
                           out.col.data() + out.ptr[i], out.val.data() + out.ptr[i]);
    return;
  }
  if (cpu_has_avx2_fma()) {  // 8 entries at a time (lse_avx2.hpp): Newton steps ~10 % faster on Zen 2 (D = 256)
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i)
      compact_above_avx2(val.data() + ptr[i], col.data() + ptr[i], ptr[i + 1] - ptr[i], floor,
                         out.ptr[i + 1] - out.ptr[i], out.col.data() + out.ptr[i], out.val.data() + out.ptr[i]);
    return;
  }
#endif
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    int32_t* oc = out.col.data();
    float* ov = out.val.data();
    const int64_t end = out.ptr[i + 1];
    int64_t at = out.ptr[i];
    for (int64_t k = ptr[i]; k < ptr[i + 1] && at < end; ++k) {
      oc[at] = col[k];
      ov[at] = val[k];
      at += val[k] > floor ? 1 : 0;
    }
  }
}

// The most steps of a last-stage Newton round, and the steps over which a round must gain 1 % to go
// on (newton_polish).
constexpr int kNewtonRoundSteps = 50;
constexpr int kNewtonStallSteps = 10;

// Newton's method on the dual: the Hessian of the dual objective is -M / eps with
// M = [[D1, P], [P^T, D2]], D1 = diag(P 1), D2 = diag(P^T 1), so the ascent step solves
// M (d1, d2) = (a - P1, b - P^T 1) and moves (f, g) by eps (d1, d2). The column block is eliminated
// exactly: S d1 = (a - P1) - P D2^-1 (b - P^T 1) with the Schur complement S = D1 - P D2^-1 P^T,
// then d2 = D2^-1 (b - P^T 1 - P^T d1). With Jacobi scaling the spectrum of M is 1 +- sigma_k and
// that of S is 1 - sigma_k^2 (sigma_k: singular values of the scaled plan), so CG on S sees a
// condition number about 4x smaller, on vectors half as long. S is PSD; its null vectors (one per
// connected component of the plan's support) are orthogonal to the right-hand side when the
// component's masses balance, so CG stays in the range (where they do not, the damping below keeps
// the steps bounded). A backtracking line search keeps steps that lower the marginal error or pass
// an Armijo test on the dual objective. Stops at `target`, on stagnation, or when the iteration
// budget is spent. Returns the marginal error (on the pattern) of the potentials it leaves.
// `keeps_pattern(f, g)` says whether the pattern still holds every entry the plan at (f, g) needs.
// A step that leaves it (Newton's cluster moves shift whole groups of potentials by many eps, far
// beyond what a pattern built around the old potentials covers) is tried on a pattern rebuilt
// around the trial point: `relocate(f, g, err)` rebuilds it, evaluates the plan there into `p` and,
// when that error is below `err`, installs the new pattern and returns the error; otherwise it
// keeps the old pattern and returns inf (`p` is then stale: the search re-evaluates it). R is the
// pattern's own rows (m columns), so it follows a relocation; the products with P^T scatter from
// its rows (column_products), so no CSC copy is needed. The certification at the end decides, on
// the dense plan if the pattern cannot vouch for the result. Below `settle` (0: never), an accepted
// step that does not halve the error ends it (where tol lies below float64's rounding; the caller).
template <typename T, typename Poll, typename Keeps, typename Relocate>
double newton_polish(const SparseRows<T>& R, int64_t m, const double* a, const double* b,
                     const double* log_a, const double* log_b, double eps, double target, double settle,
                     double* f, double* g,
                     SparsePlan& p, SinkhornReport& rep, Poll& poll, const Keeps& keeps_pattern,
                     const Relocate& relocate, const PlanClasses& cls, int64_t max_iter, double& floor, bool debug,
                     const int& nt) {
  // Inexact Newton with a constant forcing term: each outer step then cuts the error by roughly
  // this factor while CG stops long before resolving the near-null cluster modes exactly.
  constexpr double opt_forcing = 0.1;
  const int64_t n = static_cast<int64_t>(R.ptr.size()) - 1;
  std::vector<double> rhs(n), x(n), res(n), dir(n), q(n), dinv(n), w(m), inv_c(m), f_try(n), g_try(m);
  // Levenberg-Marquardt damping: M + lambda diag(M). On a truncated pattern whose components do not
  // balance their masses the Newton system is inconsistent; CG then runs off along the null
  // vectors (N = 10^4 logits: 20,000 CG iterations and steps no line search could shorten enough,
  // every try leaving the pattern). Damping makes the system definite and bounds those steps; it
  // grows after a rejected or shortened step and shrinks after a full one.
  // Starts damped: on every N = 10^4 draw measured the undamped first step left the pattern and
  // failed its whole line search (1-3 s of rebuilds) before the damping rose to 1e-3.
  double lambda = 1e-3;
  const int32_t* row_class = cls.row_class;
  const int Rc = cls.row_classes;
  const bool use_coarse = Rc >= 2 && Rc <= 512;  // E is Rc x Rc (+ 1: the extra vector), factored once per step
  TwoLevelPreconditioner coarse;
  std::vector<double> last_dir;  // the coarse space's extra vector comes from it (coarse.start)
  std::vector<double> zvec(n);
  // Threads for the kernel-sized loops only where they have enough work (R may change size on a
  // relocation).
  const auto mv_threads = [&]() { return R.col.size() > 200000 ? nt : 1; };
  int nt_mv = mv_threads();
  // q = S v (and returns v . q): w = D2^-1 P^T v over the columns, then q = D1 v - P w over the rows.
  // CG's operator leaves out the plan entries below `floor` of the smallest marginal mass: most of
  // the pattern (it keeps every entry that may matter to the last stage's certificate, C - f - g up
  // to 35 eps, where the Newton system sees nothing below ~14 eps). Each row and column of the
  // operator then loses at most nnz x floor of its mass (the diagonal keeps the exact sums, so it
  // stays positive semi-definite); the right-hand sides, the line search and the certificate use
  // every entry. At N = 10^4 and the default 1e-6 it keeps 6 % (D = 19) and 17 % (D = 256) of the
  // entries, and the last stage took 2.2-3.0 -> 0.9-1.8 s (D = 19) and 4.7-7.2 -> 2.4-4.6 s
  // (D = 256), same Newton steps or fewer (RESULTS.md, session 13). Where the left-out entries do
  // matter (clusters joined only by them look disconnected to CG), the direction's residual against
  // every entry shows it: `floor` is then set to 0 for the rest of the solve. A step the line search
  // rejects sets it to 0 for the steps until one is accepted (see the end of the loop).
  double min_mass = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) min_mass = std::min(min_mass, a[i]);
  for (int64_t j = 0; j < m; ++j) min_mass = std::min(min_mass, b[j]);
  PlanEntries opr;
  // The operator's diagonal blocks D1, D2: the exact row and column sums, or, for a tight target or
  // an operator of every entry (floor 0), the sums of the pattern's entries as the operator holds
  // them, rounded to float (rs_op, cs_op). Against the exact sums the rounding leaves S 1 off by up
  // to ~6e-8 of each row's mass: harmless at the default tol, where the entries below the floor
  // shift the diagonal by far more, but near 1e-10 it swamps the couplings between nearly separate
  // components of a sparse plan. 300 x 300 points, D = 19, eps = 0.1, tol 1e-10 sat at 3-7e-10
  // until max_iter (as the blocked mode did with its double captured plan rounded to float; with
  // double values 13 steps), and a tol-1e-10 sweep flagged 3 of 108 stored solves; with the rounded
  // sums none (RESULTS.md, session 26). They still include every entry the floor leaves out, so S
  // stays definite (see above). Below kRoundedSumsBelow only: they cost a pass over the pattern a
  // step, and at the default tol K = 10 took the same iterations with them.
  constexpr double kRoundedSumsBelow = 1e-7;
  std::vector<double> rs_op, cs_op, ones;
  const double* d1 = p.row_sum.data();
  const double* d2 = p.col_sum.data();
  // out = S v on the operator's entries (`all`: every entry of the pattern); returns v . out.
  auto apply_schur = [&](bool all, const std::vector<double>& v, std::vector<double>& out) {
    const int64_t* rp = all ? R.ptr.data() : opr.ptr.data();
    const int32_t* rc = all ? R.col.data() : opr.col.data();
    const float* rv = all ? p.by_row.data() : opr.val.data();
    column_products(rp, rc, rv, n, m, v.data(), nt_mv, w.data());
    for (int64_t j = 0; j < m; ++j) w[j] *= inv_c[j];
#pragma omp parallel for num_threads(nt_mv) schedule(static)
    for (int64_t i = 0; i < n; ++i)
      out[i] = (1.0 + lambda) * d1[i] * v[i] - SparseDot::run(rv, rc, rp[i], rp[i + 1], w.data());
    double vq = 0.0;  // serial, fixed order: results do not depend on the thread count
    for (int64_t i = 0; i < n; ++i) vq += v[i] * out[i];
    return vq;
  };
  auto schur = [&](const std::vector<double>& v, std::vector<double>& out) { return apply_schur(false, v, out); };
  double err = evaluate_plan(R, m, a, b, log_a, log_b, eps, f, g, p, nt);
  // Whether this step's direction is checked against every entry (below). That product reads the
  // whole pattern (6x / 17x the operator at D = 19 / 256) and cost ~3 % of a D = 256 call. Entries
  // left out that matter also show in the step: it is shortened or rejected, or gains little. So
  // the check runs on the first step, after a relocation, and after every step that was not a full
  // one cutting the error at least in half; a run of such full steps on one pattern skips it.
  bool check_all = true;
  // Whether the residual of CG's direction x against every entry provably stays within the check's
  // threshold (below), so that the product with every entry (6x / 19x the operator at D = 256 / 19)
  // can be skipped: |rhs - S_all x| <= |rhs - S_op x| + left_out_product_bound (kernels.hpp), with
  // a 10 % margin for the products' rounding. It costs the operator's product and a scatter of its
  // column sums, and held on all 4 checks of the benchmark's first draw at D = 256 and at D = 19
  // (the left-out entries' bound at 0.03-0.5 of the threshold); with newton_cg_floor 5e-3, on
  // clusters joined only by entries it leaves out (test_newton_cg_floor), it does not, and the check
  // runs and sends the solve to every entry.
  std::vector<double> op_col(m), rho;
  auto residual_bound_holds = [&](double rhs_norm2) {
    const double threshold = 0.9 * 3.0 * opt_forcing * std::sqrt(rhs_norm2);
    apply_schur(false, x, q);  // leaves w = D2^-1 P_op^T x, the (1 + lambda) included
    ones.assign(n, 1.0);
    column_products(opr.ptr.data(), opr.col.data(), opr.val.data(), n, m, ones.data(), nt_mv, op_col.data());
    double r_op2 = 0.0;
    for (int64_t i = 0; i < n; ++i) r_op2 += (rhs[i] - q[i]) * (rhs[i] - q[i]);
    const double left_out = left_out_product_bound(opr.ptr.data(), opr.col.data(), opr.val.data(), n, m, d1, d2,
                                                   inv_c.data(), op_col.data(), x.data(), w.data(), rho);
    const bool holds = std::sqrt(r_op2) + left_out <= threshold;
    if (debug)
      std::fprintf(stderr, "  residual bound: |r_op| %.3g + left out %.3g %s %.3g\n", std::sqrt(r_op2), left_out,
                   holds ? "<=" : ">", threshold);
    return holds;
  };
  double floor_after_rejection = 0.0;  // the floor a rejected step set aside (see below)
  // A round whose last kNewtonStallSteps steps gained under 1 % in all ends: the caller then looks
  // for a component whose masses do not balance on the pattern, runs a Sinkhorn phase, or widens
  // the pattern, which such a crawl is waiting for. A 1,986-pixel draw (D = 64, float64, eps = 0.1,
  // tol 1e-4) sat at 4.04e-3 for three rounds of 50 steps (CG converging in one iteration, a
  // relocation most steps: ~8 s) until a refresh widened its cutoff; ended early, its second round
  // led to a component shift and the draw took 8.7 instead of 14 s (session 41). The benchmark's
  // steps gain ~3x each, so this never fires there.
  double history[kNewtonRoundSteps];
  for (int step = 0; step < kNewtonRoundSteps && err > target && rep.iterations < max_iter && !rep.timed_out; ++step) {
    history[step] = err;
    if (step >= kNewtonStallSteps && err > 0.99 * history[step - kNewtonStallSteps]) {
      if (debug) std::fprintf(stderr, "  newton: %d steps gained under 1 %%: the round ends\n", kNewtonStallSteps);
      break;
    }
    nt_mv = mv_threads();  // nt may grow between steps (SinkhornOptions::lent_threads)
    const auto step_start = Clock::now();
    d1 = p.row_sum.data();
    d2 = p.col_sum.data();
    if (floor == 0.0 || target < kRoundedSumsBelow) {
      rs_op.resize(n);
      ones.assign(n, 1.0);
      cs_op.resize(m);
      for (int64_t i = 0; i < n; ++i) {
        double s = 0.0;
        for (int64_t k = R.ptr[i]; k < R.ptr[i + 1]; ++k) s += static_cast<double>(p.by_row[k]);
        rs_op[i] = s;
      }
      column_products(R.ptr.data(), R.col.data(), p.by_row.data(), n, m, ones.data(), nt_mv, cs_op.data());
      d1 = rs_op.data();
      d2 = cs_op.data();
    }
    for (int64_t j = 0; j < m; ++j) {
      inv_c[j] = d2[j] > 0 ? 1.0 / ((1.0 + lambda) * d2[j]) : 0.0;
      w[j] = (b[j] - p.col_sum[j]) * inv_c[j];
    }
    // The system's right-hand side and Jacobi diagonal (from the operator's entries too, exactly
    // as the operator sees them); the residuals a - P1 and b - P^T 1 are exact.
    const float cg_floor = static_cast<float>(floor * min_mass);
    plan_entries_above(R.ptr, R.col, p.by_row, cg_floor, nt_mv, opr);
#pragma omp parallel for num_threads(nt_mv) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      double s = a[i] - p.row_sum[i], diag = (1.0 + lambda) * d1[i];
      for (int64_t k = opr.ptr[i]; k < opr.ptr[i + 1]; ++k) {
        const double v = static_cast<double>(opr.val[k]);
        s -= v * w[opr.col[k]];
        diag -= v * v * inv_c[opr.col[k]];
      }
      rhs[i] = s;
      // A row whose columns it owns alone has a zero row in S (and a zero right-hand side).
      dinv[i] = diag > 1e-12 * d1[i] ? 1.0 / diag : 0.0;
    }
    double rhs_norm2 = 0.0;
    for (int64_t i = 0; i < n; ++i) rhs_norm2 += rhs[i] * rhs[i];
    // Two-level preconditioner: Jacobi plus an exact solve on the span of the row classes' indicator
    // vectors Z, z = D^-1 r + Z E^-1 Z^T r with E = Z^T S Z (additive, so still symmetric positive
    // definite for CG). The slow Newton directions are nearly constant on weakly coupled clusters,
    // which Jacobi leaves to many CG iterations; classes approximate those clusters. E is formed in
    // one pass over the columns: Z^T S Z = Z^T D1 Z - sum_j inv_c_j u_j u_j^T, u_j[c] = sum of
    // column j's entries in rows of class c (all u_j from one pass over the operator's rows).
    if (use_coarse) {
      coarse.start(Rc, row_class, last_dir, schur);
      for (int64_t i = 0; i < n; ++i) coarse.E(row_class[i], row_class[i]) += (1.0 + lambda) * d1[i];
      std::vector<double> U(static_cast<size_t>(m) * Rc, 0.0);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = opr.ptr[i]; k < opr.ptr[i + 1]; ++k)
          U[static_cast<size_t>(opr.col[k]) * Rc + row_class[i]] += opr.val[k];
      for (int64_t j = 0; j < m; ++j) {
        const double* u = U.data() + static_cast<size_t>(j) * Rc;
        for (int c = 0; c < Rc; ++c) {
          if (u[c] == 0.0) continue;
          const double uc = u[c] * inv_c[j];
          for (int e = 0; e < Rc; ++e) coarse.E(c, e) -= uc * u[e];
        }
      }
      coarse.factor();
    }
    auto precondition = [&](const std::vector<double>& r, std::vector<double>& z) {
      coarse.apply(r, z, dinv, use_coarse, row_class);
    };
    // Inexact Newton: solve to a fixed relative residual.
    const int cg = solve_cg(
        rhs, rhs_norm2 * opt_forcing * opt_forcing, static_cast<int>(std::min<int64_t>(20 * n, 20000)), schur,
        precondition, [] { return false; },
        [&](int it) {
          if ((it & 63) == 0) poll();
        },
        x, res, dir, q, zvec);
    rep.cg_iterations += cg;
    last_dir = x;
    if (opr.col.size() < R.col.size() && check_all && !residual_bound_holds(rhs_norm2)) {
      // The direction against every entry: a residual well above what CG was asked for means the
      // entries left out mattered (clusters joined only by them); every entry from here on. Only
      // when some were left out: otherwise that product is the one CG already used.
      apply_schur(true, x, q);
      double r2 = 0.0;
      for (int64_t i = 0; i < n; ++i) r2 += (rhs[i] - q[i]) * (rhs[i] - q[i]);
      if (r2 > 9.0 * opt_forcing * opt_forcing * rhs_norm2) {
        floor = 0.0;
        floor_after_rejection = 0.0;
        if (debug) std::fprintf(stderr, "  CG operator: residual %.2g against every entry: all entries from now on\n",
                                std::sqrt(r2 / rhs_norm2));
      }
    }
    // d2 = D2^-1 (b - P^T 1 - P^T d1), kept in w.
    column_products(opr.ptr.data(), opr.col.data(), opr.val.data(), n, m, x.data(), nt_mv, w.data());
    for (int64_t j = 0; j < m; ++j) w[j] = (b[j] - p.col_sum[j] - w[j]) * inv_c[j];
    // Merit: the truncated problem's dual objective D = <a, f> + <b, g> - eps * sum(pi), concave, which
    // the Newton direction ascends with slope eps * (<a - P1, d1> + <b - P^T 1, d2>). Far from the
    // solution the L1 marginal error is a poor merit: the full step moves mass between clusters and
    // overshoots in L1 while the dual gains, and a search on the error alone took steps of 1e-3 to
    // 6e-2 (N = 10^4 logits: a last stage that crawled from error 5e-2 for 17,000 iterations).
    // Armijo on D is trusted only while the gain stands above the rounding noise of its terms
    // (sum(pi) ~ 1 summed over the pattern); near the solution a step must lower the error.
    double slope = 0.0, mass = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      slope += (a[i] - p.row_sum[i]) * x[i];
      mass += p.row_sum[i];
    }
    for (int64_t j = 0; j < m; ++j) slope += (b[j] - p.col_sum[j]) * w[j];
    const double noise = 1e-10;
    double t = 1.0, err_try = err;
    bool ascent = false;
    int relocations = 0;
    for (; t > 1e-3; t *= 0.5) {
      for (int64_t i = 0; i < n; ++i) f_try[i] = f[i] + t * eps * x[i];
      for (int64_t j = 0; j < m; ++j) g_try[j] = g[j] + t * eps * w[j];
      if (!keeps_pattern(f_try.data(), g_try.data())) {
        // A rebuild costs one dense scan: tried for the two longest steps only.
        if (relocations++ >= 2) continue;
        err_try = relocate(f_try.data(), g_try.data(), err);
        if (err_try < err) {
          ++rep.newton_relocations;
          nt_mv = mv_threads();
          break;
        }
        continue;
      }
      err_try = evaluate_plan(R, m, a, b, log_a, log_b, eps, f_try.data(), g_try.data(), p, nt);
      if (err_try < err) break;
      if (t * slope > noise) {
        double gain = 0.0, mass_try = 0.0;  // D(trial) - D(current), divided by eps
        for (int64_t i = 0; i < n; ++i) {
          gain += a[i] * t * x[i];
          mass_try += p.row_sum[i];
        }
        for (int64_t j = 0; j < m; ++j) gain += b[j] * t * w[j];
        gain -= mass_try - mass;
        if (dual_ascent_accepted(gain, t * slope, err_try, err)) {
          ascent = true;
          break;
        }
      }
    }
    ++rep.newton_steps;
    ++rep.iterations;  // a Newton step is charged as one iteration against max_iter
    poll();
    if (debug)
      std::fprintf(stderr, "  newton step %d: lambda=%g cg=%d (on %.3f of the entries) t=%g err %.3e -> %.3e%s (%d relocation tries, %.0f ms)\n", step,
                   lambda, cg, static_cast<double>(opr.ptr[n]) / static_cast<double>(R.ptr[n]), t, err, err_try, ascent ? " (dual ascent)" : "", relocations,
                   1e3 * std::chrono::duration<double>(Clock::now() - step_start).count());
    check_all = !(t == 1.0 && relocations == 0 && !ascent && err_try <= 0.5 * err);
    if (!(err_try < err) && !ascent) {
      evaluate_plan(R, m, a, b, log_a, log_b, eps, f, g, p, nt);  // p must describe (f, g) again
      lambda = std::max(1e-3, 10.0 * lambda);
      // The next step on every entry, in case the ones left out caused this. A rejection has other
      // causes too (every trial left the pattern and its rebuilds failed), so the operator's floor
      // comes back after the next accepted step, whose direction is then checked against every
      // entry (check_all); that check, not a rejection, keeps every entry for good. Kept after a
      // rejection, the floor had a D = 256 draw's last 9 steps run on every entry (3x the time
      // each: 4.5 -> 7.5 s; bench/RESULTS.md, session 38).
      if (floor > 0.0) {
        floor_after_rejection = floor;
        floor = 0.0;
      }
      if (lambda > 1e2) return err;  // no progress even on a short leash: leave it to Sinkhorn
      continue;
    }
    lambda = next_damping(lambda, t, ascent, err_try, err);  // kernels.hpp
    std::copy(f_try.begin(), f_try.end(), f);
    std::copy(g_try.begin(), g_try.end(), g);
    const bool halved = err_try <= 0.5 * err;
    err = err_try;
    if (!halved && err <= settle) return err;
    if (floor_after_rejection > 0.0) {
      floor = floor_after_rejection;
      floor_after_rejection = 0.0;
      check_all = true;
    }
  }
  return err;
}

// One row of summarize_pattern: its entries exp(base + B[col] - c * inv_eps) into v, their sum
// returned and their sum weighted by the cost in wd. fast_exp in double (truncation below 5e-18
// relative, fastexp.hpp) rounds like std::exp to a few ulp and vectorises; with std::exp the
// certificate ran scalar at ~5 ns an entry, 78 ms against 32 now for one draw at N = 10^4, D = 256
// on one thread (RESULTS.md, session 21).
template <typename T>
struct SummaryPatternRow {
  SEGTRANSFER_HOT static double run(const T* c, const int32_t* cols, int64_t len, double base, const double* B,
                                    double inv_eps, double* v, double& wd) {
    double s = 0.0, w = 0.0;
#pragma omp simd reduction(+ : s, w)
    for (int64_t k = 0; k < len; ++k) {
      const double ck = static_cast<double>(c[k]);
      const double e = detail::fast_exp(base + B[cols[k]] - ck * inv_eps);
      v[k] = e;
      s += e;
      w += e * ck;
    }
    wd = w;
    return s;
  }
};

// Plan statistics from the truncated kernel alone: the entries on the pattern exactly, the rest
// through its bound `outside` on the dropped mass (each dropped unit of mass is missing from one
// row sum and one column sum, hence 2 * outside on the L1 marginal error). The rows are cut into
// fixed blocks (at most 16, as scatter_row_blocks), each with its own column sums, joint table and
// totals, added in block order: bit-identical for any thread count. A row's columns are ascending
// and the column classes contiguous ranges, so its joint entries are sums over runs of its entries.
template <typename T>
PlanSummary summarize_pattern(const SparseRows<T>& R, const double* a, const double* b, const double* log_a,
                              const double* log_b, const double* f, const double* g, double eps,
                              const PlanClasses& cls, double outside, int nt) {
  const int64_t n = static_cast<int64_t>(R.ptr.size()) - 1;
  const int64_t m = cls.col_class_start[cls.col_classes];
  const int Q = cls.col_classes;
  const size_t cells = static_cast<size_t>(cls.row_classes) * Q;
  const double inv_eps = 1.0 / eps;
  std::vector<int32_t> col_class(m);
  for (int c = 0; c < Q; ++c)
    std::fill(col_class.begin() + cls.col_class_start[c], col_class.begin() + cls.col_class_start[c + 1], c);
  std::vector<double> B(m);
  for (int64_t j = 0; j < m; ++j) B[j] = log_b[j] + g[j] * inv_eps;
  const int64_t nnz = R.ptr[n];
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>({16, n, nnz / (32 * std::max<int64_t>(m, 1))}));
  // Per block: m column sums, the joint table, then the row error and the transport cost.
  const size_t stride = static_cast<size_t>(m) + cells + 2;
  std::vector<double> parts(static_cast<size_t>(nb) * stride, 0.0);
  const int t = nnz > 200000 ? nt : 1;
#pragma omp parallel for num_threads(t) schedule(dynamic, 1)
  for (int64_t q = 0; q < nb; ++q) {
    double* col_part = parts.data() + q * stride;
    double* joint = col_part + m;
    double& err_rows = joint[cells];
    double& cost = joint[cells + 1];
    std::vector<double> v;
    for (int64_t i = n * q / nb; i < n * (q + 1) / nb; ++i) {
      const int64_t k0 = R.ptr[i], len = R.ptr[i + 1] - k0;
      const int32_t* cols = R.col.data() + k0;
      v.resize(static_cast<size_t>(len));
      double wd = 0.0;
      const double row = SummaryPatternRow<T>::run(R.val.data() + k0, cols, len, log_a[i] + f[i] * inv_eps, B.data(),
                                                   inv_eps, v.data(), wd);
      cost += wd;
      err_rows += std::fabs(row - a[i]);
      for (int64_t k = 0; k < len; ++k) col_part[cols[k]] += v[k];
      double* jrow = joint + static_cast<size_t>(cls.row_class[i]) * Q;
      for (int64_t k = 0; k < len;) {
        const int c = col_class[cols[k]];
        const int64_t end = std::lower_bound(cols + k, cols + len, static_cast<int32_t>(cls.col_class_start[c + 1])) - cols;
        double run = 0.0;
#pragma omp simd reduction(+ : run)
        for (int64_t l = k; l < end; ++l) run += v[l];
        jrow[c] += run;
        k = end;
      }
    }
  }
  PlanSummary out;
  out.joint.assign(cells, 0.0);
  std::vector<double> col_sum(m, 0.0);
  double err = 0.0;
  for (int64_t q = 0; q < nb; ++q) {
    const double* part = parts.data() + q * stride;
    for (int64_t j = 0; j < m; ++j) col_sum[j] += part[j];
    for (size_t c = 0; c < cells; ++c) out.joint[c] += part[m + c];
    err += part[m + cells];
    out.transport_cost += part[m + cells + 1];
  }
  for (int64_t j = 0; j < m; ++j) err += std::fabs(col_sum[j] - b[j]);
  out.marginal_error = err + 2.0 * outside;
  return out;
}

}  // namespace

template <typename T>
double dense_bytes(int64_t n, int64_t m) {
  // The cost, plus truncated kernels at their densest (SinkhornOptions' default max_density,
  // value and column index): the pattern as CSR and CSC, and a rebuilt one (a refresh or a Newton
  // relocation) as CSR and CSC while the old one still exists.
  // Up to kFullFallback entries the last stage's kernel may be full (kSmallProblem, kFullFallback),
  // up to kLastDenseUpTo half full (kLastStageDensity).
  const double entries = static_cast<double>(n) * static_cast<double>(m);
  const double max_density = SinkhornOptions{}.max_density;
  const double density = entries <= kFullFallback  ? 1.0
                         : entries <= kLastDenseUpTo ? std::max(max_density, kLastStageDensity)
                                                     : max_density;
  return entries * (sizeof(T) + density * 4.0 * (sizeof(T) + 4));
}

namespace {
// The range of a tile (rows x w, leading dimension ld) into hi and lo (started at an entry of
// it); true if it holds a NaN, which the comparisons pass over. squared_euclidean's tiles, and
// sinkhorn_log's scan of a matrix given without its range (one row at a time).
template <typename T>
SEGTRANSFER_HOT bool tile_range(const T* tile, int64_t rows, int64_t w, int64_t ld, T& hi, T& lo) {
  int bad = 0;
  T h = hi, l = lo;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = tile + r * ld;
#pragma omp simd reduction(max : h) reduction(min : l) reduction(| : bad)
    for (int64_t j = 0; j < w; ++j) {
      const T v = row[j];
      h = v > h ? v : h;
      l = v < l ? v : l;
      bad |= v != v ? 1 : 0;
    }
  }
  hi = h;
  lo = l;
  return bad != 0;
}
}  // namespace

template <typename T>
CostRange squared_euclidean(const T* x, int64_t n, const T* y, int64_t m, int64_t d, RowMatrix<T>& cost,
                            int num_threads) {
  // The blocked solver's tiles (point_cost.hpp), panels of 24 rows in parallel: the same values as
  // the blocked mode, and AVX2 + FMA register blocks where Eigen's GEMM, compiled for baseline
  // x86-64, ran SSE2 without FMA. 24 rows: whole register blocks of 6 (AVX2) and 8 (AVX-512);
  // panels of 16 left AVX2 a block of 4 at two thirds of the rate.
  const PointCost<T> points(x, n, y, m, d);
  cost.resize(n, m);
  const auto bytes = static_cast<std::size_t>(n * m) * sizeof(T);
  detail::advise_huge_pages(cost.data(), bytes, bytes);  // before its first touch
  // The range from each tile while it is in cache: a separate pass over the matrix (in
  // sinkhorn_log) was ~45 ms of a draw at N = 10^4, bound by memory (RESULTS.md, session 39).
  // Minima and maxima do not depend on the order they are taken in; a NaN (from overflowing
  // points) leaves the range unknown, and sinkhorn_log then scans the matrix as before.
  constexpr int64_t kRows = 24;
  const int64_t panels = (n + kRows - 1) / kRows;
  double cmax = -std::numeric_limits<double>::infinity(), cmin = std::numeric_limits<double>::infinity();
  bool nan = false;
#pragma omp parallel for num_threads(threads_for(num_threads)) schedule(static) reduction(max : cmax) \
    reduction(min : cmin) reduction(|| : nan)
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t i0 = p * kRows, rows = std::min(n, i0 + kRows) - i0;
    T* out = cost.data() + i0 * m;
    for (int64_t j0 = 0; j0 < m; j0 += kCostTile) {
      const int64_t w = std::min(kCostTile, m - j0);
      points.tile(i0, rows, j0, w, out + j0, m);
      T hi = out[j0], lo = out[j0];
      nan = tile_range(out + j0, rows, w, m, hi, lo) || nan;
      cmax = std::max(cmax, static_cast<double>(hi));
      cmin = std::min(cmin, static_cast<double>(lo));
    }
  }
  CostRange range;
  range.valid = !nan && n > 0 && m > 0;
  range.min = cmin;
  range.max = cmax;
  return range;
}

// Mean extra cost a point pays to reach its nearest subsampled point (rows ri, columns ci) instead
// of its nearest point, probed on up to 256 rows and 256 columns; the larger of the two sides.
template <typename T>
double subsample_resolution(const RowMatrix<T>& cost, const std::vector<int64_t>& ri,
                            const std::vector<int64_t>& ci) {
  const int64_t n = cost.rows(), m = cost.cols(), ks = static_cast<int64_t>(ci.size());
  const int64_t probes = std::min<int64_t>(256, std::min(n, m));
  double gap_rows = 0.0, gap_cols = 0.0;
  for (int64_t k = 0; k < probes; ++k) {
    const T* row = cost.data() + ((2 * k + 1) * n / (2 * probes)) * m;
    double sub_min = kPosInf;
    for (int64_t l = 0; l < ks; ++l) sub_min = std::min(sub_min, static_cast<double>(row[ci[l]]));
    gap_rows += sub_min - static_cast<double>(*std::min_element(row, row + m));
  }
  // Columns, read row by row (a column walk would miss the cache on every entry).
  std::vector<double> col_all(probes, kPosInf), col_sub(probes, kPosInf);
  std::vector<int64_t> pj(probes);
  for (int64_t k = 0; k < probes; ++k) pj[k] = (2 * k + 1) * m / (2 * probes);
  for (int64_t l = 0; l < n; ++l) {
    const T* row = cost.data() + l * m;
    for (int64_t k = 0; k < probes; ++k) col_all[k] = std::min(col_all[k], static_cast<double>(row[pj[k]]));
  }
  for (int64_t l : ri) {
    const T* row = cost.data() + l * m;
    for (int64_t k = 0; k < probes; ++k) col_sub[k] = std::min(col_sub[k], static_cast<double>(row[pj[k]]));
  }
  for (int64_t k = 0; k < probes; ++k) gap_cols += col_sub[k] - col_all[k];
  return std::max(gap_rows, gap_cols) / static_cast<double>(probes);
}

namespace {
// sinkhorn_log; `trace` (optional) receives the stage extrapolation's records: the potentials at
// the end of the last two stages completed (the multiscale start extends its subsample's).
template <typename T>
SinkhornReport sinkhorn_log_traced(const RowMatrix<T>& cost, const double* a, const double* b,
                                   const SinkhornOptions& opt, double* f, double* g, const PlanClasses* classes,
                                   const PlanClasses* groups, StageExtrapolation* trace,
                                   const CostRange* range = nullptr) {
  const int64_t n = cost.rows(), m = cost.cols();
  if (n < 1 || m < 1) throw InvalidArgument("cost", "needs at least one point on each side");
  check_options(opt);

  // Grows when otce's other workers run out of repeats and lend theirs (poll, below), unless the
  // problem is too small for threads (parallel_min_entries).
  const int own_threads = threads_for(opt, n, m);
  int nt = own_threads;
  std::vector<double> log_a(n), log_b(m), err_rows(std::max(n, m));
  for (int64_t i = 0; i < n; ++i) log_a[i] = std::log(a[i]);
  for (int64_t j = 0; j < m; ++j) log_b[j] = std::log(b[j]);

  // The largest cost (where the schedule starts) and the largest magnitude (for build_sparse): from
  // `range` where given, else in one pass.
  double cmax = -std::numeric_limits<double>::infinity(), cmin = std::numeric_limits<double>::infinity();
  if (range != nullptr && range->valid) {
    cmax = range->max;
    cmin = range->min;
  } else {
#pragma omp parallel for num_threads(nt) schedule(static) reduction(max : cmax) reduction(min : cmin)
    for (int64_t i = 0; i < n; ++i) {
      T hi = cost(i, 0), lo = cost(i, 0);
      tile_range(cost.data() + i * m, 1, m, m, hi, lo);
      cmax = std::max(cmax, static_cast<double>(hi));
      cmin = std::min(cmin, static_cast<double>(lo));
    }
  }
  const std::vector<double> schedule = stage_schedule(cmax, opt);
  std::fill(f, f + n, 0.0);
  std::fill(g, g + m, 0.0);

  SinkhornReport rep;
  const auto start = Clock::now();
  auto last_poll = start;
  auto poll = [&]() {
    // The clock is cheap and read every call, so a timeout holds to within one iteration; the
    // interrupt callback (which takes the GIL in the bindings) is asked at most every 50 ms.
    const auto now = Clock::now();
    if (opt.timeout > 0 && std::chrono::duration<double>(now - start).count() > opt.timeout)
      rep.timed_out = true;
    if (opt.lent_threads && opt.parallel(n, m)) nt = own_threads + opt.lent_threads();
    if (now - last_poll < std::chrono::milliseconds(50)) return;
    last_poll = now;
    if (opt.interrupt && opt.interrupt()) throw Interrupted();
  };

  const bool debug = std::getenv("SEGTRANSFER_DEBUG") != nullptr;
  Pattern<T> pattern;
  pattern.cost_bound = std::max(std::fabs(cmax), std::fabs(cmin));
  pattern.n_cols = m;
  const SparseRows<T>& rows = pattern.rows;
  SparsePlan plan;
  std::vector<int64_t> one_class{0, m};
  std::vector<int32_t> zero_class(n, 0);
  const PlanClasses cls = classes ? *classes : PlanClasses{zero_class.data(), 1, one_class.data(), 1};
  const PlanClasses& grp = groups ? *groups : cls;
  // Whether the float iterations may balance the classes within themselves (fused_iteration's
  // `bal`): there must be groups to balance, each row group one run of rows (as otce sorts them),
  // and the column sums of its blocks (one per run and per 256 rows within one) must take at most
  // 64 MB or twice the usual blocks' (18 MB at N = 10^4 with ~190 groups), counted at 8 bytes a sum
  // as when fused_iteration kept them in double (it keeps them in float since session 50; the
  // criterion was left as it was, so that the same problems fold).
  const bool fold_groups = [&] {
    if (!opt.fold_balancing || !opt.class_balance || (grp.row_classes < 2 && grp.col_classes < 2)) return false;
    std::vector<char> seen(grp.row_classes, 0);
    int64_t runs = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i > 0 && grp.row_class[i] == grp.row_class[i - 1]) continue;
      if (seen[grp.row_class[i]]) return false;
      seen[grp.row_class[i]] = 1;
      ++runs;
    }
    const double usual = static_cast<double>(n) / 256.0 + 1.0;
    return (static_cast<double>(runs) + usual) * static_cast<double>(m) * 8.0 <=
           std::max(64e6, 2.0 * usual * static_cast<double>(m) * 8.0);
  }();
  std::vector<double> f_snap(n), g_snap(m);

  // Sinkhorn iterations until the estimated marginal error is <= target. Over-relaxation
  // f <- f + omega (f_new - f), adaptive and safeguarded: iterations run in blocks that start from
  // a snapshot; omega climbs towards its cap after every block whose error fell, and a block whose
  // error rose (or overflowed) is undone, omega drops back halfway to 1 and the level that failed
  // becomes the new cap. A fixed omega near 1.8 is up to 7x faster than plain Sinkhorn on some
  // problems but diverges on others; this finds the edge per stage.
  // Schmitzer's safeguard: the iterations on a truncated kernel are only right while the pattern
  // still holds every entry with C - f - g < (most of) truncation * eps. Potentials that drift far
  // (typically when the pattern has lost entries every feasible plan needs, so the truncated problem
  // is infeasible and the potentials run off) make the loops stop with `stale` set; the stage then
  // refreshes the pattern and carries on.
  // The margin demanded keeps the mass the truncation may drop below 1e-3 of the stage's target
  // (an intermediate stage, which only needs stage_tol, tolerates far more drift than the last).
  // Below that margin the pattern is stale only if its weighted bound on the dropped mass
  // (Pattern::outside_mass) exceeds the same level too: the margin takes the largest moves of f and
  // of g, which a few points make while the rest stay put (after an extrapolated stage start at
  // N = 10^4, D = 256, a refresh that cost 1.3 s left the next iterations and the score unchanged).
  bool stale = false;
  double min_margin = 0.0, stage_eps = 1.0;
  auto pattern_stale = [&]() {
    stale = stale || (pattern.valid && pattern.margin(f, g) < min_margin &&
                      pattern.outside_mass(f, g, log_a.data(), log_b.data(), stage_eps) >
                          std::exp(-min_margin / stage_eps));
    return stale;
  };
  // The over-relaxation state lives for a whole stage, so that a stage whose Sinkhorn phases are
  // interleaved with Newton rounds does not restart from omega = 1 after each of them.
  double omega = 1.0, cap = opt.overrelaxation;
  bool lowp = false;  // set per stage below
  // Set when the last stage's error stalled at float64's resolution (FloorWatch): it then ends there.
  bool at_floor = false;
  // newton_polish lowers it to 0 for good when a direction's residual shows that the entries it
  // leaves out matter, or when a round ends on a rejected step; after a rejection within a round it
  // restores it once a step is accepted.
  double cg_floor = opt.newton_cg_floor;
  // `floor_stop`: the loop may end at the noise floor (at_floor), for the last stage without Newton;
  // with Newton, its rounds watch for that instead.
  // `phase`: a last-stage phase between futile Newton rounds; it ends (without at_floor) after
  // kPhaseStallIterations without progress, or at the floor.
  // `sr`: the pattern's rows (pattern.rows), or null for a dense loop.
  double loop_err = std::numeric_limits<double>::infinity();  // the last iteration's error
  int64_t loop_block = 10;  // iterations between balancings and over-relaxation checks (set per stage)
  bool intermediate_stage = false;  // the stage is not the last one (set per stage)
  auto sinkhorn_loop = [&](double eps, double target, const SparseRows<T>* sr, int64_t iter_limit,
                           bool floor_stop = false, bool phase = false) {
    double block_err = std::numeric_limits<double>::infinity();
    int64_t block_left = 0;
    // 450 blocks without progress near the floor end the loop; in an intermediate stage
    // kIntermediateStallIterations (stopping.hpp) without progress anywhere.
    FloorWatch blocks(pattern.cost_bound, eps, 450,
                      intermediate_stage ? static_cast<int>(kIntermediateStallIterations / loop_block)
                                         : (phase ? static_cast<int>(kPhaseStallIterations / loop_block)
                                                  : std::numeric_limits<int>::max()));
    StallBackoff cycle;
    const int64_t block = loop_block;
    std::copy(f, f + n, f_snap.begin());
    std::copy(g, g + m, g_snap.begin());
    // Threads only where a half-step has enough work to pay for its barrier (a few ms on a loaded
    // machine): a 2000 x 2000 dense half-step runs faster on one thread there.
    const bool loop_threads = (sr ? static_cast<double>(sr->ptr[n]) : static_cast<double>(n) * m) > 1e7;
    int nt_loop = loop_threads ? nt : 1;
    // Class balancing at the start and after every block (see balance_classes), or within the
    // block's last iteration where that runs fused (fold_groups). The shifted potentials start a
    // new block with no error to compare against, since the shift may raise the L1 error while it
    // raises the dual.
    // The pattern's BlockIndex where the float loops read it (KeptTerms::blocks_available()).
    const auto loop_blocks = [&]() -> const BlockIndex* {
      return lowp && sr != nullptr && KeptTerms::blocks_available() ? &pattern.row_blocks(nt_loop) : nullptr;
    };
    const auto balance = [&]() {
      if (!opt.class_balance) return;
      if (!balance_classes(cost, sr, log_a.data(), log_b.data(), eps, grp, nt_loop, f, g, lowp, loop_blocks())) return;
      std::copy(f, f + n, f_snap.begin());
      std::copy(g, g + m, g_snap.begin());
      block_err = std::numeric_limits<double>::infinity();
    };
    // Not when no iteration follows: a solve out of time or iterations ends on the column
    // c-transform that makes its column marginal exact, which a balancing shift would undo.
    if (rep.iterations < iter_limit && !rep.timed_out) balance();
    while (rep.iterations < iter_limit && !rep.timed_out) {
      nt_loop = loop_threads ? nt : 1;  // nt may grow (lent_threads)
      double err_r = 0.0, err_c = 0.0;
      bool cols_done = false;
      // The iteration that ends a block balances the classes within (fused_iteration's `bal`)
      // where it runs fused, instead of balance_classes' pass after it, which cost ~1.5 iterations
      // (a fifth of a draw's time at N = 10^4, D = 19; RESULTS.md, session 39).
      bool balanced = false;
      const bool fold = fold_groups && block_left <= 1;
      // Exponents in float: one pass over the rows (fused_iteration).
      if (std::is_same_v<T, float> && lowp && fused_guess_finite(g, m, eps))
        cols_done = fused_iteration(cost, sr, loop_blocks(), log_a.data(), log_b.data(), a, b, eps, omega, f, g,
                                    err_rows, nt_loop, err_r, err_c, fold ? &grp : nullptr, &balanced);
      else
        err_r = half_step(cost, false, sr, g, log_b.data(), a, eps, omega, f, err_rows, nt_loop, lowp);
      rep.folded_balancings += balanced ? 1 : 0;
      if (!cols_done)
        err_c = half_step(cost, true, sr ? &pattern.csc(nt) : sr, f, log_a.data(), b, eps, omega, g, err_rows, nt_loop,
                          lowp);
      ++rep.iterations;
      poll();
      const double err = err_r + err_c;
      loop_err = err;
      if (std::isfinite(err) && err <= target) return;
      if (--block_left > 0 && std::isfinite(err)) continue;
      if (omega == 1.0 && !std::isfinite(err)) return;  // plain Sinkhorn overflowed: certify, report
      const bool accepted = accept_block(err, block_err, omega, cap);
      if (!accepted) {
        std::copy(f_snap.begin(), f_snap.end(), f);
        std::copy(g_snap.begin(), g_snap.end(), g);
      } else {
        std::copy(f, f + n, f_snap.begin());
        std::copy(g, g + m, g_snap.begin());
      }
      if (std::isfinite(err) && cycle.record(err, omega, cap) && debug)
        std::fprintf(stderr, "  eps=%g it=%lld err=%.3e: no progress across balancing, omega -> %.3f\n", eps,
                     (long long)rep.iterations, err, omega);
      block_left = block;
      if (balanced && accepted)
        block_err = std::numeric_limits<double>::infinity();  // as balance() leaves it (the snapshot is taken)
      else
        balance();
      if (sr != nullptr && pattern_stale()) return;
      if ((floor_stop || phase) && std::isfinite(err) && blocks.stuck(err)) {
        if (!phase) at_floor = true;
        return;
      }
      if (debug && rep.iterations % 500 < block)
        std::fprintf(stderr, "  eps=%g it=%lld err=%.3e omega=%.3f\n", eps, (long long)rep.iterations, err, omega);
    }
  };

  // Multiscale warm start. While epsilon is large the kernel is dense and every iteration costs
  // n*m exponentials, yet those stages only need to get the potentials roughly right. So they run
  // on a strided subsample (the OTCE pipeline sorts pixels by class, so striding is stratified)
  // until the subsample's truncated kernel turns sparse; the potentials are then extended to every
  // point by the c-transform and the full problem resumes from that epsilon.
  StageExtrapolation own_extrapolation;
  StageExtrapolation& extrapolation = trace != nullptr ? *trace : own_extrapolation;
  std::vector<double> handover;  // (f, g) where the full problem starts after a multiscale start
  bool resumed = false;          // the full problem starts at first_stage from a multiscale start
  size_t first_stage = 0;
  const int64_t ks = opt.multiscale_points;
  if (opt.eps_scaling && ks > 0 && n > 2 * ks && m > 2 * ks && opt.truncation > 0) {
    std::vector<int64_t> ri(ks), ci(ks);
    for (int64_t k = 0; k < ks; ++k) {
      ri[k] = (2 * k + 1) * n / (2 * ks);
      ci[k] = (2 * k + 1) * m / (2 * ks);
    }
    RowMatrix<T> sub(ks, ks);
    for (int64_t k = 0; k < ks; ++k)
      for (int64_t l = 0; l < ks; ++l) sub(k, l) = cost(ri[k], ci[l]);
    std::vector<double> sa(ks), sb(ks), sf(ks), sg(ks);
    double ta = 0, tb = 0;
    for (int64_t k = 0; k < ks; ++k) { sa[k] = a[ri[k]]; sb[k] = b[ci[k]]; ta += sa[k]; tb += sb[k]; }
    for (int64_t k = 0; k < ks; ++k) { sa[k] /= ta; sb[k] /= tb; }
    // The subsample stands in for the full problem only while epsilon exceeds its resolution: the
    // extra cost a point pays to reach the nearest subsampled point instead of its nearest point.
    // Below that, the c-transform extension hands the full problem potentials that are off by
    // about that much (on clustered logits, a 2000-point subsample run down to the sparse regime
    // left the full problem at marginal error ~1 and 18,000 iterations from the answer, where
    // stopping at the resolution needs a few hundred). Measured on up to 256 rows and columns.
    const double resolution = subsample_resolution(cost, ri, ci);
    SinkhornOptions so = opt;
    so.stop_when_sparse = true;
    so.stop_below = opt.multiscale_resolution * resolution;
    so.schedule_from = schedule.front();  // the same stage epsilons as the full problem
    so.multiscale_points = 0;
    so.newton = false;
    so.tol = std::max(opt.stage_tol, opt.tol);
    so.interrupt = opt.interrupt;
    // The subsample's solve has what is left of the timeout (it keeps its own clock).
    if (opt.timeout > 0)
      so.timeout = std::max(1e-9, opt.timeout - std::chrono::duration<double>(Clock::now() - start).count());
    StageExtrapolation sub_trace;
    const SinkhornReport sr = sinkhorn_log_traced(sub, sa.data(), sb.data(), so, sf.data(), sg.data(), nullptr, nullptr,
                                                  &sub_trace);
    rep.iterations += sr.iterations;  // charged as full iterations: conservative against max_iter
    poll();  // a timeout reached in the subsample's solve skips the full problem's stages
    if (sr.final_epsilon > 0 && !rep.timed_out) {
      resumed = true;
      // Resume at the last stage the subsample completed, not the one it stopped before: the
      // extension's error is then removed where iterations converge fastest (at the next, smaller
      // epsilon the full problem needed 5x more iterations on clustered logits).
      while (first_stage + 1 < schedule.size() && schedule[first_stage] > sr.final_epsilon * (1 + 1e-12))
        ++first_stage;
      if (first_stage > 0) --first_stage;
      const double eps = schedule[first_stage];
      // Subsample potentials extended to every point by the c-transform at epsilon e: to the rows
      // from the subsample's column potentials, f_i = -e log sum_l sb_l exp((sg_l - C_{i, ci[l]}) / e),
      // to the columns likewise from its row potentials (over the rows ri). `guess` (optional): the
      // points' potentials the result is expected near, which shift a one-pass sum (RowLse::run).
      std::vector<double> lsa(ks), lsb(ks);
      for (int64_t k = 0; k < ks; ++k) {
        lsa[k] = std::log(sa[k]);
        lsb[k] = std::log(sb[k]);
      }
      // To the columns: from the subsample's row potentials (over its rows ri), shifted by `guess`
      // where given.
      auto extend_cols = [&](const double* sub_pot, double e, const double* guess, double* out) {
        const double inv = 1.0 / e;
        std::vector<double> A;
        exponent_offsets(sub_pot, lsa.data(), ks, inv, A);
        std::vector<double> lse(2 * m);  // read row by row (a column walk misses the cache)
        if (guess != nullptr)
          for (int64_t j = 0; j < m; ++j) lse[m + j] = -guess[j] * inv;
        dense_column_lse(cost, A.data(), inv, nt, lse.data(), guess != nullptr ? lse.data() + m : nullptr, false,
                         ri.data(), ks);
        for (int64_t j = 0; j < m; ++j) out[j] = -e * lse[j];
      };
      // f extended to the rows from the subsample's column potentials, then g by a full half-step
      // against it: one float sweep (as the stage that follows runs them) shifted by g extended too,
      // where an unguessed sweep in double made two passes over the cost and took a third of the
      // multiscale start. f_p comes from the row's subsampled columns, strided across all of its
      // cache lines, so extending f on its own reads the whole cost (0.4 GB at N = 10^4); it is done
      // row by row within the half-step's sweep instead (dense_column_lse's `prep`), each row read
      // once for both (a separate pass took 50 of the multiscale start's ~190 ms: RESULTS.md,
      // session 39). Whether that sweep forms its exponents in float is decided before f exists,
      // on a bound: f_p is a weighted log-mean-exp of C_pk - sg_k, so |f_p| <= max|C| + max|sg|.
      // The full problem's second stage would start where its first ended (extrapolating needs
      // two stages), and took 21 iterations on the benchmark's logits where the extrapolated later
      // stages take 5-12. The subsample's potentials at the end of its stage before this one,
      // extended to every point (shifted by the potentials just made), stand in for the full
      // problem's previous stage; fp, its rows', is extended in the same row visit. Whether the
      // second stage uses them is decided after the first (see the stage loop).
      const bool previous = opt.stage_extrapolation > 0 && sub_trace.prev_eps() > eps * (1 + 1e-12) &&
                            static_cast<int64_t>(sub_trace.prev_f().size()) == ks;
      const double pe = sub_trace.prev_eps();
      std::vector<double> fp(previous ? n : 0), gp(previous ? m : 0);
      extend_cols(sf.data(), eps, nullptr, g);
      {
        const double inv = 1.0 / eps, inv2 = previous ? 1.0 / pe : 0.0;
        std::vector<double> A, A2, A_rows(n), lse(2 * m);
        exponent_offsets(sg.data(), lsb.data(), ks, inv, A);
        if (previous) exponent_offsets(sub_trace.prev_g().data(), lsb.data(), ks, inv2, A2);
        const double* prev_g = previous ? sub_trace.prev_g().data() : nullptr;
        // Row p: f_p (and fp_p, shifted by f_p) from its subsampled columns, then its offset in
        // the column sums, A_p = f_p / eps + log a_p (exponent_offsets' formula). The next row is
        // prefetched along the strided reads (the sweep's 111 -> 105 ms at N = 10^4).
        const auto extend_row = [&](int64_t p) {
          thread_local std::vector<T> c;
          c.resize(ks);
          const T* next = p + 1 < n ? cost.data() + (p + 1) * m : cost.data() + p * m;
          const T* here = cost.data() + p * m;
          for (int64_t k = 0; k < ks; ++k) {
            prefetch_line(next + ci[k]);
            c[k] = here[ci[k]];
          }
          f[p] = -eps * RowLse<T>::run(c.data(), nullptr, ks, A.data(), inv);
          if (prev_g != nullptr) fp[p] = -pe * RowLse<T>::run(c.data(), nullptr, ks, A2.data(), inv2, -f[p] * inv2);
          A_rows[p] = f[p] * inv + log_a[p];
        };
        double sg_max = 0.0;
        for (int64_t k = 0; k < ks; ++k) sg_max = std::max(sg_max, std::fabs(sg[k]));
        const double f_bound = pattern.cost_bound + sg_max;
        const bool lowp_sweep = stage_float_exponents(opt, opt.handover_tol, pattern.cost_bound, &f_bound, 1, g, m, eps);
        for (int64_t j = 0; j < m; ++j) lse[m + j] = -g[j] * inv;
        dense_column_lse(cost, A_rows.data(), inv, nt, lse.data(), lse.data() + m, lowp_sweep, nullptr, 0, extend_row);
        for (int64_t j = 0; j < m; ++j) scale_potential(lse[j], b[j], eps, 1.0, g[j]);
      }
      if (previous) {
        extend_cols(sub_trace.prev_f().data(), pe, g, gp.data());
        extrapolation.record(pe, fp.data(), n, gp.data(), m);
        handover.assign(f, f + n);
        handover.insert(handover.end(), g, g + m);
      }
      if (debug)
        std::fprintf(stderr, "multiscale: resolution %.3g, %lld sub-iterations, resume at eps=%g t=%.3f\n", resolution, (long long)sr.iterations,
                     eps, std::chrono::duration<double>(Clock::now() - start).count());
    }
  }

  BestCertificate best;  // of the last stage's rounds (see the certification)
  bool was_sparse = false;  // the last pattern built was a sparse one (see the stage loop)
  for (size_t s = first_stage; s < schedule.size(); ++s) {
    const double eps = schedule[s];
    bool extrapolated = false;  // this stage starts from extrapolated potentials (see undo_overflowing_start)
    if (s > first_stage && !rep.timed_out) {
      // After a multiscale start, the second stage extrapolates from the subsample's extended
      // stage before (see above) only if the first stage moved the potentials less than they had
      // moved from that stage to the hand-over: otherwise the slope would be mostly the first
      // stage's correction of the hand-over (mass the subsample misplaced between clusters), which
      // is no trend in epsilon. Measured (mass-weighted L1 of each move, constants removed): 0.51 /
      // 0.36 of the trend on the benchmark's logits at D = 19 / 256, where the second stage then
      // took 9 instead of 21 iterations; 9.8 on three unequal clusters (check_multiscale_same_plan),
      // where extrapolating took 241 instead of 157 iterations.
      bool extrapolate = true;
      if (s == first_stage + 1 && !handover.empty()) {
        auto moved = [](const double* u, const double* v, const double* w, int64_t len) {
          double mean = 0.0, sum = 0.0;
          for (int64_t k = 0; k < len; ++k) mean += w[k] * (u[k] - v[k]);
          for (int64_t k = 0; k < len; ++k) sum += w[k] * std::fabs(u[k] - v[k] - mean);
          return sum;
        };
        const double correction = moved(f, handover.data(), a, n) + moved(g, handover.data() + n, b, m);
        const double trend = moved(handover.data(), extrapolation.last_f().data(), a, n) +
                             moved(handover.data() + n, extrapolation.last_g().data(), b, m);
        extrapolate = correction <= trend;
        if (debug)
          std::fprintf(stderr, "  multiscale slope: first stage moved %.3g, hand-over from the stage before %.3g: %s\n",
                       correction, trend, extrapolate ? "extrapolate" : "do not extrapolate");
      }
      extrapolation.record(schedule[s - 1], f, n, g, m);
      if (extrapolate) extrapolated = extrapolation.apply(opt.stage_extrapolation, eps, f, n, g, m);
    }
    const bool last = s + 1 == schedule.size();
    poll();  // a stage begun after the timeout would run its pattern scan and a first iteration
    if (rep.timed_out && !last) continue;  // out of time: go straight to certifying what we have
    // Out of time or iterations before the last stage: no pattern is built (a dense scan, and at
    // N = 10^4 in float64 0.9 s of fresh pages, where the certificate's one dense pass is ~0.1 s).
    const bool out_of_budget = last && (rep.timed_out || rep.iterations >= opt.max_iter);
    // One dense pair of c-transforms at this epsilon, rows then columns, without over-relaxation.
    const auto dense_c_transforms = [&]() {
      half_step(cost, false, static_cast<const SparseRows<T>*>(nullptr), g, log_b.data(), a, eps, 1.0, f, err_rows, nt);
      half_step(cost, true, static_cast<const SparseRows<T>*>(nullptr), f, log_a.data(), b, eps, 1.0, g, err_rows, nt);
    };
    // Stopped before reaching this epsilon: potentials of a far larger epsilon would give a plan
    // with an overflowing mass. The pair (not charged against max_iter) makes the column marginal
    // exact and every reported number finite.
    if (out_of_budget) dense_c_transforms();
    double trunc = last || opt.stop_when_sparse ? opt.truncation : std::min(opt.truncation, opt.stage_truncation);
    // The first stage after a multiscale start (it stops at handover_tol) on a thinner kernel, where
    // the usual one would be sparse (see handover_truncation). Estimated on a sixteenth of the rows
    // at the cutoff and slack the pattern would be built with, against max_density.
    if (!last && resumed && s == first_stage && opt.truncation > 0 && opt.handover_truncation < trunc &&
        !out_of_budget && sampled_density(cost, f, g, (trunc + kPatternSlack) * eps, 16) <= opt.max_density)
      trunc = opt.handover_truncation;
    // The last stage widens its pattern when refreshes stop helping (see the stale refresh below).
    double cutoff = trunc * eps;
    // A small problem's last stage keeps its kernel as a (possibly full) sparse matrix whatever its
    // density, for the sake of Newton: at large epsilon a dense stage can crawl, e.g. 50 x 50 logits
    // at eps = 10 still had marginal error 1.5e-6 after 50,000 Sinkhorn iterations (POT's too), as one
    // nearly isolated point's mass converges at a sublinear rate. At most kSmallProblem entries.
    const double entries = static_cast<double>(n) * static_cast<double>(m);
    double density_cap = last && entries <= kSmallProblem ? 1.0
                         : last && opt.newton && entries <= kLastDenseUpTo ? std::max(opt.max_density, kLastStageDensity)
                                                                          : opt.max_density;
    // Larger problems (up to kLastDenseUpTo entries) whose last-stage kernel is too dense for a
    // pattern run dense Sinkhorn, which is cheaper than Newton on a full kernel at a loose tol (the
    // demo: 4 iterations, ~6 ms, against a 42 ms Newton step); should it crawl, the stage starts
    // again on a denser pattern with Newton (kFullFallback). A D = 256 draw of 1,500 points at
    // eps = 1 (pattern density 36 %, above max_density) crawled at ~1e-5 for 3,000 iterations; Newton
    // converged in 8 steps. N = 6,000 at eps = 1 (52 %) took 230-325 iterations, 6-10 s a draw.
    // A small problem's pattern fails only on a row or column left without an entry (potentials
    // far off, as after a drift): the dense iterations give every one its mass back, and the
    // pattern then holds. 719 x 719 float32 points at eps = 0.1 (cost / eps ~ 1e6, ~1 entry a row)
    // had instead crawled densely from 5e-2 for 49,665 iterations (25 s); now 0.1 s.
    bool full_fallback = last && opt.newton && opt.truncation > 0 && entries <= kLastDenseUpTo;
    double target = last ? 0.5 * opt.tol : std::max(opt.stage_tol, opt.tol);
    // The first full stage after a multiscale start is dense and removes the extension's error
    // (0.13-0.4 after its first iteration on the benchmark's draws); every dense iteration costs
    // 10^8 exponentials at N = 10^4. From 3e-2 rather than 1e-2 the next, sparse, stage finishes
    // the job: K = 10 at N = 10^4 took 48.1 -> 41.6 s (D = 19) and 71.9 -> 68.9 s (D = 256) on the
    // session-13 machine; 5e-2 and 1e-1 were slower again (RESULTS.md).
    if (!last && resumed && s == first_stage) target = std::max(target, opt.handover_tol);
    lowp = !last && stage_float_exponents(opt, target, pattern.cost_bound, f, n, g, m, eps);
    // Blocks of 5 iterations in the intermediate stages, 10 in the last. After a balancing the
    // error drops (1.6e-2 -> 1.1e-2 in the first sparse stage of a D = 256 draw), then the
    // over-relaxed iterations raise it again (to 2.2e-2) and it creeps down until the next balancing;
    // an intermediate stage, which ends at stage_tol (1e-2), got there only right after one. With
    // blocks of 5: K = 4 at N = 10^4 took 165.8 -> 149.5 (D = 19) and 116.0 -> 106.2 (D = 256)
    // iterations a draw and 5-9 % less time; in the last stage blocks of 5 changed nothing there and
    // took the demo's draws from 23.4 to 29.2 iterations (RESULTS.md, session 26).
    loop_block = last ? 10 : 5;
    intermediate_stage = !last;
    at_floor = false;
    ++rep.stages;
    omega = 1.0;
    cap = opt.overrelaxation;
    // After a futile Newton round, Sinkhorn runs a full phase (ignoring newton_switch) before the
    // next round, and the phase doubles each time: futile rounds then cost O(log iterations).
    int64_t sinkhorn_phase = kFirstPhase;
    bool newton_futile = false;
    // The lowest error a Newton round of this stage ended on, stale ones included (see below).
    double best_round_err = std::numeric_limits<double>::infinity();
    // Newton rounds, for at_floor (afresh after a component shift).
    const auto round_watch = [&] { return FloorWatch(pattern.cost_bound, eps, 4, kStalledRounds); };
    FloorWatch rounds = round_watch();
    int shifts = 0;  // shift_imbalanced_component's, this stage
    std::vector<T> column;  // a column of the cost, for its transposed trees
    // shift_imbalanced_component on the current pattern, for a component whose masses differ by
    // more than min_imbalance; the entries that join components are those that can carry mass in a
    // round: plan values above e^-kCarryingCut of min(a_i, b_j) (the pattern keeps all within the
    // cutoff, up to 700 eps). Returns whether it shifted (the pattern must be rebuilt).
    const auto shift_component = [&](double min_imbalance) {
      return shift_imbalanced_component(
          n, m, a, b, min_imbalance,
          [&](const auto& visit) {
            for (int64_t i = 0; i < n; ++i)
              for (int64_t k = rows.ptr[i]; k < rows.ptr[i + 1]; ++k) {
                const int32_t j = rows.col[k];
                const double r = (static_cast<double>(rows.val[k]) - f[i] - g[j]) / eps;
                if (r <= kCarryingCut + std::max(log_a[i], log_b[j])) visit(i, j);
              }
          },
          [&](int64_t i) { return cost.data() + i * m; },
          [&](int64_t j) {
            column.resize(n);
            for (int64_t i = 0; i < n; ++i) column[i] = cost(i, j);
            return column.data();
          },
          f, g, debug);
    };
    double refresh_err = std::numeric_limits<double>::infinity();  // the error at the last stale refresh
    // A last-stage round that gained nothing: shift_component while shifts remain, and if it shifted,
    // the rounds start afresh on the pattern the caller rebuilds. Returns whether it shifted.
    const auto shift_after_round = [&](double err) {
      if (shifts >= kComponentShifts || !shift_component(component_min_imbalance(opt.tol, err))) return false;
      ++shifts;
      refresh_err = std::numeric_limits<double>::infinity();
      rounds = round_watch();
      best_round_err = std::numeric_limits<double>::infinity();
      newton_futile = false;
      sinkhorn_phase = kFirstPhase;
      return true;
    };
    double certified = std::numeric_limits<double>::infinity();    // the last certificate that missed tol
    // Rounds of this loop (a pattern, a solve, a certificate) that did no work: no iteration (a Newton
    // step is charged as one). Such a round repeats the one before it, so a few in a row end the
    // stage. Without this, a 2-point draw of features ~10^6 (cost / eps ~ 10^12) looped forever: its pattern estimate was 0,
    // every certificate 4.3e-4 (all of it float64 rounding at that scale), and a lower target asks no
    // work of an estimate of 0 (found by the CI fuzzer, session 28).
    int idle_rounds = 0;
    FloorWatch widest_refreshes(pattern.cost_bound, eps, kStalledRounds, kStalledRounds);  // see below
    // An intermediate stage's refreshes, watched afresh after a component shift (below).
    const auto refresh_watch = [&] {
      return FloorWatch(pattern.cost_bound, eps, kIntermediateStalledRounds, kIntermediateStalledRounds);
    };
    FloorWatch stage_refreshes = refresh_watch();
    // An extrapolated start whose plan overflows (the first Sinkhorn phase ends on a non-finite error:
    // plain Sinkhorn stops there) is undone once: the stage starts again, on a new pattern, from where
    // the stage before ended. Extrapolating from stages that had stalled (nearly unregularised
    // problems) can land so: a 1,351-pixel float64 draw (D = 256, cost / eps ~2e10) whose stages from
    // eps = 6.4 to 0.4 all sat at ~2e-2 began its last stage with an overflowing plan, ran Newton on
    // it, and ended at a marginal error of 0.40 (session 53). Only the first phase is watched.
    const auto undo_overflowing_start = [&] {
      const bool undo = extrapolated && !std::isfinite(loop_err) && !rep.timed_out;
      extrapolated = false;
      if (!undo) return false;
      std::copy(extrapolation.last_f().begin(), extrapolation.last_f().end(), f);
      std::copy(extrapolation.last_g().begin(), extrapolation.last_g().end(), g);
      stale = true;
      refresh_err = std::numeric_limits<double>::infinity();
      if (debug) std::fprintf(stderr, "  extrapolated start overflowed: from the stage before's end\n");
      return true;
    };
    for (;;) {
      const int64_t iterations_before = rep.iterations;
      stale = false;
      min_margin = std::min(0.8 * trunc, std::log(1e3 / target)) * eps;
      stage_eps = eps;
      if (eps < opt.stop_below) {  // before the pattern scan, whose result would go unused
        rep.final_epsilon = eps;
        return rep;
      }
      // The stage before the last keeps, where its pattern allows, every entry the last stage would
      // build its own from (truncation + slack at the last epsilon, 3.5 against 2.2 at the paper's
      // 0.1): the last stage then filters it instead of rescanning the dense cost, which is otherwise
      // the one stage change that always rescans (the truncation rises from stage_truncation to
      // truncation there). At N = 10^4 the stage before holds 3-100 % more entries for its ~12
      // iterations, and a draw saves one dense scan and transposition, 0.1-0.25 s (RESULTS.md,
      // session 15).
      double stage_slack = kPatternSlack * eps;
      if (s + 2 == schedule.size())
        stage_slack = std::max(stage_slack, (opt.truncation + kPatternSlack) * schedule.back() - cutoff);
      // Pattern from the current potentials; by symmetry the transpose keeps the same entries.
      const auto scan_start = Clock::now();
      // Columns (CSC) only where the stage reads them: not where fused_iteration updates them,
      // which includes a last stage's Sinkhorn phases before Newton (see below). A phase that runs
      // in double after all transposes the pattern when it first needs the columns (csc()).
      const bool newton_stage = last && opt.newton;
      const bool with_cols = !(std::is_same_v<T, float> && (lowp || newton_stage)) && !opt.stop_when_sparse;
      bool sparse = opt.truncation > 0 && !out_of_budget &&
                    refresh_pattern(cost, f, g, cutoff, stage_slack, density_cap, with_cols, nt, pattern);
      // A pattern that fails right after a sparse one, at the same or a smaller epsilon, has
      // rarely become too dense: a row or column lost every entry within the cutoff (potentials
      // pushed off by over-relaxation or a drift). One dense pair of c-transforms gives each its
      // mass back, and the pattern is tried again, instead of running the stage dense: 1,709
      // points at cost / eps ~ 2e6 ran 2,786 dense iterations (15 s) at eps = 0.8 and then
      // crawled densely in the last stage (session 29). So does a last stage's full kernel
      // (density_cap 1), which can fail on nothing else: a 1,726-pixel draw (D = 64, cost / eps
      // ~1.3e8, tol 1e-8) whose full-kernel fallback failed so crawled densely at 1.16e-2 until
      // max_iter (over 300 s); with the pair its Newton and component shifts ended it in 0.6 s.
      // pattern_lost: the pair did not help either (the stage runs dense, see below).
      bool pattern_lost = false;
      if (!sparse && (was_sparse || (last && density_cap >= 1.0)) && opt.truncation > 0 && !out_of_budget &&
          !opt.stop_when_sparse && rep.iterations < opt.max_iter && !rep.timed_out) {
        dense_c_transforms();
        ++rep.iterations;
        sparse = refresh_pattern(cost, f, g, cutoff, stage_slack, density_cap, with_cols, nt, pattern);
        pattern_lost = !sparse;
        if (debug) std::fprintf(stderr, "  pattern lost a row or column: one dense iteration, then %s\n", sparse ? "sparse" : "dense");
      }
      was_sparse = sparse;
      const double scan_s = std::chrono::duration<double>(Clock::now() - scan_start).count();
      if (!sparse) ++rep.dense_stages;
      if (sparse && opt.stop_when_sparse) {
        rep.final_epsilon = eps;
        return rep;
      }
      if (debug)
        std::fprintf(stderr, "stage eps=%g sparse=%d nnz/row=%.1f it=%lld t=%.3f (pattern %.3f s)\n", eps, (int)sparse,
                     sparse ? double(rows.ptr[n]) / n : double(m), (long long)rep.iterations,
                     std::chrono::duration<double>(Clock::now() - start).count(), scan_s);
      const SparseRows<T>* sr = sparse ? &rows : nullptr;
      if (last && sparse && opt.newton) {
        // Sinkhorn removes the fast error modes cheaply; the slow ones (mass balance between
        // nearly disconnected clusters, rate 1 - 1e-5 per iteration on clustered logits) are left
        // to Newton steps on the sparse plan, whose CG solves converge in ~sqrt of those counts.
        // Alternate: a bounded Sinkhorn phase (it can stall above the switch level on clustered
        // data), then Newton; if Newton stops progressing, Sinkhorn again, until the budget is spent.
        // A phase that only hands over to Newton (at newton_switch, 1e-1) needs no more accuracy
        // than an intermediate stage: it runs with float exponents like those (one exponential an
        // entry, no transposed pattern), and Newton, the certificate and any phase aimed at tol
        // stay in double. Same iterations, Newton steps and scores on the benchmark's draws; the
        // last stage ~7 % faster and one transposition fewer a draw (RESULTS.md, session 21).
        while (rep.iterations < opt.max_iter && !rep.timed_out) {
          // Where float64's rounding at this cost scale (certificate_rounding) already exceeds tol, no
          // certificate can pass and the first one ends the stage (at_floor). Below twice that
          // rounding Newton then goes on only while its steps halve the error (newton_settle), and the
          // round goes to its certificate: errors that close to the rounding fall slowly where
          // they fall at all. A 1,202-point draw (D = 1, float32, cost / eps 1.4e8, tol 1e-8, rounding
          // 1.6e-7) spent 40 of its 56 s in Newton steps of up to 20,000 CG iterations crawling
          // from 3e-8 towards the round's 5e-9, then was certified at 1.7e-7, unconverged; now
          // 2.0 s and 4.8e-7. Where steps still gain 10x each (300 points at cost / eps 1e4, tol
          // 1e-11, rounding 1.04e-11), to tol as before (session 48).
          const double settle =
              newton_settle(certificate_rounding(pattern.cost_bound, f, n, g, m, eps, std::max(n, m)), opt.tol);
          const double phase_target = newton_futile ? target : std::max(target, opt.newton_switch);
          // Back from a certificate that missed tol but is below newton_switch, Newton resumes at
          // once: the hand-over phase's float exponents would put the error back up first (float32
          // inputs at tol 1e-11, certified 1.0e-11: every round began at ~6e-6, and the rounds ran to
          // max_iter instead of stopping at the floor).
          if (newton_futile || !(certified <= opt.newton_switch)) {
            lowp = stage_float_exponents(opt, phase_target, pattern.cost_bound, f, n, g, m, eps);
            sinkhorn_loop(eps, phase_target, sr, std::min(opt.max_iter, rep.iterations + sinkhorn_phase), false,
                          phase_target == target);
            lowp = false;
            if (undo_overflowing_start() || stale || at_floor) break;
          }
          certified = std::numeric_limits<double>::infinity();
          const int64_t steps_before = rep.newton_steps;
          // Takes no step when Sinkhorn already reached the target.
          const auto keeps = [&](const double* ft, const double* gt) {
            return pattern.margin(ft, gt) >= 0.0;
          };
          // A relocation is kept only if the plan's error on the rebuilt pattern is below err_now.
          // The plan on the current pattern at the trial point bounds that error from below: its
          // entries are a subset of every entry, so a row (column) whose sum already exceeds its
          // mass there exceeds it by at least as much on the dense plan, hence on the rebuilt
          // pattern too, up to the entries the rebuilt pattern leaves out (2 e^-cutoff/eps in L1
          // at most). When that bound already reaches err_now the rebuild (a dense scan and a
          // transposition) would be rejected: it is skipped, and the step goes on as it would.
          // On six N = 10^4 draws every rejected rebuild (5, each 0.1-0.35 s on 2 threads) was
          // foreseen so, for a plan evaluation of 20-60 ms (bench/RESULTS.md, session 14).
          const auto relocate = [&](const double* ft, const double* gt, double err_now) {
            evaluate_plan(rows, m, a, b, log_a.data(), log_b.data(), eps, ft, gt, plan, nt);
            double excess = 0.0;
            for (int64_t i = 0; i < n; ++i) excess += std::max(0.0, plan.row_sum[i] - a[i]);
            for (int64_t j = 0; j < m; ++j) excess += std::max(0.0, plan.col_sum[j] - b[j]);
            if (excess - 2.0 * std::exp(-cutoff / eps) >= err_now * (1.0 + 1e-9))
              return std::numeric_limits<double>::infinity();
            // No CSC copy: Newton reads rows only; a later Sinkhorn phase transposes it (csc()).
            if (prepare_pattern(cost, ft, gt, cutoff, kPatternSlack * eps, density_cap, false, nt, pattern)) {
              const double e = evaluate_plan(pattern.next_rows, m, a, b, log_a.data(), log_b.data(),
                                             eps, ft, gt, plan, nt);
              if (e < err_now) {
                pattern.commit(ft, gt);
                ++rep.pattern_refreshes;
                return e;
              }
            }
            return std::numeric_limits<double>::infinity();
          };
          const double err = newton_polish(rows, m, a, b, log_a.data(), log_b.data(), eps, target, settle, f, g,
                                           plan, rep, poll, keeps, relocate, grp, opt.max_iter,
                                           cg_floor, debug, nt);
          if (err <= target || err <= settle) break;
          // A round that made its pattern stale goes to a refresh, and the stage resumes on the new
          // pattern. If the round gained nothing, the next one starts where it did: Newton keeps its
          // best point, so a round of rejected or dual-ascent steps leaves the potentials, and so the
          // refreshed pattern, as they were. Such a round looks for a component whose masses do not
          // balance, as a futile round does below, before the refresh. A float32 draw at cost / eps
          // ~7e10 (D = 256, tol 1e-4) ran the same round eleven times and ended at 1.16e-3, where the
          // blocked solver converged; it now converges in fewer iterations. Counting the round as
          // futile instead (a Sinkhorn phase aimed at tol before the next one) did not help: the
          // phases stalled within 100 iterations and the rounds repeated (session 54).
          const bool gained = err < 0.999 * best_round_err;
          best_round_err = std::min(best_round_err, err);
          if (pattern_stale()) {
            if (!gained) shift_after_round(err);
            break;
          }
          // A round without progress counts as futile too (a stalled Newton can take several
          // rejected steps a round, and the next Sinkhorn phase must then run in full). Four such
          // rounds in a row (Sinkhorn phases of 300, 600, 1200 and 2400 iterations between them) near
          // the noise floor end the stage, as do kStalledRounds such rounds anywhere.
          const bool stuck = rounds.stuck(err);
          // A round that ended on a rejected first step (the truncated problem's Newton system can
          // be inconsistent far from the solution) leaves the work to longer Sinkhorn phases.
          newton_futile = rep.newton_steps - steps_before <= 1 || !rounds.progressed();
          // A futile round may face a component of the pattern whose masses do not balance
          // (shift_imbalanced_component, kernels.hpp): its potentials are shifted, the pattern is
          // rebuilt, and the stage goes on afresh. At most kComponentShifts times a stage. Only
          // after a futile round (the blocked solver, whose rounds cost seconds, looks after every
          // one): looking after every round took 7.5 % fewer iterations on 150 problems at
          // cost / eps 1e7-1e9, but spent the stage's shifts early on a draw at cost / eps 2.5e8
          // (1,357 points, D = 256) that then ended at 1.6e-3 instead of converging (session 32).
          if (newton_futile && shift_after_round(err)) {
            stale = true;
            break;
          }
          if (stuck) {
            at_floor = true;
            break;
          }
          if (newton_futile) sinkhorn_phase = next_phase(sinkhorn_phase, rounds, err);
        }
      } else if (full_fallback && sr == nullptr) {
        full_fallback = false;
        sinkhorn_loop(eps, target, sr, std::min(opt.max_iter, rep.iterations + opt.dense_last_iterations), true);
        if (loop_err > target && !at_floor && !rep.timed_out && rep.iterations < opt.max_iter) {
          if (debug)
            std::fprintf(stderr, "  dense last stage at %.3e after %lld iterations: full kernel and Newton\n",
                         loop_err, (long long)rep.iterations);
          density_cap = entries <= kFullFallback ? 1.0 : std::max(density_cap, kFallbackDensity);
          continue;
        }
      } else {
        // An intermediate stage whose pattern was lost runs at most kLostPatternIterations dense
        // iterations: its rows and columns without an entry are points whose potentials sit far
        // off (nearly unregularised problems with masses that do not balance), which dense
        // Sinkhorn moves at a crawl. In the draw above, eps = 0.8 took 4,381 dense iterations
        // (37 s) from 2.8 to 2.8e-2 before the intermediate stall rule ended it; the last stage's
        // Newton and component shifts do that work in well under a second.
        const int64_t limit = !last && pattern_lost ? std::min(opt.max_iter, rep.iterations + kLostPatternIterations)
                                                    : opt.max_iter;
        sinkhorn_loop(eps, target, sr, limit, true);
        undo_overflowing_start();
      }
      idle_rounds = rep.iterations == iterations_before ? idle_rounds + 1 : 0;
      if (idle_rounds >= 3) at_floor = true;
      // Refreshes of a pattern already widened to 700 eps (below) that bring no progress are watched
      // like Newton rounds (kStalledRounds): far below the paper's scale (cost / eps ~ 5e8, 23 x 18
      // points) the potentials drifted on, the pattern went stale every ~68,000 iterations, and the
      // error sat at 9.662e-3 past 12 million iterations (session 28).
      if (stale && last && cutoff >= kWidestCut * eps && widest_refreshes.stuck(loop_err)) at_floor = true;
      // A stale pattern whose error did not fall since the last refresh (see the component shift and the
      // widening below).
      const bool stale_without_progress = stale && loop_err > 0.9 * refresh_err;
      // An intermediate stage whose error did not fall between two refreshes may sit at a component
      // of its pattern whose masses do not balance, as the last stage's rounds can (see above): its
      // potentials are shifted, and the stage goes on on a new pattern. A 1,256-pixel draw (D = 64,
      // eps = 0.1, tol 1e-8) sat at 1.59e-2 at eps = 1.6, then at 0.8 and 0.4, ~1,400 iterations and
      // three refreshes each before handing over, until the last stage's Newton found the component
      // (8.3-8.8 s); shifted at eps = 1.6, 3.8 s (session 41). The benchmark's stages never stall so.
      if (stale_without_progress && !last && sparse && shifts < kComponentShifts &&
          rep.iterations < opt.max_iter && !rep.timed_out && shift_component(component_min_imbalance(target, loop_err))) {
        ++shifts;
        ++rep.pattern_refreshes;
        refresh_err = std::numeric_limits<double>::infinity();
        stage_refreshes = refresh_watch();
        continue;
      }
      // An intermediate stage that stops progressing hands over: the next stage, and in the end the
      // last one, do what it cannot. A 1,325-pixel draw (D = 64, channel scales 10^-3..10^2, cost /
      // eps ~8e7) sat at 1.43e-2 against its stage_tol of 1e-2 at eps = 25.6, refreshing its pattern
      // every ~230 iterations, until max_iter (50,000) ran out there (session 29).
      if (stale && !last && stage_refreshes.stuck(loop_err)) at_floor = true;
      if (stale && rep.iterations < opt.max_iter && !rep.timed_out && !at_floor) {
        ++rep.pattern_refreshes;
        // A last stage whose error did not fall between two refreshes may be solving a pattern that
        // cannot carry the plan: a group of rows joined to its columns only by entries beyond the
        // cutoff, whose masses differ, is infeasible on the pattern; Sinkhorn then drifts its
        // potentials by ~eps log(mass ratio) an iteration, refreshing every few hundred, while the
        // error stays at the imbalance. 200 x 150 clustered points at cost / eps ~ 5.6e7 sat at exactly
        // 3.333e-3 (1/200 x 2 - 1/150) for 50,000 iterations; with a 700 eps cutoff they converged in
        // 1,342. So such a refresh widens the cutoff to 700 eps at once (exp(-745) underflows; a
        // fourfold widening, 120 eps, let the next refresh come only after max_iter).
        if (last && stale_without_progress && cutoff < kWidestCut * eps) {
          cutoff = kWidestCut * eps;
          if (debug) std::fprintf(stderr, "  no progress since the last refresh: cutoff -> %.0f eps\n", cutoff / eps);
        }
        refresh_err = loop_err;
        if (debug) std::fprintf(stderr, "  pattern stale at it=%lld: refresh\n", (long long)rep.iterations);
        continue;
      }
      if (!last) break;
      // Certify: the cheap estimate is not the truth. On the pattern when the mass it can have
      // dropped is provably small against tol (its bound, counted twice, is part of the reported
      // error, which is then a rigorous upper bound), else on the dense plan.
      const auto cert_start = Clock::now();
      const double outside = pattern.valid ? pattern.outside_mass(f, g, log_a.data(), log_b.data(), eps)
                                           : std::numeric_limits<double>::infinity();
      PlanSummary chk = outside <= 0.1 * opt.tol
                            ? summarize_pattern(rows, a, b, log_a.data(), log_b.data(), f, g, eps, cls, outside, nt)
                            : summarize_plan(cost, a, b, f, g, eps, cls.row_class, cls.row_classes,
                                             cls.col_class_start, cls.col_classes, nt);
      const double rounding = certificate_rounding(pattern.cost_bound, f, n, g, m, eps, std::max(n, m));
      rep.marginal_error = chk.marginal_error + rounding;
      // What float64 cannot resolve at this cost scale already exceeds tol: no round can certify it.
      if (rounding > opt.tol) at_floor = true;
      rep.transport_cost = chk.transport_cost;
      rep.truncated_mass = outside <= 0.1 * opt.tol ? outside : 0.0;
      rep.joint = std::move(chk.joint);
      rep.converged = rep.marginal_error <= opt.tol;
      if (debug)
        std::fprintf(stderr, "certify(%s, outside<=%.2e, %.3f s): err=%.3e it=%lld newton=%lld relocated=%lld t=%.3f\n",
                     rep.truncated_mass > 0 ? "pattern" : "dense", outside,
                     std::chrono::duration<double>(Clock::now() - cert_start).count(), rep.marginal_error,
                     (long long)rep.iterations, (long long)rep.newton_steps, (long long)rep.newton_relocations,
                     std::chrono::duration<double>(Clock::now() - start).count());
      if (rep.converged || rep.iterations >= opt.max_iter || rep.timed_out || at_floor ||
          !std::isfinite(rep.marginal_error)) {
        if (best.restore(rep, f, n, g) && debug)
          std::fprintf(stderr, "  returning the earlier certified point (err=%.3e)\n", rep.marginal_error);
        break;
      }
      best.keep(rep, f, n, g, m);
      certified = rep.marginal_error;
      target = next_certificate_target(target, chk.marginal_error, rounding, opt.tol);
    }
  }
  return rep;
}

}  // namespace

template <typename T>
SinkhornReport sinkhorn_log(const RowMatrix<T>& cost, const double* a, const double* b,
                            const SinkhornOptions& opt, double* f, double* g, const PlanClasses* classes,
                            const PlanClasses* groups, const CostRange* range) {
  const detail::PoolScope scope;
  return sinkhorn_log_traced(cost, a, b, opt, f, g, classes, groups, nullptr, range);
}

template <typename T>
PlanSummary summarize_plan(const RowMatrix<T>& cost, const double* a, const double* b, const double* f,
                           const double* g, double eps, const int32_t* row_class, int row_classes,
                           const int64_t* col_class_start, int col_classes, int num_threads) {
  const int64_t m = cost.cols();
  auto rows = [&cost, m](int64_t i0, int64_t, std::vector<T>&) { return cost.data() + i0 * m; };
  return summarize_rows<T>(cost.rows(), m, rows, a, b, f, g, eps, row_class, row_classes, col_class_start,
                           col_classes, threads_for(num_threads));
}

#define SEGTRANSFER_INSTANTIATE(T)                                                                 \
  template double dense_bytes<T>(int64_t, int64_t);                                                \
  template CostRange squared_euclidean<T>(const T*, int64_t, const T*, int64_t, int64_t, RowMatrix<T>&, int); \
  template SinkhornReport sinkhorn_log<T>(const RowMatrix<T>&, const double*, const double*,          \
                                          const SinkhornOptions&, double*, double*, const PlanClasses*, \
                                          const PlanClasses*, const CostRange*);                          \
  template PlanSummary summarize_plan<T>(const RowMatrix<T>&, const double*, const double*,         \
                                         const double*, const double*, double, const int32_t*, int, \
                                         const int64_t*, int, int);
SEGTRANSFER_INSTANTIATE(float)
SEGTRANSFER_INSTANTIATE(double)
#undef SEGTRANSFER_INSTANTIATE

}  // namespace segtransfer
