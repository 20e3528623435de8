// Pixel sampling on a CUDA device (internal launcher interface; plain C++ types, as batch_solver.hpp).
#pragma once
#include <cstdint>
#include <vector>

namespace segtransfer::cuda {

// The draws of segtransfer::sample_pixels (sampling.hpp), computed on `device`: the same pixels for
// the same arguments (both run floyd_sampler.hpp). `code`: host array of num_pixels class codes
// (negative = ignored), uploaded once. Returns repeats * n pixel indices in host memory, each draw
// sorted ascending. Throws InvalidArgument (arg_name: fewer than n valid pixels), OutOfMemory, DeviceError.
std::vector<int64_t> sample_pixels(const int32_t* code, int64_t num_pixels, int64_t n, int64_t repeats,
                                   uint64_t seed, const char* arg_name, int device);

}  // namespace segtransfer::cuda
