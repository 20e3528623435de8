// Entropic optimal transport between two point clouds, solved by log-domain Sinkhorn with
// epsilon-scaling and a truncated (sparse) kernel at small epsilon.
//
// Convention (the one users see): pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps), C_ij = |x_i - y_j|^2.
#pragma once
#include <Eigen/Core>
#include <cstdint>
#include <functional>
#include <vector>

namespace segtransfer {

template <typename T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct SinkhornOptions {
  double epsilon = 0.1;
  double tol = 1e-6;          // stop when ||pi 1 - a||_1 + ||pi^T 1 - b||_1 <= tol
  int64_t max_iter = 20000;   // Sinkhorn iterations (two half-steps each), all stages together
  double timeout = 0.0;       // seconds; <= 0 means none. Reached: stop, report not converged
  bool eps_scaling = true;    // anneal epsilon geometrically from the cost's scale
  double scaling_factor = 0.5;  // epsilon ratio between two stages
  double stage_tol = 1e-2;    // marginal error at which an intermediate stage hands over
  double truncation = 30.0;   // keep kernel entries with C - f - g < truncation * eps; <= 0: dense
  // The same for the intermediate stages, which stop at stage_tol (1e-2): a dropped entry is below
  // a_i b_j e^-10, so row i loses less than e^-10 = 4.5e-5 of its mass a_i (near the stage's fixed
  // point), 2e-4 of stage_tol in L1 over all rows and columns. 10 rather than 15: the intermediate
  // patterns thin by 10-35 %, same iterations, a draw 5-8 % faster at N = 10^4 (RESULTS.md,
  // session 15); below 10 the patterns hardly thin further (they keep 5 eps of slack).
  double stage_truncation = 10.0;
  // Above this kernel density the dense loop is used. Sparse rows cost ~2x a dense entry, but only
  // a sparse last stage gets Newton steps: at D = 256, eps = 0.1 the kernel holds 16-21 % of the
  // entries and a dense last stage took > 5,000 plain iterations where the sparse one took 14.
  // 0.35 rather than 0.5: as fast at N = 10^4 (9.0 vs 10.2 s at D = 19, 14.6 vs 15.8 s at D = 256),
  // and the two patterns a stage change holds at once stay far smaller (N = 3 x 10^4: 16 GB peak
  // at 0.5). The last stage, up to 10^8 entries, keeps a pattern up to 0.5 (kLastStageDensity,
  // sinkhorn.cpp: at eps = 1, D = 256 its kernel holds ~41 %, and dense it crawled).
  double max_density = 0.35;
  // A last stage still too dense for a pattern (up to 10^8 entries) that has not converged after
  // this many dense Sinkhorn iterations starts again on a denser pattern with Newton (sinkhorn.cpp).
  // 10: enough for the loose-tol solves that converge dense in a few iterations; a crawling stage
  // then costs ~2 Newton steps before Newton takes over (200 had N = 6,000, D = 256 at eps = 1 run
  // 230-325 iterations, 6-10 s a draw, against 97-102 and 1.8 s).
  int64_t dense_last_iterations = 10;
  // Upper bound on the adaptive over-relaxation factor omega in f <- f + omega (f_new - f);
  // 1 gives plain Sinkhorn.
  double overrelaxation = 1.9;
  // Every few iterations, shift the potentials by the exact per-group constants that balance the
  // plan's mass between groups of points (sinkhorn_log's `groups`); the Newton preconditioner uses
  // the same groups. transport_points and otce make the groups (k-means cells, inside each class
  // for otce) from 10^6 entries up; false turns both the grouping and the balancing off.
  bool class_balance = true;
  // float storage only: the half-steps of intermediate stages (dense, sparse and blocked, the
  // multiscale subsample's too) form their exponents in float (16 lanes, half the gathered bytes), each entry
  // then off by up to ~3e-4 relative, far inside the stage_tol those stages stop at; so do the last
  // stage's Sinkhorn phases that only hand over to Newton (at newton_switch). Newton, any phase
  // aimed at tol and every certificate stay in double. Same iterations and scores on the benchmark's
  // draws; K = 10 at D = 256 131 -> 122 s (RESULTS.md, session 6). Only where float resolves the
  // stage's exponents (float_exponents_fit, kernels.hpp: their magnitude up to ~1.7e4); beyond,
  // in double (large features had stalled those stages; RESULTS.md, session 17).
  bool float_stage_exponents = true;
  // Each stage starts from the previous two stages' potentials extrapolated linearly in epsilon
  // (scaled by this factor; 0: from the previous stage's end). See StageExtrapolation, kernels.hpp.
  double stage_extrapolation = 1.0;
  bool newton = true;          // finish the last stage with Newton-CG steps on the sparse plan
  // With newton: the schedule leaves out the stage at epsilon / scaling_factor, so the last step
  // spans two factors (epsilon / scaling_factor^2 -> epsilon). That stage ran Sinkhorn down to
  // stage_tol on a pattern nearly as large as the last one's (17 iterations of a D = 19 draw), to
  // save Newton ~1 step from a start twice as far; K = 10 at N = 10^4 took 4.5 % (D = 19) and 2 %
  // (D = 256) less time without it (bench/RESULTS.md, session 38). Leaving out two stages was slower.
  bool newton_long_last_step = true;
  double newton_switch = 1e-1;  // Sinkhorn hands over to Newton below this marginal error
  // Newton's CG operator leaves out plan entries below this fraction of the smallest marginal mass
  // (0: every entry); the residuals, the line search and the certificate use them all. See
  // newton_polish (sinkhorn.cpp). The blocked solver keeps its own rule (entries below 20 eps).
  double newton_cg_floor = 1e-6;
  // Dense early stages run on a subsample of this many points per side (0: off); see sinkhorn.cpp.
  int64_t multiscale_points = 2000;
  // ... down to this multiple of the subsample's resolution (see sinkhorn.cpp), not below.
  double multiscale_resolution = 2.0;
  // Marginal error at which the full problem's first stage after a multiscale start hands over
  // (the other intermediate stages stop at stage_tol); see sinkhorn.cpp.
  double handover_tol = 3e-2;
  // ... and its truncation (stored solver), where its kernel at stage_truncation would be sparse: it stops
  // at handover_tol (3e-2), where a dropped entry below a_i b_j e^-5 costs row i < e^-5 = 6.7e-3 of
  // its mass (1.3e-2 in L1, against 3e-2), and the next stage filters or rebuilds its own pattern.
  // Its pattern (~24 % of the entries against ~31 % at N = 10^4, D = 19) is then built and iterated
  // faster: K = 10 took 3-5 % less time at D = 19 (RESULTS.md, session 38). Not where the usual
  // kernel is too dense: a stage at D = 256 that it turned sparse at 33 % density was slower.
  double handover_truncation = 5.0;
  // The float iterations that end a block of the intermediate stages balance the classes within
  // themselves, between their row and column halves, instead of in a pass of their own (the
  // tests compare both).
  bool fold_balancing = true;
  bool stop_when_sparse = false;  // internal: return at the first stage with a sparse kernel
  double stop_below = 0.0;        // internal: ... or at the first stage with epsilon below this
  double schedule_from = 0.0;     // internal: first stage epsilon (0: the largest cost)
  // transport_points and otce only: recompute the cost in panels at every pass instead of storing
  // it (sinkhorn_blocked, blocked.hpp), for problems whose cost does not fit in memory.
  bool blocked = false;
  // blocked only: the most memory the Newton finish may keep its truncated copy of the plan in
  // (12 bytes an entry); beyond, its CG products are recomputed passes (0: always).
  double blocked_plan_bytes = 2.0 * 1024 * 1024 * 1024;
  int num_threads = 0;        // 0: OpenMP's default
  // Problems of fewer entries (n x m) are solved on one thread whatever num_threads says: their
  // passes take well under a millisecond, and each parallel region's barrier can stall for a
  // scheduler time slice on a loaded machine. Results never depend on the thread count (0: threads
  // at any size, which the tests use to check that on small problems).
  double parallel_min_entries = 1e5;
  // Whether an n x m problem is large enough for threads (parallel_min_entries).
  bool parallel(int64_t n, int64_t m) const {
    return static_cast<double>(n) * static_cast<double>(m) >= parallel_min_entries;
  }
  // Polled about every 50 ms from the calling thread; returning true stops the solve with
  // Interrupted. The core never learns what is behind it (the bindings check for Ctrl-C).
  std::function<bool()> interrupt;
  // Internal (otce): threads lent to this solve on top of num_threads by workers that ran out of
  // repeats; asked between iterations. Results do not depend on the thread count.
  std::function<int()> lent_threads;
};

struct SinkhornReport {
  int64_t iterations = 0;
  bool converged = false;
  bool timed_out = false;
  // Certified bound on ||pi 1 - a||_1 + ||pi^T 1 - b||_1 (see truncated_mass), including what float64
  // rounding can hide in its computation (certificate_rounding, stopping.hpp: ~1e-11 at N = 10^4).
  double marginal_error = 0.0;
  double transport_cost = 0.0;  // <pi, C> from the same certifying pass
  int stages = 0;
  int dense_stages = 0;
  double final_epsilon = 0.0;  // set when stop_when_sparse returned early
  int64_t newton_steps = 0;
  int64_t newton_relocations = 0;  // Newton steps taken onto a pattern rebuilt around them
  int64_t cg_iterations = 0;
  int64_t pattern_refreshes = 0;  // truncated kernels rebuilt because the potentials drifted
  int64_t folded_balancings = 0;  // class balancings done within an iteration (fold_balancing)
  // Bound on the plan mass outside the truncated kernel when the certificate was computed on the
  // kernel alone (0 when it was computed on the dense plan); already included in marginal_error.
  double truncated_mass = 0.0;
  std::vector<double> joint;  // (row_classes x col_classes) from the certifying pass
};

// Class of every row and, columns being grouped by class, the first column of every class:
// class c owns columns [col_class_start[c], col_class_start[c + 1]).
struct PlanClasses {
  const int32_t* row_class;
  int row_classes;
  const int64_t* col_class_start;
  int col_classes;
};

// Dense plan statistics computed in one streaming pass from the potentials (the plan is never stored).
struct PlanSummary {
  double transport_cost = 0.0;  // <pi, C>
  double marginal_error = 0.0;  // ||pi 1 - a||_1 + ||pi^T 1 - b||_1
  std::vector<double> joint;    // (row_classes x col_classes), row-major: mass between label pairs
};

// The smallest and largest entry of a cost matrix, as squared_euclidean finds them while it writes
// the matrix, for sinkhorn_log, which otherwise reads the whole matrix once more to find them.
// `valid` is false where the matrix holds a NaN (sinkhorn_log then scans it itself).
struct CostRange {
  double min = 0.0, max = 0.0;
  bool valid = false;
};

// C = |x|^2 + |y|^2 - 2 x y^T, clamped at 0. x: (n, d), y: (m, d), both row-major. The points are
// centred on their joint mean first: distances do not change and the expansion loses less to
// cancellation. Entry for entry the values the blocked mode recomputes (sinkhorn_blocked).
// `num_threads` as SinkhornOptions::num_threads (0: OpenMP's default). Returns the range of C.
template <typename T>
CostRange squared_euclidean(const T* x, int64_t n, const T* y, int64_t m, int64_t d, RowMatrix<T>& cost,
                            int num_threads = 0);

// Solves the entropic problem on a cost matrix C (n x m, never transposed). a, b: weights (sum 1).
// f (n) and g (m) are outputs (and are overwritten). The certifying pass at the end measures the
// marginal error and W_D and, when `classes` is given, the joint label table (else one class per
// side). `groups` (same layout; default: `classes`) are the clusters class balancing and the Newton
// preconditioner act on. `range` (optional): the cost's range as squared_euclidean returned it,
// which spares a pass over the matrix (~45 ms at N = 10^4); it must be the matrix's exact range.
// Throws InvalidArgument / Interrupted.
template <typename T>
SinkhornReport sinkhorn_log(const RowMatrix<T>& cost, const double* a, const double* b,
                            const SinkhornOptions& opt, double* f, double* g,
                            const PlanClasses* classes = nullptr, const PlanClasses* groups = nullptr,
                            const CostRange* range = nullptr);

// One pass over the dense plan defined by (f, g, eps). row_class[i] in [0, row_classes); the columns
// are grouped by class: class c owns columns [col_class_start[c], col_class_start[c + 1]).
template <typename T>
PlanSummary summarize_plan(const RowMatrix<T>& cost, const double* a, const double* b, const double* f,
                           const double* g, double eps, const int32_t* row_class, int row_classes,
                           const int64_t* col_class_start, int col_classes, int num_threads = 0);

// Bytes the solver may allocate for an n x m problem in precision T (cost and truncated kernels).
template <typename T>
double dense_bytes(int64_t n, int64_t m);

}  // namespace segtransfer
