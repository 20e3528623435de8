#include "segtransfer/sampling.hpp"

#include <algorithm>
#include <limits>
#include <string>

#include "floyd_sampler.hpp"
#include "segtransfer/errors.hpp"

namespace segtransfer {

int64_t count_valid(const int32_t* code, int64_t num_pixels) {
  int64_t k = 0;
  for (int64_t p = 0; p < num_pixels; ++p) k += code[p] >= 0;
  return k;
}

std::vector<int64_t> sample_pixels(const int32_t* code, int64_t num_pixels, int64_t n, int64_t repeats,
                                   uint64_t seed, const char* arg_name) {
  floyd::check_draw_arguments(n, repeats);
  std::vector<int64_t> valid;
  valid.reserve(static_cast<size_t>(std::min<int64_t>(num_pixels, 1 << 20)));
  for (int64_t p = 0; p < num_pixels; ++p)
    if (code[p] >= 0) valid.push_back(p);
  const int64_t nv = static_cast<int64_t>(valid.size());
  floyd::check_enough_valid(nv, n, arg_name);
  // n * repeats must not wrap around (a negative or small size would make every write below overflow).
  if (repeats > static_cast<int64_t>(std::numeric_limits<int64_t>::max() / sizeof(int64_t)) / n)
    throw OutOfMemory("repeats=" + std::to_string(repeats) + " draws of n_pixels=" + std::to_string(n) +
                      " pixel indices do not fit in memory; lower repeats");
  std::vector<int64_t> out(static_cast<size_t>(n * repeats));
  const int bits = floyd::table_bits(n);
  std::vector<int64_t> slots;
  for (int64_t k = 0; k < repeats; ++k) {
    int64_t* dst = out.data() + k * n;
    if (n == nv) {
      std::copy(valid.begin(), valid.end(), dst);
      continue;
    }
    slots.assign(size_t(1) << bits, floyd::kEmpty);
    floyd::draw(floyd::repeat_state(seed, k), nv, n, slots.data(), bits);
    int64_t w = 0;
    for (int64_t pos : slots)
      if (pos != floyd::kEmpty) dst[w++] = pos;
    std::sort(dst, dst + n);
    for (int64_t i = 0; i < n; ++i) dst[i] = valid[dst[i]];  // valid is ascending, so dst stays sorted
  }
  return out;
}

}  // namespace segtransfer
