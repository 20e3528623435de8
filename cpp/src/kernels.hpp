// Internal to the core (not installed): the pieces shared by the stored-cost solver (sinkhorn.cpp)
// and the blocked one (blocked.cpp), which recomputes the cost instead of storing it: the
// log-sum-exp kernels and the class-level correction.
// Everything here has internal linkage, so each of the two files gets its own target clones.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "segtransfer/errors.hpp"
#include "segtransfer/fastexp.hpp"
#include "segtransfer/sinkhorn.hpp"
#include "clones.hpp"
#include "lse_avx2.hpp"
#include "overrelaxation.hpp"
#include "schedule.hpp"
#include "stopping.hpp"
#include "prefetch.hpp"
#include "lse_avx512.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif


namespace segtransfer {
namespace {

// Cache-line-aligned storage for the vectors that the AVX2 block loops read and write 8 columns at a
// time (the column potentials they gather from, the column sums they scatter to): a block starts at
// a multiple of 8 columns, so from a 64-byte aligned base its 32 bytes never straddle two cache lines.
// Eigen's allocator aligns to EIGEN_MAX_ALIGN_BYTES, which the build sets to 64 (CMakeLists.txt) for
// the cost matrix too.
template <typename T>
using AlignedVector = std::vector<T, Eigen::aligned_allocator<T>>;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kPosInf = std::numeric_limits<double>::infinity();

inline int threads_for(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// A solve's threads: one for an n x m problem below SinkhornOptions::parallel_min_entries
// (SinkhornOptions::parallel), else opt.num_threads as above. Beside two busy processes on a 2-vCPU
// VM, blocked solves of 12-24 points a side (1,000-2,600 iterations) ran past 10 s on two threads
// against 0.01-0.02 s on one, and a blocked 30 x 30 solve took 1.4 s against 1 ms, every pass a few
// barriers each stalled by the scheduler (tests/fuzz/stall_sweep.py, seed 5002; RESULTS.md, session
// 50). On an idle machine two threads gain from ~200 points a side, a few milliseconds a solve below
// 10^5 entries.
inline int threads_for(const SinkhornOptions& opt, int64_t n, int64_t m) {
  return opt.parallel(n, m) ? threads_for(opt.num_threads) : 1;
}

// The option checks both solvers make (InvalidArgument naming the option).
inline void check_options(const SinkhornOptions& opt) {
  if (!(opt.epsilon > 0) || !std::isfinite(opt.epsilon))
    throw InvalidArgument("epsilon", "must be a finite number > 0");
  if (!(opt.tol > 0)) throw InvalidArgument("tol", "must be > 0");
  if (opt.max_iter < 1) throw InvalidArgument("max_iter", "must be >= 1");
  if (!(opt.scaling_factor > 0 && opt.scaling_factor < 1))
    throw InvalidArgument("scaling_factor", "must be in (0, 1)");
  if (!(opt.overrelaxation > 0 && opt.overrelaxation < 2))
    throw InvalidArgument("overrelaxation", "must be in (0, 2)");
  if (!(opt.stage_extrapolation >= 0 && opt.stage_extrapolation <= 2))
    throw InvalidArgument("stage_extrapolation", "must be in [0, 2]");
  if (!(opt.blocked_plan_bytes >= 0)) throw InvalidArgument("blocked_plan_bytes", "must be >= 0");
  if (!(opt.parallel_min_entries >= 0)) throw InvalidArgument("parallel_min_entries", "must be >= 0");
  if (!(opt.handover_tol > 0 && opt.handover_tol < 1)) throw InvalidArgument("handover_tol", "must be in (0, 1)");
  if (!(opt.handover_truncation > 0)) throw InvalidArgument("handover_truncation", "must be > 0");
  if (!(opt.newton_cg_floor >= 0 && opt.newton_cg_floor < 1e-2))
    throw InvalidArgument("newton_cg_floor", "must be in [0, 0.01)");
}

// Stage epsilons: from the largest cost `cmax` (where the kernel is nearly flat and a few iterations
// converge; or opt.schedule_from) down to the target by a constant factor, on the grid
// target / factor^k; each stage warm-starts the next. Throws when cmax shows the cost overflowed, or
// epsilon is too small for it.
inline std::vector<double> stage_schedule(double cmax, const SinkhornOptions& opt) {
  if (!std::isfinite(cmax))
    throw cost_overflow();
  // Exponents (f + g - C) / eps are formed in double; beyond ~1e12 the dual variables lose all
  // precision relative to the cost and 1/eps itself may overflow.
  if (cmax / opt.epsilon > 1e12 || !std::isfinite(1.0 / opt.epsilon)) {
    throw InvalidArgument("epsilon", "is too small for the cost scale (largest cost the solver works on " +
                                         std::to_string(cmax) + ", cost / epsilon must stay below 1e12)");
  }
  std::vector<double> schedule;
  if (opt.eps_scaling) {
    if (opt.schedule_from > 0) {
      for (double e = opt.schedule_from; e > opt.epsilon; e *= opt.scaling_factor) schedule.push_back(e);
    } else {
      schedule = epsilon_grid(cmax, opt.epsilon, opt.scaling_factor);
    }
    // The stage at epsilon / scaling_factor, where Newton finishes the last one (see
    // newton_long_last_step); only after another stage, so that some annealing is left.
    if (opt.newton && opt.newton_long_last_step && schedule.size() >= 2) schedule.pop_back();
  }
  schedule.push_back(opt.epsilon);
  return schedule;
}

// Warm start of each epsilon stage by linear extrapolation of the potentials in epsilon, from the
// ends of the two previous stages: f(e_next) ~ f(e) + (f(e) - f(e_prev)) (e_next - e) / (e - e_prev).
// The entropic potentials move smoothly with epsilon, so the extrapolated start is nearer the next
// fixed point than the previous end is: on the benchmark's logits the stages after the first two
// took 5-12 instead of 12-22 iterations (RESULTS.md, session 8). Only the start changes, never the
// fixed point or the stopping rule. A constant moved between f and g (the gauge) cancels in f + g.
class StageExtrapolation {
 public:
  // Call at the end of every stage on the full problem (eps: the stage that just ended), then
  // apply() at the start of the next.
  void record(double eps, const double* f, int64_t n, const double* g, int64_t m) {
    prev_f_.swap(cur_f_);
    prev_g_.swap(cur_g_);
    cur_f_.assign(f, f + n);
    cur_g_.assign(g, g + m);
    prev_eps_ = cur_eps_;
    cur_eps_ = eps;
  }
  // Returns whether it moved the start (the stage may then undo it: see sinkhorn.cpp).
  bool apply(double factor, double eps_next, double* f, int64_t n, double* g, int64_t m) const {
    if (factor <= 0 || prev_eps_ <= 0 || static_cast<int64_t>(prev_f_.size()) != n ||
        static_cast<int64_t>(prev_g_.size()) != m)
      return false;
    const double t = factor * (eps_next - cur_eps_) / (cur_eps_ - prev_eps_);
    for (int64_t i = 0; i < n; ++i) f[i] = cur_f_[i] + t * (cur_f_[i] - prev_f_[i]);
    for (int64_t j = 0; j < m; ++j) g[j] = cur_g_[j] + t * (cur_g_[j] - prev_g_[j]);
    return true;
  }

  // The records: the last stage's potentials (last_*) and the one's before (prev_*).
  double prev_eps() const { return prev_eps_; }
  const std::vector<double>& prev_f() const { return prev_f_; }
  const std::vector<double>& prev_g() const { return prev_g_; }
  const std::vector<double>& last_f() const { return cur_f_; }
  const std::vector<double>& last_g() const { return cur_g_; }

 private:
  std::vector<double> prev_f_, prev_g_, cur_f_, cur_g_;
  double prev_eps_ = 0.0, cur_eps_ = 0.0;
};

// Whether an intermediate stage may form its exponents in float (float_stage_exponents). Each
// exponent A_j - C_ij / eps - shift_i is formed from values up to M = (max|C| + max|f| + max|g|) /
// eps, so float's rounding puts a relative error of about 2^-24 M on every term. The stages stop at
// a 1e-2 marginal error; kMaxFloatExponent keeps that error at or below 1e-3. Measured (K = 1,
// N = 2,000, D = 19, features scaled up): the benchmark's stages reach M = 6,600 (10^4 at N = 10^4);
// with features x 30 (M up to 6.7e6) the float stages stalled at an error of 0.2 for all of
// max_iter = 50,000 iterations, where exponents in double converged in 280-624 (RESULTS.md,
// session 17).
constexpr double kMaxFloatExponent = 16777216.0 * 1e-3;
inline bool float_exponents_fit(double cost_bound, const double* f, int64_t n, const double* g, int64_t m,
                                double eps) {
  double fm = 0.0, gm = 0.0;
  for (int64_t i = 0; i < n; ++i) fm = std::max(fm, std::fabs(f[i]));
  for (int64_t j = 0; j < m; ++j) gm = std::max(gm, std::fabs(g[j]));
  return (cost_bound + fm + gm) / eps <= kMaxFloatExponent;  // false for NaN, as for inf
}

// The one rule for whether an intermediate stage (or the multiscale hand-over's half-step, whose
// target is handover_tol) forms its exponents in float: asked for, a target that float's rounding
// (~3e-4 relative on a term) cannot spoil, and exponents float resolves. Both solvers.
inline bool stage_float_exponents(const SinkhornOptions& opt, double target, double cost_bound, const double* f,
                                  int64_t n, const double* g, int64_t m, double eps) {
  return opt.float_stage_exponents && target >= 1e-3 && float_exponents_fit(cost_bound, f, n, g, m, eps);
}

// The widest cutoff, in epsilons, of the last stage's truncated kernel (stored solver) or of
// Newton's captured plan (blocked solver), to which they widen when rounds stop helping: exp(-745)
// underflows in double.
constexpr double kWidestCut = 700.0;

// The Levenberg-Marquardt damping after an accepted Newton step of length t (both solvers' Newton).
// Gently down after a full step (a tenfold cut was followed by a shortened step, and the damping
// then oscillated), up after a shortened one. Near a tight tol, a step the error search accepted
// for a gain under 1 % says the damping swamps the direction that matters: components joined only
// by entries ~1e-7 of their masses, whose balance the damped system barely moves. 12 x 3 points at
// cost / eps 6.7e3, tol 2e-10: with the damping kept at >= 1e-4 every step gained ~1e-4 of 3.5e-9
// and the solve took 9.8 million iterations; cut 1000-fold after such a step, it converged in 42.
// Only below kDampingCutBelow: with more mass to move than such entries carry, the linear model
// fails anyway, and the cut's long steps were rejected in turn (a pattern that cannot carry the plan
// at an error of 3e-3 then never reached the refresh that widens it). Dual-ascent steps, which may
// raise the error by design, are left out. At the default tol the cut never fires (same iterations
// and scores at K = 10, D = 19 and 256; session 28).
constexpr double kDampingCutBelow = 1e-7;
inline double next_damping(double lambda, double t, bool ascent, double err_try, double err) {
  if (!ascent && err < kDampingCutBelow && err_try > 0.99 * err) return lambda > 1e-9 ? lambda * 1e-3 : 0.0;
  return t == 1.0 ? (lambda > 1e-6 ? lambda / 3.0 : 0.0) : std::max(1e-4, 2.0 * lambda);
}

// The dual steps of the Hungarian algorithm, for a last stage stalled on points whose masses do not
// balance. Near the unregularised limit (cost / eps >~ 10^6) the plan can fall apart into components
// joined only by entries too small to carry mass (kCarryingCut), or by none within any kernel's reach
// (e^-700). A component whose rows hold more mass than its columns cannot then reach its marginals
// by any iteration on the pattern, Newton's included: the error sits at the imbalance, since moving
// that mass needs the component's potentials shifted against the rest's by far more than Sinkhorn
// moves them. A 1,795-pixel draw (D = 8, cost / eps 8.6e6) sat at one point's mass (249 rows against
// 248 columns, the next entry out 1.9e5 eps away) for 50,000 iterations (session 31).
// `entries(visit)` calls visit(i, j) for every entry that joins components (the pattern's, or the
// blocked solver's captured plan's, above kCarryingCut); `cost_row(i)` returns row i of the cost (m
// values, valid until the next call).
// Finds the components of those entries and grows the one whose rows hold the most mass more than
// its columns, if by more than `min_imbalance`, as the Hungarian algorithm grows its tree: shift the
// tree's potentials (f + delta on its rows, g - delta on its columns) by the least amount that makes
// an entry leaving it as tight as the best entry inside of that entry's row, and take in the
// component that entry reaches; until the tree's imbalance is down to `min_imbalance` (or below 0).
// The masses sum to the same on both sides, so where a component is short of rows some other is
// short of columns, and its growth usually reaches the first; where that excess is spread over
// components each below min_imbalance, the one short of rows grows instead, on the transposed
// problem (`cost_col(j)`: column j, n values). Entries inside the tree keep their values, and no
// entry leaving it becomes tighter than its row's best inside. Each row is read once a tree
// (cost_row), when it joins. Then the next component, the same way (below). Returns whether it
// shifted; the pattern must be rebuilt then.
// Calls a stage at most (each followed by a new pattern). 8 until session 32: a draw at cost / eps
// 2.5e8 (1,357 points, D = 256) whose imbalances kept coming back one point's mass at a time spent
// them and ended at 1.5e-3; it converges after 10 (9,375 iterations). No other problem measured
// changed (150 at cost / eps 1e7-1e9, 400 tight-tol calls).
constexpr int kComponentShifts = 32;
// The entries that join components: plan values above e^-kCarryingCut of min(a_i, b_j). Below that an
// entry carries no mass the rounds can move (a 1-D draw at cost / eps 1e10 kept an error of 3e-3
// with every component of its 700 eps pattern balanced; session 31).
constexpr double kCarryingCut = 40.0;
// The imbalance a component must exceed to be shifted, in both solvers: a quarter of tol (below it the
// component cannot keep the solve from tol) and a tenth of the current error (one that matters there).
inline double component_min_imbalance(double tol, double err) { return std::max(0.25 * tol, 0.1 * err); }
// One tree of shift_imbalanced_component on rows 0..n-1 and columns n..n+m-1 (`comp`: each node's
// component label, a node index; `imbalance` by label): grows the component `root`, short of columns
// by more than min_imbalance, and shifts its potentials. The tree is then one component (its labels
// and imbalance updated). Returns the tree's imbalance left, `shifted` set when potentials moved.
template <typename CostRow>
double grow_component_tree(int64_t n, int64_t m, std::vector<int64_t>& comp, std::vector<double>& imbalance,
                           int64_t root, double min_imbalance, const CostRow& cost_row, double* f, double* g,
                           int64_t& rows_read, bool& shifted, bool debug, const char* columns = "columns") {
  // The tree: its nodes with the total shift at which each joined (it is shifted by what comes
  // after); slack[j] for a column outside: min over the tree's rows i of (C_ij - g_j) - (row i's best
  // inside), plus the total at i's joining, so that its current value is slack[j] - total.
  std::vector<char> in_tree(n + m, 0);
  std::vector<double> joined(n + m, 0.0), slack(m, kPosInf);
  double total = 0.0, excess = 0.0;
  int64_t outside = m, steps = 0;
  const auto take_in = [&](int64_t label) {
    for (int64_t j = 0; j < m; ++j)
      if (comp[n + j] == label) {
        in_tree[n + j] = 1;
        joined[n + j] = total;
        slack[j] = kPosInf;
        --outside;
      }
    for (int64_t i = 0; i < n; ++i) {
      if (comp[i] != label) continue;
      in_tree[i] = 1;
      joined[i] = total;
      const auto* c = cost_row(i);
      ++rows_read;
      double best_in = kPosInf;  // with the tree's columns' current potentials
      for (int64_t j = 0; j < m; ++j)
        if (in_tree[n + j]) best_in = std::min(best_in, static_cast<double>(c[j]) - (g[j] - (total - joined[n + j])));
      if (!std::isfinite(best_in)) continue;  // a row without columns inside: leads nowhere
      for (int64_t j = 0; j < m; ++j)
        if (!in_tree[n + j]) slack[j] = std::min(slack[j], static_cast<double>(c[j]) - g[j] - best_in + total);
    }
    excess += imbalance[label];
  };
  const double start = imbalance[root];
  take_in(root);
  while (excess > min_imbalance && outside > 0) {
    int64_t reach = -1;
    for (int64_t j = 0; j < m; ++j)
      if (!in_tree[n + j] && (reach < 0 || slack[j] < slack[reach])) reach = j;
    const double delta = slack[reach] - total;
    if (!std::isfinite(delta)) break;
    total += std::max(0.0, delta);
    ++steps;
    take_in(comp[n + reach]);
  }
  if (debug)
    std::fprintf(stderr, "  component short of %s by %.3e: %lld shifts (%.4g in all), tree now short by %.3e\n",
                 columns, start, static_cast<long long>(steps), total, excess);
  if (total > 0) {
    for (int64_t i = 0; i < n; ++i)
      if (in_tree[i]) f[i] += total - joined[i];
    for (int64_t j = 0; j < m; ++j)
      if (in_tree[n + j]) g[j] -= total - joined[n + j];
    shifted = true;
  }
  // The tree is one component now (its entries that joined are as tight as their rows' best).
  for (int64_t v = 0; v < n + m; ++v)
    if (in_tree[v]) comp[v] = root;
  imbalance[root] = excess;
  return excess;
}

template <typename Entries, typename CostRow, typename CostCol>
bool shift_imbalanced_component(int64_t n, int64_t m, const double* a, const double* b, double min_imbalance,
                                const Entries& entries, const CostRow& cost_row, const CostCol& cost_col, double* f,
                                double* g, bool debug) {
  std::vector<int64_t> comp(n + m);  // union-find over rows 0..n-1 and columns n..n+m-1, then labels
  std::iota(comp.begin(), comp.end(), int64_t{0});
  const auto find = [&comp](int64_t v) {
    while (comp[v] != v) v = comp[v] = comp[comp[v]];
    return v;
  };
  entries([&](int64_t i, int64_t j) {
    const int64_t r = find(i), c = find(n + j);
    if (r != c) comp[r] = c;
  });
  for (int64_t v = 0; v < n + m; ++v) comp[v] = find(v);
  std::vector<double> imbalance(n + m, 0.0);  // by component label: row mass - column mass
  for (int64_t i = 0; i < n; ++i) imbalance[comp[i]] += a[i];
  for (int64_t j = 0; j < m; ++j) imbalance[comp[n + j]] -= b[j];
  // Tree after tree, while a component stays short of columns by more than min_imbalance: a tree that
  // overshoots (takes in a component short of rows by more than it was short of columns) leaves the
  // rest of the problem short of columns elsewhere, and one tree a call had left each such
  // component to another round without progress, seconds each in the blocked mode (1,427 pixels,
  // D = 19, cost / eps 1.4e7: three calls 10 s apart; session 32). Where none is but a component is
  // short of rows by more (the excess it lacks spread over components each below min_imbalance),
  // that one grows on the transposed problem (columns as rows, cost_col(j) its rows): a 181 x 183
  // grid problem at cost / eps 1.3e9 had otherwise sat at 1.9e-3 (session 32). A later tree starts
  // from the earlier ones' potentials, and the rows and columns read are at most
  // kShiftRowReads (n + m) in all.
  constexpr int64_t kShiftRowReads = 3;
  std::vector<char> stuck(n + m, 0);
  std::vector<int64_t> comp_t;
  std::vector<double> imbalance_t;
  int64_t read = 0;
  bool shifted = false;
  for (;;) {
    int64_t most = -1, least = -1;  // the roots most short of columns and most short of rows
    for (int64_t v = 0; v < n + m; ++v) {
      if (comp[v] != v || stuck[v]) continue;
      if (most < 0 || imbalance[v] > imbalance[most]) most = v;
      if (least < 0 || imbalance[v] < imbalance[least]) least = v;
    }
    if (most < 0 || (shifted && read >= kShiftRowReads * (n + m))) break;
    if (imbalance[most] > min_imbalance) {
      if (grow_component_tree(n, m, comp, imbalance, most, min_imbalance, cost_row, f, g, read, shifted, debug) >
          min_imbalance)
        stuck[most] = 1;  // it reached every column it can: left as it is
      continue;
    }
    if (!(imbalance[least] < -min_imbalance)) break;
    // The transposed view: node v' < m is column v', node m + i is row i; a label maps the same way.
    const auto to_t = [n, m](int64_t v) { return v < n ? m + v : v - n; };
    const auto from_t = [n, m](int64_t v) { return v < m ? n + v : v - m; };
    comp_t.resize(n + m);
    imbalance_t.assign(n + m, 0.0);
    for (int64_t v = 0; v < n + m; ++v) {
      comp_t[to_t(v)] = to_t(comp[v]);
      imbalance_t[to_t(v)] = -imbalance[v];
    }
    const double left = grow_component_tree(m, n, comp_t, imbalance_t, to_t(least), min_imbalance, cost_col, g, f,
                                            read, shifted, debug, "rows");
    for (int64_t v = 0; v < n + m; ++v) {
      comp[from_t(v)] = from_t(comp_t[v]);
      imbalance[from_t(v)] = -imbalance_t[v];
    }
    if (left > min_imbalance) stuck[least] = 1;
  }
  return shifted;
}

// The best certificate of a last stage's rounds and its potentials, shared by the stored and the
// blocked solver: a stage that ends unconverged returns it when an earlier round certified better.
// Rounds that ask for a tol below what the arithmetic resolves can end worse than they began
// (float32 inputs at tol 1e-12: certified 9.1e-12 after 137 iterations, then 1.1e-7 after max_iter).
class BestCertificate {
 public:
  // After each certificate that does not end the stage.
  void keep(const SinkhornReport& rep, const double* f, int64_t n, const double* g, int64_t m) {
    if (!(rep.marginal_error < error_)) return;
    error_ = rep.marginal_error;
    transport_cost_ = rep.transport_cost;
    truncated_mass_ = rep.truncated_mass;
    joint_ = rep.joint;
    fg_.assign(f, f + n);
    fg_.insert(fg_.end(), g, g + m);
  }
  // When the stage ends: an unconverged `rep` worse than the best kept takes the best point back
  // (into f, g too); returns whether it did.
  bool restore(SinkhornReport& rep, double* f, int64_t n, double* g) {
    if (rep.converged || !(error_ < rep.marginal_error)) return false;
    std::copy(fg_.begin(), fg_.begin() + n, f);
    std::copy(fg_.begin() + n, fg_.end(), g);
    rep.marginal_error = error_;
    rep.transport_cost = transport_cost_;
    rep.truncated_mass = truncated_mass_;
    rep.joint = std::move(joint_);
    return true;
  }

 private:
  double error_ = std::numeric_limits<double>::infinity(), transport_cost_ = 0.0, truncated_mass_ = 0.0;
  std::vector<double> joint_, fg_;
};

// The threshold a dense scan compares c - T(p) against, formed in T, for the exact test
// c - p < th (c of type T, p and th double) when |c|, 2|p| and |th| add up to at most `magnitude`:
// in float the three roundings (of p, of the difference, of the threshold) are each below
// 2^-24 magnitude, so th is raised by 2^-21 magnitude. Then every entry the exact test keeps passes,
// and every entry that fails satisfies c - p >= th. In double the test is the exact one.
template <typename T>
inline T scan_threshold(double th, double magnitude) {
  return static_cast<T>(std::is_same<T, float>::value ? th + std::ldexp(magnitude, -21) : th);
}

// Exponentials are evaluated in the storage precision T (float: 8 or 16 lanes per vector op), but
// their arguments are formed in double: A_j - C_ij / eps is a small difference of values that can
// be 10^3 times larger, and forming it in float would put ~1e-4 noise on every exponent.
// A shifted sum is trusted when it lies in [kShiftedMin, inf): its largest term is then above
// ~1e-15 and every term a float exp flushes to zero (below ~e^-87) is below e^-50 of it.
constexpr double kShiftedMin = 1e-10;

// Inlined into each target clone of its callers, so that every clone vectorises it for its own ISA.
#if defined(__GNUC__)
#define SEGTRANSFER_INLINE inline __attribute__((always_inline))
#else
#define SEGTRANSFER_INLINE inline
#endif

// The exponential of a loop whose exponent is formed in E: fast_exp_lowp where that is float (the
// intermediate stages' loops, float storage only), else fast_exp.
template <typename E, typename T>
SEGTRANSFER_INLINE T stage_exp(T x) {
  if constexpr (std::is_same<E, float>::value && std::is_same<T, float>::value)
    return detail::fast_exp_lowp(x);
  else
    return detail::fast_exp(x);
}

template <typename T>
struct RowLse {
  // sum_j exp(A[col_j] - c_j * inv_eps - shift), in blocks whose partial sums in T stay exact enough.
  // E is the type the exponent is formed in: double, or float where a stage tolerates it (sum_lowp).
  template <typename E>
  SEGTRANSFER_INLINE static double shifted_sum(const T* c, const int32_t* cols, int64_t len, const E* A, E inv_eps,
                                               E shift) {
    double total = 0.0;
    constexpr int64_t kBlock = 256;
    for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
      const int64_t j1 = std::min(len, j0 + kBlock);
      T part = 0;
      if (cols == nullptr) {
#pragma omp simd reduction(+ : part)
        for (int64_t j = j0; j < j1; ++j)
          part += stage_exp<E>(static_cast<T>(A[j] - static_cast<E>(c[j]) * inv_eps - shift));
      } else {
#pragma omp simd reduction(+ : part)
        for (int64_t k = j0; k < j1; ++k)
          part += stage_exp<E>(static_cast<T>(A[cols[k]] - static_cast<E>(c[k]) * inv_eps - shift));
      }
      total += static_cast<double>(part);
    }
    return total;
  }
  static double sum(const T* c, const int32_t* cols, int64_t len, const double* A, double inv_eps, double shift) {
#ifdef SEGTRANSFER_AVX2_LSE
    // AVX2 without AVX-512 (the AVX-512 clone, measured there, stays): the compiler's AVX2 clone
    // ran fast_exp's chain two vectors at a time, latency-bound (19 % of a blocked D = 19 draw on
    // Zen 2).
    if constexpr (std::is_same<T, float>::value) {
      if (!avx512_lse_available() && cpu_has_avx2_fma())
        return cols != nullptr ? lse_sum_avx2<true, false, double>(c, cols, len, A, inv_eps, shift)
                               : lse_sum_avx2<false, false, double>(c, nullptr, len, A, inv_eps, shift);
    }
#endif
    return sum_clones(c, cols, len, A, inv_eps, shift);
  }
  SEGTRANSFER_HOT static double sum_clones(const T* c, const int32_t* cols, int64_t len, const double* A,
                                           double inv_eps, double shift) {
    return shifted_sum<double>(c, cols, len, A, inv_eps, shift);
  }
  // The exponent formed in float (Af: A in float): 16 lanes and one gather per 16 entries instead of
  // 8. Its terms reach ~10^3 at small eps, so each entry carries a relative error up to ~3e-4: only
  // for stages that stop at a loose error (see half_step).
  static double sum_lowp(const T* c, const int32_t* cols, int64_t len, const float* Af, float inv_eps, float shift) {
#ifdef SEGTRANSFER_AVX2_LSE
    if constexpr (std::is_same<T, float>::value) {
      if (avx512_lse_available())
        return cols != nullptr ? lse_sum_avx512<true>(c, cols, len, Af, inv_eps, shift)
                               : lse_sum_avx512<false>(c, nullptr, len, Af, inv_eps, shift);
      if (cpu_has_avx2_fma())
        return cols != nullptr ? lse_sum_avx2<true>(c, cols, len, Af, inv_eps, shift)
                               : lse_sum_avx2<false>(c, nullptr, len, Af, inv_eps, shift);
    }
#endif
    return sum_lowp_clones(c, cols, len, Af, inv_eps, shift);
  }
  SEGTRANSFER_HOT static double sum_lowp_clones(const T* c, const int32_t* cols, int64_t len, const float* Af,
                                                float inv_eps, float shift) {
    return shifted_sum<float>(c, cols, len, Af, inv_eps, shift);
  }

  // log sum_j exp(A[col_j] - c_j * inv_eps) over one row that stays in cache. `cols == nullptr`
  // means a dense row. A_j = other_j / eps + log w_j is formed once per half-step by the caller,
  // which leaves one gather per entry on sparse rows. `guess` (finite) is a value the result is
  // expected near (the row's own potential, -pot_i / eps, near a fixed point): the sum is then
  // taken in one pass shifted by it, and only when that over- or underflows is the row's maximum
  // found first (the safe two-pass form). The max pass does no exps yet cost 30-40 % of a dense
  // iteration (bench/RESULTS.md, roofline).
  SEGTRANSFER_HOT static double run(const T* c, const int32_t* cols, int64_t len, const double* A, double inv_eps,
                                    double guess = kNegInf) {
    if (std::isfinite(guess)) {
      const double total = sum(c, cols, len, A, inv_eps, guess);
      if (total >= kShiftedMin && total < kPosInf) return guess + std::log(total);
    }
    double mx = kNegInf;
    if (cols == nullptr) {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < len; ++j) {
        const double s = A[j] - static_cast<double>(c[j]) * inv_eps;
        mx = s > mx ? s : mx;
      }
    } else {
#pragma omp simd reduction(max : mx)
      for (int64_t k = 0; k < len; ++k) {
        const double s = A[cols[k]] - static_cast<double>(c[k]) * inv_eps;
        mx = s > mx ? s : mx;
      }
    }
    if (!(mx > kNegInf) || std::isinf(mx)) return mx;
    return mx + std::log(sum(c, cols, len, A, inv_eps, mx));
  }
};

// A_j = pot_j / eps + log_w_j, the per-column part of every exponent of a half-step.
inline void exponent_offsets(const double* pot, const double* log_w, int64_t m, double inv_eps,
                             std::vector<double>& A) {
  A.resize(m);
  for (int64_t j = 0; j < m; ++j) A[j] = pot[j] * inv_eps + log_w[j];
}

// Column log-sum-exp over a row-major matrix without transposing it: every row updates m running
// column maxima, then m running sums, both vectorised along the row (FlashAttention's trick turned
// sideways). s_ij = A_i - C_ij / eps.
template <typename T>
struct ColLse {
  SEGTRANSFER_HOT static void max_row(const T* c, int64_t m, double Ai, double inv_eps, double* mx) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const double s = Ai - static_cast<double>(c[j]) * inv_eps;
      mx[j] = s > mx[j] ? s : mx[j];
    }
  }
  // E: the type the exponent is formed in (see RowLse::shifted_sum).
  template <typename E>
  SEGTRANSFER_INLINE static void shifted_row(const T* c, int64_t m, E Ai, E inv_eps, const E* mx, T* part) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j)
      part[j] += stage_exp<E>(static_cast<T>(Ai - static_cast<E>(c[j]) * inv_eps - mx[j]));
  }
  SEGTRANSFER_HOT static void sum_row(const T* c, int64_t m, double Ai, double inv_eps, const double* mx, T* part) {
    shifted_row<double>(c, m, Ai, inv_eps, mx, part);
  }
  // The exponent in float (see RowLse::sum_lowp).
  static void sum_row_lowp(const T* c, int64_t m, float Ai, float inv_eps, const float* mx, T* part) {
#ifdef SEGTRANSFER_AVX2_LSE
    if constexpr (std::is_same<T, float>::value) {
      if (avx512_lse_available()) return col_lse_row_avx512(c, m, Ai, inv_eps, mx, part);
      if (cpu_has_avx2_fma()) return col_lse_row_avx2(c, m, Ai, inv_eps, mx, part);
    }
#endif
    sum_row_lowp_clones(c, m, Ai, inv_eps, mx, part);
  }
  SEGTRANSFER_HOT static void sum_row_lowp_clones(const T* c, int64_t m, float Ai, float inv_eps, const float* mx,
                                                  T* part) {
    shifted_row<float>(c, m, Ai, inv_eps, mx, part);
  }
  // The same for one row of a truncated kernel (CSR: `cols` distinct), its terms scattered to
  // part[cols[k]]: fused_iteration's column sums (sinkhorn.cpp) where KeptTerms does not run, or
  // where a row's float sum left range (rare: no hand-written form).
  SEGTRANSFER_HOT static void sum_sparse_row_lowp(const T* c, const int32_t* cols, int64_t len, float Ai,
                                                  float inv_eps, const float* mx, T* part) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k)
      part[cols[k]] += stage_exp<float>(static_cast<T>(Ai - static_cast<float>(c[k]) * inv_eps - mx[cols[k]]));
  }
};

// fused_iteration's column update from a row's own terms, where the hand-written loops run
// (available(): AVX-512 or AVX2 + FMA): sum() is RowLse<float>::sum_lowp on that row (the same value
// to the bit) that also keeps its terms e_k = exp(Af[cols[k]] - c[k] inv_eps - shift) (cols null: a
// dense row, Af[k]); add_scaled() then adds r e_k to part[cols[k]] (part[k]). A column's term at the
// row's new potential is e_k times a per-row factor r and a per-column constant, so one exponential
// per entry serves both half-steps (elsewhere the column update recomputes it,
// ColLse::sum_sparse_row_lowp, whose AVX2 clone gathers and scatters lane by lane: 3.9 ns an entry
// on Zen 2 against 1.0 for add_scaled's scalar read-modify-writes, bench/RESULTS.md session 33).
struct KeptTerms {
  static bool available() {
#ifdef SEGTRANSFER_AVX512_LSE
    return avx512_lse_available() || cpu_has_avx2_fma();
#else
    return false;
#endif
  }
  static double sum(const float* c, const int32_t* cols, int64_t len, const float* Af, float inv_eps, float shift,
                    float* terms) {
#ifdef SEGTRANSFER_AVX512_LSE
    if (avx512_lse_available())
      return cols != nullptr ? lse_sum_avx512<true, true>(c, cols, len, Af, inv_eps, shift, terms)
                             : lse_sum_avx512<false, true>(c, nullptr, len, Af, inv_eps, shift, terms);
    return cols != nullptr ? lse_sum_avx2<true, true>(c, cols, len, Af, inv_eps, shift, terms)
                           : lse_sum_avx2<false, true>(c, nullptr, len, Af, inv_eps, shift, terms);
#else
    (void)c, (void)cols, (void)len, (void)Af, (void)inv_eps, (void)shift, (void)terms;
    return std::numeric_limits<double>::quiet_NaN();
#endif
  }
  // sum() and add_scaled() on a CSR row through its 8-column blocks (BlockIndex, pattern_scan.hpp:
  // nb blocks, first columns `bcol`, lanes `bmask`), where blocks_available(): the same values to
  // the bit, the row's potentials gathered a block at a time (to Ag, room for len + 8) and its terms
  // added a block at a time; Af and part are padded to a multiple of 8 columns, terms has room for
  // len + 8. Wherever AVX2 runs, AVX-512 included: 1.47 -> ~1.0 ns an entry on Zen 2 for the pair
  // (bench/RESULTS.md, session 34), and on Zen 5 faster than AVX-512's own gathers and scatters
  // (sum's lse_sum_avx512 on the CSR row, scatter_scaled_avx512), the packed row then summed by
  // sum's own dense AVX-512 loop: K = 10 on two threads took 14.2 -> 13.1 s at D = 256 and 6.3 ->
  // 5.8 s at D = 19, the same iterations and scores (bench/RESULTS.md, session 42).
  static bool blocks_available() {
#ifdef SEGTRANSFER_AVX512_LSE
    return cpu_has_avx2_fma();
#else
    return false;
#endif
  }
  static double sum_blocks(const float* c, int64_t len, const int32_t* bcol, const uint8_t* bmask, int64_t nb,
                           const float* Af, float inv_eps, float shift, float* terms, float* Ag) {
#ifdef SEGTRANSFER_AVX512_LSE
    gather_blocks_avx2(bcol, bmask, nb, Af, Ag);
    // The packed row through sum()'s own dense loop, so that both give the same bits.
    if (avx512_lse_available()) return lse_sum_avx512<false, true>(c, nullptr, len, Ag, inv_eps, shift, terms);
    return lse_sum_avx2<false, true>(c, nullptr, len, Ag, inv_eps, shift, terms);
#else
    (void)c, (void)len, (void)bcol, (void)bmask, (void)nb, (void)Af, (void)inv_eps, (void)shift, (void)terms, (void)Ag;
    return std::numeric_limits<double>::quiet_NaN();
#endif
  }
  static void add_scaled_blocks(const float* terms, const int32_t* bcol, const uint8_t* bmask, int64_t nb, float r,
                                float* part) {
#ifdef SEGTRANSFER_AVX512_LSE
    scatter_blocks_avx2(terms, bcol, bmask, nb, r, part);
#else
    (void)terms, (void)bcol, (void)bmask, (void)nb, (void)r, (void)part;
#endif
  }
  static void add_scaled(const float* terms, const int32_t* cols, int64_t len, float r, float* part) {
    if (cols == nullptr) return add_scaled_dense(terms, len, r, part);
#ifdef SEGTRANSFER_AVX512_LSE
    if (avx512_lse_available()) return scatter_scaled_avx512(terms, cols, len, r, part);
    if (cpu_has_avx2_fma()) return scatter_scaled_avx2(terms, cols, len, r, part);
#endif
    for (int64_t k = 0; k < len; ++k) part[cols[k]] += r * terms[k];
  }
  SEGTRANSFER_HOT static void add_scaled_dense(const float* terms, int64_t len, float r, float* part) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) part[k] += r * terms[k];
  }
};

inline void lse_add(double& acc, double v) {
  if (v == kNegInf) return;
  acc = acc == kNegInf ? v : std::max(acc, v) + std::log1p(std::exp(-std::fabs(acc - v)));
}

// Newton's method on the coarse problem of coarse_shift: scalings eu (R), ev (Q) such that
// P = diag(eu) K diag(ev) has row sums Aw and column sums Bw (rows and columns not `on` are left
// at their scaling and carry no mass). The same elimination as newton_polish's (sinkhorn.cpp), on
// dense R x Q matrices: S du = r - P D2^-1 s with S = D1 - P D2^-1 P^T, dv = D2^-1 (s - P^T du),
// and a backtracking search on the concave dual <Aw, u> + <Bw, v> - sum(P) (or on the L1 error,
// whose decrease is the test once the dual's gain is at rounding level). Why: the linear-domain
// Sinkhorn it precedes took ~870 sweeps a call on the benchmark's groups (54 x 189), 8 ms a call
// and 3 % of a K = 10 call's time; Newton converges in a few steps. Returns true when the L1
// marginal error reached `tol`; otherwise eu, ev hold the last accepted point, which the caller's
// Sinkhorn sweeps finish from.
inline bool coarse_newton(const std::vector<double>& K, const std::vector<double>& Aw, const std::vector<double>& Bw,
                          const std::vector<char>& row_on, const std::vector<char>& col_on, double tol,
                          std::vector<double>& eu, std::vector<double>& ev) {
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const int R = static_cast<int>(eu.size()), Q = static_cast<int>(ev.size());
  const Eigen::Map<const Mat> Km(K.data(), R, Q);
  Eigen::VectorXd u(R), v(Q), A(R), B(Q), on_r(R), on_c(Q);
  for (int c = 0; c < R; ++c) {
    u[c] = std::log(eu[c]);
    A[c] = row_on[c] ? Aw[c] : 0.0;
    on_r[c] = row_on[c] ? 1.0 : 0.0;
  }
  for (int d = 0; d < Q; ++d) {
    v[d] = std::log(ev[d]);
    B[d] = col_on[d] ? Bw[d] : 0.0;
    on_c[d] = col_on[d] ? 1.0 : 0.0;
  }
  Mat P;
  Eigen::VectorXd rs, cs;
  auto evaluate = [&](const Eigen::VectorXd& uu, const Eigen::VectorXd& vv, double& dual, double& err) {
    P = uu.array().exp().matrix().asDiagonal() * Km * vv.array().exp().matrix().asDiagonal();
    rs = P.rowwise().sum();
    cs = P.colwise().sum().transpose();
    dual = A.dot(uu) + B.dot(vv) - rs.sum();
    err = (on_r.array() * (A - rs).array().abs()).sum() + (on_c.array() * (B - cs).array().abs()).sum();
    return std::isfinite(dual) && std::isfinite(err);
  };
  double dual = 0.0, err = 0.0;
  if (!evaluate(u, v, dual, err)) return false;
  Eigen::LDLT<Eigen::MatrixXd> fact;
  for (int step = 0; step < 50; ++step) {
    if (err <= tol) break;
    const Eigen::VectorXd r = on_r.cwiseProduct(A - rs), s = on_c.cwiseProduct(B - cs);
    Eigen::VectorXd d2inv(Q);
    for (int d = 0; d < Q; ++d) d2inv[d] = col_on[d] && cs[d] > 0 ? 1.0 / cs[d] : 0.0;
    const Mat W = P * d2inv.cwiseSqrt().asDiagonal();
    // Only the lower triangle, which is all LDLT reads: half the flops of W W^T, the bulk of a
    // step (R^2 Q; 5 % of a K = 10 call with 150 x 370 groups).
    Eigen::MatrixXd S = Eigen::MatrixXd::Zero(R, R);
    S.selfadjointView<Eigen::Lower>().rankUpdate(W, -1.0);
    S.diagonal() += rs;
    // A relative ridge keeps S definite (its constant null vector, and weakly linked groups).
    const double ridge = 1e-12 * std::max(rs.maxCoeff(), 1e-300);
    for (int c = 0; c < R; ++c) S(c, c) += row_on[c] ? ridge : 1.0;
    fact.compute(S);
    if (fact.info() != Eigen::Success) return false;
    const Eigen::VectorXd du = on_r.cwiseProduct(fact.solve(r - P * d2inv.cwiseProduct(s)));
    const Eigen::VectorXd dv = d2inv.cwiseProduct(s - P.transpose() * du);
    const double slope = r.dot(du) + s.dot(dv);
    if (!(slope > 0) || !du.allFinite() || !dv.allFinite()) return false;
    // After an accepted search P, rs and cs describe the new point (its evaluation was the last);
    // after a failed one they are stale, and only u, v and err, unchanged, are used below.
    const Eigen::VectorXd u0 = u, v0 = v;
    const double dual0 = dual, err0 = err;
    bool accepted = false;
    for (double t = 1.0; t > 1e-8; t *= 0.5) {
      double dual_t = 0.0, err_t = 0.0;
      if (evaluate(u0 + t * du, v0 + t * dv, dual_t, err_t) && (dual_t >= dual0 + 1e-4 * t * slope || err_t < err0)) {
        u = u0 + t * du;
        v = v0 + t * dv;
        dual = dual_t;
        err = err_t;
        accepted = true;
        break;
      }
    }
    if (!accepted) break;
  }
  // The gauge: (u + k, v - k) is the same plan. Sinkhorn's sweeps, which start from ev = 1, leave
  // the columns' mean shift near 0, and so does this: the shift then goes where the mass moved,
  // and the potentials do not drift by a constant from one balancing to the next.
  const double k = B.dot(v) / std::max(B.sum(), 1e-300);
  u.array() += k * on_r.array();
  v.array() -= k * on_c.array();
  for (int c = 0; c < R; ++c) eu[c] = std::exp(u[c]);
  for (int d = 0; d < Q; ++d) ev[d] = std::exp(v[d]);
  return err <= tol;
}

// The coarse step of class balancing (see balance_classes in sinkhorn.cpp): given logM (R x Q), the
// log of the plan's mass between row group c and column group d at (f, g), shifts f and g by the
// exact per-group constants that maximise the dual over such shifts. Returns false (and changes
// nothing) if the coarse problem is degenerate (a group without mass, non-finite masses).
// `row_shift` (optional): receives each row group's shift of f, divided by eps.
inline bool coarse_shift(const std::vector<double>& logM, const double* log_a, const double* log_b, int64_t n,
                         double eps, const PlanClasses& cls, double* f, double* g,
                         std::vector<double>* row_shift = nullptr) {
  const int R = cls.row_classes, Q = cls.col_classes;
  std::vector<double> logA(R, kNegInf), logB(Q, kNegInf);
  for (int64_t i = 0; i < n; ++i) lse_add(logA[cls.row_class[i]], log_a[i]);
  for (int d = 0; d < Q; ++d)
    for (int64_t j = cls.col_class_start[d]; j < cls.col_class_start[d + 1]; ++j) lse_add(logB[d], log_b[j]);
  for (double v : logM)
    if (std::isnan(v) || v == kPosInf) return false;
  // A class with mass on one side needs some plan mass to rescale; an empty class (no points) is
  // left alone.
  std::vector<double> u(R, 0.0), v(Q, 0.0);
  std::vector<char> row_on(R), col_on(Q);
  for (int c = 0; c < R; ++c) {
    double mx = kNegInf;
    for (int d = 0; d < Q; ++d) mx = std::max(mx, logM[c * Q + d]);
    row_on[c] = logA[c] > kNegInf;
    if (row_on[c] && mx == kNegInf) return false;
  }
  for (int d = 0; d < Q; ++d) {
    double mx = kNegInf;
    for (int c = 0; c < R; ++c) mx = std::max(mx, logM[c * Q + d]);
    col_on[d] = logB[d] > kNegInf;
    if (col_on[d] && mx == kNegInf) return false;
  }
  // Sinkhorn on the R x Q problem (u = alpha / eps, v = beta / eps), in the linear domain on M scaled
  // by its largest entry (couplings below e^-700 of it vanish, and with them nothing that matters; a
  // group left without any coupling makes the step decline). Each sweep is itself an exact
  // coordinate ascent, so stopping early still helps.
  double top = kNegInf;
  for (double v : logM) top = std::max(top, v);
  std::vector<double> K(logM.size()), eu(R, 1.0), ev(Q, 1.0), Ktu(Q), Aw(R, 0.0), Bw(Q, 0.0);
  for (size_t k = 0; k < logM.size(); ++k) K[k] = std::exp(logM[k] - top);
  for (int c = 0; c < R; ++c) Aw[c] = row_on[c] ? std::exp(logA[c]) : 0.0;
  for (int d = 0; d < Q; ++d) Bw[d] = col_on[d] ? std::exp(logB[d]) : 0.0;
  for (int c = 0; c < R; ++c) {
    double rs = 0.0;
    for (int d = 0; d < Q; ++d) rs += K[c * Q + d];
    if (row_on[c] && !(rs > 0)) return false;
  }
  const bool solved = coarse_newton(K, Aw, Bw, row_on, col_on, 1e-12, eu, ev);
  for (int it = 0; it < (solved ? 0 : 5000); ++it) {
    for (int c = 0; c < R; ++c) {
      if (!row_on[c]) continue;
      double acc = 0.0;
      for (int d = 0; d < Q; ++d) acc += K[c * Q + d] * ev[d];
      eu[c] = Aw[c] / acc;
    }
    std::fill(Ktu.begin(), Ktu.end(), 0.0);
    for (int c = 0; c < R; ++c)
      for (int d = 0; d < Q; ++d) Ktu[d] += K[c * Q + d] * eu[c];
    double err = 0.0;
    for (int d = 0; d < Q; ++d) {
      if (!col_on[d]) continue;
      if (!(Ktu[d] > 0)) return false;
      err += std::fabs(Ktu[d] * ev[d] - Bw[d]);  // before this update
      ev[d] = Bw[d] / Ktu[d];
    }
    if (err < 1e-12) break;
  }
  for (int c = 0; c < R; ++c) u[c] = row_on[c] ? std::log(eu[c]) - top : 0.0;
  for (int d = 0; d < Q; ++d) v[d] = col_on[d] ? std::log(ev[d]) : 0.0;
  for (int c = 0; c < R; ++c)
    if (!std::isfinite(u[c])) return false;
  for (int d = 0; d < Q; ++d)
    if (!std::isfinite(v[d])) return false;
  for (int64_t i = 0; i < n; ++i) f[i] += eps * u[cls.row_class[i]];
  for (int d = 0; d < Q; ++d)
    for (int64_t j = cls.col_class_start[d]; j < cls.col_class_start[d + 1]; ++j) g[j] += eps * v[d];
  if (row_shift != nullptr) row_shift->swap(u);
  return true;
}


// One row of the dense plan, p_j = exp(base + (g_j - c_j) / eps + log b_j), for summarize_rows:
// adds p to col[j] and each column class's mass to joint_row[class], p c to wd; returns the row's
// mass. Runs of kChunk columns whose largest exponent (from gb_j = g_j / eps + log b_j) is below
// kNegligible are skipped: an entry there is below e^-100 = 4e-44, so even 10^10 of them add less
// than 1e-33 to sums that are compared at 1e-16 of the mass, while at the paper's eps most of a
// row lies far beyond that and its exponentials were the certificate's whole cost (perf: 1.1 s of
// an N = 10^4, D = 256 draw on one thread). Columns are grouped by class and k-means cell, so the
// mass of a row sits in a few runs.
template <typename T>
struct SummaryRow {
  static constexpr int64_t kChunk = 32;
  static constexpr double kNegligible = -100.0;
  SEGTRANSFER_HOT static double run(const T* c, double base, const double* g, const double* log_b, const double* gb,
                                    double inv_eps, const int64_t* col_class_start, int col_classes, double* col,
                                    double* joint_row, double& wd) {
    double row_total = 0.0, w = 0.0;
    for (int cc = 0; cc < col_classes; ++cc) {
      double mass = 0.0, wc = 0.0;
      for (int64_t j0 = col_class_start[cc]; j0 < col_class_start[cc + 1]; j0 += kChunk) {
        const int64_t j1 = std::min(j0 + kChunk, col_class_start[cc + 1]);
        double top = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : top)
        for (int64_t j = j0; j < j1; ++j) top = std::max(top, gb[j] - static_cast<double>(c[j]) * inv_eps);
        if (base + top < kNegligible) continue;  // a NaN base or gb (made +inf) is not skipped
#pragma omp simd reduction(+ : mass, wc)
        for (int64_t j = j0; j < j1; ++j) {
          const double cij = static_cast<double>(c[j]);
          const double p = detail::fast_exp(base + (g[j] - cij) * inv_eps + log_b[j]);
          col[j] += p;
          mass += p;
          wc += p * cij;
        }
      }
      joint_row[cc] += mass;
      row_total += mass;
      w += wc;
    }
    wd += w;
    return row_total;
  }
};

// Dense plan statistics (PlanSummary) in one streaming pass from the potentials, over cost rows
// that `rows(i0, i1, buf)` provides: a pointer to rows [i0, i1) (row-major, m columns), either into
// a stored cost or recomputed into `buf`. Asked for at most kPanel rows at a time.
template <typename T, typename Rows>
PlanSummary summarize_rows(int64_t n, int64_t m, const Rows& rows, const double* a, const double* b,
                           const double* f, const double* g, double eps, const int32_t* row_class,
                           int row_classes, const int64_t* col_class_start, int col_classes, int nt) {
  constexpr int64_t kPanel = 32;
  const double inv_eps = 1.0 / eps;
  std::vector<double> log_b(m), gb(m);
  for (int64_t j = 0; j < m; ++j) {
    log_b[j] = std::log(b[j]);
    gb[j] = g[j] * inv_eps + log_b[j];
    if (std::isnan(gb[j])) gb[j] = std::numeric_limits<double>::infinity();  // never skipped: NaN shows
  }

  // Rows are cut into a fixed number of blocks, independent of the thread count, and the blocks'
  // partial results are added in order: the summary is bit-identical for any number of threads.
  const int64_t nblocks = std::min<int64_t>(n, 64);
  std::vector<double> col_part(static_cast<size_t>(nblocks) * m, 0.0);
  std::vector<double> joint_part(static_cast<size_t>(nblocks) * row_classes * col_classes, 0.0);
  std::vector<double> cost_part(nblocks, 0.0), row_err_part(nblocks, 0.0);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t i0 = n * blk / nblocks, i1 = n * (blk + 1) / nblocks;
    double* colp = col_part.data() + blk * m;
    double* jp = joint_part.data() + blk * row_classes * col_classes;
    double wd = 0.0, rerr = 0.0;
    std::vector<T> buf;
    const T* panel = nullptr;
    for (int64_t i = i0; i < i1; ++i) {
      if ((i - i0) % kPanel == 0) panel = rows(i, std::min(i1, i + kPanel), buf);
      const T* c = panel + ((i - i0) % kPanel) * m;
      const double base = std::log(a[i]) + f[i] * inv_eps;
      const double row_total = SummaryRow<T>::run(c, base, g, log_b.data(), gb.data(), inv_eps, col_class_start,
                                                  col_classes, colp, jp + row_class[i] * col_classes, wd);
      rerr += std::fabs(row_total - a[i]);
    }
    cost_part[blk] = wd;
    row_err_part[blk] = rerr;
  }
  PlanSummary out;
  out.joint.assign(static_cast<size_t>(row_classes) * col_classes, 0.0);
  double err = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    out.transport_cost += cost_part[blk];
    err += row_err_part[blk];
    const double* jp = joint_part.data() + blk * row_classes * col_classes;
    for (size_t k = 0; k < out.joint.size(); ++k) out.joint[k] += jp[k];
  }
  for (int64_t j = 0; j < m; ++j) {
    double col = 0.0;
    for (int64_t blk = 0; blk < nblocks; ++blk) col += col_part[blk * m + j];
    err += std::fabs(col - b[j]);
  }
  out.marginal_error = err;
  return out;
}

// Newton's line search (both solvers) accepts a step that gains on the dual objective though it
// raises the marginal error (far from the solution the full step overshoots in L1 while moving mass
// between clusters), but by at most this factor: the global phase's overshoots were below 2x on
// the benchmark's draws, while near the solution, with every entry in CG and no damping, full steps
// that gained on the dual raised the error 14-28x (6e-7 -> 1.7e-5), each costing a 200-900 ms step
// to undo (N = 10^4, D = 256: one draw took 20 Newton steps instead of 16; bench/RESULTS.md,
// session 20). Beyond it the step is shortened, and the damping then rises.
constexpr double kAscentOvershoot = 4.0;

// The acceptance of such a step, shared by both solvers' line searches: `gain` is the trial's dual
// gain over eps, `t_slope` the step length times the direction's slope, `err_try` and `err` the
// trial's and the current marginal errors.
inline bool dual_ascent_accepted(double gain, double t_slope, double err_try, double err) {
  return gain >= 1e-4 * t_slope && gain > 1e-12 && err_try <= kAscentOvershoot * err;
}

// The extra coarse vector of Newton's preconditioner from the previous step's direction d (n rows,
// groups row_class[i] < groups): d with each group's mean removed, so that it adds a direction the
// groups' indicators do not span, scaled to unit length. Returns false (v unusable) where nothing
// is left, e.g. d constant on every group. Why: after the groups' coarse correction, the slow
// modes CG still has to resolve change little from one Newton step to the next, and the last
// direction carries them. On the benchmark's K = 10 calls (N = 10^4, eps = 0.1) CG took 1,938 ->
// 1,508 iterations at D = 256, for one more operator product a step (bench/RESULTS.md, session 45).
inline bool deflation_vector(const std::vector<double>& d, const int32_t* row_class, int groups,
                             std::vector<double>& v) {
  const int64_t n = static_cast<int64_t>(d.size());
  std::vector<double> sum(groups, 0.0), count(groups, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    sum[row_class[i]] += d[i];
    count[row_class[i]] += 1.0;
  }
  v.resize(n);
  double before = 0.0, after = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = d[i] - sum[row_class[i]] / count[row_class[i]];
    before += d[i] * d[i];
    after += v[i] * v[i];
  }
  // Below 1e-12 of d's length the remainder is the means' rounding, not a direction.
  if (!(after > 1e-24 * before) || !std::isfinite(after)) return false;  // also false for NaN
  const double scale = 1.0 / std::sqrt(after);
  for (double& e : v) e *= scale;
  return true;
}

// The two-level preconditioner of Newton's CG (see newton_polish in sinkhorn.cpp): z = D^-1 r +
// Z E^-1 Z^T r, with Z the row groups' indicator vectors and E = Z^T S Z, which each solver
// assembles in `E` (groups x groups) from its own plan before factor(), after start(). With the
// previous step's direction, Z gains one more column, a dense vector v (`extra`, deflation_vector):
// E then has a last row and column, (Z_groups^T S v, v^T S v), which start() fills.
struct TwoLevelPreconditioner {
  Eigen::MatrixXd E;
  Eigen::LDLT<Eigen::MatrixXd> fact;
  std::vector<double> extra, s_extra;  // v and S v
  bool with_extra = false;

  // E for this step: zeroed for `groups` groups (row_class: each row's group), plus v's row and
  // column where `last_dir` (the previous step's direction, empty before the first) gives one.
  // schur(v, out) sets out = S v and returns v . out. The solver then adds the groups' block.
  template <typename Schur>
  void start(int groups, const int32_t* row_class, const std::vector<double>& last_dir, const Schur& schur) {
    with_extra = !last_dir.empty() && deflation_vector(last_dir, row_class, groups, extra);
    const int k = with_extra ? 1 : 0;
    E.setZero(groups + k, groups + k);
    if (!with_extra) return;
    s_extra.resize(extra.size());
    E(groups, groups) = schur(extra, s_extra);
    for (size_t i = 0; i < extra.size(); ++i) E(row_class[i], groups) += s_extra[i];
    E.row(groups).head(groups) = E.col(groups).head(groups).transpose();
  }

  void factor() {
    // Without damping the constant vector is a null vector of S (and of E): a relative ridge keeps
    // the factorisation defined; CG only ever sees right-hand sides orthogonal to it.
    const double ridge = 1e-10 * E.diagonal().cwiseAbs().maxCoeff();
    E.diagonal().array() += ridge;
    fact.compute(E);
  }
  // z = dinv .* r, plus the coarse correction when `coarse` (row_class: each row's group).
  void apply(const std::vector<double>& r, std::vector<double>& z, const std::vector<double>& dinv, bool coarse,
             const int32_t* row_class) const {
    const int64_t n = static_cast<int64_t>(r.size());
    for (int64_t i = 0; i < n; ++i) z[i] = dinv[i] * r[i];
    if (!coarse) return;
    Eigen::VectorXd zr = Eigen::VectorXd::Zero(E.rows());
    for (int64_t i = 0; i < n; ++i) zr[row_class[i]] += r[i];
    const int64_t last = E.rows() - 1;
    if (with_extra) {
      double d = 0.0;
      for (int64_t i = 0; i < n; ++i) d += extra[i] * r[i];
      zr[last] = d;
    }
    zr = fact.solve(zr);
    for (int64_t i = 0; i < n; ++i) z[i] += zr[row_class[i]];
    if (with_extra)
      for (int64_t i = 0; i < n; ++i) z[i] += zr[last] * extra[i];
  }
};

// Newton's inner solve in both solvers: preconditioned conjugate gradients on S x = rhs from x = 0,
// until |residual|^2 <= tol2, a direction of non-positive curvature, rz <= 0, max_cg iterations, or
// stop() (checked before each iteration). apply(v, out) sets out = S v and returns v . out;
// precondition(r, z); tick(cg) after each iteration's update (the callers poll there). res, dir,
// q, z: work vectors of rhs's size. Sums in a fixed order. Returns the iterations taken.
template <typename Apply, typename Precondition, typename Stop, typename Tick>
int solve_cg(const std::vector<double>& rhs, double tol2, int max_cg, const Apply& apply,
             const Precondition& precondition, const Stop& stop, const Tick& tick, std::vector<double>& x,
             std::vector<double>& res, std::vector<double>& dir, std::vector<double>& q, std::vector<double>& z) {
  const int64_t n = static_cast<int64_t>(rhs.size());
  double rz = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = 0.0;
    res[i] = rhs[i];
  }
  precondition(res, z);
  for (int64_t i = 0; i < n; ++i) {
    dir[i] = z[i];
    rz += res[i] * z[i];
  }
  int cg = 0;
  for (; cg < max_cg && rz > 0 && !stop(); ++cg) {
    const double pq = apply(dir, q);
    if (!(pq > 0)) break;
    const double alpha = rz / pq;
    double rr = 0.0, rz_new = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      x[i] += alpha * dir[i];
      res[i] -= alpha * q[i];
      rr += res[i] * res[i];
    }
    tick(cg);
    if (rr <= tol2) return cg + 1;
    precondition(res, z);
    for (int64_t i = 0; i < n; ++i) rz_new += res[i] * z[i];
    const double beta = rz_new / rz;
    rz = rz_new;
    for (int64_t i = 0; i < n; ++i) dir[i] = z[i] + beta * dir[i];
  }
  return cg;
}

// An upper bound on |S_all x - S_op x|_2, where Newton's Schur operator S = (1 + lambda) D1 - P D2^-1 P^T
// (newton_polish, sinkhorn.cpp) is formed from all of a pattern's plan entries (S_all) or from only
// those its CG operator keeps (S_op: CSR rows ptr / col / val, the values as stored, in float). d1,
// d2 are the diagonal's sums, which include every entry; inv_c_j = 1 / ((1 + lambda) d2_j), or 0;
// op_col = P_op^T 1; w_op = inv_c * (P_op^T x). The entries left out hold row masses dr_i and column
// masses dc_j (the sums less the operator's, plus float's rounding of each kept value), and
//   (S_all x - S_op x)_i = -sum_j P_out,ij w_all,j - sum_j P_op,ij (w_all,j - w_op,j),
// with |w_all - w_op|_j <= rho_j |x|_inf, rho_j = inv_c_j dc_j, so
//   |.|_i <= dr_i (|w_op|_inf + max_j rho_j |x|_inf) + sum_j P_op,ij rho_j |x|_inf.
// Lets Newton skip its product with every entry where the operator's left-out mass cannot matter.
// `rho`: work space of m values.
inline double left_out_product_bound(const int64_t* ptr, const int32_t* col, const float* val, int64_t n, int64_t m,
                                     const double* d1, const double* d2, const double* inv_c, const double* op_col,
                                     const double* x, const double* w_op, std::vector<double>& rho) {
  // Each kept value's rounding to float (2^-24 relative), and the sums' own (far smaller).
  constexpr double kRounding = 1.2e-7;
  rho.resize(m);
  double xmax = 0.0, wmax = 0.0, rho_max = 0.0;
  for (int64_t i = 0; i < n; ++i) xmax = std::max(xmax, std::fabs(x[i]));
  for (int64_t j = 0; j < m; ++j) {
    wmax = std::max(wmax, std::fabs(w_op[j]));
    rho[j] = (std::max(0.0, d2[j] - op_col[j]) + kRounding * d2[j]) * inv_c[j];
    rho_max = std::max(rho_max, rho[j]);
  }
  wmax += rho_max * xmax;
  double sum2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double op_row = 0.0, moved = 0.0;
    for (int64_t k = ptr[i]; k < ptr[i + 1]; ++k) {
      op_row += static_cast<double>(val[k]);
      moved += static_cast<double>(val[k]) * rho[col[k]];
    }
    const double dr = std::max(0.0, d1[i] - op_row) + kRounding * d1[i];
    const double bound = dr * wmax + moved * xmax;
    sum2 += bound * bound;
  }
  return std::sqrt(sum2);
}

}  // namespace
}  // namespace segtransfer
