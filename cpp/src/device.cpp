#include "segtransfer/device.hpp"

#ifdef SEGTRANSFER_WITH_CUDA
#include "cuda_device.hpp"
#endif

namespace segtransfer {

#ifdef SEGTRANSFER_WITH_CUDA
bool built_with_cuda() { return true; }
int cuda_device_count() { return cuda::device_count(nullptr); }
std::string cuda_status() {
  std::string why;
  const int n = cuda::device_count(&why);
  return n > 0 ? std::to_string(n) + " CUDA device(s)" : why;
}
#else
bool built_with_cuda() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_status() { return "segtransfer was built without CUDA (no nvcc at build time or SEGTRANSFER_CUDA=OFF)"; }
#endif

}  // namespace segtransfer
