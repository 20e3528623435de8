// Entropic optimal transport without the n x m cost in memory: the blocked solver recomputes the
// cost from the points in panels of rows at every pass, for problems whose cost (and truncated
// kernels) sinkhorn_log cannot hold, e.g. 10^5 pixels per side (40 GB of float32 cost).
#pragma once
#include <cstdint>

#include "segtransfer/sinkhorn.hpp"

namespace segtransfer {

// sinkhorn_log's problem, options and report, between points x (n x d) and y (m x d), both
// row-major, with C_ij = |x_i - y_j|^2 recomputed at every pass instead of stored: memory
// O((n + m) d + threads * 32 * m) plus Newton's truncated copy of the plan (at most
// opt.blocked_plan_bytes), time O(n m d) per Sinkhorn iteration. It keeps epsilon-scaling with
// stage extrapolation, the safeguarded over-relaxation, class balancing (on `groups`, default
// `classes`) and the Newton finish, whose residuals and line search run on the dense plan and whose
// CG products run on the plan's entries with C - f - g < 20 eps (recomputed passes when those do not
// fit). It leaves out the truncated kernel of the Sinkhorn iterations and the multiscale start. The
// certificate is a pass over the dense plan, as sinkhorn_log's when its pattern cannot vouch for the
// result. Results are identical for any thread count. Throws InvalidArgument / Interrupted.
template <typename T>
SinkhornReport sinkhorn_blocked(const T* x, int64_t n, const T* y, int64_t m, int64_t d, const double* a,
                                const double* b, const SinkhornOptions& opt, double* f, double* g,
                                const PlanClasses* classes = nullptr, const PlanClasses* groups = nullptr);

// Bytes sinkhorn_blocked allocates for such a problem on `threads` threads, with up to `row_groups`
// x `col_groups` balancing groups (its inputs and the potentials not included).
template <typename T>
double blocked_bytes(int64_t n, int64_t m, int64_t d, int threads, int row_groups, int col_groups);

}  // namespace segtransfer
