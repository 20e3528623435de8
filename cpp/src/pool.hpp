// Internal to the core (not installed): a per-thread cache of the large blocks a solve allocates
// for its truncated kernels and plans, reused by the next allocations of the same call.
//
// Why: fresh pages are expensive. Each N = 10^4 draw allocated ~1 GB of pattern storage (the first
// sparse kernel in two layouts, Newton's relocated patterns, the plan's values) and touched every
// page for the first time: on the 2-vCPU VMs a K = 4 call spent 16-19 % of its CPU time in the
// kernel's page faults, and the first pattern Newton relocated took 0.72 s to build against 0.18 s
// for the next one, in the same pages (bench/RESULTS.md, session 14). glibc gives such blocks
// (> 32 MB, always mmapped) back to the system on free, so every draw paid again.
//
// A block freed inside a PoolScope is kept by the freeing thread and handed to a later request
// that fits it (the smallest that fits, and at most 4x the request, so that a small vector does not
// hold a block a later pattern needs). A request that no kept block serves first gives back the
// kept blocks too small for it: the resident memory (live + kept) then never exceeds what the call
// has already needed at its largest. Everything kept goes back to the system when the outermost
// scope on the thread ends: nothing is held between calls.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

// In a named namespace (not internal linkage like the other internal headers): the pool of a
// thread must be the same one in every file, so that otce.cpp's scope covers sinkhorn.cpp's blocks.
namespace segtransfer::detail {

constexpr std::size_t kHugePage = std::size_t(2) << 20;

// Asks the kernel to back [p, p + bytes) with transparent huge pages where whole 2 MB pages fit
// (a no-op where THP is off or unknown), unless a huge page turns out slow to fault in here.
//
// Why huge pages: the first touch of the solver's large arrays (the cost, the first truncated
// kernels) cost ~250,000 page faults a draw in 4 kB pages, 5-8 % of a K = 10 call's CPU time with
// two workers faulting into one address space; in 2 MB pages the faults drop tenfold and the TLB
// covers the kernels' streams (K = 10: -3 to -7 %, RESULTS.md, session 15).
//
// Why the probe: in a VM whose guest reports free pages to its host (virtio free page reporting,
// as on the 2-vCPU benchmark VMs), memory the host took back is slow to fault in by whole huge
// pages: 400 MB took 1.1 s to first touch in 2 MB pages against 0.17 s in 4 kB pages (and 0.05 s in
// huge pages the guest had freed just before). K = 10 at N = 10^4 then spent 5.4 s in the kernel
// instead of 0.8 s, 17.2-17.5 s against 15.4-15.8 s end to end (RESULTS.md, session 17). The fast
// pages come first (the guest hands out what it freed last), so one probe tells nothing: the huge
// pages of [p, p + touch) are touched here in order and timed, and from the first slower than
// kSlowHugeFault (bare metal zeroes 2 MB in ~0.1-0.3 ms; such a VM took ~5.7 ms) the rest of the
// range is left to 4 kB pages. The probes stop after kProbeSpan (the slow pages began within the
// first 0-12 MB of every block on that VM): where huge pages are fast (bare metal), the rest keeps
// the advice and is faulted in by its first use, and no more than kProbeSpan of a block is touched
// ahead of time (`touch`: the part of the range that will be used; a vector's spare capacity is
// not). Only effective before the pages are first touched; a probe writes back the byte it reads,
// so it is harmless on memory already in use (a cost matrix reused by the next draw).
inline void advise_huge_pages(void* p, std::size_t bytes, std::size_t touch) noexcept {
#ifdef MADV_HUGEPAGE
  constexpr double kSlowHugeFault = 1.5e-3;  // seconds
  constexpr std::size_t kProbeSpan = std::size_t(64) << 20;
  const auto lo = (reinterpret_cast<std::uintptr_t>(p) + kHugePage - 1) & ~(kHugePage - 1);
  const auto hi = (reinterpret_cast<std::uintptr_t>(p) + bytes) & ~(kHugePage - 1);
  if (hi <= lo) return;
  if (madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) != 0) return;
  const auto touch_end = std::min({hi, reinterpret_cast<std::uintptr_t>(p) + touch, lo + kProbeSpan});
  for (auto at = lo; at < touch_end; at += kHugePage) {
    volatile char* probe = reinterpret_cast<volatile char*>(at);
    const auto start = std::chrono::steady_clock::now();
    *probe = *probe;
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > kSlowHugeFault) {
      if (at + kHugePage < hi) madvise(reinterpret_cast<void*>(at + kHugePage), hi - at - kHugePage, MADV_NOHUGEPAGE);
      break;
    }
  }
#else
  (void)p;
  (void)bytes;
  (void)touch;
#endif
}

class BlockPool {
 public:
  // Blocks below this go to malloc directly (glibc keeps small freed memory itself).
  static constexpr std::size_t kMinPooled = std::size_t(1) << 20;

  static BlockPool& local() {
    thread_local BlockPool pool;
    return pool;
  }
  BlockPool() = default;
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;
  ~BlockPool() { release(); }

  void enter() { ++depth_; }
  void leave() {
    if (--depth_ == 0) release();
  }

  void* take(std::size_t bytes) {
    std::size_t best = kept_.size();
    for (std::size_t k = 0; k < kept_.size(); ++k)
      if (kept_[k].first >= bytes && kept_[k].first / 4 <= bytes &&
          (best == kept_.size() || kept_[k].first < kept_[best].first))
        best = k;
    if (best < kept_.size()) {
      void* p = kept_[best].second;
      kept_[best] = kept_.back();
      kept_.pop_back();
      return p;
    }
    // Gives back kept blocks too small for this request, the largest first, until they add up to
    // it: the new block then takes no more memory than they held.
    std::size_t freed = 0;
    while (freed < bytes) {
      std::size_t k = kept_.size();
      for (std::size_t q = 0; q < kept_.size(); ++q)
        if (kept_[q].first < bytes && (k == kept_.size() || kept_[q].first > kept_[k].first)) k = q;
      if (k == kept_.size()) break;
      freed += kept_[k].first;
      free_block(kept_[k].second);
      kept_[k] = kept_.back();
      kept_.pop_back();
    }
    // Room to grow, since pages never touched cost nothing: a later draw's kernel of the same stage
    // differs by up to ~15 % (N = 10^4, D = 256: 2,700-3,150 entries a row in the first sparse
    // stage, requested with the build's 10 % margin). A block that misses is mapped afresh and
    // faults in every page it uses; with 1/8 of room K = 10 took 450-640 thousand page faults,
    // with 1/2 ~360 thousand, most of them the first draw of each worker (RESULTS.md, session 24).
    const std::size_t size = ((bytes + bytes / 2) | (kGranule - 1)) + 1;
    std::size_t mapped = 0;
    void* base = size >= kHugeAligned ? map_huge(size + kHeader, bytes + kHeader, mapped) : nullptr;
    if (base == nullptr) base = std::malloc(size + kHeader);
    if (base == nullptr) throw std::bad_alloc();
    static_cast<std::size_t*>(base)[0] = size;
    static_cast<std::size_t*>(base)[1] = mapped;
    return static_cast<char*>(base) + kHeader;
  }

  std::size_t kept_bytes() const {
    std::size_t total = 0;
    for (const auto& block : kept_) total += block.first;
    return total;
  }

  void give(void* p) noexcept {
    if (depth_ > 0) {
      try {
        kept_.emplace_back(*static_cast<std::size_t*>(header(p)), p);
        return;
      } catch (...) {  // no room to remember it: free it
      }
    }
    free_block(p);
  }

 private:
  static constexpr std::size_t kHeader = 64;  // keeps the blocks 64-byte aligned (malloc gives 16)
  static constexpr std::size_t kGranule = std::size_t(1) << 16;
  static constexpr std::size_t kHugeAligned = std::size_t(8) << 20;  // blocks from here on: 2 MB aligned
  static void* header(void* p) { return static_cast<char*>(p) - kHeader; }
  // A block of its own mapping, 2 MB aligned and advised for huge pages (see advise_huge_pages);
  // `touch`: the bytes the request will use (the rest is room to grow; advise_huge_pages).
  // `mapped`: its length, for munmap. Its own mapping, not malloc's: a huge-page advice on a range
  // of malloc's heap would outlive the block and cover whatever the heap puts there next.
  static void* map_huge(std::size_t bytes, std::size_t touch, std::size_t& mapped) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    bytes = (bytes + 4095) & ~std::size_t(4095);
    const std::size_t len = bytes + kHugePage;
    void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const auto r = reinterpret_cast<std::uintptr_t>(raw);
    const auto at = (r + kHugePage - 1) & ~(kHugePage - 1);
    if (at > r) munmap(raw, at - r);
    if (r + len > at + bytes) munmap(reinterpret_cast<void*>(at + bytes), r + len - (at + bytes));
    advise_huge_pages(reinterpret_cast<void*>(at), bytes, touch);
    mapped = bytes;
    return reinterpret_cast<void*>(at);
#else
    (void)bytes;
    (void)touch;
    mapped = 0;
    return nullptr;
#endif
  }
  static void free_block(void* p) noexcept {
    void* base = header(p);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (const std::size_t mapped = static_cast<std::size_t*>(base)[1]; mapped != 0) {
      munmap(base, mapped);
      return;
    }
#endif
    std::free(base);
  }
  void release() {
    for (auto& [size, p] : kept_) free_block(p);
    kept_.clear();
  }
  std::vector<std::pair<std::size_t, void*>> kept_;  // (usable bytes, block)
  int depth_ = 0;
};

// Keeps the blocks freed on this thread for reuse while it lives (scopes nest).
struct PoolScope {
  PoolScope() { BlockPool::local().enter(); }
  ~PoolScope() { BlockPool::local().leave(); }
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;
};

// std::allocator, except that blocks of kMinPooled bytes or more come from and go to the pool.
template <typename T>
struct PoolAllocator {
  using value_type = T;
  PoolAllocator() = default;
  template <typename U>
  PoolAllocator(const PoolAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    if (n * sizeof(T) < BlockPool::kMinPooled) return std::allocator<T>().allocate(n);
    return static_cast<T*>(BlockPool::local().take(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (n * sizeof(T) < BlockPool::kMinPooled) return std::allocator<T>().deallocate(p, n);
    BlockPool::local().give(p);
  }
  // resize() default-initialises: new elements of the kernel vectors are left as they are, not
  // zeroed. Every resize of one is followed by a fill of every element (scan, transposition,
  // filter, plan values), and the zeroing was a pass of its own over up to 200 MB (80 ms of a
  // 180 ms pattern build at N = 10^4; RESULTS.md, session 15).
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const PoolAllocator<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const PoolAllocator<U>&) const noexcept { return false; }
};

// The vectors whose size follows the number of kernel entries.
template <typename T>
using KernelVector = std::vector<T, PoolAllocator<T>>;

}  // namespace segtransfer::detail
