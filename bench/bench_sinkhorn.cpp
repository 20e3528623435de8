// Native benchmark of the CPU solver, no Python in the loop: logit-like clustered features,
// one OTCE draw per repeat, wall time per phase. Usage: segtransfer_bench [N] [D] [repeats] [f32|f64] [tol] [name=value...]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "segtransfer/otce.hpp"

using namespace segtransfer;

template <typename T>
int run(int64_t n, int64_t d, int64_t repeats, const SinkhornOptions& opt) {
  const int classes = 19;
  std::mt19937_64 rng(42);
  std::normal_distribution<double> noise(0.0, 2.0);
  std::uniform_int_distribution<int> label(0, classes - 1);
  auto make = [&](std::vector<T>& x, std::vector<int32_t>& y, double shift) {
    x.resize(n * d);
    y.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      y[i] = label(rng);
      for (int64_t k = 0; k < d; ++k)
        x[i * d + k] = static_cast<T>(noise(rng) + (k == y[i] % d ? 10.0 : 0.0) + shift);
    }
  };
  std::vector<T> xs, xt;
  std::vector<int32_t> ys, yt;
  make(xs, ys, 0.0);
  make(xt, yt, 0.5);
  PixelView<T> vs{xs.data(), 1, n, d, n * d, d, 1}, vt{xt.data(), 1, n, d, n * d, d, 1};
  std::vector<int64_t> idx(n * repeats);
  for (int64_t k = 0; k < repeats; ++k)
    for (int64_t i = 0; i < n; ++i) idx[k * n + i] = i;
  const auto t0 = std::chrono::steady_clock::now();
  const OTCEResult r = otce<T>(vs, ys.data(), classes, idx.data(), n, vt, yt.data(), classes, idx.data(), n,
                               repeats, opt, 0.0);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int64_t k = 0; k < repeats; ++k)
    std::printf("repeat %lld: H(Yt|Ys)=%.8f W_D=%.6f iterations=%lld marginal_error=%.3e converged=%d\n",
                static_cast<long long>(k), r.conditional_entropy[k], r.transport_cost[k],
                static_cast<long long>(r.iterations[k]), r.marginal_error[k], r.converged[k]);
  std::printf("N=%lld D=%lld repeats=%lld dtype=%s total %.3f s (%.3f s per repeat)\n", static_cast<long long>(n),
              static_cast<long long>(d), static_cast<long long>(repeats), sizeof(T) == 4 ? "f32" : "f64", secs,
              secs / repeats);
  return 0;
}

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 2000;
  const int64_t d = argc > 2 ? std::atoll(argv[2]) : 19;
  const int64_t repeats = argc > 3 ? std::atoll(argv[3]) : 1;
  const bool f64 = argc > 4 && std::strcmp(argv[4], "f64") == 0;
  SinkhornOptions opt;
  if (argc > 5) opt.tol = std::atof(argv[5]);
  // Solver knobs for experiments: name=value after the positional arguments.
  for (int k = 6; k < argc; ++k) {
    const char* eq = std::strchr(argv[k], '=');
    if (eq == nullptr) { std::fprintf(stderr, "expected name=value, got %s\n", argv[k]); return 2; }
    const std::string key(argv[k], static_cast<size_t>(eq - argv[k]));
    const double v = std::atof(eq + 1);
    if (key == "newton_switch") opt.newton_switch = v;
    else if (key == "stage_tol") opt.stage_tol = v;
    else if (key == "multiscale_points") opt.multiscale_points = static_cast<int64_t>(v);
    else if (key == "scaling_factor") opt.scaling_factor = v;
    else if (key == "truncation") opt.truncation = v;
    else if (key == "threads") opt.num_threads = static_cast<int>(v);
    else if (key == "newton") opt.newton = v != 0;
    else if (key == "blocked") opt.blocked = v != 0;
    else if (key == "eps_scaling") opt.eps_scaling = v != 0;
    else if (key == "epsilon") opt.epsilon = v;
    else if (key == "max_iter") opt.max_iter = static_cast<int64_t>(v);
    else if (key == "class_balance") opt.class_balance = v != 0;
    else if (key == "stage_extrapolation") opt.stage_extrapolation = v;
    else { std::fprintf(stderr, "unknown option %s\n", key.c_str()); return 2; }
  }
  if (n < 2 || d < 1 || repeats < 1 || !(opt.tol > 0)) {
    std::fprintf(stderr, "usage: %s [N>=2] [D>=1] [repeats>=1] [f32|f64] [tol>0] [name=value...]\n", argv[0]);
    return 2;
  }
  return f64 ? run<double>(n, d, repeats, opt) : run<float>(n, d, repeats, opt);
}
