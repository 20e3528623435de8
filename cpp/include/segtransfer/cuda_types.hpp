// Plain types shared by the CUDA backend's public interface (cuda_otce.hpp), its launcher (cuda/) and
// the bindings. No Eigen, no CUDA headers: nvcc and the host compiler both read this file.
#pragma once
#include <cstdint>

namespace segtransfer {

// Where pixel features live and how to read them: `images` blocks of `pixels` pixels with `dim`
// channels, element strides (may be negative or zero), float32 or float64. Covers (P, D) tables and
// (B, D, H, W) / (B, H, W, D) maps whose H and W merge into one pixel stride.
struct FeatureSource {
  uint64_t data = 0;        // address of element (0, 0, 0): host memory when device < 0, else device memory
  bool float64 = false;     // element type: float64 when true, float32 when false
  int64_t images = 1, pixels = 0, dim = 0;
  int64_t stride_image = 0, stride_pixel = 0, stride_dim = 0;
  int device = -1;          // -1: host memory; >= 0: CUDA device ordinal the memory belongs to
  // The producer's stream, whose queued work must finish before the features are read:
  // 0: none (ready now), 1: the legacy default stream, 2: the per-thread default stream,
  // anything else: a cudaStream_t value. DLPack exports requested with stream=1 are ready on 1.
  uint64_t stream = 0;
  int64_t size() const { return images * pixels; }
};

// Device bytes the batched CUDA solver allocates for `repeats` problems of n x m points in `dim`
// dimensions with (row_classes x col_classes) label tables. codes_len: class codes uploaded for the
// finiteness check of device-resident inputs (0 for host inputs). Kept in sync with the buffers
// allocated in cuda/batch_solver.cu (see the table in docs/cuda.md).
inline double cuda_workspace_bytes(int64_t repeats, int64_t n, int64_t m, int64_t dim, int row_classes,
                                   int col_classes, bool float64, int64_t codes_len) {
  const double K = static_cast<double>(repeats), N = static_cast<double>(n), M = static_cast<double>(m);
  const double D = static_cast<double>(dim), t = float64 ? 8.0 : 4.0;
  double bytes = 0.0;
  bytes += K * N * M * t;                                  // cost matrices, one per repeat
  bytes += K * (N + M) * D * t;                            // gathered, centred features
  bytes += K * D * 8.0 * 2;                                // each side's mean
  bytes += K * (N + M) * 8.0 * 4;                          // squared norms, cost offsets; f, g and their snapshot
  bytes += K * (N + M) * 8.0;                              // per-row / per-column errors
  bytes += K * N * 8.0;                                    // per-row transport cost
  bytes += K * N * static_cast<double>(col_classes) * 8.0;  // per-row mass by target class
  bytes += K * static_cast<double>(row_classes) * col_classes * 8.0;  // joint tables
  bytes += (N + M) * 8.0 * 2;                              // weights and their logs
  bytes += K * (N + M) * 8.0;                              // sampled pixel indices
  bytes += K * (static_cast<double>(row_classes) + col_classes + 2) * 8.0;  // class ranges
  bytes += static_cast<double>(codes_len) * 4.0;           // class codes (device inputs only)
  bytes += K * 8.0 * 8;                                    // per-repeat scalars and flags
  bytes += K * (2 * (N + M) + M * static_cast<double>(row_classes)) * 8.0;  // Newton's vectors, class masses
  return bytes;
}

}  // namespace segtransfer
