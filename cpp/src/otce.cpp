#include "segtransfer/otce.hpp"


#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <thread>

#include "segtransfer/blocked.hpp"
#include "segtransfer/errors.hpp"
#include "clones.hpp"
#include "pool.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace segtransfer {
namespace {

void check_budget(double bytes, double budget) {
  if (budget > 0 && bytes > budget) {
    std::ostringstream msg;
    msg.precision(3);
    msg << "the solver needs " << bytes / 1e9 << " GB for this problem but only " << budget / 1e9
        << " GB are available; lower n_pixels";
    throw OutOfMemory(msg.str());
  }
}

// Every valid pixel, not only the sampled ones: a NaN in the input is a bug upstream that the user
// should hear about whatever the seed.
// 0 * x is NaN exactly when x is NaN or infinite; the flags are combined with integer ORs, as a sum
// of those products was one dependent float add a channel (latency-bound: ~0.1 s a side for
// 4 x 10^6 pixels at D = 19).
template <typename T>
void check_finite(const PixelView<T>& v, const int32_t* code, const char* arg) {
  const auto fail = [&](int64_t pixel) {
    throw InvalidArgument(arg, "contains NaN or infinite values (pixel " + std::to_string(pixel) + ")");
  };
  if (v.stride_pixel == 1 && v.pixels > 1) {
    // Channel planes (B, D, H, W): one contiguous pass per plane, flags kept per pixel.
    std::vector<unsigned char> bad(static_cast<size_t>(v.pixels));
    for (int64_t b = 0; b < v.images; ++b) {
      std::fill(bad.begin(), bad.end(), 0);
      for (int64_t d = 0; d < v.dim; ++d) {
        const T* plane = v.data + b * v.stride_image + d * v.stride_dim;
        for (int64_t p = 0; p < v.pixels; ++p) bad[p] |= static_cast<unsigned char>(!(plane[p] * T(0) == T(0)));
      }
      for (int64_t p = 0; p < v.pixels; ++p)
        if (bad[p] && code[b * v.pixels + p] >= 0) fail(b * v.pixels + p);
    }
    return;
  }
  for (int64_t b = 0; b < v.images; ++b) {
    for (int64_t p = 0; p < v.pixels; ++p) {
      const T* src = v.data + b * v.stride_image + p * v.stride_pixel;
      unsigned bad = 0;
      for (int64_t d = 0; d < v.dim; ++d) bad |= static_cast<unsigned>(!(src[d * v.stride_dim] * T(0) == T(0)));
      if (bad && code[b * v.pixels + p] >= 0) fail(b * v.pixels + p);
    }
  }
}

// Entries (n x m) from which transport_points groups unlabelled points for class balancing: below,
// a solve takes milliseconds and the grouping would only add work.
constexpr double kGroupingMin = 1e6;

// Squared distances from the point p to the k points of q (rows of d): point_groups' one hot loop.
// Eight partial sums per distance: one running sum was a dependent add per dimension,
// latency-bound at 0.4 s of an N = 10^4, D = 256 draw (perf). Four rows of q at a time share each
// load of p and give the adds eight independent chains (two four-lane halves a row): one row at a
// time, the loads and the add latency held it to ~2 dimensions a cycle on Zen 2 (80 ms a side of a
// D = 256 draw). GCC's vector extension rather than intrinsics, and not contracted into fused
// multiply-adds, so that every target clone (SSE2 to AVX-512) rounds each lane exactly as the
// baseline build does and every CPU finds the same cells. The operations per distance are those of
// one row at a time: the same value whatever the blocking.
struct Distances {
  typedef double Lanes __attribute__((vector_size(32)));  // four of the eight partial sums
  static Lanes load(const double* s) {
    Lanes v;
    std::memcpy(&v, s, sizeof v);
    return v;
  }
  // The tail's terms one by one, then the eight partial sums in lane order.
  static double finish(const Lanes& lo, const Lanes& hi, const double* p, const double* qc, int64_t t, int64_t d) {
    double acc = 0.0;
    for (; t < d; ++t) acc += (p[t] - qc[t]) * (p[t] - qc[t]);
    for (int l = 0; l < 4; ++l) acc += lo[l];
    for (int l = 0; l < 4; ++l) acc += hi[l];
    return acc;
  }
  // finish for four rows of q (qc, rows of d) at once, each lane one row's chain: the chains run
  // side by side instead of one after another (at D = 19 the tail and the eight partial sums, 11
  // dependent adds a distance, took most of the time). out[r] for row r.
  static void finish4(const Lanes* lo, const Lanes* hi, const double* p, const double* qc, int64_t t, int64_t d,
                      double* out) {
    Lanes acc = {};
    for (; t < d; ++t) {
      const Lanes u = p[t] - Lanes{qc[t], qc[d + t], qc[2 * d + t], qc[3 * d + t]};
      acc += u * u;
    }
    for (int l = 0; l < 4; ++l) acc += Lanes{lo[0][l], lo[1][l], lo[2][l], lo[3][l]};
    for (int l = 0; l < 4; ++l) acc += Lanes{hi[0][l], hi[1][l], hi[2][l], hi[3][l]};
    std::memcpy(out, &acc, sizeof acc);
  }
  // Distances from each of the np points p (rows of d) to the k points q: out[i k + c]. Four rows
  // of q at a time for every point of p before the next four, so that the 4 d values of q (8 kB
  // at D = 256) stay in L1 across the points; point by point, the k rows of q (128 kB at k = 64)
  // streamed from L2 for each point.
  SEGTRANSFER_HOT_EXACT static void run(const double* p, int64_t np, const double* q, int64_t k, int64_t d,
                                        double* out) {
    constexpr int kRows = 4;
    const int64_t d8 = d - d % 8;
    int64_t c = 0;
    for (; c + kRows <= k; c += kRows) {
      const double* qc = q + c * d;
      for (int64_t i = 0; i < np; ++i) {
        const double* pi = p + i * d;
        Lanes lo[kRows] = {}, hi[kRows] = {};
        for (int64_t t = 0; t < d8; t += 8) {
          const Lanes p0 = load(pi + t), p1 = load(pi + t + 4);
          for (int r = 0; r < kRows; ++r) {
            const Lanes u = p0 - load(qc + r * d + t), v = p1 - load(qc + r * d + t + 4);
            lo[r] += u * u;
            hi[r] += v * v;
          }
        }
        finish4(lo, hi, pi, qc, d8, d, out + i * k + c);
      }
    }
    for (; c < k; ++c) {
      const double* qc = q + c * d;
      for (int64_t i = 0; i < np; ++i) {
        const double* pi = p + i * d;
        Lanes lo = {}, hi = {};
        for (int64_t t = 0; t < d8; t += 8) {
          const Lanes u = load(pi + t) - load(qc + t), v = load(pi + t + 4) - load(qc + t + 4);
          lo += u * u;
          hi += v * v;
        }
        out[i * k + c] = finish(lo, hi, pi, qc, d8, d);
      }
    }
  }
};

// Groups of nearby points (k-means cells) standing in for classes when the caller has none: class
// balancing and the two-level Newton preconditioner (sinkhorn.cpp) then act on clusters of the data
// rather than on labels. Deterministic and independent of the thread count: farthest-point seeds
// and 10 Lloyd rounds on a strided subsample of at most 2,000 points, then every point joins its
// nearest centre: one cell per 64 points, 2 to kMaxGroups of them (at most `max_cells`). Returns
// group ids in [0, groups) with no empty group.
template <typename T>
std::vector<int32_t> point_groups(const T* x, int64_t n, int64_t d, int& groups, int max_cells = kMaxGroups) {
  const int64_t ns = std::min<int64_t>(n, 2000);
  const int k = static_cast<int>(
      std::min<int64_t>({kMaxGroups, std::max<int64_t>(2, n / 64), ns, std::max(1, max_cells)}));
  std::vector<double> sub(static_cast<size_t>(ns) * d), centre(static_cast<size_t>(k) * d);
  for (int64_t s = 0; s < ns; ++s)
    for (int64_t t = 0; t < d; ++t) sub[s * d + t] = static_cast<double>(x[(s * n / ns) * d + t]);
  // (The cells only steer the solver, not its answer.)
  // Points are assigned in batches of kBatch (Distances::run's tiling).
  constexpr int64_t kBatch = 8;
  std::vector<double> nearest(ns, std::numeric_limits<double>::infinity()),
      dist(std::max<int64_t>(ns, kBatch * k));
  int64_t pick = 0;
  for (int c = 0; c < k; ++c) {
    std::copy(sub.begin() + pick * d, sub.begin() + (pick + 1) * d, centre.begin() + c * d);
    Distances::run(&centre[c * d], 1, sub.data(), ns, d, dist.data());  // (p - q)^2 = (q - p)^2 exactly
    for (int64_t s = 0; s < ns; ++s) nearest[s] = std::min(nearest[s], dist[s]);
    pick = std::max_element(nearest.begin(), nearest.end()) - nearest.begin();
  }
  // Calls visit(i, c) for each of the `count` points p (rows of d), c its nearest centre (the first
  // of equals), in order.
  auto assign = [&](const double* p, int64_t count, auto&& visit) {
    Distances::run(p, count, centre.data(), k, d, dist.data());
    for (int64_t i = 0; i < count; ++i) {
      const double* di = dist.data() + i * k;
      visit(i, static_cast<int>(std::min_element(di, di + k) - di));
    }
  };
  std::vector<double> sum(static_cast<size_t>(k) * d);
  std::vector<int64_t> count(k);
  // Lloyd's rounds end early once a round assigns every point as the round before: the centres it
  // computes are then the same to the bit, and so would every later round's be (the result is
  // that of all 10 rounds). At N = 10^4, D = 256 one side converged after one round, the other
  // after 3-7.
  std::vector<int32_t> last(ns, -1);
  for (int round = 0; round < 10; ++round) {
    bool changed = false;
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(count.begin(), count.end(), 0);
    for (int64_t s0 = 0; s0 < ns; s0 += kBatch) {
      const double* batch = &sub[s0 * d];
      assign(batch, std::min(kBatch, ns - s0), [&](int64_t i, int c) {
        changed = changed || last[s0 + i] != c;
        last[s0 + i] = c;
        ++count[c];
        for (int64_t t = 0; t < d; ++t) sum[c * d + t] += batch[i * d + t];
      });
    }
    for (int c = 0; c < k; ++c)
      if (count[c] > 0)
        for (int64_t t = 0; t < d; ++t) centre[c * d + t] = sum[c * d + t] / static_cast<double>(count[c]);
    if (!changed) break;
  }
  std::vector<int32_t> group(n);
  std::vector<double> p(kBatch * d);
  std::vector<int32_t> renumber(k, -1);
  groups = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBatch) {
    const int64_t rows = std::min(kBatch, n - i0);
    for (int64_t t = 0; t < rows * d; ++t) p[t] = static_cast<double>(x[i0 * d + t]);
    assign(p.data(), rows, [&](int64_t i, int c) {
      if (renumber[c] < 0) renumber[c] = groups++;
      group[i0 + i] = renumber[c];
    });
  }
  return group;
}

// One side's k-means cells (point_groups, at most `max_cells`) for its sampled pixels (`idx`, sorted
// by class; `x` their gathered features); returns how many (class, cell) groups they make.
template <typename T>
int class_cells(const int32_t* code, const std::vector<int64_t>& idx, const RowMatrix<T>& x, int64_t d,
                int max_cells, std::vector<int32_t>& cell, int& cell_count) {
  const int64_t n = static_cast<int64_t>(idx.size());
  cell = point_groups(x.data(), n, d, cell_count, max_cells);
  std::vector<char> seen(static_cast<size_t>(cell_count), 0);
  int groups = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (i > 0 && code[idx[i]] != code[idx[i - 1]]) std::fill(seen.begin(), seen.end(), 0);
    if (!seen[cell[i]]) seen[cell[i]] = 1, ++groups;
  }
  return groups;
}

// Whether class balancing's coarse problem on R x Q groups stays small against a dense pass over
// the n x m plan: a coarse Newton step forms an R x R system from the R x Q group masses and
// factors it, ~R^2 (Q / 2 + R / 6) multiply-adds, and a balancing takes a few steps after every
// block of iterations. The benchmark's draws (n = m = 10^4, ~150 x 370 groups) use 1/20 of the
// allowance. Small draws with many classes are where it binds: 1,449 points with 29 source
// classes made 560 x 213 (class, cell) groups of 2-3 points each, whose balancings took 0.1 s a
// block (~10 ms an iteration for an iteration of 2,000 entries): a 3-draw call took 27 s, 0.8 s
// with fewer cells (session 29).
inline bool coarse_affordable(int R, int Q, int64_t n, int64_t m) {
  const double r = R, q = Q;
  return r * r * (0.5 * q + r / 6.0) <= static_cast<double>(n) * static_cast<double>(m) / 8.0;
}

// Sorts one side's sampled pixels (`idx`, already sorted by class; `x` their gathered features) by
// (class, k-means cell `cell`, from class_cells), re-gathers `x` in that order and leaves the cells,
// in that order, in `cells`; merge_duplicates' weights (`count`, if any) are permuted with them.
template <typename T>
void group_within_classes(const PixelView<T>& view, const int32_t* code, const std::vector<int32_t>& cell,
                          std::vector<int64_t>& idx, RowMatrix<T>& x, const char* arg, std::vector<int32_t>& cells,
                          std::vector<double>& count) {
  const int64_t n = static_cast<int64_t>(idx.size());
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) {
    const int32_t cp = code[idx[p]], cq = code[idx[q]];
    return cp < cq || (cp == cq && cell[p] < cell[q]);
  });
  std::vector<int64_t> sorted(n);
  cells.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    sorted[i] = idx[order[i]];
    cells[i] = cell[order[i]];
  }
  idx.swap(sorted);
  if (!count.empty()) {  // merge_duplicates' weights follow their points
    std::vector<double> moved(n);
    for (int64_t i = 0; i < n; ++i) moved[i] = count[order[i]];
    count.swap(moved);
  }
  gather_pixels(view, idx.data(), n, x.data(), arg);
}

// For each of n points (rows of d values), the first point with bit-identical features and the
// same class (`cls`: one a point, or null for all one class); empty when every point is its own.
// Such points are one point of their summed mass to entropic OT: identical rows of the cost get one
// potential in the KL-regularised problem (relative to a x b, as the solver's is), and the plan
// without merging splits each merged row by the points' masses. So the plan summed over them, the
// joint label distribution, the transport cost and the L1 marginal error are the same. Flat
// feature maps (saturated activations, padding, quantised features) otherwise hand the solver
// thousands of copies of a few points: binary features with 8 distinct points a side took 4,579
// iterations and 9 s for 1,306 pixels (session 29's medium sweep), 0.01 s merged.
template <typename T>
std::vector<int64_t> first_copies(const T* x, int64_t n, int64_t d, const int32_t* cls) {
  if (n < 2) return {};
  const size_t row_bytes = static_cast<size_t>(d) * sizeof(T);
  const auto same_class = [cls](int64_t p, int64_t q) { return cls == nullptr || cls[p] == cls[q]; };
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t p, int64_t q) {
    if (!same_class(p, q)) return cls[p] < cls[q];
    const int c = std::memcmp(x + p * d, x + q * d, row_bytes);
    return c != 0 ? c < 0 : p < q;
  });
  // Equal keys are adjacent in `order`, the first occurrence leading its run (ties go by position).
  std::vector<int64_t> first(n);
  bool merged = false;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t p = order[k], q = k > 0 ? order[k - 1] : -1;
    const bool same = q >= 0 && same_class(p, q) && std::memcmp(x + p * d, x + q * d, row_bytes) == 0;
    first[p] = same ? first[q] : p;
    merged = merged || same;
  }
  if (!merged) first.clear();
  return first;
}

// Each point's index among the distinct ones (first occurrences, in their order), from first_copies.
inline std::vector<int64_t> distinct_slots(const std::vector<int64_t>& first, int64_t& distinct) {
  const int64_t n = static_cast<int64_t>(first.size());
  std::vector<int64_t> slot(n);
  distinct = 0;
  for (int64_t p = 0; p < n; ++p) slot[p] = first[p] == p ? distinct++ : slot[first[p]];
  return slot;
}

// Merges the sampled pixels (`idx`, sorted by class; `x`, their gathered features) that share a
// class and features (first_copies) into one point weighing their count, and returns how many
// points are left (idx and x compacted in place, first occurrences in their order; `count` left
// empty when nothing merged, so that a draw without duplicates is solved exactly as before).
template <typename T>
int64_t merge_duplicates(const int32_t* code, std::vector<int64_t>& idx, RowMatrix<T>& x, int64_t d,
                         std::vector<double>& count) {
  const int64_t n = static_cast<int64_t>(idx.size());
  count.clear();
  std::vector<int32_t> cls(n);
  for (int64_t p = 0; p < n; ++p) cls[p] = code[idx[p]];
  const std::vector<int64_t> first = first_copies(x.data(), n, d, cls.data());
  if (first.empty()) return n;
  int64_t kept = 0;
  const std::vector<int64_t> slot = distinct_slots(first, kept);
  count.assign(kept, 0.0);
  for (int64_t p = 0; p < n; ++p) {
    count[slot[p]] += 1.0;
    // slot[p] <= p: the rows still to be read lie after p, so compacting forward is safe.
    if (first[p] == p && slot[p] != p) {
      std::memmove(x.data() + slot[p] * d, x.data() + p * d, static_cast<size_t>(d) * sizeof(T));
      idx[slot[p]] = idx[p];
    }
  }
  idx.resize(kept);
  return kept;
}

// Centres each side on its own mean, in place, and returns the separable part of the cost that this
// removes: with x~ = x - mx, y~ = y - my and delta = mx - my,
//   |x_i - y_j|^2 = |x~_i - y~_j|^2 + r_i + c_j,  r_i = 2 x~_i . delta + |delta|^2,  c_j = -2 y~_j . delta.
// Entropic OT does not see r and c (the potentials absorb them: the plan is the same), so the solver
// runs on the cost of the centred points, whose float32 rounding follows the spread of the points
// rather than the distance between the two sets. Solving on the full cost, sets 1,000 apart (one
// side shifted, spread ~1) put ~0.5 of float32 rounding on costs of 8e6 (5 eps at eps = 0.1) and
// the score off by 2.5e-3 while the solve converged (bench/RESULTS.md, session 26). r and c are formed
// in double from the points as given.
template <typename T>
void centre_sides(T* x, int64_t n, T* y, int64_t m, int64_t d, std::vector<double>& r, std::vector<double>& c) {
  auto mean = [d](const T* p, int64_t count) {
    std::vector<double> mu(d, 0.0);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t k = 0; k < d; ++k) mu[k] += static_cast<double>(p[i * d + k]);
    for (double& v : mu) v /= static_cast<double>(count);
    return mu;
  };
  const std::vector<double> mx = mean(x, n), my = mean(y, m);
  std::vector<double> delta(d);
  double dd = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    delta[k] = mx[k] - my[k];
    dd += delta[k] * delta[k];
  }
  // p -= mu in place; out_i = scale * (p_i - mu) . delta + add, from the unrounded differences.
  auto centre = [d, &delta](T* p, int64_t count, const std::vector<double>& mu, double scale, double add,
                            std::vector<double>& out) {
    out.resize(count);
    for (int64_t i = 0; i < count; ++i) {
      double s = 0.0;
      for (int64_t k = 0; k < d; ++k) {
        const double v = static_cast<double>(p[i * d + k]) - mu[k];
        s += v * delta[k];
        p[i * d + k] = static_cast<T>(v);
      }
      out[i] = scale * s + add;
    }
  };
  centre(x, n, mx, 2.0, dd, r);
  centre(y, m, my, -2.0, 0.0, c);
  // The offset part overflowing double is the full cost overflowing (as stage_schedule reports it).
  const auto finite = [](const std::vector<double>& v) {
    return std::all_of(v.begin(), v.end(), [](double e) { return std::isfinite(e); });
  };
  if (!std::isfinite(dd) || !finite(r) || !finite(c))
    throw cost_overflow();
}

// The stored cost and sinkhorn_log, or sinkhorn_blocked, which recomputes it (opt.blocked), on the
// points centred side by side (centre_sides; x and y are overwritten); f, g and the transport cost
// are returned for the cost of the points as given. `cost`: the stored path's buffer, reused
// across calls.
template <typename T>
SinkhornReport solve_points(T* x, int64_t n, T* y, int64_t m, int64_t d, const double* a, const double* b,
                            const SinkhornOptions& opt, double* f, double* g, const PlanClasses* classes,
                            const PlanClasses* groups, RowMatrix<T>& cost) {
  std::vector<double> r, c;
  centre_sides(x, n, y, m, d, r, c);
  SinkhornReport rep;
  if (opt.blocked) {
    rep = sinkhorn_blocked(x, n, y, m, d, a, b, opt, f, g, classes, groups);
  } else {
    // One thread for a problem the solver itself takes on one (SinkhornOptions::parallel).
    const CostRange range = squared_euclidean(x, n, y, m, d, cost, opt.parallel(n, m) ? opt.num_threads : 1);
    rep = sinkhorn_log(cost, a, b, opt, f, g, classes, groups, &range);
  }
  // <pi, C> = <pi, C~> + sum_i (pi 1)_i r_i + sum_j (pi^T 1)_j c_j, with the marginals a and b
  // standing in for the plan's: off by at most max(|r|, |c|) times the marginal error, the order of
  // the uncertainty that error leaves on <pi, C> anyway.
  double shift = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    f[i] += r[i];
    shift += a[i] * r[i];
  }
  for (int64_t j = 0; j < m; ++j) {
    g[j] += c[j];
    shift += b[j] * c[j];
  }
  rep.transport_cost += shift;
  return rep;
}

}  // namespace

template <typename T>
void gather_pixels(const PixelView<T>& v, const int64_t* idx, int64_t n, T* out, const char* arg) {
  for (int64_t k = 0; k < n; ++k) {
    const int64_t p = idx[k];
    const T* src = v.data + (p / v.pixels) * v.stride_image + (p % v.pixels) * v.stride_pixel;
    T* dst = out + k * v.dim;
    bool finite = true;
    for (int64_t d = 0; d < v.dim; ++d) {
      dst[d] = src[d * v.stride_dim];
      finite = finite && std::isfinite(dst[d]);
    }
    if (!finite)
      throw InvalidArgument(arg, "contains NaN or infinite values (pixel " + std::to_string(p) + ")");
  }
}

double conditional_entropy(const double* joint, int rows, int cols) {
  double total = 0.0;
  for (int k = 0; k < rows * cols; ++k) total += joint[k];
  if (!(total > 0)) return std::nan("");
  double h = 0.0;
  for (int r = 0; r < rows; ++r) {
    double pr = 0.0;
    for (int c = 0; c < cols; ++c) pr += joint[r * cols + c];
    if (pr <= 0) continue;
    for (int c = 0; c < cols; ++c) {
      const double p = joint[r * cols + c];
      if (p > 0) h -= (p / total) * std::log(p / pr);
    }
  }
  return std::max(h, 0.0);  // rounding can leave -1e-17 where the true value is 0
}

// The solve behind transport_points, on the points as given (transport_points merges their
// duplicates first).
template <typename T>
static TransportResult transport_distinct(const T* x, int64_t n, const T* y, int64_t m, int64_t d, const double* a,
                                          const double* b, const SinkhornOptions& opt, double memory_budget) {
  const bool grouping = opt.class_balance && static_cast<double>(n) * static_cast<double>(m) >= kGroupingMin;
  check_budget(opt.blocked ? blocked_bytes<T>(n, m, d, opt.num_threads > 0 ? opt.num_threads : 64,
                                              grouping ? kMaxGroups : 1, grouping ? kMaxGroups : 1)
                           : dense_bytes<T>(n, m),
               memory_budget);
  std::vector<double> ua, ub;
  if (a == nullptr) { ua.assign(n, 1.0 / n); a = ua.data(); }
  if (b == nullptr) { ub.assign(m, 1.0 / m); b = ub.data(); }
  RowMatrix<T> cost;
  TransportResult res;
  res.f.resize(n);
  res.g.resize(m);
  if (!grouping) {
    std::vector<T> xc(x, x + n * d), yc(y, y + m * d);  // solve_points centres them in place
    res.report = solve_points(xc.data(), n, yc.data(), m, d, a, b, opt, res.f.data(), res.g.data(), nullptr, nullptr, cost);
  } else {
    // Points sorted by group (a permutation, which OT does not see), so that the column groups are
    // contiguous ranges as sinkhorn_log wants them; the potentials are permuted back.
    int gx_count = 0, gy_count = 0;
    const std::vector<int32_t> gx = point_groups(x, n, d, gx_count), gy = point_groups(y, m, d, gy_count);
    std::vector<int64_t> px(n), py(m);
    std::iota(px.begin(), px.end(), 0);
    std::iota(py.begin(), py.end(), 0);
    std::stable_sort(px.begin(), px.end(), [&](int64_t p, int64_t q) { return gx[p] < gx[q]; });
    std::stable_sort(py.begin(), py.end(), [&](int64_t p, int64_t q) { return gy[p] < gy[q]; });
    std::vector<T> xp(static_cast<size_t>(n) * d), yp(static_cast<size_t>(m) * d);
    std::vector<double> ap(n), bp(m), fp(n), gp(m);
    std::vector<int32_t> row_class(n);
    std::vector<int64_t> col_start(gy_count + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      std::copy(x + px[i] * d, x + (px[i] + 1) * d, xp.begin() + i * d);
      ap[i] = a[px[i]];
      row_class[i] = gx[px[i]];
    }
    for (int64_t j = 0; j < m; ++j) {
      std::copy(y + py[j] * d, y + (py[j] + 1) * d, yp.begin() + j * d);
      bp[j] = b[py[j]];
      ++col_start[gy[py[j]] + 1];
    }
    for (int c = 0; c < gy_count; ++c) col_start[c + 1] += col_start[c];
    const PlanClasses groups{row_class.data(), gx_count, col_start.data(), gy_count};
    res.report = solve_points(xp.data(), n, yp.data(), m, d, ap.data(), bp.data(), opt, fp.data(), gp.data(), nullptr,
                              &groups, cost);
    for (int64_t i = 0; i < n; ++i) res.f[px[i]] = fp[i];
    for (int64_t j = 0; j < m; ++j) res.g[py[j]] = gp[j];
  }
  res.transport_cost = res.report.transport_cost;  // from the solver's certifying pass
  return res;
}

template <typename T>
TransportResult transport_points(const T* x, int64_t n, const T* y, int64_t m, int64_t d, const double* a,
                                 const double* b, const SinkhornOptions& opt, double memory_budget) {
  // Bit-identical points solved as one (first_copies), their potentials copied back to each.
  const std::vector<int64_t> first_x = first_copies(x, n, d, nullptr), first_y = first_copies(y, m, d, nullptr);
  if (!first_x.empty() || !first_y.empty()) {
    auto merge = [d](const T* p, int64_t count, const double* w, const std::vector<int64_t>& first,
                     std::vector<int64_t>& slot, std::vector<T>& points, std::vector<double>& mass) {
      int64_t distinct = count;
      if (first.empty()) {
        slot.resize(count);
        std::iota(slot.begin(), slot.end(), 0);
      } else {
        slot = distinct_slots(first, distinct);
      }
      points.resize(static_cast<size_t>(distinct) * d);
      mass.assign(distinct, 0.0);
      for (int64_t i = 0; i < count; ++i) {
        if (first.empty() || first[i] == i) std::copy(p + i * d, p + (i + 1) * d, points.begin() + slot[i] * d);
        mass[slot[i]] += w != nullptr ? w[i] : 1.0 / count;
      }
      return distinct;
    };
    std::vector<int64_t> slot_x, slot_y;
    std::vector<T> xm, ym;
    std::vector<double> am, bm;
    const int64_t nm = merge(x, n, a, first_x, slot_x, xm, am), mm = merge(y, m, b, first_y, slot_y, ym, bm);
    TransportResult res = transport_distinct(xm.data(), nm, ym.data(), mm, d, am.data(), bm.data(), opt, memory_budget);
    std::vector<double> f(n), g(m);
    for (int64_t i = 0; i < n; ++i) f[i] = res.f[slot_x[i]];
    for (int64_t j = 0; j < m; ++j) g[j] = res.g[slot_y[j]];
    res.f.swap(f);
    res.g.swap(g);
    return res;
  }
  return transport_distinct(x, n, y, m, d, a, b, opt, memory_budget);
}

template <typename T>
OTCEResult otce(const PixelView<T>& src, const int32_t* src_code, int source_classes,
                const int64_t* src_idx, int64_t ns, const PixelView<T>& tgt, const int32_t* tgt_code,
                int target_classes, const int64_t* tgt_idx, int64_t nt, int64_t repeats,
                const SinkhornOptions& opt, double memory_budget) {
  if (src.dim != tgt.dim)
    throw InvalidArgument("target_features", "has " + std::to_string(tgt.dim) +
                                                 " channels but source_features has " + std::to_string(src.dim));
  // Balancing groups: up to kMaxGroups k-means cells per class (group_within_classes).
  const double per_solve =
      (opt.blocked ? blocked_bytes<T>(ns, nt, src.dim, 1, source_classes * kMaxGroups, target_classes * kMaxGroups)
                   : dense_bytes<T>(ns, nt)) +
      8.0 * (ns + nt) * src.dim;
  check_budget(per_solve, memory_budget);
  check_finite(src, src_code, "source_features");
  check_finite(tgt, tgt_code, "target_features");
  const int64_t d = src.dim;
  const int cs = source_classes, ct = target_classes;
  OTCEResult out;
  out.repeats = repeats;
  out.source_classes = cs;
  out.target_classes = ct;
  out.joint.assign(static_cast<size_t>(repeats) * cs * ct, 0.0);
  out.conditional_entropy.assign(repeats, 0.0);
  out.transport_cost.assign(repeats, 0.0);
  out.marginal_error.assign(repeats, 0.0);
  out.iterations.assign(repeats, 0);
  out.converged.assign(repeats, 0);
  out.timed_out.assign(repeats, 0);

  // The repeats are independent problems: with several threads they run side by side, one thread
  // each, rather than one after the other with every thread inside each solve. That needs no
  // synchronisation inside a solve (OpenMP barriers stall badly on a loaded machine) and scales
  // fully; the memory of one solve per worker must fit the budget. Each solve is computed the same
  // way whatever the thread count, so the results are bit-identical.
#ifdef _OPENMP
  const int threads = opt.num_threads > 0 ? opt.num_threads : omp_get_max_threads();
#else
  const int threads = 1;
#endif
  const bool use_groups = static_cast<double>(ns) * static_cast<double>(nt) >= kGroupingMin;
  int workers = static_cast<int>(std::min<int64_t>(threads, repeats));
  if (memory_budget > 0)
    workers = std::max(1, std::min(workers, static_cast<int>(memory_budget / per_solve)));
  SinkhornOptions inner = opt;
  if (workers > 1) inner.num_threads = 1;
  // Only the calling thread may ask the caller's interrupt callback (the bindings check for Ctrl-C,
  // which only the main thread hears); the other workers see its answer through `stop`.
  // (By thread identity: a solve's own parallel regions renumber their threads from 0.)
  std::atomic<bool> stop{false};
  const std::thread::id caller = std::this_thread::get_id();
  if (opt.interrupt) {
    inner.interrupt = [&opt, &stop, caller]() {
      if (std::this_thread::get_id() == caller && opt.interrupt()) stop = true;
      return stop.load();
    };
  }
  std::exception_ptr error;
  // A worker that finds no repeat left lends its thread to the solves still running (nested
  // parallel regions inside them): with K = 10 on two workers the last draw otherwise ran alone for
  // 2.5 s of a 16.6 s call (N = 10^4, D = 256). Solves do not depend on their thread count.
  // The blocked solver keeps its own lanes: it borrows nothing.
  const bool lend = workers > 1 && !opt.blocked;
  std::atomic<int> finished{0};
  if (lend)
    inner.lent_threads = [&finished, workers]() {
      const int done = finished.load(std::memory_order_relaxed);
      return done < workers ? done / (workers - done) : 0;
    };
#ifdef _OPENMP
  const int levels = omp_get_max_active_levels();
  if (lend) omp_set_max_active_levels(std::max(levels, 2));
  struct RestoreLevels {
    int levels;
    ~RestoreLevels() { omp_set_max_active_levels(levels); }
  } restore_levels{levels};
#endif

#pragma omp parallel num_threads(workers)
  {
    const detail::PoolScope scope;  // this worker's solves reuse each other's kernel storage
    std::vector<double> a(ns, 1.0 / ns), b(nt, 1.0 / nt), f(ns), g(nt);
    std::vector<int64_t> is(ns), it(nt), col_start(ct + 1);
    std::vector<int32_t> row_class(ns), row_group(ns), cells_s, cells_t, cell_s, cell_t;
    std::vector<int64_t> group_start;
    std::vector<double> count_s, count_t;
    RowMatrix<T> xs(ns, d), xt(nt, d), cost;
    // A solve polls for Ctrl-C only after 50 ms, so a call made of many short draws (repeats=10**5
    // at n_pixels=20) also polls between draws, at most every 50 ms.
    auto last_poll = std::chrono::steady_clock::now();
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t k = 0; k < repeats; ++k) {
      if (stop) continue;
      if (inner.interrupt && std::chrono::steady_clock::now() - last_poll > std::chrono::milliseconds(50)) {
        last_poll = std::chrono::steady_clock::now();
        if (inner.interrupt()) continue;
      }
      try {
        // Pixels sorted by class (a permutation, which OT does not see): the target classes become
        // contiguous column ranges, so the joint-label reduction is a sum over ranges, not a scatter.
        is.assign(src_idx + k * ns, src_idx + (k + 1) * ns);
        it.assign(tgt_idx + k * nt, tgt_idx + (k + 1) * nt);
        std::stable_sort(is.begin(), is.end(), [&](int64_t p, int64_t q) { return src_code[p] < src_code[q]; });
        std::stable_sort(it.begin(), it.end(), [&](int64_t p, int64_t q) { return tgt_code[p] < tgt_code[q]; });
        gather_pixels(src, is.data(), ns, xs.data(), "source_features");
        gather_pixels(tgt, it.data(), nt, xt.data(), "target_features");
        const int64_t n_s = merge_duplicates(src_code, is, xs, d, count_s);
        const int64_t n_t = merge_duplicates(tgt_code, it, xt, d, count_t);
        // Balancing groups: each class split by k-means cells (sorted by cell inside the class, so
        // groups and classes are both contiguous). Labels alone are coarser than the clusters the
        // solver fights (a target label merging several source classes, boundary pixels): at
        // N = 10^4, D = 256 cells took a draw from 26 to 16 s.
        // Fewer cells where the coarse problem would outweigh the iterations (coarse_affordable):
        // the side with more groups halves its cells, down to one (the classes alone).
        const bool grouped = use_groups && inner.class_balance &&
                             static_cast<double>(n_s) * static_cast<double>(n_t) >= kGroupingMin;
        if (grouped) {
          int max_s = kMaxGroups, max_t = kMaxGroups, cells_count_s = 0, cells_count_t = 0;
          int gs = class_cells(src_code, is, xs, d, max_s, cell_s, cells_count_s);
          int gt = class_cells(tgt_code, it, xt, d, max_t, cell_t, cells_count_t);
          while (!coarse_affordable(gs, gt, n_s, n_t) && (cells_count_s > 1 || cells_count_t > 1)) {
            if ((gs >= gt && cells_count_s > 1) || cells_count_t <= 1) {
              max_s = cells_count_s / 2;
              gs = class_cells(src_code, is, xs, d, max_s, cell_s, cells_count_s);
            } else {
              max_t = cells_count_t / 2;
              gt = class_cells(tgt_code, it, xt, d, max_t, cell_t, cells_count_t);
            }
          }
          group_within_classes(src, src_code, cell_s, is, xs, "source_features", cells_s, count_s);
          group_within_classes(tgt, tgt_code, cell_t, it, xt, "target_features", cells_t, count_t);
        }
        // Uniform masses, or each merged point's share (the same 1 / n for an unmerged draw).
        auto masses = [](std::vector<double>& w, const std::vector<double>& count, int64_t kept, int64_t n) {
          w.resize(kept);
          for (int64_t i = 0; i < kept; ++i) w[i] = count.empty() ? 1.0 / n : count[i] / static_cast<double>(n);
        };
        masses(a, count_s, n_s, ns);
        masses(b, count_t, n_t, nt);
        for (int64_t i = 0; i < n_s; ++i) row_class[i] = src_code[is[i]];
        std::fill(col_start.begin(), col_start.end(), 0);
        for (int64_t j = 0; j < n_t; ++j) ++col_start[tgt_code[it[j]] + 1];
        for (int c = 0; c < ct; ++c) col_start[c + 1] += col_start[c];
        int row_groups = 0, col_groups = 0;
        if (grouped) {
          // Group ids: a new group wherever (class, cell) changes along the sorted order.
          for (int64_t i = 0; i < n_s; ++i) {
            if (i > 0 && (row_class[i] != row_class[i - 1] || cells_s[i] != cells_s[i - 1])) ++row_groups;
            row_group[i] = row_groups;
          }
          ++row_groups;
          group_start.assign(1, 0);
          for (int64_t j = 1; j < n_t; ++j)
            if (tgt_code[it[j]] != tgt_code[it[j - 1]] || cells_t[j] != cells_t[j - 1]) group_start.push_back(j);
          group_start.push_back(n_t);
          col_groups = static_cast<int>(group_start.size()) - 1;
        }

        const PlanClasses classes{row_class.data(), cs, col_start.data(), ct};
        const PlanClasses groups{row_group.data(), row_groups, group_start.data(), col_groups};
        const SinkhornReport rep = solve_points(xs.data(), n_s, xt.data(), n_t, d, a.data(), b.data(), inner, f.data(),
                                                g.data(), &classes, grouped ? &groups : nullptr, cost);
        std::copy(rep.joint.begin(), rep.joint.end(), out.joint.begin() + k * cs * ct);
        out.conditional_entropy[k] = conditional_entropy(rep.joint.data(), cs, ct);
        out.transport_cost[k] = rep.transport_cost;
        out.marginal_error[k] = rep.marginal_error;
        out.iterations[k] = rep.iterations;
        out.converged[k] = rep.converged ? 1 : 0;
        out.timed_out[k] = rep.timed_out ? 1 : 0;
      } catch (...) {
#pragma omp critical(segtransfer_otce_error)
        if (!error) error = std::current_exception();
        stop = true;
      }
    }
    finished.fetch_add(1, std::memory_order_relaxed);
  }
  if (error) std::rethrow_exception(error);
  if (stop) throw Interrupted();
  return out;
}

#define SEGTRANSFER_INSTANTIATE(T)                                                                     \
  template void gather_pixels<T>(const PixelView<T>&, const int64_t*, int64_t, T*, const char*);       \
  template TransportResult transport_points<T>(const T*, int64_t, const T*, int64_t, int64_t,          \
                                               const double*, const double*, const SinkhornOptions&,  \
                                               double);                                                \
  template OTCEResult otce<T>(const PixelView<T>&, const int32_t*, int, const int64_t*, int64_t,       \
                              const PixelView<T>&, const int32_t*, int, const int64_t*, int64_t,       \
                              int64_t, const SinkhornOptions&, double);
SEGTRANSFER_INSTANTIATE(float)
SEGTRANSFER_INSTANTIATE(double)
#undef SEGTRANSFER_INSTANTIATE

}  // namespace segtransfer
