// The OTCE pipeline on the CPU: gather sampled pixels, cost, Sinkhorn, label reductions, entropies.
#pragma once
#include <cstdint>
#include <vector>

#include "segtransfer/sinkhorn.hpp"

namespace segtransfer {

// The most k-means cells each side is split into for class balancing and Newton's coarse space
// (otce splits each class by them, transport_points uses them as the groups); the Python layer sizes
// its memory estimate by it (`_core.max_groups`). 64 rather than 32: the finer groups cut the
// iterations (K = 10 at N = 10^4 on two task pairs: 147.3 -> 146.0 and 149.9 -> 141.7 at D = 19,
// 123.8 -> 120.4 and 154.9 -> 142.0 at D = 256; at N = 3 x 10^4 118 / 123 -> 108 / 114) for the same
// time or less. 128 cut them further but cost more than they saved at D = 19: the coarse problems
// grow with the groups (bench/RESULTS.md, session 19).
constexpr int kMaxGroups = 64;

// A strided view of pixel features: `images` blocks of `pixels` pixels with `dim` channels each.
// Covers (P, D) tables, (B, D, H, W) maps and (B, H, W, D) maps without copying; strides in elements.
template <typename T>
struct PixelView {
  const T* data = nullptr;
  int64_t images = 1, pixels = 0, dim = 0;
  int64_t stride_image = 0, stride_pixel = 0, stride_dim = 0;
  int64_t size() const { return images * pixels; }
};

// Copies the features of pixels idx[0..n) into out (n x dim, row-major); throws InvalidArgument
// naming `arg` if one of them is NaN or infinite.
template <typename T>
void gather_pixels(const PixelView<T>& view, const int64_t* idx, int64_t n, T* out, const char* arg);

// H(column label | row label) in nats for a joint table (rows x cols) that need not be normalised.
double conditional_entropy(const double* joint, int rows, int cols);

struct TransportResult {
  std::vector<double> f, g;
  SinkhornReport report;
  double transport_cost = 0.0;
};

// Entropic OT between point clouds x (n x d) and y (m x d) with weights a, b (uniform when null).
template <typename T>
TransportResult transport_points(const T* x, int64_t n, const T* y, int64_t m, int64_t d, const double* a,
                                 const double* b, const SinkhornOptions& opt, double memory_budget);

struct OTCEResult {
  int64_t repeats = 0;
  int source_classes = 0, target_classes = 0;
  std::vector<double> conditional_entropy, transport_cost, marginal_error;  // (repeats)
  std::vector<double> joint;                                                // (repeats, Cs, Ct)
  std::vector<int64_t> iterations;
  std::vector<uint8_t> converged, timed_out;
};

// OTCE over `repeats` draws. src_idx: (repeats, ns) pixel indices into src, tgt_idx: (repeats, nt).
// code[p] in [0, classes) is the class of pixel p. memory_budget: bytes (<= 0: unchecked); a draw
// whose dense buffers exceed it throws OutOfMemory before allocating.
template <typename T>
OTCEResult otce(const PixelView<T>& src, const int32_t* src_code, int source_classes,
                const int64_t* src_idx, int64_t ns, const PixelView<T>& tgt, const int32_t* tgt_code,
                int target_classes, const int64_t* tgt_idx, int64_t nt, int64_t repeats,
                const SinkhornOptions& opt, double memory_budget);

}  // namespace segtransfer
