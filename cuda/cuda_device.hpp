// Host-side entry points of the CUDA backend. Plain C++ types only: callers need no CUDA headers.
#pragma once
#include <string>

namespace segtransfer::cuda {

// Counts devices through the runtime API. cudaGetDeviceCount does not create a context; with no
// driver it fails with cudaErrorInsufficientDriver / NoDevice, which we report as zero devices.
int device_count(std::string* why_none);

}  // namespace segtransfer::cuda
