// Internal to the core (not installed): the attribute that compiles a hot loop for several
// instruction sets, picked at load time.
#pragma once

// The log-sum-exp loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked
// at load time, so a wheel built on one machine runs at full width on another without
// -march=native. The AVX-512 clone ran 5x faster than the AVX2 one here (see bench/RESULTS.md).
// SEGTRANSFER_HOT_EXACT: the same, without contracting a multiply and an add into one fused
// multiply-add, which only the AVX2 and AVX-512 clones could do: every clone then rounds exactly
// as the baseline build does.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SEGTRANSFER_NO_CLONES)
#define SEGTRANSFER_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define SEGTRANSFER_HOT_EXACT SEGTRANSFER_HOT __attribute__((optimize("fp-contract=off")))
#else
#define SEGTRANSFER_HOT
#define SEGTRANSFER_HOT_EXACT
#endif
