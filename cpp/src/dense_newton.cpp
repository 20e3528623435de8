#include "dense_newton.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <limits>

namespace segtransfer {

namespace {

constexpr double kForcing = 0.1;       // inexact Newton: CG stops at this relative residual
constexpr double kMaxDamping = 1e2;    // a step rejected at this damping ends the problem's polish
constexpr double kShortestStep = 1e-3;
constexpr double kApproximateDown = 1e-7;  // targets from here down get exact products (see below)

bool any(const std::vector<int>& flags) {
  return std::any_of(flags.begin(), flags.end(), [](int v) { return v != 0; });
}

// One problem's coarse level: E = Z^T S Z over its source classes, factored.
struct Coarse {
  Eigen::LDLT<Eigen::MatrixXd> fact;
  bool ok = false;
};

}  // namespace

DenseNewtonStats dense_newton(DenseNewtonBackend& be, const DenseNewtonProblem& p, const std::vector<double>& target,
                              std::vector<int> active, std::vector<double>& f, std::vector<double>& g, int max_steps,
                              const DenseNewtonStop& stop) {
  const int64_t K = p.repeats, n = p.n, m = p.m;
  const int G = p.classes;
  const double eps = p.eps;
  DenseNewtonStats st;
  st.error.assign(K, std::numeric_limits<double>::infinity());
  st.steps.assign(K, 0);
  st.products.assign(K, 0);

  std::vector<double> r(K * n), c(K * m), r_try(K * n), c_try(K * m);
  std::vector<double> inv_c(K * m), w(K * m), tmp_n(K * n), tmp_m(K * m), dinv(K * n), rhs(K * n);
  std::vector<double> x(K * n), res(K * n), z(K * n), d(K * n), q(K * n), wd(K * m);
  std::vector<double> f_try(K * n), g_try(K * m), U;
  std::vector<double> lambda(K, 1e-3), err(K, std::numeric_limits<double>::infinity());
  std::vector<Coarse> coarse(K);

  auto errors = [&](const std::vector<int>& on, const std::vector<double>& rr, const std::vector<double>& cc,
                    std::vector<double>& out) {
    for (int64_t k = 0; k < K; ++k) {
      if (!on[k]) continue;
      double e = 0.0;
      for (int64_t i = 0; i < n; ++i) e += std::fabs(rr[k * n + i] - p.a[i]);
      for (int64_t j = 0; j < m; ++j) e += std::fabs(cc[k * m + j] - p.b[j]);
      out[k] = e;
    }
  };
  auto precondition = [&](int64_t k, const double* v, double* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = dinv[k * n + i] * v[i];
    if (!coarse[k].ok) return;
    const int64_t* start = p.row_class_start + k * (G + 1);
    Eigen::VectorXd s(G);
    for (int cl = 0; cl < G; ++cl) {
      double acc = 0.0;
      for (int64_t i = start[cl]; i < start[cl + 1]; ++i) acc += v[i];
      s[cl] = acc;
    }
    const Eigen::VectorXd u = coarse[k].fact.solve(s);
    for (int cl = 0; cl < G; ++cl)
      for (int64_t i = start[cl]; i < start[cl + 1]; ++i) out[i] += u[cl];
  };

  be.sums(active, r, c);
  errors(active, r, c, err);
  bool stopped = false;
  for (int step = 0; step < max_steps && !stopped; ++step) {
    for (int64_t k = 0; k < K; ++k)
      if (active[k] && (!(err[k] > target[k]) || !std::isfinite(err[k]))) active[k] = 0;
    if (!any(active)) break;

    // Right-hand side of the Schur system and its Jacobi diagonal.
    for (int64_t k = 0; k < K; ++k) {
      if (!active[k]) continue;
      for (int64_t j = 0; j < m; ++j) {
        const double cj = c[k * m + j];
        inv_c[k * m + j] = cj > 0 ? 1.0 / ((1.0 + lambda[k]) * cj) : 0.0;
        w[k * m + j] = (p.b[j] - cj) * inv_c[k * m + j];
      }
    }
    // Approximate (float) products only while every target is loose: against the exact sums in the
    // diagonal their rounding leaves S 1 off by ~1e-7 of each row's mass, which near 1e-10 swamps the
    // couplings between nearly separate components of a sparse plan (300 x 300 points, D = 19,
    // eps = 0.1, target 1e-11: 60 steps stalled at 9e-10 on the CPU test backend; the same stall as
    // the stored CPU solver's, newton_polish in sinkhorn.cpp).
    bool approximate = true;
    for (int64_t k = 0; k < K; ++k)
      if (active[k] && target[k] < kApproximateDown) approximate = false;
    be.row_products(active, w, false, false, tmp_n);
    be.row_products(active, inv_c, true, approximate, dinv);  // sum_j p_ij^2 inv_c_j, turned into 1 / diag below
    for (int64_t k = 0; k < K; ++k) {
      if (!active[k]) continue;
      for (int64_t i = 0; i < n; ++i) {
        const double ri = r[k * n + i];
        rhs[k * n + i] = (p.a[i] - ri) - tmp_n[k * n + i];
        const double diag = (1.0 + lambda[k]) * ri - dinv[k * n + i];
        dinv[k * n + i] = diag > 1e-12 * ri ? 1.0 / diag : 0.0;
      }
    }
    // Coarse level: E = Z^T D1 Z (1 + lambda) - sum_j inv_c_j u_j u_j^T, u_j = column j's class masses.
    if (G >= 2) {
      U.assign(K * m * G, 0.0);
      be.class_column_sums(active, U);
      for (int64_t k = 0; k < K; ++k) {
        if (!active[k]) continue;
        Eigen::MatrixXd E = Eigen::MatrixXd::Zero(G, G);
        const int64_t* start = p.row_class_start + k * (G + 1);
        for (int cl = 0; cl < G; ++cl)
          for (int64_t i = start[cl]; i < start[cl + 1]; ++i) E(cl, cl) += (1.0 + lambda[k]) * r[k * n + i];
        for (int64_t j = 0; j < m; ++j) {
          const double* u = U.data() + (k * m + j) * G;
          const double ic = inv_c[k * m + j];
          for (int c1 = 0; c1 < G; ++c1) {
            if (u[c1] == 0.0) continue;
            for (int c2 = 0; c2 < G; ++c2) E(c1, c2) -= ic * u[c1] * u[c2];
          }
        }
        // A relative ridge keeps E definite (its null vector is the constant on connected classes).
        E.diagonal().array() += 1e-10 * E.diagonal().cwiseAbs().maxCoeff() + 1e-300;
        coarse[k].fact.compute(E);
        coarse[k].ok = coarse[k].fact.info() == Eigen::Success;
      }
    }

    // Preconditioned CG, all problems in lockstep; each stops at its own relative residual.
    std::vector<int> cg(active);
    std::vector<double> rz(K, 0.0), stop2(K, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      if (!cg[k]) continue;
      double nn = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        x[k * n + i] = 0.0;
        res[k * n + i] = rhs[k * n + i];
        nn += rhs[k * n + i] * rhs[k * n + i];
      }
      stop2[k] = kForcing * kForcing * nn;
      precondition(k, res.data() + k * n, z.data() + k * n);
      double s = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        d[k * n + i] = z[k * n + i];
        s += res[k * n + i] * z[k * n + i];
      }
      rz[k] = s;
      if (!(nn > 0)) cg[k] = 0;
    }
    const int64_t cg_cap = std::min<int64_t>(20 * n, 20000);
    for (int64_t it = 0; it < cg_cap && any(cg); ++it) {
      be.col_products(cg, d, approximate, tmp_m);
      for (int64_t k = 0; k < K; ++k)
        if (cg[k])
          for (int64_t j = 0; j < m; ++j) tmp_m[k * m + j] *= inv_c[k * m + j];
      be.row_products(cg, tmp_m, false, approximate, tmp_n);
      for (int64_t k = 0; k < K; ++k) {
        if (!cg[k]) continue;
        ++st.products[k];
        double dq = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          q[k * n + i] = (1.0 + lambda[k]) * r[k * n + i] * d[k * n + i] - tmp_n[k * n + i];
          dq += d[k * n + i] * q[k * n + i];
        }
        if (!(dq > 0)) {  // S is PSD: only rounding (or a null direction) gets here
          cg[k] = 0;
          continue;
        }
        const double alpha = rz[k] / dq;
        double r2 = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          x[k * n + i] += alpha * d[k * n + i];
          res[k * n + i] -= alpha * q[k * n + i];
          r2 += res[k * n + i] * res[k * n + i];
        }
        if (r2 <= stop2[k]) {
          cg[k] = 0;
          continue;
        }
        precondition(k, res.data() + k * n, z.data() + k * n);
        double rz_new = 0.0;
        for (int64_t i = 0; i < n; ++i) rz_new += res[k * n + i] * z[k * n + i];
        const double beta = rz_new / rz[k];
        rz[k] = rz_new;
        for (int64_t i = 0; i < n; ++i) d[k * n + i] = z[k * n + i] + beta * d[k * n + i];
      }
      if (stop && stop()) {
        stopped = true;
        break;
      }
    }
    if (stopped) break;  // nothing moved yet in this step: the backend holds (f, g)

    // The column block of the direction: d2 = D2^-1 (b - P^T 1 - P^T d1).
    be.col_products(active, x, false, tmp_m);
    for (int64_t k = 0; k < K; ++k)
      if (active[k])
        for (int64_t j = 0; j < m; ++j)
          wd[k * m + j] = (p.b[j] - c[k * m + j] - tmp_m[k * m + j]) * inv_c[k * m + j];

    // Backtracking on the marginal error, all problems in lockstep.
    std::vector<int> search(active), rejected(K, 0);
    std::vector<double> t(K, 1.0), err_try(K, 0.0);
    while (any(search)) {
      for (int64_t k = 0; k < K; ++k) {
        if (!search[k]) continue;
        for (int64_t i = 0; i < n; ++i) f_try[k * n + i] = f[k * n + i] + t[k] * eps * x[k * n + i];
        for (int64_t j = 0; j < m; ++j) g_try[k * m + j] = g[k * m + j] + t[k] * eps * wd[k * m + j];
      }
      be.set_potentials(f_try, g_try, search);
      be.sums(search, r_try, c_try);
      errors(search, r_try, c_try, err_try);
      for (int64_t k = 0; k < K; ++k) {
        if (!search[k]) continue;
        if (err_try[k] < err[k]) {
          search[k] = 0;
          err[k] = err_try[k];
          std::copy(f_try.begin() + k * n, f_try.begin() + (k + 1) * n, f.begin() + k * n);
          std::copy(g_try.begin() + k * m, g_try.begin() + (k + 1) * m, g.begin() + k * m);
          std::copy(r_try.begin() + k * n, r_try.begin() + (k + 1) * n, r.begin() + k * n);
          std::copy(c_try.begin() + k * m, c_try.begin() + (k + 1) * m, c.begin() + k * m);
          if (t[k] == 1.0) lambda[k] /= 3.0;
        } else if ((t[k] *= 0.5) <= kShortestStep) {
          search[k] = 0;
          rejected[k] = 1;
        }
      }
      if (stop && stop()) {
        stopped = true;
        for (int64_t k = 0; k < K; ++k)
          if (search[k]) {
            search[k] = 0;
            rejected[k] = 1;
          }
      }
    }
    if (any(rejected)) be.set_potentials(f, g, rejected);  // the backend held the last trial
    for (int64_t k = 0; k < K; ++k) {
      if (!active[k]) continue;
      ++st.steps[k];
      if (!rejected[k]) continue;
      if (lambda[k] >= kMaxDamping) active[k] = 0;
      lambda[k] = std::max(1e-3, 10.0 * lambda[k]);
    }
  }
  st.error = err;
  return st;
}

}  // namespace segtransfer
