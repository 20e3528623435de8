// Over-relaxation control shared by the CPU solvers and the CUDA launcher: plain C++, no Eigen, so
// that nvcc compiles it in cuda/batch_solver.cu as well.
#pragma once

#include <algorithm>
#include <cmath>

namespace segtransfer {

// The adaptive over-relaxation of the Sinkhorn loops (CPU: sinkhorn_log, blocked; CUDA: batch_solver.cu), at the end of a
// block of iterations whose last error is `err` (`block_err`: the last accepted block's). Returns
// false when the block is to be undone (the caller restores its snapshot): omega then drops back
// halfway to 1 and the level that failed becomes the cap; otherwise omega climbs towards the cap.
inline bool accept_block(double err, double& block_err, double& omega, double& cap) {
  if (!std::isfinite(err) || (omega > 1.0 && err > block_err)) {
    cap = std::max(1.0, omega - 0.05);
    omega = 1.0 + 0.5 * (omega - 1.0);
    if (omega < 1.02) omega = 1.0;
    return false;
  }
  block_err = err;
  omega = std::min(cap, omega + 0.5 * (cap - omega) + 0.01);
  return true;
}

}  // namespace segtransfer
