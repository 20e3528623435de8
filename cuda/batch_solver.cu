// Batched log-domain Sinkhorn on one CUDA device: K problems of n x m points advance together.
//
// Run on an H200 (2026-12-04, bench/gpu_check.sh, sessions 22-23): agrees with the CPU solver,
// compute-sanitizer memcheck and racecheck clean; K = 10 draws of N = 10^4 at epsilon = 0.1 converge in
// 2.7-2.9 s with the Newton polish below. See docs/cuda.md for the design, the measurements and what
// remains.
//
// Pipeline (one stream, every launch checked, all reductions in a fixed order, so results are
// deterministic):
//   stage_features   finiteness check of every valid pixel + gather of the sampled rows into
//                    contiguous (K, n, D) / (K, m, D) buffers (on the device for device inputs, on
//                    the host + one upload for host inputs)
//   mean_kernel      per-problem mean of each side's points (double)
//   centre_kernel    subtract each side's own mean in place; squared norms and the separable part of
//                    the cost that the centring removes (added back to W_D and the potentials), in double
//   cost_kernel      C = max(0, |x|^2 + |y|^2 - 2 x.y): 16 x 16 shared-memory tiles, FMA accumulation in
//                    the storage type (no tensor cores, hence no TF32)
//   max_kernel       largest cost per problem (start of the epsilon schedule)
//   row_step_kernel  f half-step: one warp per row, online log-sum-exp in one pass over the row
//   col_step_kernel  g half-step: 32 columns x 8 row groups per block, reads rows of C (coalesced
//                    across columns, no transposed copy), merges the 8 partial log-sum-exps
//   sum_rows_kernel  L1 marginal error per problem (rows + columns) every `check_every` iterations;
//                    the host retires converged / diverged problems and steers each problem's
//                    over-relaxation factor (a block that raised the error is undone)
//   newton_row_kernel, newton_col_kernel, pattern_*_kernel, sparse_*_kernel   the plan products of
//                    the Newton polish (DeviceNewtonBackend, driven by dense_newton.cpp from the host):
//                    the last stage and the slow intermediate ones, Sinkhorn handing over at 1e-1
//   summary_row_kernel + joint_kernel + col_step_kernel (measure only)   the certifying pass:
//                    joint label table, W_D = <pi, C> and both marginal errors, streamed from the
//                    potentials; the plan is never stored
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "batch_solver.hpp"
#include "runtime.cuh"
#include "overrelaxation.hpp"
#include "schedule.hpp"
#include "stopping.hpp"
#include "segtransfer/errors.hpp"

namespace segtransfer::cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Kernels.

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRowWarps = 8;          // row kernels: one warp per row, 8 rows per 256-thread block
constexpr int kRowThreads = kRowWarps * kWarp;
constexpr int kColCols = 32;          // column kernel: 32 columns per block ...
constexpr int kColRows = 8;           // ... times 8 interleaved row groups (256 threads)
constexpr int kTile = 16;             // cost kernel: 16 x 16 output tile per block
constexpr int kMeanRows = 16;         // mean kernel: 32 dimensions x 16 row groups per block
constexpr int kReduceThreads = 256;   // per-problem reductions (power of two)
constexpr int64_t kMaxGridYZ = 65535;

// exp of an exponent formed in double, evaluated in the precision E (float: expf of the rounded
// argument, like the CPU path's float exponentials; double: exp). Arguments are <= 0 here.
template <typename E>
__device__ __forceinline__ double exp_in(double x);
template <>
__device__ __forceinline__ double exp_in<float>(double x) {
  return static_cast<double>(expf(static_cast<float>(x)));
}
template <>
__device__ __forceinline__ double exp_in<double>(double x) {
  return exp(x);
}

// Online log-sum-exp state (mx, s): the value is mx + log(s). One pass, one exponential per element;
// the rare rescale when the maximum moves is done in double so that repeated rescaling of the
// running sum does not accumulate float rounding.
template <typename E>
__device__ __forceinline__ void lse_push(double& mx, double& s, double x) {
  if (x > mx) {
    s = s * exp(mx - x) + 1.0;  // mx = -inf at the start: exp(-inf) = 0
    mx = x;
  } else {
    s += exp_in<E>(x - mx);  // NaN x lands here and poisons s: reported as divergence
  }
}

__device__ __forceinline__ void lse_merge(double& mx, double& s, double mx2, double s2) {
  const double m = fmax(mx, mx2);
  if (m == -INFINITY) {  // both empty
    mx = m;
    s = 0.0;
    return;
  }
  s = s * exp(mx - m) + s2 * exp(mx2 - m);
  mx = m;
}

// Butterfly reductions: every lane ends with the same value (IEEE + and * are commutative).
__device__ __forceinline__ void warp_lse(double& mx, double& s) {
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const double mx2 = __shfl_xor_sync(kFullMask, mx, off);
    const double s2 = __shfl_xor_sync(kFullMask, s, off);
    lse_merge(mx, s, mx2, s2);
  }
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// first_bad <- min(first_bad, p) over valid pixels p with a NaN/Inf channel.
template <typename Tin>
__global__ void check_finite_kernel(const Tin* data, int64_t pixels, int64_t dim, int64_t si, int64_t sp,
                                    int64_t sd, int64_t total_pixels, const int32_t* __restrict__ code,
                                    unsigned long long* first_bad) {
  const int64_t count = total_pixels * dim;
  for (int64_t e = global_thread(); e < count; e += grid_threads()) {
    const int64_t p = e / dim, d = e - p * dim;
    if (code != nullptr && code[p] < 0) continue;
    const int64_t img = p / pixels, pix = p - img * pixels;
    const Tin v = data[img * si + pix * sp + d * sd];
    if (!isfinite(v)) atomicMin(first_bad, static_cast<unsigned long long>(p));
  }
}

// out[r, d] = data[pixel idx[r], channel d], converted to the storage type.
template <typename Tin, typename T>
__global__ void gather_kernel(const Tin* data, int64_t pixels, int64_t dim, int64_t si, int64_t sp, int64_t sd,
                              const int64_t* __restrict__ idx, int64_t rows, T* __restrict__ out) {
  const int64_t count = rows * dim;
  for (int64_t e = global_thread(); e < count; e += grid_threads()) {
    const int64_t r = e / dim, d = e - r * dim;
    const int64_t p = idx[r];
    const int64_t img = p / pixels, pix = p - img * pixels;
    out[e] = static_cast<T>(data[img * si + pix * sp + d * sd]);
  }
}

// mean[k, d] = mean of channel d over the rows of x[k] (one side of problem k), in double.
// grid (ceil(dim / 32), K), block (32, kMeanRows).
template <typename T>
__global__ void mean_kernel(const T* __restrict__ x, int64_t rows, int64_t dim, double* __restrict__ mean) {
  __shared__ double part[kMeanRows][kWarp];
  const int64_t k = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  double acc = 0.0;
  if (d < dim) {
    const T* xk = x + k * rows * dim;
    for (int64_t r = threadIdx.y; r < rows; r += kMeanRows) acc += static_cast<double>(xk[r * dim + d]);
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && d < dim) {
    double total = 0.0;
    for (int t = 0; t < kMeanRows; ++t) total += part[t][threadIdx.x];
    mean[k * dim + d] = total / static_cast<double>(rows);
  }
}

// Centres one side of every problem on its own mean (the CPU path's centre_sides, otce.cpp): with
// delta = mean_s - mean_t, |x_i - y_j|^2 = |x~_i - y~_j|^2 + r_i + c_j, r_i = 2 x~_i . delta + |delta|^2,
// c_j = -2 y~_j . delta. The solver runs on the cost of the centred points, whose float32 rounding
// follows the points' spread rather than the distance between the two sets (the potentials absorb r
// and c; the host adds them back to W_D and the returned potentials).
//   x[k, r] -= own_mean[k] (in double, rounded to T); norm[k, r] = |x[k, r]|^2 of the rounded values;
//   offset[k, r] = scale (x[k, r] - own_mean[k]) . delta[k] (unrounded differences) + (with_dd ? |delta[k]|^2 : 0)
// scale 2 with_dd for the source side, scale -2 for the target side. grid (ceil(rows / kRowWarps), K),
// block kRowThreads.
template <typename T>
__global__ void centre_kernel(T* __restrict__ x, int64_t rows, int64_t dim, const double* __restrict__ own_mean,
                              const double* __restrict__ mean_s, const double* __restrict__ mean_t, double scale,
                              bool with_dd, double* __restrict__ norm, double* __restrict__ offset) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  const int64_t k = blockIdx.y;
  if (r >= rows) return;  // warp-uniform
  T* row = x + (k * rows + r) * dim;
  const double* mu = own_mean + k * dim;
  const double* ms = mean_s + k * dim;
  const double* mt = mean_t + k * dim;
  double acc = 0.0, dot = 0.0, dd = 0.0;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const double v = static_cast<double>(row[d]) - mu[d];
    const double delta = ms[d] - mt[d];
    const T rounded = static_cast<T>(v);
    row[d] = rounded;
    acc += static_cast<double>(rounded) * static_cast<double>(rounded);
    dot += v * delta;
    dd += delta * delta;
  }
  acc = warp_sum(acc);
  dot = warp_sum(dot);
  dd = warp_sum(dd);
  if (lane == 0) {
    norm[k * rows + r] = acc;
    offset[k * rows + r] = scale * dot + (with_dd ? dd : 0.0);
  }
}

// cost[k, i, j] = max(0, ns[k, i] + nt[k, j] - 2 <xs[k, i], xt[k, j]>). The dot product accumulates in
// T with FMAs on the CUDA cores (never tensor cores, so never TF32). A NaN (inf - inf from features
// whose squares overflow T) becomes +inf, which the max check reports.
// grid (ceil(m / kTile), ceil(n / kTile), K), block (kTile, kTile).
template <typename T>
__global__ void cost_kernel(const T* __restrict__ xs, const T* __restrict__ xt, const double* __restrict__ ns,
                            const double* __restrict__ nt, int64_t n, int64_t m, int64_t dim, T* __restrict__ cost) {
  __shared__ T xa[kTile][kTile + 1];  // xa[row][channel]; +1 avoids bank conflicts
  __shared__ T yb[kTile][kTile + 1];  // yb[col][channel]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t k = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const T* x = xs + k * n * dim;
  const T* y = xt + k * m * dim;
  T acc = 0;
  for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
    const int64_t d = d0 + tx;
    xa[ty][tx] = (i0 + ty < n && d < dim) ? x[(i0 + ty) * dim + d] : T(0);
    yb[ty][tx] = (j0 + ty < m && d < dim) ? y[(j0 + ty) * dim + d] : T(0);
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc += xa[ty][t] * yb[tx][t];
    __syncthreads();
  }
  const int64_t i = i0 + ty, j = j0 + tx;
  if (i < n && j < m) {
    const double v = ns[k * n + i] + nt[k * m + j] - 2.0 * static_cast<double>(acc);
    double c = v > 0.0 ? v : 0.0;
    if (v != v) c = INFINITY;
    cost[(k * n + i) * m + j] = static_cast<T>(c);
  }
}

// max_bits[k] <- max over cost[k] as the bits of a non-negative double (ordered like the values, so
// an integer atomicMax is exact). max_bits must start at 0 (= +0.0). grid (blocks, K).
template <typename T>
__global__ void max_kernel(const T* __restrict__ cost, int64_t per_problem, unsigned long long* max_bits) {
  __shared__ double part[kReduceThreads];
  const int64_t k = blockIdx.y;
  const T* c = cost + k * per_problem;
  double mx = 0.0;
  for (int64_t e = global_thread(); e < per_problem; e += grid_threads()) {
    const double v = static_cast<double>(c[e]);
    mx = v > mx ? v : mx;
  }
  part[threadIdx.x] = mx;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] = fmax(part[threadIdx.x], part[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0)
    atomicMax(&max_bits[k], static_cast<unsigned long long>(__double_as_longlong(part[0])));
}

// The Sinkhorn half-steps' online log-sum-exps are chains: each element's update waits for the one
// before (its running max and sum), and Nsight Compute found the session-23 kernels latency-bound
// (DRAM at 23-28 % of peak, SM at 55 %). U > 1 gives each thread U independent chains over
// interleaved elements, whose loads are issued together, merged (lse_merge) before the cross-thread
// merge. U = 1 is the session-23 loop, element for element. SEGTRANSFER_CUDA_ILP chooses (kIlpDefault
// unless set); U = 4 is compiled but was not yet run on a GPU (session 31).
constexpr int kIlpDefault = 1;
constexpr int kIlpWide = 4;

// The online log-sum-exp (mx, s) of term(e) over e = first, first + stride, ... < count, in U chains
// (element e in chain ((e - first) / stride) % U up to the tail, which goes to chain 0), merged.
template <typename E, int U, typename Term>
__device__ __forceinline__ void chained_lse(int64_t first, int64_t stride, int64_t count, const Term& term,
                                            double& mx, double& s) {
  double mxs[U], ss[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    mxs[u] = -INFINITY;
    ss[u] = 0.0;
  }
  int64_t e = first;
  for (; e + (U - 1) * stride < count; e += U * stride) {
    double x[U];  // all loads before the chains' updates
#pragma unroll
    for (int u = 0; u < U; ++u) x[u] = term(e + u * stride);
#pragma unroll
    for (int u = 0; u < U; ++u) lse_push<E>(mxs[u], ss[u], x[u]);
  }
  for (; e < count; e += stride) lse_push<E>(mxs[0], ss[0], term(e));
#pragma unroll
  for (int u = 1; u < U; ++u) lse_merge(mxs[0], ss[0], mxs[u], ss[u]);
  mx = mxs[0];
  s = ss[0];
}

// f half-step for every row i of every active problem k:
//   lse_i = log sum_j exp((f_i + g_j - C_ij) / eps + log b_j)      (exponent formed in double)
//   err_i = a_i |exp(lse_i) - 1|  = |row marginal_i - a_i| of the plan (f, g) before the update
//   f_i  <- f_i - omega_k eps lse_i     (over-relaxed when omega_k > 1; omega == nullptr: measure only)
// One warp per row, one pass (online log-sum-exp; U chains a lane, see kIlpDefault), butterfly
// merge. grid (ceil(n / 8), K).
template <typename T, typename E, int U>
__global__ void row_step_kernel(const T* __restrict__ cost, int64_t n, int64_t m, const double* __restrict__ g,
                                const double* __restrict__ log_b, const double* __restrict__ a, double eps,
                                double inv_eps, const int* __restrict__ active, const double* __restrict__ omega,
                                double* f, double* __restrict__ err) {
  const int64_t k = blockIdx.y;
  if (active != nullptr && active[k] == 0) return;  // block-uniform
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (i >= n) return;  // warp-uniform: the shuffles below see full warps
  const T* c = cost + (k * n + i) * m;
  const double* gk = g + k * m;
  const double fi = f[k * n + i];
  double mx, s;
  chained_lse<E, U>(
      lane, kWarp, m, [&](int64_t j) { return (fi + gk[j] - static_cast<double>(c[j])) * inv_eps + log_b[j]; }, mx, s);
  warp_lse(mx, s);
  if (lane == 0) {
    const double lse = mx + log(s);
    err[k * n + i] = a[i] * fabs(expm1(lse));
    if (omega != nullptr) f[k * n + i] = fi - omega[k] * eps * lse;
  }
}

// g half-step, the mirror image over columns, without a transposed copy of C: a block owns 32
// consecutive columns; its 8 row groups walk rows i = ty, ty + 8, ... reading C[i, j0 .. j0 + 31]
// (one 128-byte line per warp for float; U chains a thread over rows i, i + 8, ..., i + 8 (U - 1), see
// kIlpDefault), then the 8 partial log-sum-exps are merged in a fixed order.
// omega == nullptr measures only (certification). grid (ceil(m / 32), K), block (32, 8).
template <typename T, typename E, int U>
__global__ void col_step_kernel(const T* __restrict__ cost, int64_t n, int64_t m, const double* __restrict__ f,
                                const double* __restrict__ log_a, const double* __restrict__ b, double eps,
                                double inv_eps, const int* __restrict__ active, const double* __restrict__ omega,
                                double* g, double* __restrict__ err) {
  __shared__ double part_mx[kColRows][kColCols];
  __shared__ double part_s[kColRows][kColCols];
  const int64_t k = blockIdx.y;
  if (active != nullptr && active[k] == 0) return;  // block-uniform, before any __syncthreads
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColCols + tx;
  double mx = -INFINITY, s = 0.0, gj = 0.0;
  if (j < m) {
    gj = g[k * m + j];
    const T* c = cost + k * n * m + j;
    const double* fk = f + k * n;
    chained_lse<E, U>(
        ty, kColRows, n, [&](int64_t i) { return (fk[i] + gj - static_cast<double>(c[i * m])) * inv_eps + log_a[i]; },
        mx, s);
  }
  part_mx[ty][tx] = mx;
  part_s[ty][tx] = s;
  __syncthreads();  // every read of g[k, j] happens before the write below
  if (ty == 0 && j < m) {
    for (int t = 1; t < kColRows; ++t) lse_merge(mx, s, part_mx[t][tx], part_s[t][tx]);
    const double lse = mx + log(s);
    err[k * m + j] = b[j] * fabs(expm1(lse));
    if (omega != nullptr) g[k * m + j] = gj - omega[k] * eps * lse;
  }
}

// out[k] = sum_r values[k, r] in a fixed order (strided partial sums, then a tree), for active k.
// grid K, block kReduceThreads.
__global__ void sum_rows_kernel(const double* __restrict__ values, int64_t len, const int* __restrict__ active,
                                double* __restrict__ out) {
  __shared__ double part[kReduceThreads];
  const int64_t k = blockIdx.x;
  if (active != nullptr && active[k] == 0) return;  // block-uniform
  const double* v = values + k * len;
  double acc = 0.0;
  for (int64_t r = threadIdx.x; r < len; r += kReduceThreads) acc += v[r];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[k] = part[0];
}

// ---- Newton polish (dense_newton.hpp): products with the dense plan, never stored.
// p_ij = exp((f_i + g_j - C_ij) / eps + log a_i + log b_j), exponent in double, exp in E: double for
// the marginals, float for the products that only build the Newton system (the backend's
// `approximate`: with double exponentials everywhere a Newton pass took ~2x a Sinkhorn pass with float
// ones on the H200). Near the solution every entry is at most min(a_i, b_j), so the plain sums below cannot
// overflow (a bad trial point gives inf, which the driver rejects).

// out_i = sum_j p_ij w_j (squared: p_ij^2 w_j; w == nullptr: w_j = 1). One warp per row, lanes in a
// fixed order, butterfly sum. grid (ceil(n / 8), K).
template <typename T, typename E>
__global__ void newton_row_kernel(const T* __restrict__ cost, int64_t n, int64_t m, const double* __restrict__ f,
                                  const double* __restrict__ g, const double* __restrict__ log_a,
                                  const double* __restrict__ log_b, double inv_eps, const int* __restrict__ active,
                                  const double* __restrict__ w, bool squared, double* __restrict__ out) {
  const int64_t k = blockIdx.y;
  if (active[k] == 0) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (i >= n) return;
  const T* c = cost + (k * n + i) * m;
  const double* gk = g + k * m;
  const double* wk = w != nullptr ? w + k * m : nullptr;
  const double base = f[k * n + i] * inv_eps + log_a[i];
  double acc = 0.0;
  for (int64_t j = lane; j < m; j += kWarp) {
    double pij = exp_in<E>(base + (gk[j] - static_cast<double>(c[j])) * inv_eps + log_b[j]);
    if (squared) pij *= pij;
    acc += wk != nullptr ? pij * wk[j] : pij;
  }
  acc = warp_sum(acc);
  if (lane == 0) out[k * n + i] = acc;
}

// out_j = sum_i p_ij v_i (v == nullptr: v_i = 1) over all rows, or, with row_start (K, G + 1), per
// class c = blockIdx.y over its rows into out[(k m + j) G + c]. Block (32 columns, 8 row groups), the
// 8 partial sums merged in shared memory in a fixed order. grid (ceil(m / 32), G or 1, K).
template <typename T, typename E>
__global__ void newton_col_kernel(const T* __restrict__ cost, int64_t n, int64_t m, const double* __restrict__ f,
                                  const double* __restrict__ g, const double* __restrict__ log_a,
                                  const double* __restrict__ log_b, double inv_eps, const int* __restrict__ active,
                                  const double* __restrict__ v, const int64_t* __restrict__ row_start, int classes,
                                  double* __restrict__ out) {
  __shared__ double part[kColRows][kColCols];
  const int64_t k = blockIdx.z;
  if (active[k] == 0) return;  // block-uniform, before the barrier
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int cls = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColCols + tx;
  const int64_t begin = row_start != nullptr ? row_start[k * (classes + 1) + cls] : 0;
  const int64_t end = row_start != nullptr ? row_start[k * (classes + 1) + cls + 1] : n;
  double acc = 0.0;
  if (j < m) {
    const double gj = g[k * m + j] * inv_eps + log_b[j];
    const T* c = cost + k * n * m + j;
    const double* fk = f + k * n;
    const double* vk = v != nullptr ? v + k * n : nullptr;
    for (int64_t i = begin + ty; i < end; i += kColRows) {
      const double pij = exp_in<E>(fk[i] * inv_eps + log_a[i] + gj - static_cast<double>(c[i * m]) * inv_eps);
      acc += vk != nullptr ? pij * vk[i] : pij;
    }
  }
  part[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < m) {
    for (int t = 1; t < kColRows; ++t) acc += part[t][tx];
    if (row_start != nullptr)
      out[(k * m + j) * classes + cls] = acc;
    else
      out[k * m + j] = acc;
  }
}

// ---- The plan's pattern for Newton's approximate products. At the paper's epsilon the plan is
// sparse: on the benchmark's converged draws (N = 10^4) the entries above e^-30 a_i b_j are 2.4 %
// (D = 19) and 15 % (D = 256) of all, and all the others together weigh below 1e-16. So CG's
// products, which only build the Newton system, run over the entries kept by `kept` (CSR for the
// rows, a CSC-like copy for the columns), rebuilt from the current potentials before each step.
// The marginals, the right-hand side and the line search stay dense and exact.
constexpr double kPatternCut = -30.0;
// Above this share of the plan the pattern is not built: its storage (two copies, 16 bytes an entry
// for float32 costs) then outgrows what it saves. With 0.4 the benchmark's K = 10 call peaked at
// 11.7 GB of device memory against 4.1 GB dense (H200, session 23), for patterns of 20-38 % on the
// intermediate stages; the last stage's are 2-4 %.
constexpr double kPatternMaxDensity = 0.15;
constexpr int kPatternGroups = kColRows;  // the column kernels' row groups: each owns a segment

__device__ __forceinline__ bool kept(double fi, double gj, double cij, double inv_eps) {
  return (fi + gj - cij) * inv_eps > kPatternCut;  // a NaN or +inf cost is never kept
}

__device__ __forceinline__ int warp_sum_int(int v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// row_count[k n + i] = kept entries of row i. One warp per row. grid (ceil(n / 8), K).
template <typename T>
__global__ void pattern_row_count_kernel(const T* __restrict__ cost, int64_t n, int64_t m, const double* __restrict__ f,
                                         const double* __restrict__ g, double inv_eps, const int* __restrict__ active,
                                         int* __restrict__ row_count) {
  const int64_t k = blockIdx.y;
  if (active[k] == 0) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (i >= n) return;  // warp-uniform
  const T* c = cost + (k * n + i) * m;
  const double* gk = g + k * m;
  const double fi = f[k * n + i];
  int cnt = 0;
  for (int64_t j = lane; j < m; j += kWarp) cnt += kept(fi, gk[j], static_cast<double>(c[j]), inv_eps) ? 1 : 0;
  cnt = warp_sum_int(cnt);
  if (lane == 0) row_count[k * n + i] = cnt;
}

// Row i's kept columns (ascending) and costs from row_ptr[k n + i] on. One warp per row, a ballot
// per 32 columns. grid (ceil(n / 8), K).
template <typename T>
__global__ void pattern_row_fill_kernel(const T* __restrict__ cost, int64_t n, int64_t m, const double* __restrict__ f,
                                        const double* __restrict__ g, double inv_eps, const int* __restrict__ active,
                                        const int64_t* __restrict__ row_ptr, int32_t* __restrict__ cols,
                                        T* __restrict__ vals) {
  const int64_t k = blockIdx.y;
  if (active[k] == 0) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (i >= n) return;  // warp-uniform: the ballots see full warps
  const T* c = cost + (k * n + i) * m;
  const double* gk = g + k * m;
  const double fi = f[k * n + i];
  int64_t pos = row_ptr[k * n + i];
  const unsigned below = (1u << lane) - 1u;
  for (int64_t j0 = 0; j0 < m; j0 += kWarp) {
    const int64_t j = j0 + lane;
    const bool keep = j < m && kept(fi, gk[j], static_cast<double>(c[j]), inv_eps);
    const unsigned mask = __ballot_sync(kFullMask, keep);
    if (keep) {
      const int64_t at = pos + __popc(mask & below);
      cols[at] = static_cast<int32_t>(j);
      vals[at] = c[j];
    }
    pos += __popc(mask);
  }
}

// col_count[(k m + j) G + ty] = kept entries of column j in rows ty, ty + G, ... (the column
// kernels' layout, G = kPatternGroups). grid (ceil(m / 32), K), block (32, G).
template <typename T>
__global__ void pattern_col_count_kernel(const T* __restrict__ cost, int64_t n, int64_t m, const double* __restrict__ f,
                                         const double* __restrict__ g, double inv_eps, const int* __restrict__ active,
                                         int* __restrict__ col_count) {
  const int64_t k = blockIdx.y;
  if (active[k] == 0) return;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColCols + threadIdx.x;
  if (j >= m) return;  // no barrier below
  const double gj = g[k * m + j];
  const T* c = cost + k * n * m + j;
  const double* fk = f + k * n;
  int cnt = 0;
  for (int64_t i = threadIdx.y; i < n; i += kPatternGroups)
    cnt += kept(fk[i], gj, static_cast<double>(c[i * m]), inv_eps) ? 1 : 0;
  col_count[(k * m + j) * kPatternGroups + threadIdx.y] = cnt;
}

// Column j's kept rows and costs: segment ty from col_ptr[(k m + j) G + ty] on, so that the column's
// G segments are contiguous and its entries sit in a fixed order. Same grid and block as the count.
template <typename T>
__global__ void pattern_col_fill_kernel(const T* __restrict__ cost, int64_t n, int64_t m, const double* __restrict__ f,
                                        const double* __restrict__ g, double inv_eps, const int* __restrict__ active,
                                        const int64_t* __restrict__ col_ptr, int32_t* __restrict__ rows,
                                        T* __restrict__ vals) {
  const int64_t k = blockIdx.y;
  if (active[k] == 0) return;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColCols + threadIdx.x;
  if (j >= m) return;
  const double gj = g[k * m + j];
  const T* c = cost + k * n * m + j;
  const double* fk = f + k * n;
  int64_t pos = col_ptr[(k * m + j) * kPatternGroups + threadIdx.y];
  for (int64_t i = threadIdx.y; i < n; i += kPatternGroups) {
    const T cij = c[i * m];
    if (kept(fk[i], gj, static_cast<double>(cij), inv_eps)) {
      rows[pos] = static_cast<int32_t>(i);
      vals[pos] = cij;
      ++pos;
    }
  }
}

// newton_row_kernel<T, float> on the pattern: out_i = sum over row i's kept entries of p_ij w_j
// (squared: p_ij^2 w_j). One warp per row. grid (ceil(n / 8), K).
template <typename T>
__global__ void sparse_row_kernel(const int64_t* __restrict__ row_ptr, const int32_t* __restrict__ cols,
                                  const T* __restrict__ vals, int64_t n, int64_t m, const double* __restrict__ f,
                                  const double* __restrict__ g, const double* __restrict__ log_a,
                                  const double* __restrict__ log_b, double inv_eps, const int* __restrict__ active,
                                  const double* __restrict__ w, bool squared, double* __restrict__ out) {
  const int64_t k = blockIdx.y;
  if (active[k] == 0) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (i >= n) return;
  const double* gk = g + k * m;
  const double* wk = w != nullptr ? w + k * m : nullptr;
  const double base = f[k * n + i] * inv_eps + log_a[i];
  double acc = 0.0;
  for (int64_t e = row_ptr[k * n + i] + lane; e < row_ptr[k * n + i + 1]; e += kWarp) {
    const int32_t j = cols[e];
    double pij = exp_in<float>(base + (gk[j] - static_cast<double>(vals[e])) * inv_eps + log_b[j]);
    if (squared) pij *= pij;
    acc += wk != nullptr ? pij * wk[j] : pij;
  }
  acc = warp_sum(acc);
  if (lane == 0) out[k * n + i] = acc;
}

// newton_col_kernel<T, float> (no classes) on the pattern: out_j = sum over column j's kept entries
// of p_ij v_i. One warp per column. grid (ceil(m / 8), K).
template <typename T>
__global__ void sparse_col_kernel(const int64_t* __restrict__ col_ptr, const int32_t* __restrict__ rows,
                                  const T* __restrict__ vals, int64_t n, int64_t m, const double* __restrict__ f,
                                  const double* __restrict__ g, const double* __restrict__ log_a,
                                  const double* __restrict__ log_b, double inv_eps, const int* __restrict__ active,
                                  const double* __restrict__ v, double* __restrict__ out) {
  const int64_t k = blockIdx.y;
  if (active[k] == 0) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (j >= m) return;
  const double* fk = f + k * n;
  const double* vk = v != nullptr ? v + k * n : nullptr;
  const double gj = g[k * m + j] * inv_eps + log_b[j];
  const int64_t e1 = col_ptr[(k * m + j + 1) * kPatternGroups];
  double acc = 0.0;
  for (int64_t e = col_ptr[(k * m + j) * kPatternGroups] + lane; e < e1; e += kWarp) {
    const int32_t i = rows[e];
    const double pij = exp_in<float>(fk[i] * inv_eps + log_a[i] + gj - static_cast<double>(vals[e]) * inv_eps);
    acc += vk != nullptr ? pij * vk[i] : pij;
  }
  acc = warp_sum(acc);
  if (lane == 0) out[k * m + j] = acc;
}

// The certifying pass over rows, for every problem: plan entries
//   p_ij = exp((f_i + g_j - C_ij) / eps + log a_i + log b_j)   (exponent and exp in double)
// summed by target class (columns are grouped by class), with W_D contributions p_ij C_ij and the row
// marginal error |sum_j p_ij - a_i|. One warp per row. grid (ceil(n / 8), K).
template <typename T>
__global__ void summary_row_kernel(const T* __restrict__ cost, int64_t n, int64_t m, const double* __restrict__ f,
                                   const double* __restrict__ g, const double* __restrict__ log_a,
                                   const double* __restrict__ log_b, const double* __restrict__ a, double inv_eps,
                                   const int64_t* __restrict__ col_class_start, int col_classes,
                                   double* __restrict__ row_joint, double* __restrict__ row_err,
                                   double* __restrict__ row_cost) {
  const int64_t k = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (i >= n) return;  // warp-uniform
  const T* c = cost + (k * n + i) * m;
  const double* gk = g + k * m;
  const int64_t* starts = col_class_start + k * (col_classes + 1);
  const double fi = f[k * n + i], lai = log_a[i];
  double total = 0.0, wd = 0.0;
  for (int cc = 0; cc < col_classes; ++cc) {
    double mass = 0.0, wc = 0.0;
    for (int64_t j = starts[cc] + lane; j < starts[cc + 1]; j += kWarp) {
      const double cij = static_cast<double>(c[j]);
      const double p = exp((fi + gk[j] - cij) * inv_eps + lai + log_b[j]);
      mass += p;
      wc += p * cij;
    }
    mass = warp_sum(mass);
    wc = warp_sum(wc);
    if (lane == 0) row_joint[(k * n + i) * col_classes + cc] = mass;
    total += mass;
    wd += wc;
  }
  if (lane == 0) {
    row_err[k * n + i] = fabs(total - a[i]);
    row_cost[k * n + i] = wd;
  }
}

// joint[k, r, c] = sum over the rows of source class r (a contiguous range) of row_joint[k, i, c].
__global__ void joint_kernel(const double* __restrict__ row_joint, int64_t n, const int64_t* __restrict__ row_class_start,
                             int row_classes, int col_classes, int64_t repeats, double* __restrict__ joint) {
  const int64_t per = static_cast<int64_t>(row_classes) * col_classes;
  const int64_t count = repeats * per;
  for (int64_t e = global_thread(); e < count; e += grid_threads()) {
    const int64_t k = e / per, rem = e - k * per;
    const int64_t r = rem / col_classes, cc = rem - r * col_classes;
    const int64_t* starts = row_class_start + k * (row_classes + 1);
    double acc = 0.0;
    for (int64_t i = starts[r]; i < starts[r + 1]; ++i) acc += row_joint[(k * n + i) * col_classes + cc];
    joint[e] = acc;
  }
}

unsigned blocks_for(int64_t count, int64_t per_block) {
  return static_cast<unsigned>((count + per_block - 1) / per_block);
}

// ------------------------------------------------------------------------------------------------
// Host side.

using Clock = std::chrono::steady_clock;

void validate(const BatchProblem& p, const BatchOptions& o) {
  auto need = [](bool ok, const char* arg, const std::string& what) {
    if (!ok) throw InvalidArgument(arg, what);
  };
  need(p.repeats >= 1 && p.repeats <= kMaxGridYZ, "repeats", "must be in [1, 65535] for the CUDA solver");
  need(p.n >= 1 && p.m >= 1, "n_pixels", "needs at least one point on each side");
  need((p.n + kTile - 1) / kTile <= kMaxGridYZ, "n_pixels", "is too large for the CUDA solver (at most 1048560 source points)");
  // Newton's sparse pattern stores column indices as int32 (pattern_row_fill_kernel).
  need(p.m <= std::numeric_limits<int32_t>::max(), "n_pixels",
       "is too large for the CUDA solver (at most 2147483647 target points)");
  need(p.src.dim >= 1 && p.src.dim == p.tgt.dim, "target_features", "must have as many channels as source_features");
  need(p.src.data != 0 && p.tgt.data != 0, "features", "internal: null data pointer");
  need(p.src.images >= 1 && p.src.pixels >= 1 && p.tgt.images >= 1 && p.tgt.pixels >= 1, "features",
       "internal: empty feature view");
  need(p.src_idx != nullptr && p.tgt_idx != nullptr, "indices", "internal: null index array");
  need(p.row_classes >= 1 && p.col_classes >= 1 && p.row_class_start != nullptr && p.col_class_start != nullptr,
       "classes", "internal: class ranges missing");
  // Newton's class masses run one grid row per source class (class_column_sums).
  need(p.row_classes <= kMaxGridYZ, "source_labels",
       "has more than 65535 classes in a draw, more than the CUDA solver takes; use device='cpu'");
  need(p.device >= 0, "device", "must be a CUDA device ordinal >= 0");
  for (const FeatureSource* fs : {&p.src, &p.tgt}) {
    const char* name = fs == &p.src ? p.src_name : p.tgt_name;
    if (fs->device >= 0 && fs->device != p.device)
      throw InvalidArgument(name, "lives on cuda:" + std::to_string(fs->device) + " but the computation runs on cuda:" +
                                      std::to_string(p.device));
  }
  const int64_t K = p.repeats;
  for (int64_t e = 0; e < K * p.n; ++e)
    need(p.src_idx[e] >= 0 && p.src_idx[e] < p.src.size(), "indices", "internal: source pixel index out of range");
  for (int64_t e = 0; e < K * p.m; ++e)
    need(p.tgt_idx[e] >= 0 && p.tgt_idx[e] < p.tgt.size(), "indices", "internal: target pixel index out of range");
  auto ranges_ok = [](const int64_t* s, int classes, int64_t len) {
    if (s[0] != 0 || s[classes] != len) return false;
    for (int c = 0; c < classes; ++c)
      if (s[c + 1] < s[c]) return false;
    return true;
  };
  for (int64_t k = 0; k < K; ++k) {
    need(ranges_ok(p.row_class_start + k * (p.row_classes + 1), p.row_classes, p.n), "classes",
         "internal: bad source class ranges");
    need(ranges_ok(p.col_class_start + k * (p.col_classes + 1), p.col_classes, p.m), "classes",
         "internal: bad target class ranges");
  }
  for (int64_t i = 0; p.a != nullptr && i < p.n; ++i)
    need(p.a[i] > 0 && std::isfinite(p.a[i]), "a", "must hold finite weights > 0");
  for (int64_t j = 0; p.b != nullptr && j < p.m; ++j)
    need(p.b[j] > 0 && std::isfinite(p.b[j]), "b", "must hold finite weights > 0");
  need(o.epsilon > 0 && std::isfinite(o.epsilon), "epsilon", "must be a finite number > 0");
  need(o.tol > 0, "tol", "must be > 0");
  need(o.max_iter >= 1, "max_iter", "must be >= 1");
  need(o.scaling_factor > 0 && o.scaling_factor < 1, "scaling_factor", "must be in (0, 1)");
  need(o.check_every >= 1, "check_every", "must be >= 1");
}

// Host-memory features: every valid pixel must be finite (as in the CPU path).
template <typename Tin>
void check_host_finite(const FeatureSource& fs, const int32_t* code, const char* name) {
  const Tin* base = reinterpret_cast<const Tin*>(static_cast<uintptr_t>(fs.data));
  for (int64_t img = 0; img < fs.images; ++img) {
    for (int64_t pix = 0; pix < fs.pixels; ++pix) {
      const int64_t p = img * fs.pixels + pix;
      if (code != nullptr && code[p] < 0) continue;
      const Tin* row = base + img * fs.stride_image + pix * fs.stride_pixel;
      for (int64_t d = 0; d < fs.dim; ++d)
        if (!std::isfinite(row[d * fs.stride_dim]))
          throw InvalidArgument(name, "contains NaN or infinite values (pixel " + std::to_string(p) + ")");
    }
  }
}

template <typename Tin, typename T>
void gather_host(const FeatureSource& fs, const int64_t* idx, int64_t rows, T* out) {
  const Tin* base = reinterpret_cast<const Tin*>(static_cast<uintptr_t>(fs.data));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = idx[r];
    const Tin* row = base + (p / fs.pixels) * fs.stride_image + (p % fs.pixels) * fs.stride_pixel;
    for (int64_t d = 0; d < fs.dim; ++d) out[r * fs.dim + d] = static_cast<T>(row[d * fs.stride_dim]);
  }
}

// Fills out (rows x dim, on the device) with the features of pixels idx[0 .. rows), after checking
// every valid pixel for NaN/Inf. Host inputs are checked and gathered on the host and uploaded once
// (host_stage keeps the staging copy alive until the caller's next sync); device inputs are read in
// place by kernels, after the producer's stream.
template <typename Tin, typename T>
void stage_features(const FeatureSource& fs, const int32_t* code, const int64_t* idx, int64_t rows,
                    const char* name, Queue& q, T* out, std::vector<T>& host_stage) {
  if (fs.device < 0) {
    check_host_finite<Tin>(fs, code, name);
    host_stage.resize(static_cast<size_t>(rows * fs.dim));
    gather_host<Tin, T>(fs, idx, rows, host_stage.data());
    q.upload(out, host_stage.data(), host_stage.size(), "cudaMemcpyAsync (features to the device)");
    return;
  }
  wait_for_producer(fs.stream, q.stream(), name);
  const Tin* data = reinterpret_cast<const Tin*>(static_cast<uintptr_t>(fs.data));
  const int64_t total = fs.size();
  DeviceBuffer<int32_t> d_code;
  if (code != nullptr) {
    d_code = DeviceBuffer<int32_t>(static_cast<size_t>(total), "class codes");
    q.upload(d_code.get(), code, static_cast<size_t>(total), "cudaMemcpyAsync (class codes)");
  }
  DeviceBuffer<unsigned long long> d_bad(1, "finiteness flag");
  const unsigned long long none = ULLONG_MAX;
  q.upload(d_bad.get(), &none, 1, "cudaMemcpyAsync (finiteness flag)");
  check_finite_kernel<Tin><<<flat_grid(total * fs.dim), kFlatThreads, 0, q.stream()>>>(
      data, fs.pixels, fs.dim, fs.stride_image, fs.stride_pixel, fs.stride_dim, total, d_code.get(), d_bad.get());
  q.launched("check_finite_kernel");
  unsigned long long bad = ULLONG_MAX;
  q.download(&bad, d_bad.get(), 1, "cudaMemcpyAsync (finiteness flag)");
  q.sync("the finiteness check");
  if (bad != ULLONG_MAX)
    throw InvalidArgument(name, "contains NaN or infinite values (pixel " + std::to_string(bad) + ")");

  DeviceBuffer<int64_t> d_idx(static_cast<size_t>(rows), "pixel indices");
  q.upload(d_idx.get(), idx, static_cast<size_t>(rows), "cudaMemcpyAsync (pixel indices)");
  gather_kernel<Tin, T><<<flat_grid(rows * fs.dim), kFlatThreads, 0, q.stream()>>>(
      data, fs.pixels, fs.dim, fs.stride_image, fs.stride_pixel, fs.stride_dim, d_idx.get(), rows, out);
  q.launched("gather_kernel");
  // d_code / d_idx are freed on return; the stream is synchronised first so that the gather is done.
  q.sync("the gather of sampled pixels");
}

template <typename T>
void stage_any(const FeatureSource& fs, const int32_t* code, const int64_t* idx, int64_t rows, const char* name,
               Queue& q, T* out, std::vector<T>& host_stage) {
  if (fs.float64)
    stage_features<double, T>(fs, code, idx, rows, name, q, out, host_stage);
  else
    stage_features<float, T>(fs, code, idx, rows, name, q, out, host_stage);
}

// The Newton driver's passes (dense_newton.hpp) on the device: vectors go up, the kernels above run
// on the active problems, results come down; one synchronisation per call. The potentials are the
// solver's own buffers.
template <typename T>
class DeviceNewtonBackend final : public DenseNewtonBackend {
 public:
  DeviceNewtonBackend(Queue& q, const T* cost, int64_t K, int64_t n, int64_t m, double* f, double* g,
                      const double* log_a, const double* log_b, double eps, const int64_t* row_start, int classes)
      : q_(q), cost_(cost), K_(K), n_(n), m_(m), f_(f), g_(g), log_a_(log_a), log_b_(log_b), inv_eps_(1.0 / eps),
        row_start_(row_start), classes_(classes), active_(static_cast<size_t>(K), "Newton: active flags"),
        vn_(static_cast<size_t>(K * n), "Newton: row vectors"), vm_(static_cast<size_t>(K * m), "Newton: column vectors"),
        on_(static_cast<size_t>(K * n), "Newton: row products"), om_(static_cast<size_t>(K * m), "Newton: column products"),
        u_(static_cast<size_t>(K * m * classes), "Newton: class masses") {
    const char* env = std::getenv("SEGTRANSFER_CUDA_SPARSE");  // 0: dense products (for comparison)
    sparse_ = !(env != nullptr && env[0] == '0');
  }

  // Pattern builds, and the kept entries' share of the active problems' plans at the last build.
  int64_t pattern_builds() const { return builds_; }
  double pattern_density() const { return density_; }

  void set_potentials(const std::vector<double>& f, const std::vector<double>& g,
                      const std::vector<int>& on) override {
    pattern_ok_ = false;
    for (int64_t k = 0; k < K_; ++k) {
      if (!on[k]) continue;
      q_.upload(f_ + k * n_, f.data() + k * n_, static_cast<size_t>(n_), "cudaMemcpyAsync (Newton: f)");
      q_.upload(g_ + k * m_, g.data() + k * m_, static_cast<size_t>(m_), "cudaMemcpyAsync (Newton: g)");
    }
  }
  void sums(const std::vector<int>& on, std::vector<double>& r, std::vector<double>& c) override {
    rows(on, nullptr, false, false, r);
    cols(on, nullptr, false, c);
  }
  void col_products(const std::vector<int>& on, const std::vector<double>& v, bool approximate,
                    std::vector<double>& out) override {
    cols(on, &v, approximate, out);
  }
  void row_products(const std::vector<int>& on, const std::vector<double>& w, bool squared, bool approximate,
                    std::vector<double>& out) override {
    rows(on, &w, squared, approximate, out);
  }
  void class_column_sums(const std::vector<int>& on, std::vector<double>& U) override {
    push_active(on);
    newton_col_kernel<T, float><<<dim3(blocks_for(m_, kColCols), static_cast<unsigned>(classes_), static_cast<unsigned>(K_)),
                           dim3(kColCols, kColRows), 0, q_.stream()>>>(cost_, n_, m_, f_, g_, log_a_, log_b_, inv_eps_,
                                                                      active_.get(), nullptr, row_start_, classes_,
                                                                      u_.get());
    q_.launched("newton_col_kernel (class masses)");
    fetch(on, u_.get(), m_ * classes_, U);
  }

 private:
  void push_active(const std::vector<int>& on) {
    q_.upload(active_.get(), on.data(), static_cast<size_t>(K_), "cudaMemcpyAsync (Newton: active flags)");
  }
  // Downloads the active problems' slices (len values each) of dev into out, then synchronises.
  void fetch(const std::vector<int>& on, const double* dev, int64_t len, std::vector<double>& out) {
    for (int64_t k = 0; k < K_; ++k)
      if (on[k]) q_.download(out.data() + k * len, dev + k * len, static_cast<size_t>(len), "cudaMemcpyAsync (Newton)");
    q_.sync("a Newton product");
  }
  void rows(const std::vector<int>& on, const std::vector<double>* w, bool squared, bool approximate,
            std::vector<double>& out) {
    push_active(on);
    if (w != nullptr) q_.upload(vm_.get(), w->data(), static_cast<size_t>(K_ * m_), "cudaMemcpyAsync (Newton: w)");
    const dim3 grid(blocks_for(n_, kRowWarps), static_cast<unsigned>(K_));
    const double* wd = w != nullptr ? vm_.get() : nullptr;
    if (approximate && pattern(on))
      sparse_row_kernel<T><<<grid, kRowThreads, 0, q_.stream()>>>(row_ptr_.get(), cols_.get(), row_vals_.get(), n_, m_,
                                                                  f_, g_, log_a_, log_b_, inv_eps_, active_.get(), wd,
                                                                  squared, on_.get());
    else if (approximate)
      newton_row_kernel<T, float><<<grid, kRowThreads, 0, q_.stream()>>>(
          cost_, n_, m_, f_, g_, log_a_, log_b_, inv_eps_, active_.get(), wd, squared, on_.get());
    else
      newton_row_kernel<T, double><<<grid, kRowThreads, 0, q_.stream()>>>(
          cost_, n_, m_, f_, g_, log_a_, log_b_, inv_eps_, active_.get(), wd, squared, on_.get());
    q_.launched("newton_row_kernel");
    fetch(on, on_.get(), n_, out);
  }
  void cols(const std::vector<int>& on, const std::vector<double>* v, bool approximate, std::vector<double>& out) {
    push_active(on);
    if (v != nullptr) q_.upload(vn_.get(), v->data(), static_cast<size_t>(K_ * n_), "cudaMemcpyAsync (Newton: v)");
    const dim3 grid(blocks_for(m_, kColCols), 1, static_cast<unsigned>(K_)), block(kColCols, kColRows);
    const double* vd = v != nullptr ? vn_.get() : nullptr;
    if (approximate && pattern(on))
      sparse_col_kernel<T><<<dim3(blocks_for(m_, kRowWarps), static_cast<unsigned>(K_)), kRowThreads, 0,
                             q_.stream()>>>(col_ptr_.get(), rows_.get(), col_vals_.get(), n_, m_, f_, g_, log_a_,
                                            log_b_, inv_eps_, active_.get(), vd, om_.get());
    else if (approximate)
      newton_col_kernel<T, float><<<grid, block, 0, q_.stream()>>>(cost_, n_, m_, f_, g_, log_a_, log_b_, inv_eps_,
                                                                   active_.get(), vd, nullptr, 1, om_.get());
    else
      newton_col_kernel<T, double><<<grid, block, 0, q_.stream()>>>(cost_, n_, m_, f_, g_, log_a_, log_b_, inv_eps_,
                                                                    active_.get(), vd, nullptr, 1, om_.get());
    q_.launched("newton_col_kernel");
    fetch(on, om_.get(), m_, out);
  }

  // Makes the pattern of the current potentials available for the problems in `on` (pushed to the
  // device as the active flags already); false: use the dense kernels (pattern off, too dense to pay,
  // or not enough free device memory for it).
  bool pattern(const std::vector<int>& on) {
    if (!sparse_) return false;
    bool covered = pattern_ok_;
    for (int64_t k = 0; k < K_ && covered; ++k) covered = !on[k] || built_for_[k];
    if (covered) return use_pattern_;
    // Declined or not, the decision holds until the potentials change.
    built_for_ = on;
    pattern_ok_ = true;
    use_pattern_ = false;
    if (row_count_.size() == 0) {
      // Outside cuda_workspace_bytes, like the pattern itself: where they do not fit, the dense
      // kernels serve (as the comment above says), not a MemoryError in the middle of Newton.
      try {
        row_count_ = DeviceBuffer<int>(static_cast<size_t>(K_ * n_), "Newton: pattern row counts");
        col_count_ = DeviceBuffer<int>(static_cast<size_t>(K_ * m_ * kPatternGroups), "Newton: pattern column counts");
        row_ptr_ = DeviceBuffer<int64_t>(static_cast<size_t>(K_ * n_ + 1), "Newton: pattern row pointers");
        col_ptr_ = DeviceBuffer<int64_t>(static_cast<size_t>(K_ * m_ * kPatternGroups + 1),
                                         "Newton: pattern column pointers");
      } catch (const std::exception&) {
        row_count_ = DeviceBuffer<int>();
        col_count_ = DeviceBuffer<int>();
        row_ptr_ = DeviceBuffer<int64_t>();
        col_ptr_ = DeviceBuffer<int64_t>();
        return false;
      }
    }
    const dim3 rgrid(blocks_for(n_, kRowWarps), static_cast<unsigned>(K_));
    const dim3 cgrid(blocks_for(m_, kColCols), static_cast<unsigned>(K_)), cblock(kColCols, kPatternGroups);
    pattern_row_count_kernel<T><<<rgrid, kRowThreads, 0, q_.stream()>>>(cost_, n_, m_, f_, g_, inv_eps_, active_.get(),
                                                                        row_count_.get());
    q_.launched("pattern_row_count_kernel");
    pattern_col_count_kernel<T><<<cgrid, cblock, 0, q_.stream()>>>(cost_, n_, m_, f_, g_, inv_eps_, active_.get(),
                                                                   col_count_.get());
    q_.launched("pattern_col_count_kernel");
    const int64_t G = kPatternGroups;
    h_row_count_.assign(static_cast<size_t>(K_ * n_), 0);
    h_col_count_.assign(static_cast<size_t>(K_ * m_ * G), 0);
    for (int64_t k = 0; k < K_; ++k) {
      if (!on[k]) continue;  // the kernels skipped it: its counts stay 0
      q_.download(h_row_count_.data() + k * n_, row_count_.get() + k * n_, static_cast<size_t>(n_),
                  "cudaMemcpyAsync (Newton: pattern row counts)");
      q_.download(h_col_count_.data() + k * m_ * G, col_count_.get() + k * m_ * G, static_cast<size_t>(m_ * G),
                  "cudaMemcpyAsync (Newton: pattern column counts)");
    }
    q_.sync("the pattern counts");
    h_row_ptr_.assign(h_row_count_.size() + 1, 0);
    h_col_ptr_.assign(h_col_count_.size() + 1, 0);
    for (size_t r = 0; r < h_row_count_.size(); ++r) h_row_ptr_[r + 1] = h_row_ptr_[r] + h_row_count_[r];
    for (size_t r = 0; r < h_col_count_.size(); ++r) h_col_ptr_[r + 1] = h_col_ptr_[r] + h_col_count_[r];
    const int64_t nnz = h_row_ptr_.back();
    int64_t dense = 0;
    for (int64_t k = 0; k < K_; ++k) dense += on[k] ? n_ * m_ : 0;
    density_ = dense > 0 ? static_cast<double>(nnz) / static_cast<double>(dense) : 0.0;
    // Both layouts count the same entries (one predicate on the same values); a mismatch would be a
    // bug, and the dense kernels are always right. Denser patterns are declined (see kPatternMaxDensity).
    if (h_col_ptr_.back() != nnz || density_ > kPatternMaxDensity) return false;
    if (static_cast<int64_t>(cols_.size()) < nnz) {
      const size_t want = static_cast<size_t>(static_cast<double>(nnz) * 1.25) + 1;
      cols_ = DeviceBuffer<int32_t>();  // released before asking for the room
      rows_ = DeviceBuffer<int32_t>();
      row_vals_ = DeviceBuffer<T>();
      col_vals_ = DeviceBuffer<T>();
      size_t free_bytes = 0, total_bytes = 0;
      check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
      if (static_cast<double>(want) * 2.0 * (sizeof(int32_t) + sizeof(T)) > 0.8 * static_cast<double>(free_bytes))
        return false;
      try {
        cols_ = DeviceBuffer<int32_t>(want, "Newton: pattern columns");
        rows_ = DeviceBuffer<int32_t>(want, "Newton: pattern rows");
        row_vals_ = DeviceBuffer<T>(want, "Newton: pattern costs by row");
        col_vals_ = DeviceBuffer<T>(want, "Newton: pattern costs by column");
      } catch (const std::exception&) {  // another user took the room meanwhile: dense it is
        cols_ = DeviceBuffer<int32_t>();
        rows_ = DeviceBuffer<int32_t>();
        row_vals_ = DeviceBuffer<T>();
        col_vals_ = DeviceBuffer<T>();
        return false;
      }
    }
    q_.upload(row_ptr_.get(), h_row_ptr_.data(), h_row_ptr_.size(), "cudaMemcpyAsync (Newton: pattern row pointers)");
    q_.upload(col_ptr_.get(), h_col_ptr_.data(), h_col_ptr_.size(), "cudaMemcpyAsync (Newton: pattern column pointers)");
    pattern_row_fill_kernel<T><<<rgrid, kRowThreads, 0, q_.stream()>>>(cost_, n_, m_, f_, g_, inv_eps_, active_.get(),
                                                                       row_ptr_.get(), cols_.get(), row_vals_.get());
    q_.launched("pattern_row_fill_kernel");
    pattern_col_fill_kernel<T><<<cgrid, cblock, 0, q_.stream()>>>(cost_, n_, m_, f_, g_, inv_eps_, active_.get(),
                                                                  col_ptr_.get(), rows_.get(), col_vals_.get());
    q_.launched("pattern_col_fill_kernel");
    use_pattern_ = true;
    ++builds_;
    return true;
  }

  Queue& q_;
  const T* cost_;
  int64_t K_, n_, m_;
  double *f_, *g_;
  const double *log_a_, *log_b_;
  double inv_eps_;
  const int64_t* row_start_;
  int classes_;
  DeviceBuffer<int> active_;
  DeviceBuffer<double> vn_, vm_, on_, om_, u_;
  // The pattern (see kPatternCut): CSR by row, and by column in kPatternGroups segments per column.
  bool sparse_ = true, pattern_ok_ = false, use_pattern_ = false;
  std::vector<int> built_for_;
  int64_t builds_ = 0;
  double density_ = 0.0;
  DeviceBuffer<int> row_count_, col_count_;
  DeviceBuffer<int64_t> row_ptr_, col_ptr_;
  DeviceBuffer<int32_t> cols_, rows_;
  DeviceBuffer<T> row_vals_, col_vals_;
  std::vector<int> h_row_count_, h_col_count_;
  std::vector<int64_t> h_row_ptr_, h_col_ptr_;
};

template <typename T>
BatchResult solve_typed(const BatchProblem& p, const BatchOptions& o) {
  using E = T;  // precision of the exponentials in the Sinkhorn half-steps (see docs/cuda.md)
  const int64_t K = p.repeats, n = p.n, m = p.m, D = p.src.dim;
  const int rc = p.row_classes, cc = p.col_classes;

  DeviceGuard device_guard(p.device);
  Stream stream;
  Queue q(stream.get());

  // ---- memory: estimate first, refuse before allocating anything large
  const int64_t codes_len = (p.src.device >= 0 && p.src_code != nullptr ? p.src.size() : 0) +
                            (p.tgt.device >= 0 && p.tgt_code != nullptr ? p.tgt.size() : 0);
  const double need = cuda_workspace_bytes(K, n, m, D, rc, cc, sizeof(T) == 8, codes_len);
  size_t free_bytes = 0, total_bytes = 0;
  check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  const double margin = 64.0 * 1024 * 1024;  // allocator granularity, kernels' local memory
  if (need + margin > static_cast<double>(free_bytes)) {
    throw OutOfMemory("the CUDA solver needs " + gigabytes(need) + " of device memory on cuda:" +
                      std::to_string(p.device) + " for " + std::to_string(K) + " problems of " + std::to_string(n) +
                      " x " + std::to_string(m) + " points, but only " + gigabytes(double(free_bytes)) +
                      " are free (of " + gigabytes(double(total_bytes)) +
                      "); lower n_pixels or repeats, release memory cached by other libraries (e.g. "
                      "torch.cuda.empty_cache()), or use device='cpu'");
  }

  const size_t KN = static_cast<size_t>(K * n), KM = static_cast<size_t>(K * m);
  DeviceBuffer<T> d_cost(static_cast<size_t>(K) * n * m, "cost matrices");
  DeviceBuffer<T> d_xs(KN * D, "source features"), d_xt(KM * D, "target features");
  DeviceBuffer<double> d_mean_s(static_cast<size_t>(K * D), "source means");
  DeviceBuffer<double> d_mean_t(static_cast<size_t>(K * D), "target means");
  DeviceBuffer<double> d_ns(KN, "source norms"), d_nt(KM, "target norms");
  DeviceBuffer<double> d_off_s(KN, "source cost offsets"), d_off_t(KM, "target cost offsets");
  DeviceBuffer<double> d_f(KN, "potentials f"), d_g(KM, "potentials g");
  DeviceBuffer<double> d_err_rows(KN, "row errors"), d_err_cols(KM, "column errors");
  DeviceBuffer<double> d_row_cost(KN, "row costs");
  DeviceBuffer<double> d_row_joint(KN * cc, "row masses by class");
  DeviceBuffer<double> d_joint(static_cast<size_t>(K) * rc * cc, "joint tables");
  DeviceBuffer<double> d_a(n, "weights a"), d_log_a(n, "log a"), d_b(m, "weights b"), d_log_b(m, "log b");
  DeviceBuffer<int64_t> d_row_start(static_cast<size_t>(K) * (rc + 1), "source class ranges");
  DeviceBuffer<int64_t> d_col_start(static_cast<size_t>(K) * (cc + 1), "target class ranges");
  DeviceBuffer<unsigned long long> d_max_bits(K, "largest costs");
  DeviceBuffer<double> d_err(K, "errors"), d_err2(K, "column errors (sum)"), d_wd(K, "transport costs");
  DeviceBuffer<double> d_omega(K, "over-relaxation factors");
  DeviceBuffer<double> d_f_snap(KN, "potentials f (snapshot)"), d_g_snap(KM, "potentials g (snapshot)");
  DeviceBuffer<int> d_active(K, "active flags");
  DrainOnExit drain(stream.get());  // destroyed first: queued kernels finish before buffers are freed

  // ---- features: gather the sampled rows, centre each side of each problem on its own mean, cost,
  // largest cost
  std::vector<T> stage_s, stage_t;
  stage_any<T>(p.src, p.src_code, p.src_idx, K * n, p.src_name, q, d_xs.get(), stage_s);
  stage_any<T>(p.tgt, p.tgt_code, p.tgt_idx, K * m, p.tgt_name, q, d_xt.get(), stage_t);

  // Each side centred on its own mean (centre_kernel): the cost of the centred points, plus offsets
  // r (source) and c (target) that the potentials absorb.
  mean_kernel<T><<<dim3(blocks_for(D, kWarp), static_cast<unsigned>(K)), dim3(kWarp, kMeanRows), 0, q.stream()>>>(
      d_xs.get(), n, D, d_mean_s.get());
  q.launched("mean_kernel (source)");
  mean_kernel<T><<<dim3(blocks_for(D, kWarp), static_cast<unsigned>(K)), dim3(kWarp, kMeanRows), 0, q.stream()>>>(
      d_xt.get(), m, D, d_mean_t.get());
  q.launched("mean_kernel (target)");
  centre_kernel<T><<<dim3(blocks_for(n, kRowWarps), static_cast<unsigned>(K)), kRowThreads, 0, q.stream()>>>(
      d_xs.get(), n, D, d_mean_s.get(), d_mean_s.get(), d_mean_t.get(), 2.0, true, d_ns.get(), d_off_s.get());
  q.launched("centre_kernel (source)");
  centre_kernel<T><<<dim3(blocks_for(m, kRowWarps), static_cast<unsigned>(K)), kRowThreads, 0, q.stream()>>>(
      d_xt.get(), m, D, d_mean_t.get(), d_mean_s.get(), d_mean_t.get(), -2.0, false, d_nt.get(), d_off_t.get());
  q.launched("centre_kernel (target)");
  cost_kernel<T><<<dim3(blocks_for(m, kTile), blocks_for(n, kTile), static_cast<unsigned>(K)), dim3(kTile, kTile), 0,
                   q.stream()>>>(d_xs.get(), d_xt.get(), d_ns.get(), d_nt.get(), n, m, D, d_cost.get());
  q.launched("cost_kernel");
  q.zero(d_max_bits.get(), K * sizeof(unsigned long long), "cudaMemsetAsync (largest costs)");
  const unsigned max_blocks = static_cast<unsigned>(std::min<int64_t>((n * m + kReduceThreads - 1) / kReduceThreads, 1024));
  max_kernel<T><<<dim3(max_blocks, static_cast<unsigned>(K)), kReduceThreads, 0, q.stream()>>>(d_cost.get(), n * m,
                                                                                             d_max_bits.get());
  q.launched("max_kernel");
  std::vector<unsigned long long> max_bits(K);
  q.download(max_bits.data(), d_max_bits.get(), K, "cudaMemcpyAsync (largest costs)");
  std::vector<double> off_s(KN), off_t(KM);
  q.download(off_s.data(), d_off_s.get(), KN, "cudaMemcpyAsync (source cost offsets)");
  q.download(off_t.data(), d_off_t.get(), KM, "cudaMemcpyAsync (target cost offsets)");
  q.sync("the cost matrices");
  stage_s = std::vector<T>();  // the uploads are complete: release the host staging copies
  stage_t = std::vector<T>();

  double cmax = 0.0;
  std::vector<double> cost_bound(K);  // per problem: its floor (FloorWatch) and certificate rounding
  for (int64_t k = 0; k < K; ++k) {
    double v = 0.0;
    static_assert(sizeof(v) == sizeof(unsigned long long), "double must be 64-bit");
    std::memcpy(&v, &max_bits[k], sizeof v);
    if (!std::isfinite(v))
      throw cost_overflow();
    cost_bound[k] = v;
    cmax = std::max(cmax, v);
  }
  // The offsets overflowing double is the full cost overflowing (as on the CPU).
  const auto finite = [](const std::vector<double>& v) {
    return std::all_of(v.begin(), v.end(), [](double e) { return std::isfinite(e); });
  };
  if (!finite(off_s) || !finite(off_t))
    throw cost_overflow();
  if (cmax / o.epsilon > 1e12 || !std::isfinite(1.0 / o.epsilon))
    throw InvalidArgument("epsilon", "is too small for the cost scale (largest cost " + std::to_string(cmax) +
                                         ", cost / epsilon must stay below 1e12)");

  // ---- weights, class ranges, potentials
  std::vector<double> a(n), log_a(n), b(m), log_b(m);
  for (int64_t i = 0; i < n; ++i) a[i] = p.a != nullptr ? p.a[i] : 1.0 / static_cast<double>(n);
  for (int64_t j = 0; j < m; ++j) b[j] = p.b != nullptr ? p.b[j] : 1.0 / static_cast<double>(m);
  for (int64_t i = 0; i < n; ++i) log_a[i] = std::log(a[i]);
  for (int64_t j = 0; j < m; ++j) log_b[j] = std::log(b[j]);
  // W_D's separable part (see centre_kernel and the certifying pass).
  std::vector<double> shift(K, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < n; ++i) shift[k] += a[i] * off_s[k * n + i];
    for (int64_t j = 0; j < m; ++j) shift[k] += b[j] * off_t[k * m + j];
  }
  q.upload(d_a.get(), a.data(), n, "cudaMemcpyAsync (a)");
  q.upload(d_log_a.get(), log_a.data(), n, "cudaMemcpyAsync (log a)");
  q.upload(d_b.get(), b.data(), m, "cudaMemcpyAsync (b)");
  q.upload(d_log_b.get(), log_b.data(), m, "cudaMemcpyAsync (log b)");
  q.upload(d_row_start.get(), p.row_class_start, static_cast<size_t>(K) * (rc + 1), "cudaMemcpyAsync (class ranges)");
  q.upload(d_col_start.get(), p.col_class_start, static_cast<size_t>(K) * (cc + 1), "cudaMemcpyAsync (class ranges)");
  q.zero(d_f.get(), KN * sizeof(double), "cudaMemsetAsync (f)");  // all-zero bits are +0.0
  q.zero(d_g.get(), KM * sizeof(double), "cudaMemsetAsync (g)");

  // ---- epsilon schedule, as on the CPU (epsilon_grid, schedule.hpp): the grid epsilon / factor^k from
  // the first stage at or above the largest cost, then epsilon. One schedule for the whole batch, from
  // the largest cost of all problems (a problem with smaller costs spends an iteration or two in the
  // extra early stages).
  std::vector<double> schedule;
  if (o.eps_scaling) schedule = epsilon_grid(cmax, o.epsilon, o.scaling_factor);
  schedule.push_back(o.epsilon);

  BatchResult res;
  res.iterations.assign(K, 0);
  res.converged.assign(K, 0);
  res.timed_out.assign(K, 0);
  res.marginal_error.assign(K, std::numeric_limits<double>::quiet_NaN());
  res.transport_cost.assign(K, std::numeric_limits<double>::quiet_NaN());
  res.joint.assign(static_cast<size_t>(K) * rc * cc, 0.0);

  // at_floor: no retry can pass, as the CPU solvers' flag says: the last stage's Sinkhorn loop stopped
  // where its error no longer fell near float64's resolution for the problem's cost scale (FloorWatch),
  // or its certificate's rounding alone exceeds tol. Such a problem keeps its certificate.
  std::vector<int> active(K, 0), diverged(K, 0), at_floor(K, 0);
  std::vector<double> target(K, 0.0), err(K, 0.0), err2(K, 0.0), wd(K, 0.0);
  // Safeguarded over-relaxation per problem (the CPU solvers' accept_block, overrelaxation.hpp): omega climbs
  // towards its cap after every block of check_every iterations whose error fell; a block whose error
  // rose or overflowed is undone from the snapshot, omega drops halfway back to 1 and the failed level
  // becomes the cap. Reset at every epsilon stage.
  std::vector<double> omega(K, 1.0), cap(K, o.overrelaxation), block_err(K, 0.0);
  bool precise = false;  // exponentials in double (E = double) from here on; see the last stage below
  bool timed_out = false;
  const auto start = Clock::now();
  auto last_poll = start;
  // SEGTRANSFER_DEBUG: a line per stage / Newton round on stderr (what the CPU solvers print too).
  const bool debug = std::getenv("SEGTRANSFER_DEBUG") != nullptr;
  // The Sinkhorn half-steps' chains a thread (see kIlpDefault): SEGTRANSFER_CUDA_ILP=4 or 1.
  const char* ilp_env = std::getenv("SEGTRANSFER_CUDA_ILP");
  const int ilp = ilp_env != nullptr ? std::atoi(ilp_env) : kIlpDefault;
  if (ilp != 1 && ilp != kIlpWide)
    throw InvalidArgument("SEGTRANSFER_CUDA_ILP", "must be 1 or " + std::to_string(kIlpWide) + ", got '" +
                                                      std::string(ilp_env) + "'");
  const bool wide_chains = ilp == kIlpWide;
  auto trace = [&](const char* what, double eps) {
    if (!debug) return;
    int64_t it = 0;
    for (int64_t k = 0; k < K; ++k) it = std::max(it, res.iterations[k]);
    std::fprintf(stderr, "[cuda] %.3f s  %s eps %.4g  max iterations %lld\n",
                 std::chrono::duration<double>(Clock::now() - start).count(), what, eps, static_cast<long long>(it));
  };

  auto copy_potentials = [&](double* f_dst, const double* f_src, double* g_dst, const double* g_src, int64_t k,
                             int64_t count, const char* what) {
    check(cudaMemcpyAsync(f_dst + k * n, f_src + k * n, count * n * sizeof(double), cudaMemcpyDeviceToDevice,
                          q.stream()), what);
    check(cudaMemcpyAsync(g_dst + k * m, g_src + k * m, count * m * sizeof(double), cudaMemcpyDeviceToDevice,
                          q.stream()), what);
  };
  auto start_stage = [&]() {
    std::fill(omega.begin(), omega.end(), 1.0);
    std::fill(cap.begin(), cap.end(), std::max(1.0, o.overrelaxation));
    std::fill(block_err.begin(), block_err.end(), std::numeric_limits<double>::infinity());
    copy_potentials(d_f_snap.get(), d_f.get(), d_g_snap.get(), d_g.get(), 0, K, "cudaMemcpyAsync (snapshot)");
  };
  auto push_flags = [&]() {
    q.upload(d_active.get(), active.data(), K, "cudaMemcpyAsync (active flags)");
    q.upload(d_omega.get(), omega.data(), K, "cudaMemcpyAsync (over-relaxation factors)");
  };
  // Ctrl-C and the timeout, at most every 50 ms: throws Interrupted, or returns whether time is up.
  auto poll = [&]() {
    const auto now = Clock::now();
    if (now - last_poll < std::chrono::milliseconds(50)) return timed_out;
    last_poll = now;
    if (o.interrupt && o.interrupt()) throw Interrupted();
    if (o.timeout > 0 && std::chrono::duration<double>(now - start).count() > o.timeout) timed_out = true;
    return timed_out;
  };
  // One iteration (row then column half-step) on the active problems, exponentials in X's precision,
  // U log-sum-exp chains a thread (kIlpDefault).
  auto half_steps_u = [&](auto precision, auto chains, double eps, double inv_eps) {
    using X = decltype(precision);
    constexpr int U = decltype(chains)::value;
    row_step_kernel<T, X, U><<<dim3(blocks_for(n, kRowWarps), static_cast<unsigned>(K)), kRowThreads, 0, q.stream()>>>(
        d_cost.get(), n, m, d_g.get(), d_log_b.get(), d_a.get(), eps, inv_eps, d_active.get(), d_omega.get(),
        d_f.get(), d_err_rows.get());
    q.launched("row_step_kernel");
    col_step_kernel<T, X, U><<<dim3(blocks_for(m, kColCols), static_cast<unsigned>(K)), dim3(kColCols, kColRows), 0,
                               q.stream()>>>(d_cost.get(), n, m, d_f.get(), d_log_a.get(), d_b.get(), eps, inv_eps,
                                             d_active.get(), d_omega.get(), d_g.get(), d_err_cols.get());
    q.launched("col_step_kernel");
  };
  auto half_steps = [&](auto precision, double eps, double inv_eps) {
    if (wide_chains)
      half_steps_u(precision, std::integral_constant<int, kIlpWide>{}, eps, inv_eps);
    else
      half_steps_u(precision, std::integral_constant<int, 1>{}, eps, inv_eps);
  };

  // Iterations on the active problems until none is left; a convergence check (one host sync) every
  // check_every iterations. The error checked is the row error of the plan entering the block's last
  // row half-step plus the column error of the plan entering its last column half-step (with
  // omega > 1 neither marginal is exact after a half-step). The dense certificate decides in the end.
  const bool check_each = static_cast<double>(K) * n * m >= o.check_each_from;
  // A problem leaves the Sinkhorn loop at its stage target, or at handover_err for Newton once it has
  // spent handover_after iterations on the stage (set per stage below); last_err: the error it left at.
  std::vector<int64_t> stage_first(K, 0);
  std::vector<double> last_err(K, std::numeric_limits<double>::infinity());
  double handover_err = 0.0;
  int64_t handover_after = 0;
  auto leaves = [&](int64_t k, double e, int64_t its) {
    return std::isfinite(e) && (e <= target[k] || (e <= handover_err && its - stage_first[k] >= handover_after));
  };
  // Sums the last iteration's row and column errors of the active problems into err, err2 (host).
  auto fetch_errors = [&]() {
    sum_rows_kernel<<<static_cast<unsigned>(K), kReduceThreads, 0, q.stream()>>>(d_err_rows.get(), n,
                                                                                d_active.get(), d_err.get());
    q.launched("sum_rows_kernel (row errors)");
    sum_rows_kernel<<<static_cast<unsigned>(K), kReduceThreads, 0, q.stream()>>>(d_err_cols.get(), m,
                                                                                d_active.get(), d_err2.get());
    q.launched("sum_rows_kernel (column errors)");
    q.download(err.data(), d_err.get(), K, "cudaMemcpyAsync (row errors)");
    q.download(err2.data(), d_err2.get(), K, "cudaMemcpyAsync (column errors)");
    q.sync("a convergence check");
  };
  // The CPU solvers' stall rules (stopping.hpp), on the blocks' errors: an intermediate stage that
  // made no 0.1 % gain over kIntermediateStallIterations hands over whatever its error; the last
  // stage's loop ends after 450 blocks without one near the floor (at_floor[k]).
  auto iterate = [&](double eps, bool last_stage) {
    const double inv_eps = 1.0 / eps;
    const int far = last_stage ? std::numeric_limits<int>::max()
                               : static_cast<int>(std::max<int64_t>(1, kIntermediateStallIterations / o.check_every));
    std::vector<FloorWatch> watch;
    watch.reserve(K);
    for (int64_t k = 0; k < K; ++k) watch.emplace_back(cost_bound[k], eps, 450, far);
    for (;;) {
      int64_t block = o.check_every;
      bool any = false;
      for (int64_t k = 0; k < K; ++k) {
        if (!active[k]) continue;
        any = true;
        block = std::min<int64_t>(block, o.max_iter - res.iterations[k]);
      }
      if (!any) return;
      for (int64_t t = 0; t < block; ++t) {
        if (precise)
          half_steps(double{}, eps, inv_eps);
        else
          half_steps(E{}, eps, inv_eps);
        if (!check_each || t + 1 == block) continue;
        // Large batches: a problem that reached its target leaves now, not at the block's end (the
        // early stages need a few iterations each, and rounding each up to a block of 10 cost the
        // benchmark's K = 10 call 8-10 % of its time, H200). Its potentials are kept as they are.
        fetch_errors();
        bool retired = false;
        for (int64_t k = 0; k < K; ++k) {
          const double e = err[k] + err2[k];
          if (!active[k] || !leaves(k, e, res.iterations[k] + t + 1)) continue;
          active[k] = 0;
          res.iterations[k] += t + 1;
          last_err[k] = e;
          retired = true;
        }
        if (retired) push_flags();
        if (std::none_of(active.begin(), active.end(), [](int v) { return v != 0; })) break;
      }
      fetch_errors();
      std::vector<int64_t> undo, keep;
      for (int64_t k = 0; k < K; ++k) {
        if (!active[k]) continue;
        res.iterations[k] += block;
        const double e = err[k] + err2[k];
        last_err[k] = e;
        if (leaves(k, e, res.iterations[k])) {
          active[k] = 0;
        } else if (!std::isfinite(e) && omega[k] == 1.0) {
          active[k] = 0;  // plain Sinkhorn overflowed: reported as diverged, never as converged
          diverged[k] = 1;
        } else if (accept_block(e, block_err[k], omega[k], cap[k])) {
          keep.push_back(k);
        } else {
          undo.push_back(k);
        }
        if (active[k] && res.iterations[k] >= o.max_iter) active[k] = 0;
        if (active[k] && std::isfinite(e) && watch[k].stuck(e)) {  // after its block was kept or undone
          active[k] = 0;
          if (last_stage) at_floor[k] = 1;  // far_patience unlimited there: stuck only near the floor
        }
      }
      for (int64_t k : undo)
        copy_potentials(d_f.get(), d_f_snap.get(), d_g.get(), d_g_snap.get(), k, 1, "cudaMemcpyAsync (undo a block)");
      if (static_cast<int64_t>(keep.size()) == K) {
        copy_potentials(d_f_snap.get(), d_f.get(), d_g_snap.get(), d_g.get(), 0, K, "cudaMemcpyAsync (snapshot)");
      } else {
        for (int64_t k : keep)
          copy_potentials(d_f_snap.get(), d_f.get(), d_g_snap.get(), d_g.get(), k, 1, "cudaMemcpyAsync (snapshot)");
      }
      if (poll()) std::fill(active.begin(), active.end(), 0);
      push_flags();
    }
  };

  // Whether problem k may still iterate: not out of time, not diverged, iterations left.
  auto can_run = [&](int64_t k) { return !timed_out && !diverged[k] && res.iterations[k] < o.max_iter; };

  // Newton polish (o.newton set): the host driver (dense_newton.cpp, passed in by the glue) on the
  // device's dense plans, from the potentials the Sinkhorn loop handed over, down to `goal`. A Newton
  // step is charged as one iteration, as on the CPU. Returns the error reached per problem (inf: not
  // polished, or never measured).
  auto polish = [&](double eps, double goal) {
    std::vector<int> on(K, 0);
    bool any = false;
    for (int64_t k = 0; k < K; ++k) {
      on[k] = can_run(k) && !(last_err[k] <= goal) ? 1 : 0;
      any = any || on[k] != 0;
    }
    if (!any) return std::vector<double>(K, std::numeric_limits<double>::infinity());
    std::vector<double> hf(KN), hg(KM);
    q.download(hf.data(), d_f.get(), KN, "cudaMemcpyAsync (f)");
    q.download(hg.data(), d_g.get(), KM, "cudaMemcpyAsync (g)");
    q.sync("the hand-over to Newton");
    DeviceNewtonBackend<T> backend(q, d_cost.get(), K, n, m, d_f.get(), d_g.get(), d_log_a.get(), d_log_b.get(), eps,
                                   d_row_start.get(), rc);
    const DenseNewtonProblem np{K, n, m, a.data(), b.data(), eps, p.row_class_start, rc};
    trace("Newton from", eps);
    const DenseNewtonStats st =
        o.newton(backend, np, std::vector<double>(K, goal), on, hf, hg, o.newton_max_steps, poll);
    for (int64_t k = 0; k < K; ++k) res.iterations[k] += st.steps[k];
    if (debug) {
      std::fprintf(stderr, "[cuda]   pattern: %lld builds, last density %.4f\n",
                   static_cast<long long>(backend.pattern_builds()), backend.pattern_density());
      for (int64_t k = 0; k < K; ++k)
        std::fprintf(stderr, "[cuda]   problem %lld: %lld steps, %lld products, error %.3g\n",
                     static_cast<long long>(k), static_cast<long long>(st.steps[k]),
                     static_cast<long long>(st.products[k]), st.error[k]);
    }
    trace("Newton done", eps);
    return st.error;
  };

  // The certifying pass on the dense plan: joint tables, W_D, both marginal errors.
  std::vector<double> rounding(K, 0.0), cert_f(KN), cert_g(KM);
  auto certify = [&](double eps) {
    const double inv_eps = 1.0 / eps;
    summary_row_kernel<T><<<dim3(blocks_for(n, kRowWarps), static_cast<unsigned>(K)), kRowThreads, 0, q.stream()>>>(
        d_cost.get(), n, m, d_f.get(), d_g.get(), d_log_a.get(), d_log_b.get(), d_a.get(), inv_eps, d_col_start.get(),
        cc, d_row_joint.get(), d_err_rows.get(), d_row_cost.get());
    q.launched("summary_row_kernel");
    col_step_kernel<T, double, 1><<<dim3(blocks_for(m, kColCols), static_cast<unsigned>(K)), dim3(kColCols, kColRows), 0,
                                 q.stream()>>>(d_cost.get(), n, m, d_f.get(), d_log_a.get(), d_b.get(), eps, inv_eps,
                                               nullptr, nullptr, d_g.get(), d_err_cols.get());
    q.launched("col_step_kernel (measure)");
    sum_rows_kernel<<<static_cast<unsigned>(K), kReduceThreads, 0, q.stream()>>>(d_err_rows.get(), n, nullptr,
                                                                                d_err.get());
    q.launched("sum_rows_kernel (row errors)");
    sum_rows_kernel<<<static_cast<unsigned>(K), kReduceThreads, 0, q.stream()>>>(d_err_cols.get(), m, nullptr,
                                                                                d_err2.get());
    q.launched("sum_rows_kernel (column errors)");
    sum_rows_kernel<<<static_cast<unsigned>(K), kReduceThreads, 0, q.stream()>>>(d_row_cost.get(), n, nullptr,
                                                                                d_wd.get());
    q.launched("sum_rows_kernel (transport cost)");
    joint_kernel<<<flat_grid(K * rc * cc), kFlatThreads, 0, q.stream()>>>(d_row_joint.get(), n, d_row_start.get(),
                                                                          rc, cc, K, d_joint.get());
    q.launched("joint_kernel");
    q.download(err.data(), d_err.get(), K, "cudaMemcpyAsync (row errors)");
    q.download(err2.data(), d_err2.get(), K, "cudaMemcpyAsync (column errors)");
    q.download(wd.data(), d_wd.get(), K, "cudaMemcpyAsync (transport costs)");
    q.download(res.joint.data(), d_joint.get(), res.joint.size(), "cudaMemcpyAsync (joint tables)");
    q.download(cert_f.data(), d_f.get(), KN, "cudaMemcpyAsync (f)");
    q.download(cert_g.data(), d_g.get(), KM, "cudaMemcpyAsync (g)");
    q.sync("the certifying pass");
    for (int64_t k = 0; k < K; ++k) {
      // Plus what float64's rounding can hide at this cost scale, as on the CPU: the reported error
      // is then an upper bound, and where that rounding alone exceeds tol no retry can pass.
      rounding[k] = certificate_rounding(cost_bound[k], cert_f.data() + k * n, n, cert_g.data() + k * m, m, eps,
                                         std::max(n, m));
      res.marginal_error[k] = err[k] + err2[k] + rounding[k];
      if (rounding[k] > o.tol) at_floor[k] = 1;
      // <pi, C> = <pi, C~> + sum_i (pi 1)_i r_i + sum_j (pi^T 1)_j c_j, with the marginals a and b
      // standing in for the plan's (as on the CPU: off by at most max(|r|, |c|) times the marginal
      // error, the uncertainty that error leaves on <pi, C> anyway).
      res.transport_cost[k] = wd[k] + shift[k];
      res.converged[k] = res.marginal_error[k] <= o.tol ? 1 : 0;
    }
  };

  for (size_t s = 0; s < schedule.size(); ++s) {
    const double eps = schedule[s];
    const bool last = s + 1 == schedule.size();
    if (timed_out && !last) continue;  // out of time: go straight to certifying what we have
    ++res.stages;
    const double stage_target = last ? 0.5 * o.tol : std::max(o.stage_tol, o.tol);
    // Sinkhorn hands over to Newton at newton_switch. On the intermediate stages too (stage_newton):
    // there Sinkhorn took 50-140 iterations a stage from 1e-1 to stage_tol at the paper's epsilon on
    // the benchmark (H200, session 23), where Newton takes a few steps of ~10-30 products.
    const bool newton = static_cast<bool>(o.newton) && (last || o.stage_newton);
    // Newton on an intermediate stage pays off only where Sinkhorn is slow: after kStageNewtonAfter
    // iterations on the stage (most early stages finish in fewer).
    constexpr int64_t kStageNewtonAfter = 20;
    handover_err = newton ? o.newton_switch : 0.0;
    handover_after = last ? 0 : kStageNewtonAfter;
    for (int64_t k = 0; k < K; ++k) {
      active[k] = can_run(k) ? 1 : 0;
      target[k] = stage_target;
      stage_first[k] = res.iterations[k];
      last_err[k] = std::numeric_limits<double>::infinity();
    }
    start_stage();
    push_flags();
    bool handover = newton;
    for (;;) {
      iterate(eps, last);
      trace(last ? "last stage Sinkhorn" : "stage", eps);
      if (!last) {
        if (!handover) break;
        // Newton to the stage's target; Sinkhorn finishes what it did not reach.
        handover = false;
        const std::vector<double> reached = polish(eps, stage_target);
        bool again = false;
        for (int64_t k = 0; k < K; ++k) {
          if (reached[k] <= stage_target) last_err[k] = reached[k];
          const bool more = can_run(k) && !(last_err[k] <= stage_target);
          active[k] = more ? 1 : 0;
          again = again || more;
        }
        handover_err = 0.0;  // Sinkhorn finishes the stage
        if (!again) break;
        start_stage();
        push_flags();
        continue;
      }
      if (handover) {
        handover = false;
        polish(eps, 0.5 * o.tol);
        handover_err = 0.0;
        start_stage();  // fresh snapshots: a retry block must not fall back to the hand-over point
      }
      certify(eps);
      trace("certified", eps);
      // The check's estimate can be optimistic (it measures the plans half a step back, in the
      // storage precision): ask more of the problems that the dense pass did not certify, with
      // exponentials in double from now on (float32 storage: iterating with float exponentials
      // stalls at their rounding, ~1e-6 in L1 at cost / epsilon ~ 10^3, measured on the H200).
      precise = true;
      bool again = false;
      for (int64_t k = 0; k < K; ++k) {
        const bool retry = !res.converged[k] && can_run(k) && std::isfinite(res.marginal_error[k]) && !at_floor[k];
        active[k] = retry ? 1 : 0;
        if (retry) target[k] = next_certificate_target(target[k], err[k] + err2[k], rounding[k], o.tol);
        again = again || retry;
      }
      if (!again) break;
      push_flags();
    }
  }
  for (int64_t k = 0; k < K; ++k) res.timed_out[k] = timed_out && !res.converged[k] ? 1 : 0;

  if (p.want_potentials) {
    res.f.resize(KN);
    res.g.resize(KM);
    q.download(res.f.data(), d_f.get(), KN, "cudaMemcpyAsync (f)");
    q.download(res.g.data(), d_g.get(), KM, "cudaMemcpyAsync (g)");
  }
  q.sync("the end of the solve");
  if (p.want_potentials) {  // the potentials of the cost of the points as given (see centre_kernel)
    for (size_t e = 0; e < KN; ++e) res.f[e] += off_s[e];
    for (size_t e = 0; e < KM; ++e) res.g[e] += off_t[e];
  }
  return res;
}

}  // namespace

BatchResult solve_batch(const BatchProblem& prob, const BatchOptions& opt) {
  validate(prob, opt);
  return prob.float64 ? solve_typed<double>(prob, opt) : solve_typed<float>(prob, opt);
}

int pointer_device(uint64_t ptr) {
  cudaPointerAttributes attr{};
  check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(static_cast<uintptr_t>(ptr))),
        "cudaPointerGetAttributes");
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw InvalidArgument("array", "its __cuda_array_interface__ pointer is not CUDA device memory");
  return attr.device;
}

void copy_to_host(void* dst, uint64_t src, uint64_t bytes, int device, uint64_t stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  Stream s;
  wait_for_producer(stream, s.get(), "array");
  check(cudaMemcpyAsync(dst, reinterpret_cast<const void*>(static_cast<uintptr_t>(src)), bytes,
                        cudaMemcpyDeviceToHost, s.get()),
        "cudaMemcpyAsync (device to host)");
  check(cudaStreamSynchronize(s.get()), "cudaStreamSynchronize (device to host copy)");
}

}  // namespace segtransfer::cuda
