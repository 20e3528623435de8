#include "segtransfer/sinkhorn.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <cstdio>
#include <cstdlib>

#include "segtransfer/errors.hpp"
#include "segtransfer/fastexp.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

// The log-sum-exp loops are compiled twice (AVX2+FMA and baseline x86-64) and picked at load time,
// so a wheel built on one machine runs at full width on another without -march=native.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SEGTRANSFER_NO_CLONES)
#define SEGTRANSFER_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SEGTRANSFER_HOT
#endif

namespace segtransfer {
namespace {

using Clock = std::chrono::steady_clock;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

int threads_for(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Exponentials are evaluated in the storage precision T (float: 8 lanes per AVX2 op), but their
// arguments are formed in double: (f_i + g_j - C_ij) / eps is a small difference of values that can
// be 10^3 times larger, and forming it in float would put ~1e-4 noise on every exponent.
template <typename T>
struct RowLse {
  // log sum_j exp(s_j) with s_j = (shift + g[col_j] - c_j) * inv_eps + lw[col_j], two passes
  // (max, then sum) over one row that stays in cache. `cols == nullptr` means a dense row.
  SEGTRANSFER_HOT static double run(const T* c, const int32_t* cols, int64_t len, const double* g,
                                    const double* lw, double shift, double inv_eps) {
    double mx = kNegInf;
    if (cols == nullptr) {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < len; ++j) {
        const double s = (shift + g[j] - static_cast<double>(c[j])) * inv_eps + lw[j];
        mx = s > mx ? s : mx;
      }
    } else {
#pragma omp simd reduction(max : mx)
      for (int64_t k = 0; k < len; ++k) {
        const int32_t j = cols[k];
        const double s = (shift + g[j] - static_cast<double>(c[k])) * inv_eps + lw[j];
        mx = s > mx ? s : mx;
      }
    }
    if (!(mx > kNegInf) || std::isinf(mx)) return mx;
    double total = 0.0;
    constexpr int64_t kBlock = 256;  // partial sums in T stay exact enough, then go to double
    for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
      const int64_t j1 = std::min(len, j0 + kBlock);
      T part = 0;
      if (cols == nullptr) {
#pragma omp simd reduction(+ : part)
        for (int64_t j = j0; j < j1; ++j) {
          const double s = (shift + g[j] - static_cast<double>(c[j])) * inv_eps + lw[j];
          part += detail::fast_exp(static_cast<T>(s - mx));
        }
      } else {
#pragma omp simd reduction(+ : part)
        for (int64_t k = j0; k < j1; ++k) {
          const int32_t j = cols[k];
          const double s = (shift + g[j] - static_cast<double>(c[k])) * inv_eps + lw[j];
          part += detail::fast_exp(static_cast<T>(s - mx));
        }
      }
      total += static_cast<double>(part);
    }
    return mx + std::log(total);
  }
};

// Kernel rows kept after truncation: entries with C_ij - f_i - g_j < tau * eps (CSR layout).
template <typename T>
struct SparseRows {
  std::vector<int64_t> ptr;
  std::vector<int32_t> col;
  std::vector<T> val;
};

// Counts, then fills, the truncated pattern of `mat` (rows x cols) for potentials (p_row, p_col).
// Returns false (pattern left empty) when the kernel is too dense to be worth it or a row would be
// empty (which a truncation above log(cols) + margin rules out near convergence, but not always).
template <typename T>
bool build_sparse(const RowMatrix<T>& mat, const double* p_row, const double* p_col, double cutoff,
                  double max_density, int nt, SparseRows<T>& out) {
  const int64_t n = mat.rows(), m = mat.cols();
  std::vector<int64_t> count(n + 1, 0);
  bool empty_row = false;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|| : empty_row)
  for (int64_t i = 0; i < n; ++i) {
    const T* c = mat.data() + i * m;
    const double th = p_row[i] + cutoff;
    int64_t k = 0;
#pragma omp simd reduction(+ : k)
    for (int64_t j = 0; j < m; ++j) k += (static_cast<double>(c[j]) - p_col[j] < th) ? 1 : 0;
    count[i + 1] = k;
    empty_row = empty_row || k == 0;
  }
  for (int64_t i = 0; i < n; ++i) count[i + 1] += count[i];
  const int64_t nnz = count[n];
  if (empty_row || static_cast<double>(nnz) > max_density * static_cast<double>(n) * m) return false;
  out.ptr = std::move(count);
  out.col.resize(nnz);
  out.val.resize(nnz);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T* c = mat.data() + i * m;
    const double th = p_row[i] + cutoff;
    int64_t k = out.ptr[i];
    for (int64_t j = 0; j < m; ++j) {
      if (static_cast<double>(c[j]) - p_col[j] < th) {
        out.col[k] = static_cast<int32_t>(j);
        out.val[k] = c[j];
        ++k;
      }
    }
  }
  return true;
}

// One half-step: pot_i <- pot_i - omega * eps * log sum_j w_j exp((pot_i + other_j - C_ij) / eps).
// Returns the L1 error of this side's marginal *before* the update: sum_i w_i |e^{lse_i} - 1|.
template <typename T>
double half_step(const RowMatrix<T>& mat, const SparseRows<T>* sp, const double* other,
                 const double* log_w_other, const double* w_self, double eps, double omega,
                 double* pot, std::vector<double>& err_rows, int nt) {
  const int64_t n = mat.rows(), m = mat.cols();
  const double inv_eps = 1.0 / eps;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
  for (int64_t i = 0; i < n; ++i) {
    double lse;
    if (sp == nullptr) {
      lse = RowLse<T>::run(mat.data() + i * m, nullptr, m, other, log_w_other, pot[i], inv_eps);
    } else {
      const int64_t k0 = sp->ptr[i];
      lse = RowLse<T>::run(sp->val.data() + k0, sp->col.data() + k0, sp->ptr[i + 1] - k0, other,
                           log_w_other, pot[i], inv_eps);
    }
    err_rows[i] = w_self[i] * std::fabs(std::expm1(lse));
    pot[i] -= omega * eps * lse;
  }
  // Summed in a fixed order so that the result does not depend on the thread count.
  double err = 0.0;
  for (int64_t i = 0; i < n; ++i) err += err_rows[i];
  return err;
}

// Plan values on the truncated pattern, in CSR order (rows) and CSC order (cols), with its sums.
struct SparsePlan {
  std::vector<double> by_row, by_col, row_sum, col_sum;
};

// One side of the plan on the pattern S (CSR over this side): values in S's order and their sums.
// The exponent is symmetric in (self, other), so the same code serves rows (CSR) and columns (CSC).
template <typename T>
double plan_side(const SparseRows<T>& S, const double* w_self, const double* log_w_self,
                 const double* log_w_other, const double* pot_self, const double* pot_other, double inv_eps,
                 std::vector<double>& values, std::vector<double>& sums) {
  const int64_t n = static_cast<int64_t>(S.ptr.size()) - 1;
  values.resize(S.col.size());
  sums.assign(n, 0.0);
  double err = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t k = S.ptr[i]; k < S.ptr[i + 1]; ++k) {
      const int32_t j = S.col[k];
      const double v = std::exp(log_w_self[i] + log_w_other[j] +
                                (pot_self[i] + pot_other[j] - static_cast<double>(S.val[k])) * inv_eps);
      values[k] = v;
      s += v;
    }
    sums[i] = s;
    err += std::fabs(s - w_self[i]);
  }
  return err;
}

template <typename T>
double evaluate_plan(const SparseRows<T>& R, const SparseRows<T>& Cc, const double* a, const double* b,
                     const double* log_a, const double* log_b, double eps, const double* f, const double* g,
                     SparsePlan& p) {
  const double inv_eps = 1.0 / eps;
  return plan_side(R, a, log_a, log_b, f, g, inv_eps, p.by_row, p.row_sum) +
         plan_side(Cc, b, log_b, log_a, g, f, inv_eps, p.by_col, p.col_sum);
}

// Newton's method on the dual: the Hessian of the dual objective is -M / eps with
// M = [[diag(P 1), P], [P^T, diag(P^T 1)]], so the ascent step solves M d = eps * (a - P1, b - P^T 1)
// by Jacobi-preconditioned conjugate gradients (M is PSD; its null vector (1, -1) is orthogonal to
// the right-hand side, so CG stays in the range). A backtracking line search keeps only steps that
// lower the marginal error. Stops at `target`, on stagnation, or when the iteration budget is spent.
// Returns the marginal error (on the pattern) of the potentials it leaves.
template <typename T, typename Poll>
double newton_polish(const SparseRows<T>& R, const SparseRows<T>& Cc, const double* a, const double* b,
                   const double* log_a, const double* log_b, double eps, double target, double* f, double* g,
                   SparsePlan& p, SinkhornReport& rep, Poll& poll, int64_t max_iter, bool debug, int nt) {
  // Inexact Newton with a constant forcing term: each outer step then cuts the error by roughly
  // this factor while CG stops long before resolving the near-null cluster modes exactly.
  constexpr double opt_forcing = 0.1;
  const int64_t n = static_cast<int64_t>(R.ptr.size()) - 1, m = static_cast<int64_t>(Cc.ptr.size()) - 1;
  const int64_t N = n + m;
  std::vector<double> rhs(N), x(N), res(N), z(N), dir(N), q(N), dinv(N), f_try(n), g_try(m);
  const int nt_mv = R.col.size() > 200000 ? nt : 1;
  auto matvec = [&](const std::vector<double>& v, std::vector<double>& out) {
#pragma omp parallel for num_threads(nt_mv) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      double s = p.row_sum[i] * v[i];
      for (int64_t k = R.ptr[i]; k < R.ptr[i + 1]; ++k) s += p.by_row[k] * v[n + R.col[k]];
      out[i] = s;
    }
#pragma omp parallel for num_threads(nt_mv) schedule(static)
    for (int64_t j = 0; j < m; ++j) {
      double s = p.col_sum[j] * v[n + j];
      for (int64_t k = Cc.ptr[j]; k < Cc.ptr[j + 1]; ++k) s += p.by_col[k] * v[Cc.col[k]];
      out[n + j] = s;
    }
  };
  auto dot = [&](const std::vector<double>& u, const std::vector<double>& v) {
    double s = 0.0;
    for (int64_t k = 0; k < N; ++k) s += u[k] * v[k];
    return s;
  };
  double err = evaluate_plan(R, Cc, a, b, log_a, log_b, eps, f, g, p);
  for (int step = 0; step < 50 && err > target && rep.iterations < max_iter && !rep.timed_out; ++step) {
    for (int64_t i = 0; i < n; ++i) rhs[i] = a[i] - p.row_sum[i];
    for (int64_t j = 0; j < m; ++j) rhs[n + j] = b[j] - p.col_sum[j];
    for (int64_t i = 0; i < n; ++i) dinv[i] = 1.0 / std::max(p.row_sum[i], 1e-300);
    for (int64_t j = 0; j < m; ++j) dinv[n + j] = 1.0 / std::max(p.col_sum[j], 1e-300);
    // Inexact Newton: solve to a relative residual that tightens as the error falls.
    const double rhs_norm = std::sqrt(dot(rhs, rhs));
    const double cg_tol = rhs_norm * opt_forcing;
    std::fill(x.begin(), x.end(), 0.0);
    res = rhs;
    for (int64_t k = 0; k < N; ++k) z[k] = dinv[k] * res[k];
    dir = z;
    double rz = dot(res, z);
    int cg = 0;
    const int max_cg = static_cast<int>(std::min<int64_t>(20 * N, 20000));
    for (; cg < max_cg; ++cg) {
      matvec(dir, q);
      const double pq = dot(dir, q);
      if (!(pq > 0)) break;
      const double alpha = rz / pq;
      for (int64_t k = 0; k < N; ++k) {
        x[k] += alpha * dir[k];
        res[k] -= alpha * q[k];
      }
      if (std::sqrt(dot(res, res)) <= cg_tol) break;
      for (int64_t k = 0; k < N; ++k) z[k] = dinv[k] * res[k];
      const double rz_new = dot(res, z);
      const double beta = rz_new / rz;
      rz = rz_new;
      for (int64_t k = 0; k < N; ++k) dir[k] = z[k] + beta * dir[k];
      if ((cg & 63) == 0) poll();
    }
    rep.cg_iterations += cg;
    double t = 1.0, err_try = err;
    for (; t > 1e-3; t *= 0.5) {
      for (int64_t i = 0; i < n; ++i) f_try[i] = f[i] + t * eps * x[i];
      for (int64_t j = 0; j < m; ++j) g_try[j] = g[j] + t * eps * x[n + j];
      err_try = evaluate_plan(R, Cc, a, b, log_a, log_b, eps, f_try.data(), g_try.data(), p);
      if (err_try < err) break;
    }
    ++rep.newton_steps;
    ++rep.iterations;  // a Newton step is charged as one iteration against max_iter
    poll();
    if (debug) std::fprintf(stderr, "  newton step %d: cg=%d t=%g err %.3e -> %.3e\n", step, cg, t, err, err_try);
    if (!(err_try < err)) return err;  // no progress: leave it to Sinkhorn
    std::copy(f_try.begin(), f_try.end(), f);
    std::copy(g_try.begin(), g_try.end(), g);
    err = err_try;
  }
  return err;
}

}  // namespace

template <typename T>
double dense_bytes(int64_t n, int64_t m) {
  return 2.0 * static_cast<double>(n) * static_cast<double>(m) * sizeof(T);
}

template <typename T>
void squared_euclidean(const T* x, int64_t n, const T* y, int64_t m, int64_t d, RowMatrix<T>& cost) {
  using Map = Eigen::Map<const RowMatrix<T>>;
  Map X(x, n, d), Y(y, m, d);
  Eigen::Matrix<double, 1, Eigen::Dynamic> mean =
      (X.template cast<double>().colwise().sum() + Y.template cast<double>().colwise().sum()) /
      static_cast<double>(n + m);
  const RowMatrix<T> Xc = (X.template cast<double>().rowwise() - mean).template cast<T>();
  const RowMatrix<T> Yc = (Y.template cast<double>().rowwise() - mean).template cast<T>();
  const Eigen::Matrix<T, Eigen::Dynamic, 1> xx = Xc.rowwise().squaredNorm();
  const Eigen::Matrix<T, Eigen::Dynamic, 1> yy = Yc.rowwise().squaredNorm();
  cost.resize(n, m);
  cost.noalias() = T(-2) * Xc * Yc.transpose();
  cost.colwise() += xx;
  cost.rowwise() += yy.transpose();
  cost = cost.cwiseMax(T(0));
}

template <typename T>
SinkhornReport sinkhorn_log(const RowMatrix<T>& cost, const RowMatrix<T>& cost_t, const double* a,
                            const double* b, const SinkhornOptions& opt, double* f, double* g) {
  const int64_t n = cost.rows(), m = cost.cols();
  if (n < 1 || m < 1) throw InvalidArgument("cost", "needs at least one point on each side");
  if (cost_t.rows() != m || cost_t.cols() != n)
    throw InvalidArgument("cost_t", "must be the transpose of cost");
  if (!(opt.epsilon > 0) || !std::isfinite(opt.epsilon))
    throw InvalidArgument("epsilon", "must be a finite number > 0");
  if (!(opt.tol > 0)) throw InvalidArgument("tol", "must be > 0");
  if (opt.max_iter < 1) throw InvalidArgument("max_iter", "must be >= 1");
  if (!(opt.scaling_factor > 0 && opt.scaling_factor < 1))
    throw InvalidArgument("scaling_factor", "must be in (0, 1)");
  if (!(opt.overrelaxation > 0 && opt.overrelaxation < 2))
    throw InvalidArgument("overrelaxation", "must be in (0, 2)");

  const int nt = threads_for(opt.num_threads);
  std::vector<double> log_a(n), log_b(m), err_rows(std::max(n, m));
  for (int64_t i = 0; i < n; ++i) log_a[i] = std::log(a[i]);
  for (int64_t j = 0; j < m; ++j) log_b[j] = std::log(b[j]);

  // Stage epsilons: from the largest cost (where the kernel is nearly flat and a few iterations
  // converge) down to the target by a constant factor; each stage warm-starts the next.
  std::vector<double> schedule;
  const double cmax = static_cast<double>(cost.maxCoeff());
  if (!std::isfinite(cmax))
    throw InvalidArgument("features", "squared distances between the features overflow the floating-point "
                                      "type (the features are too large); rescale them or use float64");
  // Exponents (f + g - C) / eps are formed in double; beyond ~1e12 the dual variables lose all
  // precision relative to the cost and 1/eps itself may overflow.
  if (cmax / opt.epsilon > 1e12 || !std::isfinite(1.0 / opt.epsilon)) {
    throw InvalidArgument("epsilon", "is too small for the cost scale (largest cost " + std::to_string(cmax) +
                                         ", cost / epsilon must stay below 1e12)");
  }
  if (opt.eps_scaling) {
    for (double e = cmax; e > opt.epsilon; e *= opt.scaling_factor) schedule.push_back(e);
  }
  schedule.push_back(opt.epsilon);
  std::fill(f, f + n, 0.0);
  std::fill(g, g + m, 0.0);

  SinkhornReport rep;
  const auto start = Clock::now();
  auto last_poll = start;
  auto poll = [&]() {
    const auto now = Clock::now();
    if (now - last_poll < std::chrono::milliseconds(50)) return;
    last_poll = now;
    if (opt.interrupt && opt.interrupt()) throw Interrupted();
    if (opt.timeout > 0 && std::chrono::duration<double>(now - start).count() > opt.timeout)
      rep.timed_out = true;
  };

  const bool debug = std::getenv("SEGTRANSFER_DEBUG") != nullptr;
  SparseRows<T> rows, cols;
  SparsePlan plan;
  std::vector<int64_t> one_class{0, m};
  std::vector<int32_t> zero_class(n, 0);
  std::vector<double> f_snap(n), g_snap(m);

  // Sinkhorn iterations until the estimated marginal error is <= target. Over-relaxation
  // f <- f + omega (f_new - f), adaptive and safeguarded: iterations run in blocks that start from
  // a snapshot; omega climbs towards its cap after every block whose error fell, and a block whose
  // error rose (or overflowed) is undone, omega drops back halfway to 1 and the level that failed
  // becomes the new cap. A fixed omega near 1.8 is up to 7x faster than plain Sinkhorn on some
  // problems but diverges on others; this finds the edge per stage.
  auto sinkhorn_loop = [&](double eps, double target, const SparseRows<T>* sr, const SparseRows<T>* sc,
                           int64_t iter_limit) {
    double omega = 1.0, cap = opt.overrelaxation;
    double block_err = std::numeric_limits<double>::infinity();
    int64_t block_left = 0;
    constexpr int64_t kBlock = 10;
    std::copy(f, f + n, f_snap.begin());
    std::copy(g, g + m, g_snap.begin());
    const int nt_loop = (sr ? static_cast<double>(sr->ptr[n]) : static_cast<double>(n) * m) > 2e5 ? nt : 1;
    while (rep.iterations < iter_limit && !rep.timed_out) {
      const double err_r = half_step(cost, sr, g, log_b.data(), a, eps, omega, f, err_rows, nt_loop);
      const double err_c = half_step(cost_t, sc, f, log_a.data(), b, eps, omega, g, err_rows, nt_loop);
      ++rep.iterations;
      poll();
      const double err = err_r + err_c;
      if (std::isfinite(err) && err <= target) return;
      if (--block_left > 0 && std::isfinite(err)) continue;
      if (omega == 1.0 && !std::isfinite(err)) return;  // plain Sinkhorn overflowed: certify, report
      if (!std::isfinite(err) || (omega > 1.0 && err > block_err)) {
        std::copy(f_snap.begin(), f_snap.end(), f);
        std::copy(g_snap.begin(), g_snap.end(), g);
        cap = std::max(1.0, omega - 0.05);
        omega = 1.0 + 0.5 * (omega - 1.0);
        if (omega < 1.02) omega = 1.0;
      } else {
        block_err = err;
        std::copy(f, f + n, f_snap.begin());
        std::copy(g, g + m, g_snap.begin());
        omega = std::min(cap, omega + 0.5 * (cap - omega) + 0.01);
      }
      block_left = kBlock;
      if (debug && rep.iterations % 500 < kBlock)
        std::fprintf(stderr, "  eps=%g it=%lld err=%.3e omega=%.3f\n", eps, (long long)rep.iterations, err, omega);
    }
  };

  // Multiscale warm start. While epsilon is large the kernel is dense and every iteration costs
  // n*m exponentials, yet those stages only need to get the potentials roughly right. So they run
  // on a strided subsample (the OTCE pipeline sorts pixels by class, so striding is stratified)
  // until the subsample's truncated kernel turns sparse; the potentials are then extended to every
  // point by the c-transform and the full problem resumes from that epsilon.
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
    const RowMatrix<T> sub_t = sub.transpose();
    std::vector<double> sa(ks), sb(ks), sf(ks), sg(ks);
    double ta = 0, tb = 0;
    for (int64_t k = 0; k < ks; ++k) { sa[k] = a[ri[k]]; sb[k] = b[ci[k]]; ta += sa[k]; tb += sb[k]; }
    for (int64_t k = 0; k < ks; ++k) { sa[k] /= ta; sb[k] /= tb; }
    SinkhornOptions so = opt;
    so.stop_when_sparse = true;
    so.multiscale_points = 0;
    so.newton = false;
    so.tol = std::max(opt.stage_tol, opt.tol);
    so.interrupt = opt.interrupt;
    const SinkhornReport sr = sinkhorn_log(sub, sub_t, sa.data(), sb.data(), so, sf.data(), sg.data());
    rep.iterations += sr.iterations;  // charged as full iterations: conservative against max_iter
    if (sr.final_epsilon > 0) {
      const double eps = sr.final_epsilon;
      while (first_stage + 1 < schedule.size() && schedule[first_stage] > eps * (1 + 1e-12)) ++first_stage;
      // f_i = -eps log sum_l sb_l exp((sg_l - C_{i, ci[l]}) / eps), then a full g half-step.
      std::vector<double> lsb(ks);
      for (int64_t l = 0; l < ks; ++l) lsb[l] = std::log(sb[l]);
      std::vector<T> crow(ks);
#pragma omp parallel for num_threads(nt) schedule(static) firstprivate(crow)
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t l = 0; l < ks; ++l) crow[l] = cost(i, ci[l]);
        f[i] = -eps * RowLse<T>::run(crow.data(), nullptr, ks, sg.data(), lsb.data(), 0.0, 1.0 / eps);
      }
      half_step(cost_t, static_cast<const SparseRows<T>*>(nullptr), f, log_a.data(), b, eps, 1.0, g,
                err_rows, nt);
      if (debug) std::fprintf(stderr, "multiscale: %lld sub-iterations, resume at eps=%g\n", (long long)sr.iterations, eps);
    }
  }

  for (size_t s = first_stage; s < schedule.size(); ++s) {
    const double eps = schedule[s];
    const bool last = s + 1 == schedule.size();
    if (rep.timed_out && !last) continue;  // out of time: go straight to certifying what we have
    const double cutoff = opt.truncation * eps;
    double target = last ? 0.5 * opt.tol : std::max(opt.stage_tol, opt.tol);
    ++rep.stages;
    for (;;) {
      // Pattern from the current potentials; by symmetry the transpose keeps the same entries.
      const bool sparse = opt.truncation > 0 &&
                          build_sparse(cost, f, g, cutoff, opt.max_density, nt, rows) &&
                          build_sparse(cost_t, g, f, cutoff, 1.0, nt, cols);
      if (!sparse) ++rep.dense_stages;
      if (sparse && opt.stop_when_sparse) {
        rep.final_epsilon = eps;
        return rep;
      }
      if (debug)
        std::fprintf(stderr, "stage eps=%g sparse=%d nnz/row=%.1f it=%lld\n", eps, (int)sparse,
                     sparse ? double(rows.ptr[n]) / n : double(m), (long long)rep.iterations);
      const SparseRows<T>* sr = sparse ? &rows : nullptr;
      const SparseRows<T>* sc = sparse ? &cols : nullptr;
      if (last && sparse && opt.newton) {
        // Sinkhorn removes the fast error modes cheaply; the slow ones (mass balance between
        // nearly disconnected clusters, rate 1 - 1e-5 per iteration on clustered logits) are left
        // to Newton steps on the sparse plan, whose CG solves converge in ~sqrt of those counts.
        // Alternate: a bounded Sinkhorn phase (it can stall above the switch level on clustered
        // data), then Newton; if Newton stops progressing, Sinkhorn again, until the budget is spent.
        while (rep.iterations < opt.max_iter && !rep.timed_out) {
          sinkhorn_loop(eps, std::max(target, opt.newton_switch), sr, sc,
                        std::min(opt.max_iter, rep.iterations + 300));
          // Takes no step when Sinkhorn already reached the target.
          const double err = newton_polish(rows, cols, a, b, log_a.data(), log_b.data(), eps, target, f, g,
                                           plan, rep, poll, opt.max_iter, debug, nt);
          if (err <= target) break;
        }
      } else {
        sinkhorn_loop(eps, target, sr, sc, opt.max_iter);
      }
      if (!last) break;
      // Certify on the dense plan: the truncated kernel and the cheap estimate are not the truth.
      const PlanSummary chk = summarize_plan(cost, a, b, f, g, eps, zero_class.data(), 1,
                                             one_class.data(), 1, nt);
      rep.marginal_error = chk.marginal_error;
      rep.transport_cost = chk.transport_cost;
      rep.converged = chk.marginal_error <= opt.tol;
      if (debug) std::fprintf(stderr, "certify: err=%.3e it=%lld\n", chk.marginal_error, (long long)rep.iterations);
      if (rep.converged || rep.iterations >= opt.max_iter || rep.timed_out ||
          !std::isfinite(chk.marginal_error))
        break;
      target *= 0.1;  // the estimate was optimistic: ask more of it and refresh the pattern
    }
  }
  return rep;
}

template <typename T>
PlanSummary summarize_plan(const RowMatrix<T>& cost, const double* a, const double* b, const double* f,
                           const double* g, double eps, const int32_t* row_class, int row_classes,
                           const int64_t* col_class_start, int col_classes, int num_threads) {
  const int64_t n = cost.rows(), m = cost.cols();
  const int nt = threads_for(num_threads);
  const double inv_eps = 1.0 / eps;
  std::vector<double> log_b(m);
  for (int64_t j = 0; j < m; ++j) log_b[j] = std::log(b[j]);

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
    for (int64_t i = i0; i < i1; ++i) {
      const T* c = cost.data() + i * m;
      const double base = std::log(a[i]) + f[i] * inv_eps;
      double row_total = 0.0;
      for (int cc = 0; cc < col_classes; ++cc) {
        double mass = 0.0, wc = 0.0;
#pragma omp simd reduction(+ : mass, wc)
        for (int64_t j = col_class_start[cc]; j < col_class_start[cc + 1]; ++j) {
          const double cij = static_cast<double>(c[j]);
          const double p = detail::fast_exp(base + (g[j] - cij) * inv_eps + log_b[j]);
          colp[j] += p;
          mass += p;
          wc += p * cij;
        }
        jp[row_class[i] * col_classes + cc] += mass;
        row_total += mass;
        wd += wc;
      }
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

#define SEGTRANSFER_INSTANTIATE(T)                                                                 \
  template double dense_bytes<T>(int64_t, int64_t);                                                \
  template void squared_euclidean<T>(const T*, int64_t, const T*, int64_t, int64_t, RowMatrix<T>&); \
  template SinkhornReport sinkhorn_log<T>(const RowMatrix<T>&, const RowMatrix<T>&, const double*,  \
                                          const double*, const SinkhornOptions&, double*, double*); \
  template PlanSummary summarize_plan<T>(const RowMatrix<T>&, const double*, const double*,         \
                                         const double*, const double*, double, const int32_t*, int, \
                                         const int64_t*, int, int);
SEGTRANSFER_INSTANTIATE(float)
SEGTRANSFER_INSTANTIATE(double)
#undef SEGTRANSFER_INSTANTIATE

}  // namespace segtransfer
