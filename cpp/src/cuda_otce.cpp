// Host-side glue between the public CUDA interface (cuda_otce.hpp, same types as the CPU path) and the
// batched launcher in cuda/. Compiled by the host compiler in every build; without CUDA it only throws.
#include "segtransfer/cuda_otce.hpp"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "segtransfer/errors.hpp"

#ifdef SEGTRANSFER_WITH_CUDA
#include "batch_solver.hpp"
#include "sampling.hpp"
#include "dense_newton.hpp"
#endif

namespace segtransfer {

#ifdef SEGTRANSFER_WITH_CUDA

namespace {

cuda::BatchOptions batch_options(const SinkhornOptions& opt) {
  cuda::BatchOptions o;
  o.epsilon = opt.epsilon;
  o.tol = opt.tol;
  o.max_iter = opt.max_iter;
  o.timeout = opt.timeout;
  o.eps_scaling = opt.eps_scaling;
  o.scaling_factor = opt.scaling_factor;
  o.stage_tol = opt.stage_tol;
  o.overrelaxation = opt.overrelaxation;
  // Newton polish of the last stage, as on the CPU, and of the slow intermediate stages (see
  // batch_solver.cu). For the benchmark's comparisons: SEGTRANSFER_CUDA_NEWTON=0 turns Newton off,
  // SEGTRANSFER_CUDA_STAGE_NEWTON=0 keeps it to the last stage.
  const auto off = [](const char* name) {
    const char* env = std::getenv(name);
    return env != nullptr && env[0] == '0';
  };
  if (opt.newton && !off("SEGTRANSFER_CUDA_NEWTON")) {
    o.newton = dense_newton;
    o.newton_switch = opt.newton_switch;
    o.stage_newton = !off("SEGTRANSFER_CUDA_STAGE_NEWTON");
  }
  o.interrupt = opt.interrupt;
  return o;
}

// Orders the pixels of every draw by class (a permutation, which OT does not see), as the CPU path
// does, so that each class owns a contiguous range of rows / columns: out_idx (repeats, n) and
// class_start (repeats, classes + 1).
void group_by_class(const int32_t* code, int64_t code_len, int classes, const int64_t* idx, int64_t n,
                    int64_t repeats, const char* arg, std::vector<int64_t>& out_idx, std::vector<int64_t>& class_start) {
  out_idx.assign(idx, idx + repeats * n);
  class_start.assign(static_cast<size_t>(repeats) * (classes + 1), 0);
  for (int64_t k = 0; k < repeats; ++k) {
    int64_t* row = out_idx.data() + k * n;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t p = row[r];
      if (p < 0 || p >= code_len || code[p] < 0 || code[p] >= classes)
        throw InvalidArgument(arg, "internal: a sampled pixel is out of range, ignored, or has a bad class code");
    }
    std::stable_sort(row, row + n, [&](int64_t p, int64_t q) { return code[p] < code[q]; });
    int64_t* start = class_start.data() + k * (classes + 1);
    for (int64_t r = 0; r < n; ++r) ++start[code[row[r]] + 1];
    for (int c = 0; c < classes; ++c) start[c + 1] += start[c];
  }
}

}  // namespace

OTCEResult otce_cuda(const FeatureSource& src, const int32_t* src_code, int source_classes, const int64_t* src_idx,
                     int64_t ns, const FeatureSource& tgt, const int32_t* tgt_code, int target_classes,
                     const int64_t* tgt_idx, int64_t nt, int64_t repeats, const SinkhornOptions& opt, int device) {
  if (src.dim != tgt.dim)
    throw InvalidArgument("target_features", "has " + std::to_string(tgt.dim) +
                                                 " channels but source_features has " + std::to_string(src.dim));
  if (source_classes < 1 || target_classes < 1) throw InvalidArgument("labels", "internal: no classes");
  if (repeats < 1 || ns < 1 || nt < 1) throw InvalidArgument("n_pixels", "needs at least one pixel per draw");
  std::vector<int64_t> is, it, row_start, col_start;
  group_by_class(src_code, src.size(), source_classes, src_idx, ns, repeats, "source_labels", is, row_start);
  group_by_class(tgt_code, tgt.size(), target_classes, tgt_idx, nt, repeats, "target_labels", it, col_start);

  cuda::BatchProblem p;
  p.src = src;
  p.tgt = tgt;
  p.src_code = src_code;
  p.tgt_code = tgt_code;
  p.repeats = repeats;
  p.n = ns;
  p.m = nt;
  p.src_idx = is.data();
  p.tgt_idx = it.data();
  p.row_classes = source_classes;
  p.col_classes = target_classes;
  p.row_class_start = row_start.data();
  p.col_class_start = col_start.data();
  p.float64 = src.float64 || tgt.float64;  // mixed inputs are solved in float64, as on the CPU
  p.device = device;
  const cuda::BatchResult r = cuda::solve_batch(p, batch_options(opt));

  OTCEResult out;
  out.repeats = repeats;
  out.source_classes = source_classes;
  out.target_classes = target_classes;
  out.joint = r.joint;
  out.transport_cost = r.transport_cost;
  out.marginal_error = r.marginal_error;
  out.iterations = r.iterations;
  out.converged = r.converged;
  out.timed_out = r.timed_out;
  const size_t table = static_cast<size_t>(source_classes) * target_classes;
  for (int64_t k = 0; k < repeats; ++k)
    out.conditional_entropy.push_back(
        conditional_entropy(r.joint.data() + k * table, source_classes, target_classes));
  return out;
}

TransportResult transport_points_cuda(const FeatureSource& x, const FeatureSource& y, const double* a,
                                      const double* b, const SinkhornOptions& opt, int device) {
  if (x.dim != y.dim)
    throw InvalidArgument("y", "has " + std::to_string(y.dim) + " dimensions but x has " + std::to_string(x.dim));
  const int64_t n = x.size(), m = y.size();
  if (n < 1 || m < 1) throw InvalidArgument("x", "needs at least one point on each side");
  std::vector<int64_t> ix(n), iy(m);
  for (int64_t i = 0; i < n; ++i) ix[i] = i;
  for (int64_t j = 0; j < m; ++j) iy[j] = j;
  const int64_t row_start[2] = {0, n}, col_start[2] = {0, m};

  cuda::BatchProblem p;
  p.src = x;
  p.tgt = y;
  p.src_name = "x";
  p.tgt_name = "y";
  p.repeats = 1;
  p.n = n;
  p.m = m;
  p.src_idx = ix.data();
  p.tgt_idx = iy.data();
  p.row_class_start = row_start;
  p.col_class_start = col_start;
  p.a = a;
  p.b = b;
  p.float64 = x.float64 || y.float64;
  p.device = device;
  p.want_potentials = true;
  cuda::BatchResult r = cuda::solve_batch(p, batch_options(opt));

  TransportResult res;
  res.f = std::move(r.f);
  res.g = std::move(r.g);
  res.report.iterations = r.iterations[0];
  res.report.converged = r.converged[0] != 0;
  res.report.timed_out = r.timed_out[0] != 0;
  res.report.marginal_error = r.marginal_error[0];
  res.report.transport_cost = r.transport_cost[0];
  res.report.stages = r.stages;
  res.report.dense_stages = r.stages;
  res.transport_cost = r.transport_cost[0];
  return res;
}

std::vector<int64_t> sample_pixels_cuda(const int32_t* code, int64_t num_pixels, int64_t n, int64_t repeats,
                                        uint64_t seed, const char* arg_name, int device) {
  return cuda::sample_pixels(code, num_pixels, n, repeats, seed, arg_name, device);
}

int cuda_pointer_device(uint64_t ptr) { return cuda::pointer_device(ptr); }

void cuda_copy_to_host(void* dst, uint64_t src, uint64_t bytes, int device, uint64_t stream) {
  cuda::copy_to_host(dst, src, bytes, device, stream);
}

#else  // built without CUDA

namespace {
[[noreturn]] void no_cuda() {
  throw DeviceError("segtransfer was built without CUDA (no nvcc at build time or SEGTRANSFER_CUDA=OFF)");
}
}  // namespace

OTCEResult otce_cuda(const FeatureSource&, const int32_t*, int, const int64_t*, int64_t, const FeatureSource&,
                     const int32_t*, int, const int64_t*, int64_t, int64_t, const SinkhornOptions&, int) {
  no_cuda();
}
TransportResult transport_points_cuda(const FeatureSource&, const FeatureSource&, const double*, const double*,
                                      const SinkhornOptions&, int) {
  no_cuda();
}
std::vector<int64_t> sample_pixels_cuda(const int32_t*, int64_t, int64_t, int64_t, uint64_t, const char*, int) {
  no_cuda();
}
int cuda_pointer_device(uint64_t) { no_cuda(); }
void cuda_copy_to_host(void*, uint64_t, uint64_t, int, uint64_t) { no_cuda(); }

#endif

}  // namespace segtransfer
