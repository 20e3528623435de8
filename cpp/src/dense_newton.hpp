// Newton polish of K entropic OT problems on their dense plans, advanced in lockstep, for solvers
// whose plan products are streamed passes over a stored cost (the CUDA solver). The host drives the
// method (this file and dense_newton.cpp: plain C++ plus Eigen for the small coarse systems); a
// backend supplies the passes. No Eigen and no CUDA in this header: cuda/batch_solver.cu implements
// the backend, cpp/tests exercise the driver with a CPU backend.
//
// The formulation is newton_polish's (sinkhorn.cpp), prototyped on dense plans in
// bench/gpu_newton_prototype.py: CG on the Schur complement S = D1 - P D2^-1 P^T (the column block
// eliminated exactly), Levenberg-Marquardt damping, forcing 0.1, and the two-level preconditioner
// z = D^-1 r + Z E^-1 Z^T r over the source classes (rows are grouped by class).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace segtransfer {

// Plan of problem k: p_ij = a_i b_j exp((f_i + g_j - C_ij) / eps). Vectors are problem-major
// (k * n + i, k * m + j); every call acts on the problems whose `active` flag is set and leaves the
// other problems' outputs untouched.
class DenseNewtonBackend {
 public:
  virtual ~DenseNewtonBackend() = default;
  // Makes (f, g) the potentials of the active problems.
  virtual void set_potentials(const std::vector<double>& f, const std::vector<double>& g,
                              const std::vector<int>& active) = 0;
  // r = P 1 (K n) and c = P^T 1 (K m).
  virtual void sums(const std::vector<int>& active, std::vector<double>& r, std::vector<double>& c) = 0;
  // out (K m) = P^T v, v of length K n.
  // `approximate`: the product only builds the Newton system (CG, its preconditioner), so the backend
  // may form the entries with float exponentials: a relative error ~1e-6 in S is far inside CG's
  // forcing (0.1). Marginals (sums) and the right-hand side are always exact, so the accepted steps
  // and the reported errors are not affected. The driver asks for them only while the targets are
  // 1e-7 or looser: below, their rounding against the exact sums stalls Newton on sparse plans.
  virtual void col_products(const std::vector<int>& active, const std::vector<double>& v, bool approximate,
                            std::vector<double>& out) = 0;
  // out (K n) = P w (squared = false) or (P o P) w (squared entries), w of length K m.
  virtual void row_products(const std::vector<int>& active, const std::vector<double>& w, bool squared,
                            bool approximate, std::vector<double>& out) = 0;
  // U (K m G): U[(k m + j) G + c] = sum of column j's entries in rows of class c (preconditioner only:
  // may be approximate like the products above).
  virtual void class_column_sums(const std::vector<int>& active, std::vector<double>& U) = 0;
};

struct DenseNewtonProblem {
  int64_t repeats = 1, n = 0, m = 0;
  const double* a = nullptr;             // (n) shared by all problems
  const double* b = nullptr;             // (m)
  double eps = 0.1;
  const int64_t* row_class_start = nullptr;  // (repeats, classes + 1): rows grouped by class
  int classes = 1;
};

struct DenseNewtonStats {
  std::vector<double> error;      // (K) L1 marginal error at the returned potentials (inf: never measured)
  std::vector<int64_t> steps;     // (K) Newton steps taken
  std::vector<int64_t> products;  // (K) products S v (CG iterations)
};

// Polishes the problems flagged in `active` from (f, g) (host copies, in sync with the backend) until
// their error is <= target[k], a step fails to lower it with the largest damping, or max_steps.
// On return (f, g) and the backend hold the best potentials found. `stop` is asked after every CG
// product and line-search trial: true abandons the step under way and returns (interrupt, timeout).
using DenseNewtonStop = std::function<bool()>;
DenseNewtonStats dense_newton(DenseNewtonBackend& backend, const DenseNewtonProblem& prob,
                              const std::vector<double>& target, std::vector<int> active, std::vector<double>& f,
                              std::vector<double>& g, int max_steps, const DenseNewtonStop& stop);

// The driver's type, for solvers that receive it as a callback (the CUDA launcher is compiled apart
// from the core that holds dense_newton).
using DenseNewtonFn = std::function<DenseNewtonStats(DenseNewtonBackend&, const DenseNewtonProblem&,
                                                     const std::vector<double>&, std::vector<int>,
                                                     std::vector<double>&, std::vector<double>&, int,
                                                     const DenseNewtonStop&)>;

}  // namespace segtransfer
