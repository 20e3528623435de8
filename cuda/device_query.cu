#include <cuda_runtime.h>

#include "cuda_device.hpp"

namespace segtransfer::cuda {

int device_count(std::string* why_none) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (why_none) *why_none = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
    (void)cudaGetLastError();  // clear the sticky error so later queries start clean
    return 0;
  }
  if (n == 0 && why_none) *why_none = "no CUDA device found";
  return n;
}

}  // namespace segtransfer::cuda
