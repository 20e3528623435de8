// CUDA runtime helpers shared by the backend's translation units (batch_solver.cu, sampling.cu):
// error reporting, RAII for the current device, streams and buffers, and the launch queue. Compiled by
// nvcc only; the host compiler never sees CUDA types (see batch_solver.hpp).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "segtransfer/errors.hpp"

namespace segtransfer::cuda {

// ------------------------------------------------------------------------------------------------
// Errors. Every runtime call goes through check(); every kernel launch through Queue::launched().

inline std::string cuda_message(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

[[noreturn]] inline void raise_cuda(cudaError_t err, const std::string& what) {
  const std::string msg = "CUDA error in " + what + ": " + cuda_message(err);
  if (err == cudaErrorMemoryAllocation) throw OutOfMemory(msg);
  throw DeviceError(msg);
}

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so that later launches report their own
    raise_cuda(err, what);
  }
}

// snprintf, not an ostringstream: formatting a double through <sstream> in this nvcc-compiled file
// crashed (SIGSEGV inside std::ostream::_M_insert<double>, seen on the H200 machine with nvcc 13.0).
inline std::string gigabytes(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, bytes >= 1e8 ? "%.1f GB" : "%.3f GB", bytes / 1e9);
  return buf;
}

// ------------------------------------------------------------------------------------------------
// RAII wrappers: the current device is restored, streams drained and destroyed, buffers freed, on
// every exit path (exceptions included).

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int count = 0;
    check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (device < 0 || device >= count)
      throw InvalidArgument("device", "cuda:" + std::to_string(device) + " does not exist (" +
                                          std::to_string(count) + " CUDA device(s) visible)");
    int current = 0;
    check(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

class Stream {
 public:
  Stream() { check(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"); }
  ~Stream() {
    if (s_ != nullptr) {
      (void)cudaStreamSynchronize(s_);
      (void)cudaStreamDestroy(s_);
    }
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// Blocks the host until `s` has drained; declared after the buffers that the
// queued kernels use, so that it runs before they are freed when an exception unwinds the stack.
class DrainOnExit {
 public:
  explicit DrainOnExit(cudaStream_t s) : s_(s) {}
  ~DrainOnExit() { (void)cudaStreamSynchronize(s_); }
  DrainOnExit(const DrainOnExit&) = delete;
  DrainOnExit& operator=(const DrainOnExit&) = delete;

 private:
  cudaStream_t s_;
};

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t count, const char* name) : count_(count) {
    if (count == 0) return;
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, count * sizeof(T));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      raise_cuda(err, std::string("cudaMalloc for ") + name + " (" + gigabytes(double(count) * sizeof(T)) + ")");
    }
    ptr_ = static_cast<T*>(p);
  }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), count_(o.count_) {
    o.ptr_ = nullptr;
    o.count_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = o.ptr_;
      count_ = o.count_;
      o.ptr_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }
  T* get() const { return ptr_; }
  size_t size() const { return count_; }

 private:
  void release() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

inline cudaStream_t as_stream(uint64_t v) {
  if (v == 1) return cudaStreamLegacy;
  if (v == 2) return cudaStreamPerThread;
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(v));
}

// Makes `s` wait for the work already queued on the producer's stream (DLPack / CAI stream rules).
inline void wait_for_producer(uint64_t producer, cudaStream_t s, const std::string& name) {
  if (producer == 0) return;
  cudaEvent_t ev = nullptr;
  check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  cudaError_t err = cudaEventRecord(ev, as_stream(producer));
  if (err == cudaSuccess) err = cudaStreamWaitEvent(s, ev, 0);
  (void)cudaEventDestroy(ev);  // allowed while the wait is pending: released when it completes
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    raise_cuda(err, "waiting for the producer stream of " + name);
  }
}

// The stream all kernels of a solve run on, with launch bookkeeping. Asynchronous faults surface at
// the next synchronisation; SEGTRANSFER_CUDA_SYNC=1 synchronises after every launch so that the
// error names the kernel that failed (slow; for debugging).
class Queue {
 public:
  explicit Queue(cudaStream_t s) : s_(s) {
    const char* env = std::getenv("SEGTRANSFER_CUDA_SYNC");
    sync_each_ = env != nullptr && env[0] != '\0' && env[0] != '0';
  }
  cudaStream_t stream() const { return s_; }

  void launched(const char* kernel) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) raise_cuda(err, std::string("kernel ") + kernel + " (launch)");
    last_ = kernel;
    if (sync_each_) {
      err = cudaStreamSynchronize(s_);
      if (err != cudaSuccess) raise_cuda(err, std::string("kernel ") + kernel);
    }
  }

  void sync(const char* where) {
    const cudaError_t err = cudaStreamSynchronize(s_);
    if (err != cudaSuccess)
      raise_cuda(err, std::string("kernel ") + last_ + " or an earlier one (reported at " + where +
                          "; run with SEGTRANSFER_CUDA_SYNC=1 to name the failing kernel exactly)");
  }

  template <typename T>
  void upload(T* dst, const T* src, size_t count, const char* what) {
    if (count == 0) return;
    check(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyHostToDevice, s_), what);
  }

  // Device to (pageable) host: returns when the copy is done; the caller syncs to surface errors.
  template <typename T>
  void download(T* dst, const T* src, size_t count, const char* what) {
    if (count == 0) return;
    check(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyDeviceToHost, s_), what);
  }

  void zero(void* dst, size_t bytes, const char* what) {
    if (bytes == 0) return;
    check(cudaMemsetAsync(dst, 0, bytes, s_), what);
  }

 private:
  cudaStream_t s_;
  bool sync_each_ = false;
  const char* last_ = "(none yet)";
};

// ------------------------------------------------------------------------------------------------
// Launch shape of the grid-stride element-wise kernels: kFlatThreads a block, at most 8 x 65535
// blocks (the kernels loop over what the grid does not cover).

constexpr int kFlatThreads = 256;

inline unsigned flat_grid(int64_t count) {
  const int64_t blocks = (count + kFlatThreads - 1) / kFlatThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 8 * 65535)));
}

}  // namespace segtransfer::cuda
