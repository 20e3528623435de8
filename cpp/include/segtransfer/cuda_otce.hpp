// The CUDA implementation of the OTCE pipeline and of point-cloud OT: the same operations, options and
// result types as otce() / transport_points() in otce.hpp, with features given as FeatureSources
// (host memory, or memory on the CUDA device `device`). The caller picks one of the two
// implementations from where the input lives (python/segtransfer/_api.py, the one dispatch point).
//
// Built without CUDA, every function here throws DeviceError("... built without CUDA ...").
// Checked on an H200 (correctness, sanitizers, speed): see docs/cuda.md.
#pragma once
#include <cstdint>
#include <vector>

#include "segtransfer/cuda_types.hpp"
#include "segtransfer/otce.hpp"

namespace segtransfer {

// OTCE over `repeats` draws on CUDA device `device`. Arguments as in otce(): class codes (one per
// pixel, negative = ignored) and the draws src_idx (repeats, ns) / tgt_idx (repeats, nt) are host
// arrays. All repeats are solved together; opt.timeout applies to the whole batch. opt.num_threads,
// truncation, stage_truncation, max_density, class_balance, float_stage_exponents, newton and
// multiscale settings are CPU-only and ignored here (overrelaxation applies: the same adaptive scheme).
OTCEResult otce_cuda(const FeatureSource& src, const int32_t* src_code, int source_classes, const int64_t* src_idx,
                     int64_t ns, const FeatureSource& tgt, const int32_t* tgt_code, int target_classes,
                     const int64_t* tgt_idx, int64_t nt, int64_t repeats, const SinkhornOptions& opt, int device);

// Entropic OT between x (x.pixels x dim, one image) and y on CUDA device `device`; a, b: host weights
// (uniform when null). Potentials follow the convention of sinkhorn.hpp.
TransportResult transport_points_cuda(const FeatureSource& x, const FeatureSource& y, const double* a,
                                      const double* b, const SinkhornOptions& opt, int device);

// The draws of sample_pixels() (sampling.hpp) computed on CUDA device `device`: the same pixels for the
// same arguments. `code` is a host array (uploaded once); the result is in host memory.
std::vector<int64_t> sample_pixels_cuda(const int32_t* code, int64_t num_pixels, int64_t n, int64_t repeats,
                                        uint64_t seed, const char* arg_name, int device);

// Ordinal of the CUDA device that owns `ptr` (for __cuda_array_interface__ inputs, which carry none).
int cuda_pointer_device(uint64_t ptr);

// Copies `bytes` of device memory at `src` to host memory `dst` once the producer's `stream`
// (FeatureSource::stream encoding) has finished writing it. Used for labels and weights.
void cuda_copy_to_host(void* dst, uint64_t src, uint64_t bytes, int device, uint64_t stream);

}  // namespace segtransfer
