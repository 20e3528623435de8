// exp() for the log-sum-exp loops. glibc's exp is not vectorised without -ffast-math, which we refuse
// (it breaks inf/NaN handling elsewhere), so the hot loops use this branch-free version: Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2/2, then a Taylor polynomial for e^r and a 2^n scale built in
// the exponent bits. Truncation error: r^8/8! < 5e-9 (float, < 1 ulp) and r^14/14! < 5e-18 (double).
// Arguments below the smallest normal result flush to 0, which is what a log-sum-exp wants.
#pragma once
#include <cstdint>
#include <cstring>

namespace segtransfer::detail {

// fast_exp_lowp's polynomial for e^r, highest degree first (see fast_exp_lowp); also read by its
// AVX-512 form (fast_exp16 in cpp/src/lse_avx512.hpp) and, rescaled below, by its AVX2 one
// (fast_pow2_8 in cpp/src/lse_avx2.hpp), so they cannot drift apart.
constexpr float kExpLowpPoly[5] = {0.0414586067f, 0.167909071f, 0.500043571f, 0.999963403f, 0.999999285f};

// The same polynomial for 2^f = e^(f ln2), |f| <= 1/2 (coefficient k times ln2^(4 - k)), for the
// AVX2 loops that form their exponents in base 2 (fast_pow2_8 in cpp/src/lse_avx2.hpp).
constexpr double kLn2 = 0.693147180559945309417;
constexpr float kExp2LowpPoly[5] = {
    static_cast<float>(kExpLowpPoly[0] * kLn2 * kLn2 * kLn2 * kLn2),
    static_cast<float>(kExpLowpPoly[1] * kLn2 * kLn2 * kLn2), static_cast<float>(kExpLowpPoly[2] * kLn2 * kLn2),
    static_cast<float>(kExpLowpPoly[3] * kLn2), kExpLowpPoly[4]};
constexpr float kLog2e = 1.44269504088896341f;

// fast_exp(float) (Lowp = false) and fast_exp_lowp (true): the same reduction, clamps and scale
// around two polynomials for e^r.
template <bool Lowp>
inline float exp_float(float x) {
  const float lo = -87.0f;  // e^-87 ~ 1.6e-38, just above FLT_MIN
  const float keep = x >= lo ? 1.0f : 0.0f;
  x = x < lo ? lo : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float n = x * kLog2e + shifter;
  n -= shifter;
  float r = x - n * 0.693145751953125f;  // ln2 split in a high part exact in float ...
  r -= n * 1.42860682030941723212e-6f;   // ... and the rest
  float p;
  if constexpr (Lowp) {
    p = kExpLowpPoly[0];
    p = p * r + kExpLowpPoly[1];
    p = p * r + kExpLowpPoly[2];
    p = p * r + kExpLowpPoly[3];
    p = p * r + kExpLowpPoly[4];
  } else {
    p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
  }
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale * keep;
}

inline float fast_exp(float x) { return exp_float<false>(x); }

// The intermediate stages' float-exponent loops (RowLse::sum_lowp, ColLse::sum_row_lowp and their
// AVX2 and AVX-512 forms, fast_exp8 and fast_exp16): fast_exp's reduction and clamps with a degree-4 polynomial fitted for the
// least maximal relative error on |r| <= ln2/2 (Lawson-weighted least squares; 2.6e-6 in exact
// arithmetic, 2.7e-6 measured in float against std::exp). Those stages stop at a 1e-2 marginal error
// and form their exponents in float, which alone puts up to ~3e-4 relative on a term (kernels.hpp);
// three fewer multiply-adds than fast_exp made the summed exponentials 27 % cheaper (0.435 -> 0.319 ns
// an entry, AVX2 on Zen 3, bench/RESULTS.md session 12).
inline float fast_exp_lowp(float x) { return exp_float<true>(x); }

inline double fast_exp(double x) {
  const double lo = -708.0;
  const double keep = x >= lo ? 1.0 : 0.0;
  x = x < lo ? lo : x;
  x = x > 709.0 ? 709.0 : x;
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  double n = x * 1.4426950408889634074 + shifter;
  // The rounded n sits in the low mantissa bits of n + shifter (offset by 2^51): taking it from
  // there, not by a double -> int64 conversion, keeps the loops that call this vectorisable (GCC 12
  // left them scalar otherwise, even with AVX-512DQ).
  uint64_t nbits;
  std::memcpy(&nbits, &n, sizeof nbits);
  n -= shifter;
  double r = x - n * 6.93147180369123816490e-01;
  r -= n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const uint64_t bits = (nbits + 1023) << 52;  // the low 12 bits of nbits + 1023 are n + 1023
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale * keep;
}

}  // namespace segtransfer::detail
