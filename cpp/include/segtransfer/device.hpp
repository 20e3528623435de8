// What the CUDA backend can do in this process. Nothing here creates a CUDA context.
#pragma once
#include <string>

namespace segtransfer {

bool built_with_cuda();
// Number of usable CUDA devices; 0 when built without CUDA or when no driver/device is present.
int cuda_device_count();
// Human-readable reason when cuda_device_count() is 0 ("built without CUDA", the CUDA error, ...).
std::string cuda_status();

}  // namespace segtransfer
