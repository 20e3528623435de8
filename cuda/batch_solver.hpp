// The CUDA backend's launcher interface (internal). Plain C++ types only: the host compiler includes
// this from cpp/src/cuda_otce.cpp, nvcc from cuda/batch_solver.cu. No Eigen here (nvcc never sees it).
//
// K independent problems ("repeats") of n source points x m target points are solved together: every
// kernel launch advances all unfinished problems at once. See docs/cuda.md.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "dense_newton.hpp"
#include "segtransfer/cuda_types.hpp"

namespace segtransfer::cuda {

struct BatchProblem {
  FeatureSource src, tgt;          // features, in host memory or on `device`
  // Class code of every pixel of src / tgt (size src.size() / tgt.size(), host memory); pixels with a
  // negative code are ignored. Every valid pixel is checked for NaN/Inf, as the CPU path does.
  // nullptr: every pixel is valid.
  const int32_t* src_code = nullptr;
  const int32_t* tgt_code = nullptr;
  const char* src_name = "source_features";  // argument names for error messages
  const char* tgt_name = "target_features";
  int64_t repeats = 0, n = 0, m = 0;
  // Host arrays, (repeats, n) and (repeats, m): the pixels of every problem, in the order the rows /
  // columns of its cost matrix take. Within a problem the rows are grouped by class (see below).
  const int64_t* src_idx = nullptr;
  const int64_t* tgt_idx = nullptr;
  // Host arrays, (repeats, row_classes + 1) and (repeats, col_classes + 1): class c owns the rows
  // [row_class_start[c], row_class_start[c + 1]) of its problem, likewise for columns.
  int row_classes = 1, col_classes = 1;
  const int64_t* row_class_start = nullptr;
  const int64_t* col_class_start = nullptr;
  // Host weights (n) and (m), shared by all problems; positive, summing to 1. nullptr: uniform.
  const double* a = nullptr;
  const double* b = nullptr;
  bool float64 = false;  // storage precision of features and costs (float32 otherwise)
  int device = 0;        // CUDA device ordinal to compute on
  bool want_potentials = false;
};

struct BatchOptions {
  double epsilon = 0.1;
  double tol = 1e-6;           // converged when ||pi 1 - a||_1 + ||pi^T 1 - b||_1 <= tol
  int64_t max_iter = 50000;    // Sinkhorn iterations per problem, all stages together
  double timeout = 0.0;        // seconds for the whole batch; <= 0: none
  bool eps_scaling = true;
  double scaling_factor = 0.5;
  double stage_tol = 1e-2;     // marginal error at which an intermediate stage hands over
  double overrelaxation = 1.9;  // cap of the adaptive over-relaxation factor; 1: plain Sinkhorn
  // Newton polish (dense_newton.hpp) of the last stage, and with stage_newton of every stage: Sinkhorn
  // hands over at newton_switch. Empty: Sinkhorn only. The host glue passes the core's driver.
  DenseNewtonFn newton;
  bool stage_newton = true;
  double newton_switch = 1e-1;
  int newton_max_steps = 50;
  int check_every = 10;        // iterations per over-relaxation block (its error decides keep or undo)
  // Batches of at least this many cost entries (K n m) check the stage target after every iteration
  // (one host sync each, small against the ~5 ms an iteration takes at K n m = 10^9; measured faster
  // on the H200) instead of every block.
  double check_each_from = 5e7;
  std::function<bool()> interrupt;  // polled at every check (at most every 50 ms); true: stop
};

struct BatchResult {
  std::vector<double> joint;           // (repeats, row_classes, col_classes)
  std::vector<double> transport_cost;  // (repeats) <pi, C>
  std::vector<double> marginal_error;  // (repeats) on the dense plan, both marginals, plus certificate_rounding
  std::vector<int64_t> iterations;     // (repeats)
  std::vector<uint8_t> converged, timed_out;
  std::vector<double> f, g;            // (repeats, n), (repeats, m) when want_potentials
  int stages = 0;
};

// Solves the batch on prob.device. Throws InvalidArgument (bad input, NaN/Inf features), OutOfMemory
// (estimate above the free device memory, or a failed allocation), DeviceError (any other CUDA error,
// with the CUDA error string and the kernel or call), Interrupted.
BatchResult solve_batch(const BatchProblem& prob, const BatchOptions& opt);

// The device ordinal that owns a device pointer (cudaPointerGetAttributes). Throws DeviceError.
int pointer_device(uint64_t ptr);

// Copies `bytes` from device memory at `src` (on `device`) to host memory, after the work queued on
// the producer's `stream` (same encoding as FeatureSource::stream). Throws DeviceError.
void copy_to_host(void* dst, uint64_t src, uint64_t bytes, int device, uint64_t stream);

}  // namespace segtransfer::cuda
