// When a solve stops: the certificate's float64 rounding term, the next certificate target, the
// floor watch and the stall limits. Shared by the CPU solvers (sinkhorn.cpp, blocked.cpp) and the CUDA
// launcher (cuda/batch_solver.cu): plain C++, no Eigen, so that nvcc compiles it as well.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace segtransfer {

// What float64 rounding alone can hide in a certificate's L1 marginal error, added to it so that a
// certificate near float64's resolution for the cost scale cannot pass by the luck of its rounding
// (a faster form of the pattern certificate, with another summation order, certified 7.7e-13 against
// a tol of 1e-12 on a problem whose floor is ~1e-10; RESULTS.md, session 21). Each plan entry's
// exponent is formed from terms up to M = (max|C| + max|f| + max|g|) / eps with a few roundings,
// so the entry carries a relative error up to ~4 M 2^-53, plus the exponential's few ulp; a sum of
// up to `terms` entries adds `terms` 2^-53 relative; each unit of mass is counted in a row sum and
// in a column sum. At the paper's setting (M ~ 10^4, 10^4 terms) this is ~10^-11, far below any
// useful tol. Non-finite potentials give a non-finite term (not converged).
inline double certificate_rounding(double cost_bound, const double* f, int64_t n, const double* g, int64_t m,
                                   double eps, int64_t terms) {
  double fm = 0.0, gm = 0.0;
  bool finite = std::isfinite(cost_bound);
  for (int64_t i = 0; i < n; ++i) fm = std::max(fm, std::fabs(f[i])), finite = finite && std::isfinite(f[i]);
  for (int64_t j = 0; j < m; ++j) gm = std::max(gm, std::fabs(g[j])), finite = finite && std::isfinite(g[j]);
  if (!finite) return std::numeric_limits<double>::infinity();
  const double M = (cost_bound + fm + gm) / eps;
  return 2.0 * (4.0 * M + static_cast<double>(terms) + 8.0) * 0x1p-53;
}

// The last stage's next target after a certificate that failed (both solvers). A certificate that
// found more than the target proves the estimate optimistic: aim tenfold lower. One that confirmed
// the estimate failed on float64's rounding alone, and only a round ending below tol less that
// rounding can pass: aim there, with a margin. Tenfold lower lies under what the iteration resolves
// at such cost scales: a 1,362-pixel draw at cost / eps ~1e9 (D = 2, tol 1e-6, rounding 7.3e-7)
// then crept through 1,100 Newton steps (12 s) towards 5e-8 (session 41).
inline double next_certificate_target(double target, double checked, double rounding, double tol) {
  const double passes = 0.9 * (tol - rounding);
  if (!(passes > 0.0)) return 0.1 * target;
  return std::min(checked > target ? 0.1 * target : target, passes);
}

// Where float64's rounding alone (certificate_rounding) exceeds tol, no certificate can pass: below
// the level this returns, twice that rounding, the last stage's Newton goes on only while its steps
// halve the error, and a certificate whose rest lies below it ends the solve (both solvers; see
// sinkhorn_log's last stage). 0 where the rounding is below tol: Newton runs to its target.
inline double newton_settle(double rounding, double tol) { return rounding > tol ? 2.0 * rounding : 0.0; }

// Watches a last stage's marginal error for float64's resolution at its cost scale: exponents
// (f + g - C) / eps carry rounding of about max|C| / eps * 2^-52, and errors near that are noise no
// iteration removes. A stage whose error stops falling that close to the floor ends there and
// reports what it has, rather than iterating until max_iter (with max_iter = 2^62, a 2-point draw of
// features ~10^5, max|C| / eps ~ 10^11, never returned: bench/RESULTS.md, session 14). Shared by the
// stored solver (Sinkhorn blocks, Newton rounds) and the blocked one (certified rounds).
//
// `far_patience` records without progress end it wherever the error lies, for rounds whose
// Sinkhorn phases double each time (so that it means ~300 x 2^far_patience iterations without a 0.1 %
// gain, beyond the default max_iter): at cost / eps ~ 10^8-10^10 some 20-point problems sat at
// an error of ~5e-3 with their patterns unchanged for millions of iterations (max_iter = 2^62 never
// returned; a seeded sweep of 20,000 such calls, session 28).
class FloorWatch {
 public:
  FloorWatch(double cost_bound, double eps, int patience, int far_patience = std::numeric_limits<int>::max())
      : floor_(cost_bound / eps * std::numeric_limits<double>::epsilon()),
        patience_(patience),
        far_patience_(far_patience) {}
  // Records an error. Progress is a fall below 0.999 of the error at the last progress; true once
  // `patience` records in a row made none and the error lies within 10^3 of the floor, or
  // `far_patience` records in a row made none.
  bool stuck(double err) {
    progressed_ = err < 0.999 * reference_;
    if (progressed_) {
      reference_ = err;
      stalled_ = 0;
    } else {
      ++stalled_;
    }
    return (stalled_ >= patience_ && err < 1e3 * floor_) || stalled_ >= far_patience_;
  }
  bool progressed() const { return progressed_; }  // by the last record
  bool near_floor(double err) const { return err < 1e3 * floor_; }  // where `patience` applies

 private:
  double floor_, reference_ = std::numeric_limits<double>::infinity();
  int patience_, far_patience_, stalled_ = 0;
  bool progressed_ = false;
};
// An intermediate stage's potentials only start the next stage: one that made no 0.1 % gain over this
// many iterations (FloorWatch on its blocks) hands over, whatever its error, in both solvers. A
// 1,325-pixel draw (D = 64, channel scales 10^-3..10^2, cost / eps ~8e7) sat at 1.43e-2 against
// stage_tol (1e-2) at eps = 25.6 for all of max_iter (50,000) and returned an error of 0.20 (session
// 29). The benchmark's intermediate stages take 5-22 iterations. 200, not 1,000: a stage gaining under
// 0.1 % in 200 iterations would need ~80,000 to go from 1.5e-2 to stage_tol, so the extra 800 bought
// nothing measurable. A stored 1,373-pixel draw (D = 256, tol 1e-8) spent 14,000 iterations in such
// stages, 41 -> 16 s with the same score to 1e-10; the other 156 stored and 19 blocked sweep calls
// replayed took the same iterations (bench/RESULTS.md, session 52).
constexpr int64_t kIntermediateStallIterations = 200;
// A last-stage Sinkhorn phase between Newton rounds (kFirstPhase .. iterations, see below) that made
// no 0.1 % gain over this many iterations ends early, in both solvers: the next round (Newton, a
// component shift) moves on. Such phases sat flat at a component's imbalance for their whole length,
// 600-2,400 iterations each, seconds a round in the blocked mode (181 x 183 float32 points at
// cost / eps 1.3e9, tol 3e-8, blocked: 200,000 iterations ending at 2.4e-3 -> 9,423 ending at 1.3e-6,
// before the mirrored component shift; 400 tight-tol calls 19.7 -> 10.2 s, the same converged;
// session 32).
constexpr int64_t kPhaseStallIterations = 100;

// Last-stage rounds (Newton, then a Sinkhorn phase of 300, 600, ... iterations) without progress that
// end a solve anywhere: about 300k iterations of no gain, so never within the default max_iter.
constexpr int kStalledRounds = 10;

// The Sinkhorn phase between two last-stage Newton rounds, in both solvers: kFirstPhase
// iterations, doubled after a round that gained nothing, and back to kFirstPhase near float64's
// floor, where the rounds only have to show that they no longer gain. Doubled there too, 400 x 350
// points at cost / eps 10^7 spent 300 + 600 + 1,200 + 2,400 + 4,800 iterations deciding that an
// error of 9.95e-9 was the floor (stored 5,145 -> 1,845 iterations, blocked 10,549 -> 3,949), and a
// blocked draw at cost / eps 8e6 (1,874 points, D = 19) sat within 0.1 % of 1.313e-8 for four
// rounds of 600 .. 4,800 iterations (21 -> 8 s).
constexpr int64_t kFirstPhase = 300;
inline int64_t next_phase(int64_t phase, const FloorWatch& rounds, double err) {
  return rounds.near_floor(err) ? kFirstPhase : 2 * phase;
}

}  // namespace segtransfer
