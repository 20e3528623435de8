#include "segtransfer/sampling.hpp"

#include <algorithm>
#include <limits>
#include <string>
#include <unordered_set>

#include "segtransfer/errors.hpp"

namespace segtransfer {
namespace {

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform integer in [0, bound) without modulo bias (Lemire 2019).
  uint64_t below(uint64_t bound) {
    unsigned __int128 prod = static_cast<unsigned __int128>(next()) * bound;
    uint64_t low = static_cast<uint64_t>(prod);
    if (low < bound) {
      const uint64_t threshold = (0 - bound) % bound;
      while (low < threshold) {
        prod = static_cast<unsigned __int128>(next()) * bound;
        low = static_cast<uint64_t>(prod);
      }
    }
    return static_cast<uint64_t>(prod >> 64);
  }
};

}  // namespace

int64_t count_valid(const int32_t* code, int64_t num_pixels) {
  int64_t k = 0;
  for (int64_t p = 0; p < num_pixels; ++p) k += code[p] >= 0;
  return k;
}

std::vector<int64_t> sample_pixels(const int32_t* code, int64_t num_pixels, int64_t n, int64_t repeats,
                                   uint64_t seed, const char* arg_name) {
  if (n < 1) throw InvalidArgument("n_pixels", "must be >= 1");
  if (repeats < 1) throw InvalidArgument("repeats", "must be >= 1");
  std::vector<int64_t> valid;
  valid.reserve(static_cast<size_t>(std::min<int64_t>(num_pixels, 1 << 20)));
  for (int64_t p = 0; p < num_pixels; ++p)
    if (code[p] >= 0) valid.push_back(p);
  const int64_t nv = static_cast<int64_t>(valid.size());
  if (nv < n)
    throw InvalidArgument(arg_name, "has " + std::to_string(nv) + " valid (non-ignored) pixels, fewer than n_pixels=" +
                                        std::to_string(n) + "; lower n_pixels or pass n_pixels=None to use them all");
  // n * repeats must not wrap around (a negative or small size would make every write below overflow).
  if (repeats > static_cast<int64_t>(std::numeric_limits<int64_t>::max() / sizeof(int64_t)) / n)
    throw OutOfMemory("repeats=" + std::to_string(repeats) + " draws of n_pixels=" + std::to_string(n) +
                      " pixel indices do not fit in memory; lower repeats");
  std::vector<int64_t> out(static_cast<size_t>(n * repeats));
  for (int64_t k = 0; k < repeats; ++k) {
    // Each repeat has its own stream, so repeat k does not depend on how many were asked for.
    // The start state goes through the splitmix finaliser twice: consecutive repeats must not get
    // streams that are shifted copies of each other (a linear seed + k * gamma would do exactly that).
    SplitMix64 mixer{seed};
    SplitMix64 rng{SplitMix64{mixer.next() ^ static_cast<uint64_t>(k)}.next()};
    int64_t* dst = out.data() + k * n;
    if (n == nv) {
      std::copy(valid.begin(), valid.end(), dst);
      continue;
    }
    // Floyd's algorithm: n distinct positions out of nv in O(n) expected time and memory.
    std::unordered_set<int64_t> chosen;
    chosen.reserve(static_cast<size_t>(2 * n));
    for (int64_t j = nv - n; j < nv; ++j) {
      const int64_t t = static_cast<int64_t>(rng.below(static_cast<uint64_t>(j + 1)));
      if (!chosen.insert(t).second) chosen.insert(j);
    }
    int64_t w = 0;
    for (int64_t pos : chosen) dst[w++] = valid[pos];
    std::sort(dst, dst + n);
  }
  return out;
}

}  // namespace segtransfer
