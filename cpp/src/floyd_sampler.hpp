// The pixel sampler's arithmetic, compiled both by the host compiler (sampling.cpp) and by nvcc
// (cuda/sampling.cu), so that the CPU and the GPU draw the same pixels for a seed: then a GPU score can
// be checked against the CPU's on the same draw, and a user's seed means the same thing on either.
//
// A draw is Floyd's algorithm over the positions 0..nv-1 of the valid pixels, fed by a splitmix64
// stream; the chosen positions are kept in an open-addressing set (a flat table, which a GPU thread
// can use, unlike std::unordered_set). The set's contents do not depend on how it is stored, so the
// draw is the same as with any other set. The argument checks before a draw are here too, so that
// both samplers refuse the same inputs with the same words.
#pragma once
#include <cstdint>
#include <string>

#include "segtransfer/errors.hpp"

#if defined(__CUDACC__)
#define SEGTRANSFER_HD __host__ __device__
#else
#define SEGTRANSFER_HD
#endif

namespace segtransfer::floyd {

SEGTRANSFER_HD inline uint64_t mul_high(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

struct SplitMix64 {
  uint64_t state;
  SEGTRANSFER_HD uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform integer in [0, bound) without modulo bias (Lemire 2019): the high word of x * bound,
  // redrawn while the low word falls in the short first interval.
  SEGTRANSFER_HD uint64_t below(uint64_t bound) {
    uint64_t x = next();
    uint64_t low = x * bound;
    if (low < bound) {
      const uint64_t threshold = (0 - bound) % bound;
      while (low < threshold) {
        x = next();
        low = x * bound;
      }
    }
    return mul_high(x, bound);
  }
};

// The generator state of repeat k. The seed goes through the splitmix finaliser twice: consecutive
// repeats must not get streams that are shifted copies of each other (seed + k * gamma would), and
// repeat k must not depend on how many repeats were asked for.
SEGTRANSFER_HD inline uint64_t repeat_state(uint64_t seed, int64_t k) {
  SplitMix64 mixer{seed};
  return SplitMix64{mixer.next() ^ static_cast<uint64_t>(k)}.next();
}

constexpr int64_t kEmpty = -1;

// Slots of the set for a draw of n: a power of two >= 2 n, so that linear probing stays short.
SEGTRANSFER_HD inline int table_bits(int64_t n) {
  int bits = 1;
  while ((int64_t(1) << bits) < 2 * n) ++bits;
  return bits;
}

// Inserts value into the set (slots: 2^bits entries, kEmpty where free); false if it was there.
SEGTRANSFER_HD inline bool insert(int64_t* slots, int bits, int64_t value) {
  // Fibonacci hashing: Floyd inserts runs of consecutive j, which identity hashing would pile up.
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  uint64_t h = (static_cast<uint64_t>(value) * 0x9E3779B97F4A7C15ull) >> (64 - bits);
  while (true) {
    const int64_t s = slots[h];
    if (s == value) return false;
    if (s == kEmpty) {
      slots[h] = value;
      return true;
    }
    h = (h + 1) & mask;
  }
}

// Floyd's algorithm: n distinct positions out of nv (1 <= n <= nv), uniformly, in O(n) expected
// time. slots: 2^table_bits(n) entries, all kEmpty on entry; on return n of them hold the positions.
SEGTRANSFER_HD inline void draw(uint64_t state, int64_t nv, int64_t n, int64_t* slots, int bits) {
  SplitMix64 rng{state};
  for (int64_t j = nv - n; j < nv; ++j) {
    const int64_t t = static_cast<int64_t>(rng.below(static_cast<uint64_t>(j + 1)));
    if (!insert(slots, bits, t)) insert(slots, bits, j);
  }
}

// The checks both samplers make before a draw, with one wording (host code).
inline void check_draw_arguments(int64_t n, int64_t repeats) {
  if (n < 1) throw InvalidArgument("n_pixels", "must be >= 1");
  if (repeats < 1) throw InvalidArgument("repeats", "must be >= 1");
}
inline void check_enough_valid(int64_t nv, int64_t n, const char* arg_name) {
  if (nv < n)
    throw InvalidArgument(arg_name, "has " + std::to_string(nv) + " valid (non-ignored) pixels, fewer than n_pixels=" +
                                        std::to_string(n) + "; lower n_pixels or pass n_pixels=None to use them all");
}

}  // namespace segtransfer::floyd
