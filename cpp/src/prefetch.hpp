// Internal to the core (not installed): software prefetch for the loops over a sparse pattern and
// over dense rows.
#pragma once
#include <cstdint>

namespace segtransfer {
namespace {

// Loops over CSR/CSC entries read a value and a column index per entry and gather the other side's
// vector at that column. The gathers' scalar loads keep the hardware prefetchers from following the
// two streams: a 10^4 x 3000 sparse log-sum-exp (240 MB) took 1.11 -> 0.75 ns an entry with AVX2
// and 0.82 -> 0.65 with AVX-512 once they were prefetched (bench/RESULTS.md, session 14).
constexpr int64_t kPrefetchAhead = 512;  // entries
constexpr int64_t kPrefetchBlock = 256;  // entries a loop handles per prefetch_ahead call

// Prefetches the cache line holding p (a no-op where the compiler has no prefetch builtin); p may
// lie past the end of an array: a prefetch never faults.
inline __attribute__((always_inline)) void prefetch_line(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// Prefetches entries [k0, k1) + kPrefetchAhead of one contiguous stream, a cache line at a time:
// each of prefetch_ahead's two streams, and the loops over a dense row. The hardware prefetchers
// follow a dense row, but not far enough ahead of these loops: a dense float log-sum-exp over the
// 400 MB cost of an N = 10^4 draw ran at 0.53 ns an entry, 0.40 with this (scratch benchmark,
// AVX-512; 0.18 in cache, and a bare read of every line 0.28).
template <typename V>
inline __attribute__((always_inline)) void prefetch_dense_ahead(const V* val, int64_t k0, int64_t k1) {
  const uintptr_t pv = reinterpret_cast<uintptr_t>(val);
  for (int64_t k = k0 + kPrefetchAhead; k < k1 + kPrefetchAhead; k += 64 / sizeof(V))
    prefetch_line(reinterpret_cast<const void*>(pv + sizeof(V) * k));
}

// Prefetches the entries [k0 + kPrefetchAhead, k1 + kPrefetchAhead) of both streams, called once
// per block of entries. Past a row's end lie the next rows (the storage is contiguous); past the
// whole array a prefetch is a no-op (it never faults), and the address is formed as an integer so
// that no out-of-range pointer exists.
template <typename V>
inline __attribute__((always_inline)) void prefetch_ahead(const V* val, const int32_t* col, int64_t k0, int64_t k1) {
  prefetch_dense_ahead(val, k0, k1);
  prefetch_dense_ahead(col, k0, k1);
}

}  // namespace
}  // namespace segtransfer
