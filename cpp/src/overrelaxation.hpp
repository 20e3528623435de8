// Over-relaxation control shared by the CPU solvers and the CUDA launcher: plain C++, no Eigen, so
// that nvcc compiles it in cuda/batch_solver.cu as well.
#pragma once

#include <algorithm>
#include <cmath>

namespace segtransfer {

// An over-relaxed block whose error ends above this has run away: an iteration's error is the L1
// error of the rows before its row half-step plus that of the columns before its column
// half-step, and after an exact (omega = 1) half-step the plan holds mass 1, so a plain Sinkhorn
// iterate is never off by more than 2 + 2. The CPU loops reset `block_err` after each balancing
// and each pattern refresh, so without this test nothing stopped a block from making things
// worse: a 622-pixel draw at cost / eps ~ 10^7 (D = 8, eps = 1) went from 3.1 to 10^36 at
// omega = 1.9 across pattern refreshes and ended at a marginal error of 5.7e188 (session 40).
constexpr double kRunawayError = 4.0;

// The adaptive over-relaxation of the Sinkhorn loops (CPU: sinkhorn_log, blocked; CUDA: batch_solver.cu), at the end of a
// block of iterations whose last error is `err` (`block_err`: the last accepted block's). Returns
// false when the block is to be undone (the caller restores its snapshot): omega then drops back
// halfway to 1 and the level that failed becomes the cap; otherwise omega climbs towards the cap.
inline bool accept_block(double err, double& block_err, double& omega, double& cap) {
  if (!std::isfinite(err) || (omega > 1.0 && (err > block_err || err > kRunawayError))) {
    cap = std::max(1.0, omega - 0.05);
    omega = 1.0 + 0.5 * (omega - 1.0);
    if (omega < 1.02) omega = 1.0;
    return false;
  }
  block_err = err;
  omega = std::min(cap, omega + 0.5 * (cap - omega) + 0.01);
  return true;
}

// The CPU loops balance the classes after every block, and balancing resets `block_err` (its shift
// may raise the error while it raises the dual), so accept_block never compares two blocks there.
// Over-relaxed iterations and balancing can then settle into a cycle above the target: float32 demo
// draws at N = 1,500 went 7.7e-7 -> 1.5e-6 and stayed there for 50,000 iterations at omega = 1.9,
// where omega = 1 converged in 39. This watches the block-end errors across balancing: `kPatience`
// blocks in a row without a new best (by 10 %) halve omega - 1 and cap omega there. A converging
// loop keeps setting new bests and is left alone. (Stopping the balancing instead, tried in
// session 25, made a D = 256 draw at eps = 1, N = 4,000 take 914 iterations instead of 384: the
// balanced loop was still improving, by less than 10 % per 5 blocks.)
class StallBackoff {
 public:
  // After each block; true when it lowered omega.
  bool record(double err, double& omega, double& cap) {
    if (err < 0.9 * best_) {
      best_ = err;
      since_ = 0;
      return false;
    }
    if (++since_ < kPatience || omega <= 1.0) return false;
    omega = 1.0 + 0.5 * (omega - 1.0);
    if (omega < 1.02) omega = 1.0;
    cap = omega;
    since_ = 0;
    return true;
  }

 private:
  static constexpr int kPatience = 5;
  double best_ = INFINITY;
  int since_ = 0;
};

}  // namespace segtransfer
