// The epsilon grid of the stages, shared by the CPU solvers (stage_schedule, kernels.hpp) and the CUDA
// launcher (cuda/batch_solver.cu): plain C++, no Eigen, so that nvcc compiles it as well.
#pragma once

#include <cmath>
#include <vector>

namespace segtransfer {

// The stages above `epsilon`, largest first: epsilon / factor^k for k = K .. 1, K the smallest with
// epsilon / factor^K >= cmax (none when cmax <= epsilon). The caller appends epsilon itself.
// The grid is anchored at epsilon so that the last stage always follows a whole step. Starting it at
// the largest cost left that step anywhere in (factor, 1] by the cost's scale: centring each side of
// the points on its own mean (otce.cpp) moved it on the benchmark's draws, and K = 10 at N = 10^4 took
// 137.6 -> 153.5 iterations a draw at D = 19; on this grid 127.4 (D = 256: 105.5 -> 106.4), and the
// mid-size draws mostly fewer (the demo's 23.6 -> 23.8; bench/RESULTS.md, session 26).
inline std::vector<double> epsilon_grid(double cmax, double epsilon, double factor) {
  std::vector<double> stages;
  const double k = std::ceil(std::log(cmax / epsilon) / std::log(1.0 / factor) - 1e-9);
  for (double j = k; j >= 1; --j) stages.push_back(epsilon * std::pow(1.0 / factor, j));
  return stages;
}

}  // namespace segtransfer
