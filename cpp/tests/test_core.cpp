// C++ unit tests of the core, without Python: built with SEGTRANSFER_TESTS=ON (and under the
// sanitizers). Each check compares with an independent formula or a known exact answer.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "segtransfer/errors.hpp"
#include "segtransfer/fastexp.hpp"
#include "segtransfer/otce.hpp"
#include "segtransfer/sampling.hpp"

using namespace segtransfer;

static int failures = 0, passed = 0;
#define CHECK(cond)                                                         \
  do {                                                                      \
    if (cond) {                                                             \
      ++passed;                                                             \
    } else {                                                                \
      ++failures;                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                       \
  } while (0)

static void test_fast_exp() {
  for (double x = -700; x <= 0; x += 0.37) {
    const double ref = std::exp(x);
    CHECK(std::fabs(detail::fast_exp(x) - ref) <= 4e-16 * ref);
  }
  for (float x = -86.f; x <= 0.f; x += 0.013f) {
    const double ref = std::exp(static_cast<double>(x));
    CHECK(std::fabs(detail::fast_exp(x) - ref) <= 3e-7 * ref);
  }
  CHECK(detail::fast_exp(-1e4) == 0.0);
  CHECK(detail::fast_exp(-1e4f) == 0.0f);
}

static void test_sampling() {
  std::vector<int32_t> code(1000);
  for (int i = 0; i < 1000; ++i) code[i] = (i % 7 == 0) ? -1 : i % 3;
  const auto s1 = sample_pixels(code.data(), 1000, 200, 3, 5, "labels");
  const auto s2 = sample_pixels(code.data(), 1000, 200, 3, 5, "labels");
  CHECK(s1 == s2);
  bool distinct = true, valid = true;
  for (int k = 0; k < 3; ++k)
    for (int i = 0; i < 200; ++i) {
      valid = valid && code[s1[k * 200 + i]] >= 0;
      if (i) distinct = distinct && s1[k * 200 + i] > s1[k * 200 + i - 1];
    }
  CHECK(valid);
  CHECK(distinct);
  CHECK(!std::equal(s1.begin(), s1.begin() + 200, s1.begin() + 200));
  bool threw = false;
  try {
    sample_pixels(code.data(), 1000, 999, 1, 0, "labels");
  } catch (const InvalidArgument&) {
    threw = true;
  }
  CHECK(threw);
}

// Two well separated clusters relabelled bijectively: the plan keeps clusters apart, H(Yt|Ys) = 0.
static void test_otce_bijection() {
  const int64_t n = 200, d = 3;
  std::mt19937_64 rng(1);
  std::normal_distribution<double> nz(0.0, 0.3);
  std::vector<double> xs(n * d), xt(n * d);
  std::vector<int32_t> ys(n), yt(n);
  for (int64_t i = 0; i < n; ++i) {
    ys[i] = i % 2;
    yt[i] = 1 - ys[i];
    for (int k = 0; k < d; ++k) {
      xs[i * d + k] = nz(rng) + (ys[i] ? 20.0 : 0.0);
      xt[i * d + k] = nz(rng) + (ys[i] ? 20.0 : 0.0);
    }
  }
  PixelView<double> vs{xs.data(), 1, n, d, n * d, d, 1}, vt{xt.data(), 1, n, d, n * d, d, 1};
  std::vector<int64_t> idx(n);
  for (int64_t i = 0; i < n; ++i) idx[i] = i;
  SinkhornOptions opt;
  opt.tol = 1e-9;
  const OTCEResult r = otce<double>(vs, ys.data(), 2, idx.data(), n, vt, yt.data(), 2, idx.data(), n, 1, opt, 0.0);
  CHECK(r.converged[0] == 1);
  CHECK(r.marginal_error[0] <= 1e-9);
  CHECK(r.conditional_entropy[0] < 1e-9);
  CHECK(std::fabs(r.joint[1] - 0.5) < 1e-8 && std::fabs(r.joint[2] - 0.5) < 1e-8);
}

static void test_conditional_entropy() {
  const double indep[4] = {0.25, 0.25, 0.25, 0.25};
  CHECK(std::fabs(conditional_entropy(indep, 2, 2) - std::log(2.0)) < 1e-15);
  const double det[4] = {0.5, 0.0, 0.0, 0.5};
  CHECK(conditional_entropy(det, 2, 2) == 0.0);
}

int main() {
  test_fast_exp();
  test_sampling();
  test_otce_bijection();
  test_conditional_entropy();
  std::printf("%d passed, %d failed\n", passed, failures);
  return failures ? 1 : 0;
}
