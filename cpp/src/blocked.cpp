#include "segtransfer/blocked.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "kernels.hpp"
#include "point_cost.hpp"
#include "segtransfer/errors.hpp"

namespace segtransfer {
namespace {

using Clock = std::chrono::steady_clock;
// Rows per panel, the unit a pass works on: its rows' sums need every column before the column
// sums can use the rows' new potentials, so such a pass sweeps a panel's columns twice, a tile of
// kTile columns at a time (a tile's slice of y^T, d x 256, and of every per-column vector stays in
// L1/L2 while the panel's rows use it). The first sweep computes the tiles into the panel's buffer
// (16 x m), the second reads them back.
constexpr int64_t kPanel = 16;
constexpr int64_t kTile = kCostTile;
// The rows are split into this many fixed ranges ("lanes"), each summed in order into its own
// column accumulators, which are then added in lane order: the column sums do not depend on the
// thread count. More threads than lanes would idle.
constexpr int kLanes = 8;

// Sums over one row's plan entries p_j = exp(base + B_j - c_j / eps), formed and summed in double
// (the Newton system and its line search compare errors down to 1e-8 of the mass): s[0] += sum p,
// s[1] += sum p V_j when V is given, s[2] += sum p^2 V2_j when V2 is given.
template <typename T>
struct PlanSums {
  static void run(const T* c, int64_t w, double base, const double* B, double inv_eps, const double* V,
                  const double* V2, double* s) {
#ifdef SEGTRANSFER_AVX2_LSE
    // AVX2 without AVX-512 (lse_avx2.hpp); AVX-512 keeps the compiler's clone, measured there.
    if constexpr (std::is_same_v<T, float>) {
      if (!avx512_lse_available() && cpu_has_avx2_fma()) {
        if (V2 != nullptr) return plan_sums_avx2<true, true>(c, w, base, B, inv_eps, V, V2, s);
        if (V != nullptr) return plan_sums_avx2<true, false>(c, w, base, B, inv_eps, V, nullptr, s);
        return plan_sums_avx2<false, false>(c, w, base, B, inv_eps, nullptr, nullptr, s);
      }
    }
#endif
    run_clones(c, w, base, B, inv_eps, V, V2, s);
  }
  SEGTRANSFER_HOT static void run_clones(const T* c, int64_t w, double base, const double* B, double inv_eps,
                                         const double* V, const double* V2, double* s) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
    if (V2 != nullptr) {
#pragma omp simd reduction(+ : s0, s1, s2)
      for (int64_t j = 0; j < w; ++j) {
        const double p = detail::fast_exp(base + B[j] - static_cast<double>(c[j]) * inv_eps);
        s0 += p;
        s1 += p * V[j];
        s2 += p * p * V2[j];
      }
    } else if (V != nullptr) {
#pragma omp simd reduction(+ : s0, s1)
      for (int64_t j = 0; j < w; ++j) {
        const double p = detail::fast_exp(base + B[j] - static_cast<double>(c[j]) * inv_eps);
        s0 += p;
        s1 += p * V[j];
      }
    } else {
#pragma omp simd reduction(+ : s0)
      for (int64_t j = 0; j < w; ++j) s0 += detail::fast_exp(base + B[j] - static_cast<double>(c[j]) * inv_eps);
    }
    s[0] += s0;
    s[1] += s1;
    s[2] += s2;
  }
};

// Newton's truncated plan (see BlockedSolver::capture): the columns j of one cost row with
// G_j - c_j / eps > th, compacted branch-free into idx; returns how many.
template <typename T>
struct CaptureRow {
  static int64_t keep(const T* c, int64_t m, const double* G, double inv_eps, double th, int32_t* idx) {
#ifdef SEGTRANSFER_AVX512_LSE
    if constexpr (std::is_same_v<T, float>) {
      if (avx512_lse_available()) return capture_keep_avx512(c, m, G, inv_eps, th, idx);
    }
#endif
    return keep_clones(c, m, G, inv_eps, th, idx);
  }
  SEGTRANSFER_HOT static int64_t keep_clones(const T* c, int64_t m, const double* G, double inv_eps, double th,
                                             int32_t* idx) {
    int64_t k = 0;
    for (int64_t j = 0; j < m; ++j) {
      idx[k] = static_cast<int32_t>(j);
      k += (G[j] - static_cast<double>(c[j]) * inv_eps > th) ? 1 : 0;
    }
    return k;
  }
  // val[k] = exp(base + B_j - c_j / eps) for the kept columns j = idx[k]; returns their sum.
  SEGTRANSFER_HOT static double values(const T* c, const int32_t* idx, int64_t len, double base, const double* B,
                                       double inv_eps, double* val) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < len; ++k) {
      const int32_t j = idx[k];
      const double p = detail::fast_exp(base + B[j] - static_cast<double>(c[j]) * inv_eps);
      val[k] = p;
      s += p;
    }
    return s;
  }
};

// sum_k val[k] x[col[k]] (and with squared values) over one captured row: Newton's products.
struct CapturedDot {
  SEGTRANSFER_HOT static double run(const double* val, const int32_t* col, int64_t len, const double* x) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < len; ++k) s += val[k] * x[col[k]];
    return s;
  }
  SEGTRANSFER_HOT static double squares(const double* val, const int32_t* col, int64_t len, const double* x) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < len; ++k) s += val[k] * val[k] * x[col[k]];
    return s;
  }
};

// One panel's cost, a tile at a time: the first sweep computes every tile, later ones read it back.
// Recomputing the tiles in the second sweep instead was slower even at D = 19 (1.31 against 1.00 ns
// per entry and iteration at N = 2 x 10^4, 2 threads); so was sweeping whole rows (the per-column
// vectors then stream from memory: ~14 s per iteration at N = 10^5, D = 19).
template <typename T>
class PanelTiles {
 public:
  PanelTiles(const PointCost<T>& cost, std::vector<T>& buf) : C_(cost), buf_(buf) {
    buf_.resize(static_cast<size_t>(kPanel) * cost.m);
  }
  void start(int64_t i0, int64_t rows) {
    i0_ = i0;
    rows_ = rows;
    filled_ = false;
  }
  void second_sweep() { filled_ = true; }
  // Tile [j0, j0 + w) of the panel's rows, leading dimension m.
  const T* tile(int64_t j0, int64_t w) {
    if (!filled_) C_.tile(i0_, rows_, j0, w, buf_.data() + j0, C_.m);
    return buf_.data() + j0;
  }

 private:
  const PointCost<T>& C_;
  std::vector<T>& buf_;
  int64_t i0_ = 0, rows_ = 0;
  bool filled_ = false;
};

template <typename T>
class BlockedSolver {
 public:
  BlockedSolver(const PointCost<T>& cost, const double* a, const double* b, const SinkhornOptions& opt, int nt)
      : C_(cost), n_(cost.n), m_(cost.m), a_(a), b_(b), opt_(opt), nt_(nt),
        lanes_(static_cast<int>(std::min<int64_t>(kLanes, n_))), log_a_(n_), log_b_(m_), err_rows_(n_),
        A_(m_), shift_(m_), acc_(static_cast<size_t>(lanes_) * m_), caller_(std::this_thread::get_id()) {
    for (int64_t i = 0; i < n_; ++i) log_a_[i] = std::log(a_[i]);
    for (int64_t j = 0; j < m_; ++j) log_b_[j] = std::log(b_[j]);
  }

  // Largest cost (a pass of its own: it sets the schedule, as sinkhorn_log's does).
  double max_cost() {
    // Squared norms that overflow would make the expansion inf - inf; finite ones bound |2 x.y| too.
    for (T v : C_.xx)
      if (!std::isfinite(static_cast<double>(v) * 2.0)) return kPosInf;
    for (T v : C_.yy)
      if (!std::isfinite(static_cast<double>(v) * 2.0)) return kPosInf;
    std::vector<double> lane_max(lanes_, 0.0);
    panels([&](int lane, int64_t, int64_t rows, const T* c, std::vector<T>&) {
      double mx = lane_max[lane];
      for (int64_t k = 0; k < rows * m_; ++k) mx = std::max(mx, static_cast<double>(c[k]));
      lane_max[lane] = mx;
    });
    double mx = 0.0;
    for (double v : lane_max) mx = std::max(mx, v);
    return mx;
  }

  // One Sinkhorn iteration: f <- f + omega (c-transform of g - f), row by row, then, with the new f,
  // the column log-sum-exps the g half-step needs, from the same panel while it is in cache; g is
  // updated the same way. Returns the L1 error of the iterate it started from (its rows) and, in
  // err_cols, that of the half-updated one (f new, g old; its columns).
  // `lowp` (float storage only): the exponents are formed in float, as sinkhorn_log's intermediate
  // stages do (RowLse::sum_lowp, ColLse::sum_row_lowp); the shifts rounded to float are the ones
  // subtracted and added back. Only for stages that stop at a loose error.
  double iterate(double eps, double omega, double* f, double* g, double& err_cols, bool lowp = false) {
    const double inv_eps = 1.0 / eps;
    lowp = lowp && std::is_same<T, float>::value;
    exponent_offsets(g, log_b_.data(), m_, inv_eps, A_);
    // The column sums are taken shifted by the columns' own potentials, near a fixed point their
    // log-sum-exps (as RowLse::run's rows); exact maxima only when that over- or underflows.
    for (int64_t j = 0; j < m_; ++j) shift_[j] = -g[j] * inv_eps;
    if (lowp) {
      Af_.resize(m_);
      shiftf_.resize(m_);
      for (int64_t j = 0; j < m_; ++j) {
        Af_[j] = static_cast<float>(A_[j]);
        shiftf_[j] = static_cast<float>(shift_[j]);
        shift_[j] = static_cast<double>(shiftf_[j]);
      }
    }
    const float inv_eps_f = static_cast<float>(inv_eps);
    auto row_shift = [&](int64_t i) { return shift_of(f[i], inv_eps, lowp); };
    std::fill(acc_.begin(), acc_.end(), 0.0);
    tiled_panels([&](int lane, int64_t i0, int64_t rows, PanelTiles<T>& tiles, Scratch& s) {
      // Rows first, shifted by their own potentials as well, summed tile by tile.
      s.total.assign(rows, 0.0);
      for (int64_t j0 = 0; j0 < m_; j0 += kTile) {
        const int64_t w = std::min(kTile, m_ - j0);
        const int64_t ld = m_;
        const T* c = tiles.tile(j0, w);
        for (int64_t r = 0; r < rows; ++r)
          s.total[r] += lowp ? RowLse<T>::sum_lowp(c + r * ld, nullptr, w, Af_.data() + j0, inv_eps_f,
                                                   static_cast<float>(row_shift(i0 + r)))
                             : RowLse<T>::sum(c + r * ld, nullptr, w, A_.data() + j0, inv_eps, row_shift(i0 + r));
      }
      s.A.resize(rows);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        double lse = row_shift(i) + std::log(s.total[r]);
        if (!(s.total[r] >= kShiftedMin && s.total[r] < kPosInf)) {  // the safe form, on the whole row
          s.row.resize(m_);
          C_.rows(i, i + 1, s.row.data());
          lse = RowLse<T>::run(s.row.data(), nullptr, m_, A_.data(), inv_eps);
        }
        lse += f[i] * inv_eps;
        err_rows_[i] = a_[i] * std::fabs(std::expm1(lse));
        f[i] -= omega * eps * lse;
        s.A[r] = f[i] * inv_eps + log_a_[i];
      }
      // Then the columns, with the rows' new potentials.
      tiles.second_sweep();
      s.part.assign(m_, T(0));
      for (int64_t j0 = 0; j0 < m_; j0 += kTile) {
        const int64_t w = std::min(kTile, m_ - j0);
        const int64_t ld = m_;
        const T* c = tiles.tile(j0, w);
        for (int64_t r = 0; r < rows; ++r) {
          if (lowp)
            ColLse<T>::sum_row_lowp(c + r * ld, w, static_cast<float>(s.A[r]), inv_eps_f, shiftf_.data() + j0,
                                    s.part.data() + j0);
          else
            ColLse<T>::sum_row(c + r * ld, w, s.A[r], inv_eps, shift_.data() + j0, s.part.data() + j0);
        }
      }
      double* acc = acc_.data() + static_cast<size_t>(lane) * m_;
      for (int64_t j = 0; j < m_; ++j) acc[j] += static_cast<double>(s.part[j]);
    });
    bool ok = true;
    for (int64_t j = 0; j < m_; ++j) {
      double total = 0.0;
      for (int l = 0; l < lanes_; ++l) total += acc_[static_cast<size_t>(l) * m_ + j];
      A_[j] = total;  // A_ is free now: the column totals
      ok = ok && total >= kShiftedMin && total < kPosInf;
    }
    if (!ok) exact_columns(f, inv_eps);
    err_cols = 0.0;
    for (int64_t j = 0; j < m_; ++j) {
      const double rel = shift_[j] + std::log(A_[j]) + g[j] * inv_eps;
      err_cols += b_[j] * std::fabs(std::expm1(rel));
      g[j] -= omega * eps * rel;
    }
    double err = 0.0;
    for (int64_t i = 0; i < n_; ++i) err += err_rows_[i];
    return err;
  }

  // Row i's shift -f_i / eps in its row sums, rounded to float where their exponents are (lowp):
  // the value the float sums subtract, so the one to add back.
  static double shift_of(double f_i, double inv_eps, bool lowp) {
    const double sh = -f_i * inv_eps;
    return lowp ? static_cast<double>(static_cast<float>(sh)) : sh;
  }

  // Class balancing (see balance_classes in sinkhorn.cpp) with the plan's group masses from one pass.
  // `lowp`: its exponents in float, as the stage's iterations take them (iterate): the pass had formed
  // them in double at every stage's start and block's end, and took 22 % of a blocked N = 10^4,
  // D = 19 draw's samples (the compiler's double exponentials); the shifts only start the next block.
  bool balance(double eps, const PlanClasses& grp, double* f, double* g, bool lowp = false) {
    const int R = grp.row_classes, Q = grp.col_classes;
    if (R < 2 && Q < 2) return false;
    const double inv_eps = 1.0 / eps;
    lowp = lowp && std::is_same<T, float>::value;
    exponent_offsets(g, log_b_.data(), m_, inv_eps, A_);
    const float inv_eps_f = static_cast<float>(inv_eps);
    if (lowp) {
      Af_.resize(m_);
      for (int64_t j = 0; j < m_; ++j) Af_[j] = static_cast<float>(A_[j]);
    }
    std::vector<double> lane_logM(static_cast<size_t>(lanes_) * R * Q, kNegInf);
    tiled_panels([&](int lane, int64_t i0, int64_t rows, PanelTiles<T>& tiles, Scratch& s) {
      double* lm = lane_logM.data() + static_cast<size_t>(lane) * R * Q;
      // Each row's sum over each group's columns, shifted by the row's own potential, tile by tile.
      s.seg.assign(static_cast<size_t>(rows) * Q, 0.0);
      int q0 = 0;
      for (int64_t j0 = 0; j0 < m_; j0 += kTile) {
        const int64_t w = std::min(kTile, m_ - j0);
        const int64_t ld = m_;
        const T* c = tiles.tile(j0, w);
        while (grp.col_class_start[q0 + 1] <= j0) ++q0;
        for (int q = q0; q < Q && grp.col_class_start[q] < j0 + w; ++q) {
          const int64_t k0 = std::max(grp.col_class_start[q], j0), k1 = std::min(grp.col_class_start[q + 1], j0 + w);
          if (k1 <= k0) continue;
          for (int64_t r = 0; r < rows; ++r)
            s.seg[r * Q + q] +=
                lowp ? RowLse<T>::sum_lowp(c + r * ld + (k0 - j0), nullptr, k1 - k0, Af_.data() + k0, inv_eps_f,
                                           static_cast<float>(shift_of(f[i0 + r], inv_eps, true)))
                     : RowLse<T>::sum(c + r * ld + (k0 - j0), nullptr, k1 - k0, A_.data() + k0, inv_eps,
                                      shift_of(f[i0 + r], inv_eps, false));
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const double* seg = s.seg.data() + r * Q;
        double total = 0.0;
        for (int q = 0; q < Q; ++q) total += seg[q];
        double* li = lm + static_cast<size_t>(grp.row_class[i]) * Q;
        // log of row i's mass in group q: log a_i + f_i / eps + log sum_{j in q} exp(A_j - C_ij / eps),
        // and the shift was shift_of(f_i): -f_i / eps, or its float rounding (up to ~|f_i / eps| 2^-24,
        // not negligible at cost / eps 10^3), which is put back as iterate() does (exactly 0 in double).
        // A row whose total leaves [kShiftedMin, inf) is redone safely.
        if (total >= kShiftedMin && total < kPosInf) {
          const double unshift = f[i] * inv_eps + shift_of(f[i], inv_eps, lowp);
          for (int q = 0; q < Q; ++q)
            if (seg[q] > 0) lse_add(li[q], log_a_[i] + unshift + std::log(seg[q]));
          continue;
        }
        s.row.resize(m_);
        C_.rows(i, i + 1, s.row.data());
        for (int q = 0; q < Q; ++q) {
          const int64_t j0 = grp.col_class_start[q], j1 = grp.col_class_start[q + 1];
          if (j1 > j0)
            lse_add(li[q], log_a_[i] + f[i] * inv_eps +
                               RowLse<T>::run(s.row.data() + j0, nullptr, j1 - j0, A_.data() + j0, inv_eps));
        }
      }
    });
    std::vector<double> logM(static_cast<size_t>(R) * Q, kNegInf);
    for (int l = 0; l < lanes_; ++l)
      for (size_t k = 0; k < logM.size(); ++k) lse_add(logM[k], lane_logM[static_cast<size_t>(l) * R * Q + k]);
    return coarse_shift(logM, log_a_.data(), log_b_.data(), n_, eps, grp, f, g);
  }

  // Lane l owns rows [lane_start(l), lane_start(l + 1)); lanes run in parallel on up to this many
  // threads (more would idle).
  int64_t lane_start(int lane) const { return n_ * lane / lanes_; }
  int lane_threads() const { return std::max(1, std::min(nt_, lanes_)); }

  // Newton's truncated copy of the plan at one point, per lane (its fixed range of rows) as CSR:
  // the entries with C - f - g < kCaptureCut * eps, values in double.
  struct CapturedLane {
    std::vector<int64_t> ptr;
    std::vector<int32_t> col;
    std::vector<double> val;
  };
  // Plan entries left out are below a_i b_j e^-kCaptureCut each, so a row or column loses less than
  // e^-20 = 2e-9 of its mass: far inside what an inexact Newton direction (forcing 0.1) needs, while
  // the residuals, the line search and the certificate stay on the dense plan. At N = 10^4, D = 19
  // and eps = 0.1 that keeps 1.1 % of the entries (111 per row; 0.8 % at N = 10^5).
  static constexpr double kCaptureCut = 20.0;
  // Nearly unregularised problems (cost / eps ~ 10^8) capture ~1 entry a row, and a point whose
  // mass must move to an entry beyond the cut leaves the error at its mass (2 / n) round after
  // round: the captured plan then widens to 700 eps, as the stored solver's pattern does
  // (sinkhorn.cpp; exp(-745) underflows). 805 pixels at cost / eps 2.5e8, D = 256: 9,202 and
  // 31,329 iterations at ~2.5e-3 before the floor's 4.2e-7.
  void widen_capture() { capture_cut_ = kWidestCut; }
  bool capture_widened() const { return capture_cut_ > kCaptureCut; }

  // Captures the plan at (br, bc) = (log a + f / eps, log b + g / eps) into cap_; false (and cap_
  // emptied) when it would hold more than max_entries entries.
  bool capture(const double* br, const double* bc, double inv_eps, int64_t max_entries) {
    cap_.resize(lanes_);
    std::vector<double> G(m_);
    for (int64_t j = 0; j < m_; ++j) G[j] = bc[j] - log_b_[j];
    std::atomic<int64_t> total{0};
    std::atomic<bool> full{false};
    panels([&](int lane, int64_t i0, int64_t rows, const T* c, std::vector<T>&) {
      CapturedLane& L = cap_[lane];
      const int64_t r0 = lane_start(lane);
      if (i0 == r0) {
        L.ptr.assign(1, 0);
        L.col.clear();
        L.val.clear();
      }
      if (full) return;
      thread_local std::vector<int32_t> idx;
      idx.resize(m_);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const T* row = c + r * m_;
        // C - f - g < cut eps  <=>  g_j / eps - C_ij / eps > -cut - f_i / eps
        const int64_t k = CaptureRow<T>::keep(row, m_, G.data(), inv_eps, -capture_cut_ - (br[i] - log_a_[i]), idx.data());
        if (total.fetch_add(k) + k > max_entries) full = true;
        if (full) return;
        const size_t at = L.col.size();
        L.col.insert(L.col.end(), idx.begin(), idx.begin() + k);
        L.val.resize(at + k);
        CaptureRow<T>::values(row, idx.data(), k, br[i], bc, inv_eps, L.val.data() + at);
        L.ptr.push_back(static_cast<int64_t>(L.col.size()));
      }
    });
    if (full) {
      cap_.clear();
      return false;
    }
    cap_entries_ = total;
    return true;
  }

  // Whether a captured plan of every row is at hand (the last Newton call may have run without one).
  bool captured_all_rows() const {
    if (static_cast<int>(cap_.size()) != lanes_) return false;
    for (int lane = 0; lane < lanes_; ++lane)
      if (static_cast<int64_t>(cap_[lane].ptr.size()) != lane_start(lane + 1) - lane_start(lane) + 1) return false;
    return true;
  }
  // Calls visit(i, j, p_ij) for every entry of the captured plan (captured_all_rows).
  template <typename Visit>
  void captured_entries(const Visit& visit) const {
    for (int lane = 0; lane < lanes_; ++lane) {
      const CapturedLane& L = cap_[lane];
      const int64_t r0 = lane_start(lane);
      for (size_t r = 0; r + 1 < L.ptr.size(); ++r)
        for (int64_t k = L.ptr[r]; k < L.ptr[r + 1]; ++k) visit(r0 + static_cast<int64_t>(r), L.col[k], L.val[k]);
    }
  }
  // Row i of the cost, computed into buf (m values).
  const T* cost_row(int64_t i, std::vector<T>& buf) const {
    buf.resize(m_);
    C_.rows(i, i + 1, buf.data());
    return buf.data();
  }
  // Column j of the cost (n values in buf); needs set_transposed().
  const T* cost_col(int64_t j, std::vector<T>& buf) const {
    buf.resize(n_);
    Ct_->rows(j, j + 1, buf.data());
    return buf.data();
  }

  // out_i = sum_j p_ij V_j (and out2_i = sum_j p_ij^2 V2_j) on the captured plan.
  void captured_rows(const double* V, const double* V2, double* out, double* out2) const {
    const int threads = lane_threads();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int lane = 0; lane < lanes_; ++lane) {
      const CapturedLane& L = cap_[lane];
      const int64_t r0 = lane_start(lane), r1 = lane_start(lane + 1);
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t k0 = L.ptr[i - r0], len = L.ptr[i - r0 + 1] - k0;
        out[i] = CapturedDot::run(L.val.data() + k0, L.col.data() + k0, len, V);
        if (out2) out2[i] = CapturedDot::squares(L.val.data() + k0, L.col.data() + k0, len, V2);
      }
    }
  }

  // out_j = sum_i p_ij u_i on the captured plan: each lane into its own accumulators, added in lane
  // order (the sums do not depend on the thread count).
  void captured_cols(const double* u, double* out) {
    const int threads = lane_threads();
    std::fill(acc_.begin(), acc_.end(), 0.0);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int lane = 0; lane < lanes_; ++lane) {
      const CapturedLane& L = cap_[lane];
      double* acc = acc_.data() + static_cast<size_t>(lane) * m_;
      const int64_t r0 = lane_start(lane), r1 = lane_start(lane + 1);
      for (int64_t i = r0; i < r1; ++i) {
        const double ui = u[i];
        for (int64_t k = L.ptr[i - r0]; k < L.ptr[i - r0 + 1]; ++k) acc[L.col[k]] += L.val[k] * ui;
      }
    }
    for (int64_t j = 0; j < m_; ++j) {
      double t = 0.0;
      for (int l = 0; l < lanes_; ++l) t += acc_[static_cast<size_t>(l) * m_ + j];
      out[j] = t;
    }
  }

  // U (m x ranges): column j's captured mass in each range [starts[r], starts[r + 1]) of rows.
  void captured_range_sums(const std::vector<int64_t>& starts, std::vector<double>& U) const {
    const int64_t nr = static_cast<int64_t>(starts.size()) - 1;
    U.assign(static_cast<size_t>(m_) * nr, 0.0);
    int64_t r = 0;
    for (int lane = 0; lane < lanes_; ++lane) {
      const CapturedLane& L = cap_[lane];
      const int64_t r0 = lane_start(lane), r1 = lane_start(lane + 1);
      for (int64_t i = r0; i < r1; ++i) {
        while (starts[r + 1] <= i) ++r;
        for (int64_t k = L.ptr[i - r0]; k < L.ptr[i - r0 + 1]; ++k) U[static_cast<size_t>(L.col[k]) * nr + r] += L.val[k];
      }
    }
  }

  // The transposed problem, for the column passes of newton().
  void set_transposed(const PointCost<T>& ct) { Ct_ = &ct; }

  // Newton's method on the dual, as newton_polish (sinkhorn.cpp) runs it on a truncated kernel (see
  // there for the system, the Schur complement, the two-level preconditioner and the line search),
  // here on the dense plan with every product recomputed: a CG iteration costs two passes (P^T v,
  // then P w). Plain Sinkhorn needed ~11,600 iterations on a 2,000-point draw of the benchmark where
  // Newton took 28 steps and 560 CG iterations (RESULTS.md). Needs set_transposed(). Returns the
  // marginal error of the potentials it leaves (from a pass over the dense plan in double).
  // Below `settle` (0: never), a step that does not halve the error ends it (sinkhorn_log's rule
  // where tol lies below float64's rounding).
  template <typename Poll>
  double newton(double eps, double target, double settle, double* f, double* g, SinkhornReport& rep,
                const Poll& poll, const PlanClasses& grp, bool debug) {
    constexpr double forcing = 0.1;
    const double inv_eps = 1.0 / eps;
    const int64_t n = n_, m = m_;
    const PointCost<T>& Ct = *Ct_;
    std::vector<double> br(n), bc(m), rs(n), cs(m), rs_t(n), cs_t(m), sn0(n), sn1(n), sn2(n), sm0(m), sm1(m);
    std::vector<double> rhs(n), x(n), res(n), dir(n), q(n), dinv(n), z(n), w(m), wt(m), inv_c(m), f_try(n), g_try(m);
    // (br, bc) = (log a + f / eps, log b + g / eps) of the point eval() saw last.
    auto eval = [&](const double* ff, const double* gg, std::vector<double>& r_out, std::vector<double>& c_out) {
      for (int64_t i = 0; i < n; ++i) br[i] = log_a_[i] + ff[i] * inv_eps;
      for (int64_t j = 0; j < m; ++j) bc[j] = log_b_[j] + gg[j] * inv_eps;
      plan_sums(C_, br.data(), bc.data(), inv_eps, nullptr, nullptr, r_out.data(), nullptr, nullptr);
      plan_sums(Ct, bc.data(), br.data(), inv_eps, nullptr, nullptr, c_out.data(), nullptr, nullptr);
      double e = 0.0;
      for (int64_t i = 0; i < n; ++i) e += std::fabs(r_out[i] - a_[i]);
      for (int64_t j = 0; j < m; ++j) e += std::fabs(c_out[j] - b_[j]);
      return e;
    };
    // The coarse space: the row groups, which must be contiguous ranges of rows (otce and
    // transport_points sort their points so); otherwise Jacobi alone.
    const int Rc = grp.row_classes;
    std::vector<int64_t> gstart{0};
    bool use_coarse = Rc >= 2 && Rc <= 512;
    for (int64_t i = 1; i < n && use_coarse; ++i) {
      if (grp.row_class[i] < grp.row_class[i - 1]) use_coarse = false;
      if (grp.row_class[i] != grp.row_class[i - 1]) gstart.push_back(i);
    }
    gstart.push_back(n);
    const int64_t nr = static_cast<int64_t>(gstart.size()) - 1;
    std::vector<double> U;
    TwoLevelPreconditioner coarse;
    std::vector<double> last_dir;
    double lambda = 1e-3;
    const int64_t max_captured = static_cast<int64_t>(opt_.blocked_plan_bytes / (sizeof(int32_t) + sizeof(double)));
    double err = eval(f, g, rs, cs);
    for (int step = 0; step < 50 && err > target && rep.iterations < opt_.max_iter && !rep.timed_out; ++step) {
      const auto step_start = Clock::now();
      for (int64_t j = 0; j < m; ++j) {
        inv_c[j] = cs[j] > 0 ? 1.0 / ((1.0 + lambda) * cs[j]) : 0.0;
        w[j] = (b_[j] - cs[j]) * inv_c[j];
      }
      // The products below run on a truncated copy of the plan when it fits (capture), else each is a
      // recomputed pass; the residuals (a - rs, b - cs) are the dense plan's either way.
      const bool captured = capture(br.data(), bc.data(), inv_eps, max_captured);
      if (captured)
        captured_rows(w.data(), inv_c.data(), sn1.data(), sn2.data());
      else
        plan_sums(C_, br.data(), bc.data(), inv_eps, w.data(), inv_c.data(), sn0.data(), sn1.data(), sn2.data());
      for (int64_t i = 0; i < n; ++i) {
        rhs[i] = a_[i] - rs[i] - sn1[i];
        const double diag = (1.0 + lambda) * rs[i] - sn2[i];
        dinv[i] = diag > 1e-12 * rs[i] ? 1.0 / diag : 0.0;
      }
      double rhs_norm2 = 0.0;
      for (int64_t i = 0; i < n; ++i) rhs_norm2 += rhs[i] * rhs[i];
      // q = S v: wt = D2^-1 P^T v over the columns, then q = D1 v - P wt over the rows.
      auto schur = [&](const std::vector<double>& v, std::vector<double>& out) {
        if (captured)
          captured_cols(v.data(), sm1.data());
        else
          plan_sums(Ct, bc.data(), br.data(), inv_eps, v.data(), nullptr, sm0.data(), sm1.data(), nullptr);
        for (int64_t j = 0; j < m; ++j) wt[j] = sm1[j] * inv_c[j];
        if (captured)
          captured_rows(wt.data(), nullptr, sn1.data(), nullptr);
        else
          plan_sums(C_, br.data(), bc.data(), inv_eps, wt.data(), nullptr, sn0.data(), sn1.data(), nullptr);
        double vq = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          out[i] = (1.0 + lambda) * rs[i] * v[i] - sn1[i];
          vq += v[i] * out[i];
        }
        return vq;
      };
      if (use_coarse) {
        // E = Z^T S Z = Z^T D1 Z - sum_j inv_c_j u_j u_j^T, u_j[c] = column j's mass in rows of group c;
        // couplings below 1e-12 of a column's mass are left out (a preconditioner need not be exact).
        if (captured)
          captured_range_sums(gstart, U);
        else
          plan_range_sums(Ct, bc.data(), br.data(), inv_eps, gstart, U);
        // The last step's direction as one more coarse vector, as in newton_polish (one more
        // product with S a step).
        coarse.start(Rc, grp.row_class, last_dir, schur);
        for (int64_t i = 0; i < n; ++i) coarse.E(grp.row_class[i], grp.row_class[i]) += (1.0 + lambda) * rs[i];
        for (int64_t j = 0; j < m; ++j) {
          const double* u = U.data() + j * nr;
          const double floor = 1e-12 * cs[j];
          for (int64_t r1 = 0; r1 < nr; ++r1) {
            if (u[r1] <= floor) continue;
            const double uc = u[r1] * inv_c[j];
            const int c1 = grp.row_class[gstart[r1]];
            for (int64_t r2 = 0; r2 < nr; ++r2)
              if (u[r2] > floor) coarse.E(c1, grp.row_class[gstart[r2]]) -= uc * u[r2];
          }
        }
        coarse.factor();
      }
      auto precondition = [&](const std::vector<double>& r, std::vector<double>& out) {
        coarse.apply(r, out, dinv, use_coarse, grp.row_class);
      };
      const int cg = solve_cg(
          rhs, rhs_norm2 * forcing * forcing, static_cast<int>(std::min<int64_t>(20 * n, 20000)), schur, precondition,
          [&] { return rep.timed_out; }, [&](int) { poll(); }, x, res, dir, q, z);
      rep.cg_iterations += cg;
      last_dir = x;
      // d2 = D2^-1 (b - P^T 1 - P^T d1), in w.
      if (captured)
        captured_cols(x.data(), sm1.data());
      else
        plan_sums(Ct, bc.data(), br.data(), inv_eps, x.data(), nullptr, sm0.data(), sm1.data(), nullptr);
      for (int64_t j = 0; j < m; ++j) w[j] = (b_[j] - cs[j] - sm1[j]) * inv_c[j];
      // The dense plan is connected, so the step's only null direction is the gauge (f + c, g - c),
      // along which CG drifts when the damping is off; removing it keeps f + g exact: potentials of
      // 1e10 with opposite signs left a marginal error that three formulas evaluated as 4e-7, 6e-6
      // and 4e-5.
      double drift = 0.0;
      for (int64_t i = 0; i < n; ++i) drift += x[i];
      for (int64_t j = 0; j < m; ++j) drift -= w[j];
      drift /= static_cast<double>(n + m);
      for (int64_t i = 0; i < n; ++i) x[i] -= drift;
      for (int64_t j = 0; j < m; ++j) w[j] += drift;
      double slope = 0.0, mass = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        slope += (a_[i] - rs[i]) * x[i];
        mass += rs[i];
      }
      for (int64_t j = 0; j < m; ++j) slope += (b_[j] - cs[j]) * w[j];
      double t = 1.0, err_try = err;
      bool ascent = false, accepted = false;
      for (; t > 1e-3; t *= 0.5) {
        for (int64_t i = 0; i < n; ++i) f_try[i] = f[i] + t * eps * x[i];
        for (int64_t j = 0; j < m; ++j) g_try[j] = g[j] + t * eps * w[j];
        err_try = eval(f_try.data(), g_try.data(), rs_t, cs_t);
        if (err_try < err) {
          accepted = true;
          break;
        }
        if (t * slope > 1e-10) {
          double gain = 0.0, mass_try = 0.0;  // dual objective gain / eps
          for (int64_t i = 0; i < n; ++i) {
            gain += a_[i] * t * x[i];
            mass_try += rs_t[i];
          }
          for (int64_t j = 0; j < m; ++j) gain += b_[j] * t * w[j];
          gain -= mass_try - mass;
          if (dual_ascent_accepted(gain, t * slope, err_try, err)) {
            accepted = ascent = true;
            break;
          }
        }
      }
      ++rep.newton_steps;
      ++rep.iterations;  // charged as one iteration against max_iter, as in sinkhorn_log
      poll();
      if (debug)
        std::fprintf(stderr, "  blocked newton step %d: lambda=%g cg=%d t=%g err %.3e -> %.3e%s (%.1f s, %s)\n", step,
                     lambda, cg, t, err, err_try, ascent ? " (dual ascent)" : "",
                     std::chrono::duration<double>(Clock::now() - step_start).count(),
                     captured ? ("captured plan, " + std::to_string(cap_entries_ / n) + " entries per row").c_str()
                              : "recomputed products");
      if (!accepted) {
        eval(f, g, rs, cs);  // (br, bc) and the sums must describe (f, g) again
        lambda = std::max(1e-3, 10.0 * lambda);
        if (lambda > 1e2) return err;
        continue;
      }
      lambda = next_damping(lambda, t, ascent, err_try, err);
      std::copy(f_try.begin(), f_try.end(), f);
      std::copy(g_try.begin(), g_try.end(), g);
      rs.swap(rs_t);
      cs.swap(cs_t);
      const bool halved = err_try <= 0.5 * err;
      err = err_try;
      if (!halved && err <= settle) break;
    }
    return err;
  }

  PlanSummary summarize(const double* f, const double* g, double eps, const PlanClasses& cls) {
    auto rows = [this](int64_t i0, int64_t i1, std::vector<T>& buf) {
      buf.resize(static_cast<size_t>(i1 - i0) * m_);
      C_.rows(i0, i1, buf.data());
      return static_cast<const T*>(buf.data());
    };
    return summarize_rows<T>(n_, m_, rows, a_, b_, f, g, eps, cls.row_class, cls.row_classes, cls.col_class_start,
                             cls.col_classes, nt_);
  }

  // Polled between passes and, from the calling thread, between panels: a pass at n = m = 10^5 takes
  // seconds. Returns true once the caller's interrupt callback has said so.
  bool interrupted() {
    if (stop_) return true;
    if (!opt_.interrupt || std::this_thread::get_id() != caller_) return false;
    const auto now = Clock::now();
    if (now - last_poll_ < std::chrono::milliseconds(50)) return false;
    last_poll_ = now;
    if (opt_.interrupt()) stop_ = true;
    return stop_;
  }

 private:
  struct Scratch {
    std::vector<double> total, A, seg;
    std::vector<T> part, row;
  };

  // body(lane, i0, rows, the panel's tiles, per-thread scratch) for every panel; each lane's panels
  // in order, lanes in parallel. Throws Interrupted when asked to stop.
  template <typename Body>
  void tiled_panels(const Body& body) {
    const int threads = lane_threads();
#pragma omp parallel num_threads(threads)
    {
      std::vector<T> buf;
      PanelTiles<T> tiles(C_, buf);
      Scratch scratch;
#pragma omp for schedule(static)
      for (int lane = 0; lane < lanes_; ++lane) {
        const int64_t r0 = lane_start(lane), r1 = lane_start(lane + 1);
        for (int64_t i0 = r0; i0 < r1 && !stop_; i0 += kPanel) {
          const int64_t rows = std::min(kPanel, r1 - i0);
          tiles.start(i0, rows);
          body(lane, i0, rows, tiles, scratch);
          interrupted();
        }
      }
    }
    if (stop_) throw Interrupted();
  }

  // body(lane, i0, rows, cost rows i0 .. i0 + rows, per-thread scratch) for every panel, whole rows
  // at a time (for the passes that run once per solve); otherwise as tiled_panels.
  template <typename Body>
  void panels(const Body& body) {
    const int threads = lane_threads();
#pragma omp parallel num_threads(threads)
    {
      std::vector<T> buf(static_cast<size_t>(kPanel) * m_), scratch;
#pragma omp for schedule(static)
      for (int lane = 0; lane < lanes_; ++lane) {
        const int64_t r0 = lane_start(lane), r1 = lane_start(lane + 1);
        for (int64_t i0 = r0; i0 < r1 && !stop_; i0 += kPanel) {
          const int64_t rows = std::min(kPanel, r1 - i0);
          C_.rows(i0, i0 + rows, buf.data());
          body(lane, i0, rows, buf.data(), scratch);
          interrupted();
        }
      }
    }
    if (stop_) throw Interrupted();
  }

public:
  // For every row i of `cost` (this problem's, or its transpose for the columns), sums over its plan
  // entries p_ij = exp(base_i + B_j - C_ij / eps): out0 = sum p, out1 = sum p V_j (V given), out2 =
  // sum p^2 V2_j (V2 given). One sweep; every row's sums are its own, so no order depends on threads.
  void plan_sums(const PointCost<T>& cost, const double* base, const double* B, double inv_eps, const double* V,
                 const double* V2, double* out0, double* out1, double* out2) {
    const std::vector<int64_t> none;
    sweep(cost, base, B, inv_eps, V, V2, none, [&](int64_t i, const double* s) {
      out0[i] = s[0];
      if (out1) out1[i] = s[1];
      if (out2) out2[i] = s[2];
    });
  }

  // U (cost.n x ranges) = every row's plan mass in each range [starts[r], starts[r + 1]) of columns.
  void plan_range_sums(const PointCost<T>& cost, const double* base, const double* B, double inv_eps,
                       const std::vector<int64_t>& starts, std::vector<double>& U) {
    const int64_t nr = static_cast<int64_t>(starts.size()) - 1;
    U.assign(static_cast<size_t>(cost.n) * nr, 0.0);
    sweep(cost, base, B, inv_eps, nullptr, nullptr, starts,
          [&](int64_t i, const double* s) { std::copy(s, s + nr, U.begin() + i * nr); });
  }

  // The pass behind plan_sums and plan_range_sums: per row, either the three sums (ranges empty) or
  // one sum per range of columns; done(i, sums) receives each row's.
  template <typename Done>
  void sweep(const PointCost<T>& cost, const double* base, const double* B, double inv_eps, const double* V,
             const double* V2, const std::vector<int64_t>& ranges, const Done& done) {
    const int64_t rows_total = cost.n, cols = cost.m;
    const int64_t panels = (rows_total + kPanel - 1) / kPanel;
    const int64_t width = ranges.empty() ? 3 : static_cast<int64_t>(ranges.size()) - 1;
#pragma omp parallel num_threads(nt_)
    {
      std::vector<T> buf(static_cast<size_t>(kPanel) * kTile);
      std::vector<double> sums(static_cast<size_t>(kPanel) * width), ignore(3);
#pragma omp for schedule(dynamic, 1)
      for (int64_t p = 0; p < panels; ++p) {
        if (stop_) continue;
        const int64_t i0 = p * kPanel, rows = std::min(kPanel, rows_total - i0);
        std::fill(sums.begin(), sums.end(), 0.0);
        int64_t q0 = 0;
        for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
          const int64_t w = std::min(kTile, cols - j0);
          cost.tile(i0, rows, j0, w, buf.data(), kTile);
          if (ranges.empty()) {
            for (int64_t r = 0; r < rows; ++r)
              PlanSums<T>::run(buf.data() + r * kTile, w, base[i0 + r], B + j0, inv_eps, V ? V + j0 : nullptr,
                               V2 ? V2 + j0 : nullptr, sums.data() + r * 3);
            continue;
          }
          while (ranges[q0 + 1] <= j0) ++q0;
          for (int64_t q = q0; q < width && ranges[q] < j0 + w; ++q) {
            const int64_t k0 = std::max(ranges[q], j0), k1 = std::min(ranges[q + 1], j0 + w);
            for (int64_t r = 0; r < rows && k1 > k0; ++r) {
              PlanSums<T>::run(buf.data() + r * kTile + (k0 - j0), k1 - k0, base[i0 + r], B + k0, inv_eps, nullptr,
                               nullptr, ignore.data());
              sums[r * width + q] += ignore[0];
              ignore[0] = 0.0;
            }
          }
        }
        for (int64_t r = 0; r < rows; ++r) done(i0 + r, sums.data() + r * width);
        interrupted();
      }
    }
    if (stop_) throw Interrupted();
  }

private:
  // Column log-sum-exps of the current f by their exact maxima (two passes), into shift_ and A_ as
  // iterate() leaves them: lse_j = shift_j + log A_j.
  void exact_columns(const double* f, double inv_eps) {
    std::vector<double> lane_max(static_cast<size_t>(lanes_) * m_, kNegInf);
    panels([&](int lane, int64_t i0, int64_t rows, const T* c, std::vector<T>&) {
      for (int64_t r = 0; r < rows; ++r)
        ColLse<T>::max_row(c + r * m_, m_, f[i0 + r] * inv_eps + log_a_[i0 + r], inv_eps,
                           lane_max.data() + static_cast<size_t>(lane) * m_);
    });
    for (int64_t j = 0; j < m_; ++j) {
      double mx = kNegInf;
      for (int l = 0; l < lanes_; ++l) mx = std::max(mx, lane_max[static_cast<size_t>(l) * m_ + j]);
      shift_[j] = std::isfinite(mx) ? mx : (std::isnan(mx) ? mx : 0.0);
    }
    std::fill(acc_.begin(), acc_.end(), 0.0);
    panels([&](int lane, int64_t i0, int64_t rows, const T* c, std::vector<T>& part) {
      part.assign(m_, T(0));
      for (int64_t r = 0; r < rows; ++r)
        ColLse<T>::sum_row(c + r * m_, m_, f[i0 + r] * inv_eps + log_a_[i0 + r], inv_eps, shift_.data(),
                           part.data());
      double* acc = acc_.data() + static_cast<size_t>(lane) * m_;
      for (int64_t j = 0; j < m_; ++j) acc[j] += static_cast<double>(part[j]);
    });
    for (int64_t j = 0; j < m_; ++j) {
      double total = 0.0;
      for (int l = 0; l < lanes_; ++l) total += acc_[static_cast<size_t>(l) * m_ + j];
      A_[j] = total;
    }
  }

  const PointCost<T>& C_;
  const PointCost<T>* Ct_ = nullptr;
  const int64_t n_, m_;
  const double *a_, *b_;
  const SinkhornOptions& opt_;
  const int nt_, lanes_;
  std::vector<double> log_a_, log_b_, err_rows_, A_, shift_, acc_;
  std::vector<float> Af_, shiftf_;  // A_ and shift_ in float, for iterate(lowp)
  std::vector<CapturedLane> cap_;
  int64_t cap_entries_ = 0;
  double capture_cut_ = kCaptureCut;
  const std::thread::id caller_;
  Clock::time_point last_poll_{};  // the first poll asks at once
  std::atomic<bool> stop_{false};
};

}  // namespace

template <typename T>
double blocked_bytes(int64_t n, int64_t m, int64_t d, int threads, int row_groups, int col_groups) {
  const double lanes = static_cast<double>(std::min<int64_t>(kLanes, n));
  const double t = std::max(1, std::min(threads, kLanes));
  const double nm = static_cast<double>(n + m);
  return 2.0 * nm * static_cast<double>(d) * sizeof(T)                 // centred points, packed too
         + lanes * static_cast<double>(m) * 8.0                        // column accumulators
         + t * static_cast<double>(kPanel + 1) * m * sizeof(T)         // panels and partial sums
         + 64.0 * static_cast<double>(m) * 8.0                         // the certificate's column sums
         + lanes * row_groups * col_groups * 8.0 * 2                   // balancing's group masses
         + 2.0 * nm * static_cast<double>(d) * sizeof(T)               // Newton: the transposed points
         + static_cast<double>(m) * std::min(row_groups, 512) * 8.0    // ... the coarse space's column masses
         + 40.0 * nm * 8.0                                             // per-point vectors
         // ... and its truncated plan, at most as dense as a stored kernel may be
         + std::min(SinkhornOptions{}.blocked_plan_bytes, static_cast<double>(n) * m * SinkhornOptions{}.max_density * 12.0);
}

template <typename T>
SinkhornReport sinkhorn_blocked(const T* x, int64_t n, const T* y, int64_t m, int64_t d, const double* a,
                                const double* b, const SinkhornOptions& opt, double* f, double* g,
                                const PlanClasses* classes, const PlanClasses* groups) {
  if (n < 1 || m < 1 || d < 1) throw InvalidArgument("features", "needs at least one point and one dimension on each side");
  check_options(opt);

  const int nt = threads_for(opt, n, m);
  const PointCost<T> cost(x, n, y, m, d);
  BlockedSolver<T> solver(cost, a, b, opt, nt);
  // Newton's column passes run on the transposed problem.
  const bool newton = opt.newton;
  PointCost<T> cost_t;
  if (newton) {
    cost_t = PointCost<T>::transposed(cost);
    solver.set_transposed(cost_t);
  }
  // A pass of its own (see max_cost): taken once. Every stage had asked for it again, a recomputed
  // pass each time (N = 3 x 10^4, D = 19: 41.5 -> 35.7 s; RESULTS.md, session 24).
  const double cmax = solver.max_cost();
  const std::vector<double> schedule = stage_schedule(cmax, opt);
  std::fill(f, f + n, 0.0);
  std::fill(g, g + m, 0.0);

  std::vector<int64_t> one_class{0, m};
  std::vector<int32_t> zero_class(n, 0);
  const PlanClasses cls = classes ? *classes : PlanClasses{zero_class.data(), 1, one_class.data(), 1};
  const PlanClasses& grp = groups ? *groups : cls;
  const bool debug = std::getenv("SEGTRANSFER_DEBUG") != nullptr;
  SinkhornReport rep;
  const auto start = Clock::now();
  auto poll = [&]() {
    if (opt.timeout > 0 && std::chrono::duration<double>(Clock::now() - start).count() > opt.timeout)
      rep.timed_out = true;
    if (solver.interrupted()) throw Interrupted();
  };

  // sinkhorn_log's safeguarded over-relaxation, in blocks of 10 iterations from a snapshot, with
  // class balancing at the start of every block (see sinkhorn_log).
  std::vector<double> f_snap(n), g_snap(m);
  double omega = 1.0, cap = opt.overrelaxation, last_err = kPosInf;
  // `stall_iterations` (0: none): the loop also ends after that many iterations without progress
  // (kIntermediateStallIterations in an intermediate stage, kPhaseStallIterations in a last-stage
  // phase between Newton rounds).
  auto run = [&](double eps, double target, int64_t limit, bool lowp = false, int64_t stall_iterations = 0) {
    constexpr int64_t kBlock = 10;
    double block_err = kPosInf;
    int64_t block_left = 0;
    StallBackoff cycle;
    FloorWatch stall(cmax, eps, std::numeric_limits<int>::max(),
                     stall_iterations > 0 ? static_cast<int>(stall_iterations / kBlock) : std::numeric_limits<int>::max());
    auto snapshot = [&]() {
      std::copy(f, f + n, f_snap.begin());
      std::copy(g, g + m, g_snap.begin());
    };
    auto balance = [&]() {
      if (opt.class_balance && solver.balance(eps, grp, f, g, lowp)) block_err = kPosInf;
      snapshot();
    };
    if (rep.iterations < limit && !rep.timed_out) balance();  // as sinkhorn_log's loop
    while (rep.iterations < limit && !rep.timed_out) {
      double err_c = 0.0;
      const double err_r = solver.iterate(eps, omega, f, g, err_c, lowp);
      ++rep.iterations;
      poll();
      const double err = err_r + err_c;
      last_err = err;
      if (std::isfinite(err) && err <= target) return;
      if (--block_left > 0 && std::isfinite(err)) continue;
      if (omega == 1.0 && !std::isfinite(err)) return;
      if (!accept_block(err, block_err, omega, cap)) {
        std::copy(f_snap.begin(), f_snap.end(), f);
        std::copy(g_snap.begin(), g_snap.end(), g);
      }
      if (std::isfinite(err)) cycle.record(err, omega, cap);  // see StallBackoff
      if (std::isfinite(err) && stall.stuck(err)) return;
      block_left = kBlock;
      balance();
      if (debug && rep.iterations % 100 < kBlock)
        std::fprintf(stderr, "  blocked eps=%g it=%lld err=%.3e omega=%.3f t=%.1f\n", eps,
                     static_cast<long long>(rep.iterations), err, omega,
                     std::chrono::duration<double>(Clock::now() - start).count());
    }
  };

  StageExtrapolation extrapolation;
  for (size_t s = 0; s < schedule.size(); ++s) {
    const double eps = schedule[s];
    const bool last = s + 1 == schedule.size();
    poll();  // a stage begun after the timeout would run a first iteration (a pass over the plan)
    if (rep.timed_out && !last) continue;
    if (s > 0) {
      extrapolation.record(schedule[s - 1], f, n, g, m);
      extrapolation.apply(opt.stage_extrapolation, eps, f, n, g, m);
    }
    ++rep.stages;
    ++rep.dense_stages;
    omega = 1.0;
    cap = opt.overrelaxation;
    if (last && (rep.timed_out || rep.iterations >= opt.max_iter)) {
      // Stopped before this epsilon: one plain iteration at it (not charged against max_iter) makes
      // the column marginal exact and every reported number finite, as in sinkhorn_log.
      double err_c = 0.0;
      solver.iterate(eps, 1.0, f, g, err_c);
    }
    if (!last) {
      const double stage_target = std::max(opt.stage_tol, opt.tol);
      run(eps, stage_target, opt.max_iter, stage_float_exponents(opt, stage_target, cmax, f, n, g, m, eps),
          kIntermediateStallIterations);
      continue;
    }
    // The last stage: Sinkhorn down to newton_switch, then Newton; when a Newton round stalls,
    // a Sinkhorn phase (doubling each time) before the next, as in sinkhorn_log.
    double target = 0.5 * opt.tol;
    int64_t phase = kFirstPhase;
    // Ends, not converged, once three certified rounds in a row made no progress near float64's
    // resolution at this cost scale, or kStalledRounds anywhere (FloorWatch, stopping.hpp).
    const auto round_watch = [&] { return FloorWatch(cmax, eps, 3, kStalledRounds); };  // afresh after a shift
    FloorWatch rounds = round_watch();
    int shifts = 0;  // shift_imbalanced_component's
    BestCertificate best;
    double certified = kPosInf;  // the last round's certificate
    for (;;) {
      // As sinkhorn_log's rounds where float64's rounding exceeds tol (newton_settle, stopping.hpp).
      const double settle = newton_settle(certificate_rounding(cmax, f, n, g, m, eps, std::max(n, m)), opt.tol);
      double estimate = kPosInf;
      if (newton) {
        // The phase that only hands over to Newton in float exponents where they resolve this stage,
        // as sinkhorn_log's (whose comments say why not when back from a certificate below
        // newton_switch).
        const double handover = std::max(target, opt.newton_switch);
        run(eps, handover, opt.max_iter,
            !(certified <= opt.newton_switch) && stage_float_exponents(opt, handover, cmax, f, n, g, m, eps));
        estimate = solver.newton(eps, target, settle, f, g, rep, poll, grp, debug);
        if (estimate > target && estimate > settle && !rep.timed_out && rep.iterations < opt.max_iter) {
          // Newton's point is kept should the Sinkhorn phase end worse: near the floor of a tight
          // tol (float32 clusters at cost / eps 1e5, tol 1e-12) Newton reached 1e-12 and the phase
          // after it 6e-8, every round, until max_iter.
          const std::vector<double> f_newton(f, f + n), g_newton(g, g + m);
          const double newton_estimate = estimate;
          last_err = kPosInf;
          run(eps, target, std::min(opt.max_iter, rep.iterations + phase), false, kPhaseStallIterations);
          estimate = last_err;
          if (!(estimate <= newton_estimate)) {
            std::copy(f_newton.begin(), f_newton.end(), f);
            std::copy(g_newton.begin(), g_newton.end(), g);
            estimate = newton_estimate;
          }
          phase = next_phase(phase, rounds, certified);
        }
      } else {
        run(eps, target, opt.max_iter);
        estimate = last_err;
      }
      const PlanSummary chk = solver.summarize(f, g, eps, cls);
      const double rounding = certificate_rounding(cmax, f, n, g, m, eps, std::max(n, m));
      rep.marginal_error = chk.marginal_error + rounding;
      rep.transport_cost = chk.transport_cost;
      rep.joint = chk.joint;
      rep.converged = rep.marginal_error <= opt.tol;
      certified = rep.marginal_error;
      if (debug)
        std::fprintf(stderr, "blocked certify: err=%.3e (rounding %.2e) it=%lld t=%.1f\n", rep.marginal_error,
                     rounding, static_cast<long long>(rep.iterations),
                     std::chrono::duration<double>(Clock::now() - start).count());
      // What float64 cannot resolve at this cost scale exceeds tol, and the rest of the certificate
      // is already below twice that (where a round's Newton settles, above): no round can certify
      // tol, nor do much better (as the stored solver ends). Rounds that each shaved 0.2 % off such
      // a certificate had gone on for 60 s (1,415 x 2,442 points, D = 256, cost / eps 8e8, tol 1e-8:
      // certified 2.06e-8 of which 2.0e-8 rounding; session 32).
      const bool unresolvable = rounding > opt.tol && chk.marginal_error <= newton_settle(rounding, opt.tol);
      const bool done = rep.converged || rep.iterations >= opt.max_iter || rep.timed_out ||
                        !std::isfinite(rep.marginal_error) || unresolvable || rounds.stuck(rep.marginal_error);
      if (done) {
        best.restore(rep, f, n, g);
        break;
      }
      if (newton) {
        // An unconverged round may face a component of the captured plan whose masses do not
        // balance (shift_imbalanced_component, kernels.hpp), as in the stored solver (also within
        // FloorWatch's generous reach of the floor: at cost / eps 1e10 that is errors up to 2.7e-3).
        // Looked for after every such round, not only after one without progress as the stored
        // solver does (its rounds cost milliseconds): a blocked round's Sinkhorn phase of 600-1,200
        // iterations recomputing the cost then sat flat at the imbalance first (1,565 x 2,588 points,
        // D = 256, cost / eps 1.6e8: 40 s, then converged 6 iterations after the shift; session 32).
        // Finding none costs a pass over the captured plan. Otherwise, after a round without progress
        // away from the floor, the captured plan widens.
        std::vector<T> row;
        // The entries that can carry mass (kCarryingCut, kernels.hpp).
        const double carrying = std::exp(-kCarryingCut);
        const auto entries = [&](const auto& visit) {
          solver.captured_entries([&](int64_t i, int64_t j, double p) {
            if (p >= carrying * std::min(a[i], b[j])) visit(i, j);
          });
        };
        if (shifts < kComponentShifts && solver.captured_all_rows() &&
            shift_imbalanced_component(n, m, a, b, component_min_imbalance(opt.tol, rep.marginal_error), entries,
                                       [&](int64_t i) { return solver.cost_row(i, row); },
                                       [&](int64_t j) { return solver.cost_col(j, row); }, f, g, debug)) {
          ++shifts;
          rounds = round_watch();
          phase = kFirstPhase;
        } else if (!rounds.progressed() && !rounds.near_floor(rep.marginal_error) && !solver.capture_widened()) {
          solver.widen_capture();
          if (debug) std::fprintf(stderr, "  blocked: a round without progress: captured plan widened to %g eps\n", kWidestCut);
        }
      }
      best.keep(rep, f, n, g, m);
      if (estimate <= target) target = next_certificate_target(target, chk.marginal_error, rounding, opt.tol);
    }
  }
  return rep;
}

#define SEGTRANSFER_INSTANTIATE(T)                                                                         \
  template SinkhornReport sinkhorn_blocked<T>(const T*, int64_t, const T*, int64_t, int64_t, const double*, \
                                              const double*, const SinkhornOptions&, double*, double*,       \
                                              const PlanClasses*, const PlanClasses*);                       \
  template double blocked_bytes<T>(int64_t, int64_t, int64_t, int, int, int);
SEGTRANSFER_INSTANTIATE(float)
SEGTRANSFER_INSTANTIATE(double)
#undef SEGTRANSFER_INSTANTIATE

}  // namespace segtransfer
