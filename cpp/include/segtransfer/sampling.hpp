// Seeded pixel sampling. The generator is our own (splitmix64 + Lemire's bounded integers) so that a
// seed gives the same draw on every platform and compiler, which std:: distributions do not promise.
#pragma once
#include <cstdint>
#include <vector>

namespace segtransfer {

// `repeats` independent draws of `n` distinct pixels among those with code[p] >= 0 (negative codes
// mark ignored pixels). Returns repeats * n pixel indices; each draw is sorted ascending.
// Throws InvalidArgument when fewer than n valid pixels exist.
std::vector<int64_t> sample_pixels(const int32_t* code, int64_t num_pixels, int64_t n, int64_t repeats,
                                   uint64_t seed, const char* arg_name);

// Number of pixels with code >= 0.
int64_t count_valid(const int32_t* code, int64_t num_pixels);

}  // namespace segtransfer
