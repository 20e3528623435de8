"""segtransfer.otce: against the NumPy reference on the same pixels, and its invariances.

``n_pixels=None`` uses every valid pixel once (no sampling), so the reference can be computed on exactly
the pixels the library used. Sizes stay at a few hundred pixels per side: the dense solver is O(n m).

Tolerances, float64 (library tol 1e-10, reference 1e-13): the potentials agree to delta = 1e-6 in f/eps
(derivation in test_sinkhorn.py), so every plan entry, and hence every joint entry (a sum of plan entries
with the same sign), has relative error <= 2 delta. Then log(P(s,t) / P(s)) moves by <= 4 delta and
H(Yt|Ys) = -sum P log(P/P_s) by <= 4 delta + 2 delta * sum P |log(P/P_s)|, which is <= 2 delta (2 + H_max)
with H_max <= log(Ct) <= 2 here: |dH| <= 1e-5. Joint entries: |dP| <= 2 delta P <= 2e-6; transport cost:
<= C_max * 2 delta (relative 2e-6). Measured: score 1e-13..1e-11, joint (relative) <= 3e-10, cost <= 4e-11.
float32 (library tol 1e-6): delta = f32_delta from test_sinkhorn.py (cost rounding 4 (d + 3) u S / eps plus
1e-3 for convergence), ~1e-3..2e-3 here, so |dH| <= 2 delta (2 + log Ct) + tol, joint <= 2 delta + tol.
Measured: score <= 2e-8, joint (relative) <= 3.4e-7, cost (relative) <= 1.1e-7.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import segtransfer as st
from helpers import clusters, f32_delta, hard_problem
import reference as ref

TOL64 = 1e-10
DELTA64 = 1e-6


def informative_pair(seed: int, ns: int = 300, nt: int = 250, d: int = 5, ks: int = 3, kt: int = 4):
    """Source and target pixels from shared, overlapping clusters; labels partly follow the clusters.

    The clusters overlap (centre spread 1, noise 0.7) on purpose: well-separated clusters with unequal
    proportions on the two sides make the plan nearly decomposable (mass must cross between clusters
    through entries of ~e^-C/eps), which Sinkhorn, and the reference, solve only in 10^4..10^5
    iterations. That is a legitimate but slow regime, covered by test_sinkhorn.py at small sizes.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    cs = rng.integers(0, 6, ns)
    ct = rng.integers(0, 6, nt)
    xs = centres[cs] + rng.normal(size=(ns, d)) * 0.7
    xt = centres[ct] + rng.normal(size=(nt, d)) * 0.7
    ys = cs % ks
    yt = np.where(rng.random(nt) < 0.8, ct % kt, rng.integers(0, kt, nt))  # 20 % label noise
    return xs, ys, xt, yt


def run(xs, ys, xt, yt, **kw):
    kw.setdefault("threads", 1)
    return st.otce(xs, ys, xt, yt, **kw)


def assert_same_result(r1, r2, exact: bool = True, atol: float = 0.0):
    """Two OTCE results of the same problem: numbers equal (bitwise by default) and same metadata."""
    cmp = np.testing.assert_array_equal if exact else (lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol))
    cmp(r1.scores, r2.scores)
    cmp(r1.conditional_entropy, r2.conditional_entropy)
    cmp(r1.joint, r2.joint)
    cmp(r1.transport_cost / max(1.0, float(np.max(r1.transport_cost))),
        r2.transport_cost / max(1.0, float(np.max(r1.transport_cost))))
    np.testing.assert_array_equal(r1.source_classes, r2.source_classes)
    np.testing.assert_array_equal(r1.target_classes, r2.target_classes)
    assert r1.n_pixels == r2.n_pixels and r1.repeats == r2.repeats and r1.dtype == r2.dtype


# --------------------------------------------------------------------------------------------------
# Against the reference on the same pixels
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,eps", [(0, 0.1), (0, 0.5), (1, 0.5), (1, 2.0)])
def test_float64_matches_reference(seed, eps):
    xs, ys, xt, yt = informative_pair(seed)
    R = ref.otce(xs, ys, xt, yt, eps)
    r = run(xs, ys, xt, yt, n_pixels=None, epsilon=eps, tol=TOL64)
    assert r.repeats == 1 and r.scores.shape == (1,) and r.std == 0.0
    assert r.n_pixels == (len(xs), len(xt))
    assert r.dtype == "float64"
    assert r.all_converged and r.marginal_error[0] <= TOL64
    np.testing.assert_array_equal(r.source_classes, R.source_classes)
    np.testing.assert_array_equal(r.target_classes, R.target_classes)
    hmax = np.log(len(R.target_classes))
    assert abs(r.score - R.score) <= 2 * DELTA64 * (2 + hmax)
    assert r.score == -r.conditional_entropy[0]
    assert r.scores[0] == r.score
    assert r.joint.shape == (1, 3, 4)
    np.testing.assert_allclose(r.joint[0], R.joint, rtol=2 * DELTA64 + TOL64, atol=1e-15)
    cmax = float(ref.sq_dists(xs, xt).max())
    assert abs(r.transport_cost[0] - R.transport_cost) <= cmax * (2 * DELTA64 + TOL64)
    # The score is informative here: well below the independence value -H(Yt).
    assert r.score > -ref.entropy(yt) + 0.05


@pytest.mark.parametrize("seed,eps", [(1, 0.1), (0, 0.5)])
def test_float32_matches_reference(seed, eps):
    xs, ys, xt, yt = informative_pair(seed)
    xs32, xt32 = xs.astype(np.float32), xt.astype(np.float32)
    R = ref.otce(xs32.astype(np.float64), ys, xt32.astype(np.float64), yt, eps)
    tol = 1e-6
    r = run(xs32, ys, xt32, yt, n_pixels=None, epsilon=eps, tol=tol)
    assert r.dtype == "float32"
    assert r.all_converged and r.marginal_error[0] <= tol
    delta = f32_delta(xs32, xt32, eps)
    hmax = np.log(len(R.target_classes))
    assert abs(r.score - R.score) <= 2 * delta * (2 + hmax) + tol
    np.testing.assert_allclose(r.joint[0], R.joint, rtol=2 * delta, atol=tol)
    cmax = float(ref.sq_dists(xs32, xt32).max())
    assert abs(r.transport_cost[0] - R.transport_cost) <= cmax * (2 * delta + tol)
    # ... and float32 agrees with float64 on the same (rounded) data to the same bound.
    r64 = run(xs32.astype(np.float64), ys, xt32.astype(np.float64), yt, n_pixels=None, epsilon=eps, tol=TOL64)
    assert abs(r.score - r64.score) <= 2 * delta * (2 + hmax) + tol


def duplicated_pair(seed: int, ns: int, nt: int, extra_s: int, extra_t: int):
    """informative_pair's pixels, each at least once, plus repeats of random ones, some of them under
    another label: bit-identical features within a class and across classes."""
    xs0, ys0, xt0, yt0 = informative_pair(seed, ns, nt)
    rng = np.random.default_rng(seed)
    i = np.concatenate([np.arange(ns), rng.integers(0, ns, extra_s)])
    j = np.concatenate([np.arange(nt), rng.integers(0, nt, extra_t)])
    ys = np.where(rng.random(len(i)) < 0.15, rng.integers(0, 3, len(i)), ys0[i])
    yt = np.where(rng.random(len(j)) < 0.15, rng.integers(0, 4, len(j)), yt0[j])
    return xs0[i], ys, xt0[j], yt


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("seed", [2, 5])  # (seeds 0, 1, 3: the reference needs > 2 * 10^5 iterations)
def test_duplicated_pixels_match_reference(dtype, seed):
    """Pixels sharing a class and bit-identical features are solved as one point of their summed mass
    (otce.cpp, merge_duplicates): the merged problem's plan is the sum of the merged rows, so the
    reference, which solves every pixel, gives the same joint, score and transport cost, to the
    bounds of test_float64/32_matches_reference. (60 and 50 distinct points, 300 and 250 pixels.)"""
    xs, ys, xt, yt = duplicated_pair(seed, 60, 50, 240, 200)
    xs, xt = xs.astype(dtype), xt.astype(dtype)
    R = ref.otce(xs.astype(np.float64), ys, xt.astype(np.float64), yt, 0.1)
    tol = TOL64 if dtype == "float64" else 1e-6
    delta = DELTA64 if dtype == "float64" else f32_delta(xs, xt, 0.1)
    r = run(xs, ys, xt, yt, n_pixels=None, epsilon=0.1, tol=tol)
    assert r.all_converged and r.marginal_error[0] <= tol
    hmax = np.log(len(R.target_classes))
    assert abs(r.score - R.score) <= 2 * delta * (2 + hmax) + tol
    np.testing.assert_allclose(r.joint[0], R.joint, rtol=2 * delta + tol, atol=tol)
    cmax = float(ref.sq_dists(xs, xt).max())
    assert abs(r.transport_cost[0] - R.transport_cost) <= cmax * (2 * delta + tol)


def bit_distinct(x: np.ndarray) -> np.ndarray:
    """x with the k-th repeat of a row moved by k ulps in its first feature: no two rows equal, and
    the costs move by ~1e-15 relative (an exponent change of ~1e-13 here)."""
    x = x.copy()
    _, inverse = np.unique(x, axis=0, return_inverse=True)
    seen = np.zeros(inverse.max() + 1, dtype=int)
    for r, u in enumerate(inverse.ravel()):
        for _ in range(seen[u]):
            x[r, 0] = np.nextafter(x[r, 0], np.inf)
        seen[u] += 1
    assert len(np.unique(x, axis=0)) == len(x)
    return x


@pytest.mark.parametrize("blocked", [False, True])
def test_duplicated_pixels_in_a_grouped_draw_match_the_unmerged_solve(blocked):
    """Past 10^6 entries the merged points are also split into balancing groups, which carry their
    weights along (group_within_classes): the score equals that of sinkhorn's plan on every pixel,
    made bit-distinct so that nothing merges there. 1,050 and 1,040 distinct points, 200 repeats a
    side."""
    xs, ys, xt, yt = duplicated_pair(4, 1050, 1040, 200, 200)
    r = run(xs, ys, xt, yt, n_pixels=None, epsilon=0.5, tol=TOL64, blocked=blocked)
    xs1, xt1 = bit_distinct(xs), bit_distinct(xt)
    s = st.sinkhorn(xs1, xt1, epsilon=0.5, tol=TOL64, threads=1)
    assert r.all_converged and s.converged
    joint = ref.joint_labels(s.plan(xs1, xt1), ys, yt, r.source_classes, r.target_classes)
    assert abs(r.score + ref.conditional_entropy(joint)) <= 1e-9
    np.testing.assert_allclose(r.joint[0], joint, rtol=1e-8, atol=1e-12)
    assert abs(r.transport_cost[0] - s.transport_cost) <= 1e-9 * s.transport_cost


@pytest.mark.parametrize("shift", [100.0, 1000.0, 3000.0])
def test_float32_sets_far_apart_keep_the_accuracy_of_their_spread(shift):
    """The target shifted by `shift` in every channel (costs up to ~shift^2 d = 4.5e7 at 3000), against
    the same float32 values solved in float64. The solver runs on each side centred on its own mean
    (the shift is a separable part of the cost, which the potentials absorb), so float32 rounds costs
    of the size the spread gives: S ~ 30 here, ~2e-6 a cost entry, 2e-5 in an exponent at eps = 0.1,
    which moves the score by 1e-5 at most. Measured 2e-8 at every shift (6e-9..2.4e-8); on the full
    cost the score was off by 1.2e-4 / 2.9e-4 / 2.1e-2 at shifts 100 / 1000 / 3000, converged."""
    xs, ys, xt, yt = informative_pair(3)
    xs32, xt32 = xs.astype(np.float32), (xt + shift).astype(np.float32)
    r = run(xs32, ys, xt32, yt, n_pixels=None, epsilon=0.1, tol=1e-6)
    r64 = run(xs32.astype(np.float64), ys, xt32.astype(np.float64), yt, n_pixels=None, epsilon=0.1, tol=TOL64)
    assert r.all_converged and r64.all_converged
    assert abs(r.score - r64.score) <= 1e-5
    # W_D ~ shift^2 d, its shift's share carried in float64: relative 2 tol (the marginals stand in
    # for the plan's in that share; measured <= 3e-8).
    assert abs(r.transport_cost[0] - r64.transport_cost[0]) <= 2e-6 * r64.transport_cost[0]


def test_mixed_precision_solved_in_float64():
    xs, ys, xt, yt = informative_pair(2, 120, 100)
    r_mixed = run(xs.astype(np.float32), ys, xt, yt, n_pixels=None)
    r64 = run(xs.astype(np.float32).astype(np.float64), ys, xt, yt, n_pixels=None)
    assert r_mixed.dtype == "float64"
    assert_same_result(r_mixed, r64)


# --------------------------------------------------------------------------------------------------
# Properties of the score
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bijective_relabelling_of_separated_clusters_scores_zero(dtype):
    """Same clusters, same class proportions, labels permuted: H(Yt|Ys) ~ 0, so OTCE ~ 0.

    The centres are >= 10 apart and the points within 0.3 * sqrt(d) of them, so a cross-cluster pair
    costs >= ~(10 - 2*3*0.3*sqrt(8))^2 ~ 25 more than an in-cluster one; with eps = 1 the cross mass is
    <= n m e^-25 ~ 1e-6 (balanced proportions mean no mass has to cross), and H <= ~1e-6 * 20.
    """
    rng = np.random.default_rng(7)
    k, d, per = 4, 8, 60
    centres = rng.normal(size=(k, d))
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[~np.eye(k, dtype=bool)]
    centres *= 10 / gaps.min()
    lab = np.repeat(np.arange(k), per)
    xs, ys, _ = clusters(rng, k * per, k, d, labels=lab, centres=centres)
    xt, ct, _ = clusters(rng, k * per, k, d, labels=lab, centres=centres)
    perm = np.array([2, 0, 3, 1])
    yt = np.array([11, 42, 7, 99])[perm[ct]]
    r = run(xs.astype(dtype), ys, xt.astype(dtype), yt, n_pixels=None, epsilon=1.0)
    assert r.all_converged
    assert abs(r.score) < 1e-3
    # The joint is (up to ~1e-6) a permutation matrix scaled by 1/k.
    expected = np.zeros((k, k))
    tcls = np.array([11, 42, 7, 99])
    for s in range(k):
        expected[s, np.searchsorted(r.target_classes, tcls[perm[s]])] = 1 / k
    np.testing.assert_allclose(r.joint[0], expected, atol=1e-5)


def test_labels_independent_of_features_give_conditional_entropy_near_marginal():
    """Target labels drawn independently of everything: H(Yt|Ys) ~ H(Yt) (mutual information ~ 0).

    H(Yt) - H(Yt|Ys) is the mutual information of the joint, >= 0 exactly (the joint's column marginal is
    the empirical target label distribution up to tol), and for independent labels it is only a finite-
    sample fluctuation: about (Cs - 1)(Ct - 1) / (2 N_eff) with N_eff ~ the 400 target pixels -> ~0.008.
    We allow 0.03. An informative labelling of the same features scores far higher (checked).
    """
    rng = np.random.default_rng(3)
    xs, ys, centres = clusters(rng, 400, 3, 4, sep=1.0, noise=0.7)
    xt, ct, _ = clusters(rng, 400, 3, 4, centres=centres, noise=0.7)
    yt_random = rng.integers(0, 4, 400)
    h_t = ref.entropy(yt_random)
    r = run(xs, ys, xt, yt_random, n_pixels=None, epsilon=1.0)
    h = r.conditional_entropy[0]
    assert h <= h_t + 1e-6
    assert h_t - h < 0.03
    r_inf = run(xs, ys, xt, ct, n_pixels=None, epsilon=1.0)
    assert r_inf.conditional_entropy[0] < h - 0.3


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_conditional_entropy_bounds_every_repeat(dtype):
    xs, ys, xt, yt = informative_pair(4, 500, 400, kt=5)
    r = run(xs.astype(dtype), ys, xt.astype(dtype), yt, n_pixels=150, repeats=6, epsilon=0.2)
    ct = len(np.unique(yt))
    assert r.conditional_entropy.shape == (6,)
    assert np.all(r.conditional_entropy >= 0)
    assert np.all(r.conditional_entropy <= np.log(ct) + 1e-9)
    np.testing.assert_array_equal(r.scores, -r.conditional_entropy)
    assert r.score == pytest.approx(np.mean(r.scores), abs=1e-15)
    assert r.std == pytest.approx(np.std(r.scores, ddof=1), abs=1e-15)
    assert np.all(r.transport_cost > 0)
    assert r.iterations.shape == (6,) and np.all(r.iterations >= 1)
    assert r.converged.dtype == np.bool_ and r.all_converged
    assert np.all(r.marginal_error <= st.DEFAULT_TOL)


def test_pixel_permutation_does_not_change_unsampled_score():
    xs, ys, xt, yt = informative_pair(5)
    rng = np.random.default_rng(0)
    p, q = rng.permutation(len(xs)), rng.permutation(len(xt))
    r0 = run(xs, ys, xt, yt, n_pixels=None, epsilon=0.3, tol=1e-12)
    r1 = run(xs[p], ys[p], xt[q], yt[q], n_pixels=None, epsilon=0.3, tol=1e-12)
    # Same pixels, another order: the plan is permuted; only summation order (1e-16 relative) and the
    # stopping point (marginal error <= 1e-12, i.e. score within ~1e-11) can differ.
    assert abs(r0.score - r1.score) < 1e-10
    np.testing.assert_allclose(r0.joint, r1.joint, rtol=0, atol=1e-10)
    assert r0.transport_cost[0] == pytest.approx(r1.transport_cost[0], rel=1e-10)


def test_same_seed_same_result_and_repeats_differ():
    xs, ys, xt, yt = informative_pair(6, 400, 400)
    kw = dict(n_pixels=120, repeats=5, epsilon=0.3, seed=11)
    r1 = run(xs, ys, xt, yt, **kw)
    r2 = run(xs, ys, xt, yt, **kw)
    assert_same_result(r1, r2)
    np.testing.assert_array_equal(r1.iterations, r2.iterations)
    assert r1.seed == 11
    # Different repeats draw different pixels: different scores.
    assert len(np.unique(r1.scores)) == 5
    assert r1.std > 0
    # Another seed, other draws.
    r3 = run(xs, ys, xt, yt, **{**kw, "seed": 12})
    assert not np.any(np.isin(r3.scores, r1.scores))
    # Repeat k does not depend on how many repeats were asked for.
    r4 = run(xs, ys, xt, yt, **{**kw, "repeats": 2})
    np.testing.assert_array_equal(r4.scores, r1.scores[:2])
    np.testing.assert_array_equal(r4.joint, r1.joint[:2])


def test_thread_count_does_not_change_result():
    """Rows are split into a fixed number of blocks summed in order: bitwise identical for any thread count."""
    xs, ys, xt, yt = informative_pair(8, 300, 300)
    # Two repeats of 150 pixels: they run side by side, one thread each (below parallel_min_entries a
    # solve takes no threads of its own, nor lent ones; the test after this one runs larger draws).
    kw = dict(n_pixels=150, repeats=2, epsilon=2.0)
    r1 = st.otce(xs, ys, xt, yt, threads=1, **kw)
    assert_same_result(r1, st.otce(xs, ys, xt, yt, threads=2, **kw))
    assert_same_result(r1, st.otce(xs, ys, xt, yt, threads=3, **kw))  # more threads than cores
    assert_same_result(r1, st.otce(xs, ys, xt, yt, **kw))  # OpenMP's default


def test_threads_lent_to_the_last_solves_do_not_change_result():
    """A worker that runs out of repeats lends its thread to the solves still running (nested parallel
    regions from then on). Large enough draws (10^7 cost entries) that their dense stages and Newton
    run threaded, and an odd repeat count, so that one solve is still running when the other worker
    is done: the same bits as one thread."""
    xs, ys, xt, yt = informative_pair(8, 4000, 4000)
    kw = dict(n_pixels=3300, repeats=3, epsilon=0.1)
    assert_same_result(st.otce(xs, ys, xt, yt, threads=1, **kw), st.otce(xs, ys, xt, yt, threads=2, **kw))


def test_all_valid_pixels_sampled_equals_unsampled():
    xs, ys, xt, yt = informative_pair(9, 150, 130)
    r_all = run(xs, ys, xt, yt, n_pixels=None, epsilon=0.3)
    r_n = run(xs, ys, xt, yt, n_pixels=130, repeats=1, epsilon=0.3)  # target: all 130; source: a draw
    assert r_n.n_pixels == (130, 130)
    xs2, ys2 = xs[:130], ys[:130]
    r_all2 = run(xs2, ys2, xt, yt, n_pixels=None, epsilon=0.3)
    r_n2 = run(xs2, ys2, xt, yt, n_pixels=130, repeats=3, epsilon=0.3)
    # n_pixels equal to the number of valid pixels takes each of them once, in every repeat.
    for k in range(3):
        assert r_n2.scores[k] == r_all2.score
        np.testing.assert_array_equal(r_n2.joint[k], r_all2.joint[0])
    assert r_n2.std == 0.0
    assert r_all.n_pixels == (150, 130)


@pytest.mark.parametrize("n_pixels", [None, 90])
def test_joint_normalised_with_label_frequency_marginals(n_pixels):
    xs, ys, xt, yt = informative_pair(10, 200, 180)
    tol = 1e-9
    r = run(xs, ys, xt, yt, n_pixels=n_pixels, repeats=4, epsilon=0.3, tol=tol)
    K = r.repeats
    assert r.joint.shape == (K, len(np.unique(ys)), len(np.unique(yt)))
    assert np.all(r.joint >= 0)
    # Each joint is a plan aggregated over label blocks: total mass 1, marginals within tol.
    np.testing.assert_allclose(r.joint.sum(axis=(1, 2)), 1.0, atol=tol)
    row = r.joint.sum(2)
    col = r.joint.sum(1)
    if n_pixels is None:
        _, cnt_s = np.unique(ys, return_counts=True)
        _, cnt_t = np.unique(yt, return_counts=True)
        for k in range(K):
            assert np.abs(row[k] - cnt_s / len(ys)).sum() <= tol
            assert np.abs(col[k] - cnt_t / len(yt)).sum() <= tol
    else:
        # Rows: frequencies of the source labels among the n_pixels sampled pixels, so multiples of
        # 1/n_pixels summing to 1 and never above what the table holds of that class.
        for marg, labels in ((row, ys), (col, yt)):
            counts = marg * n_pixels
            np.testing.assert_allclose(counts, np.round(counts), atol=n_pixels * tol)
            np.testing.assert_array_equal(np.round(counts).sum(1), n_pixels)
            _, avail = np.unique(labels, return_counts=True)
            assert np.all(np.round(counts) <= avail)
        # Different draws give different class counts (with overwhelming probability at 90 of 200).
        assert len({tuple(np.round(row[k] * n_pixels)) for k in range(K)}) > 1
    # The reported conditional entropy is the one of the reported joint.
    for k in range(K):
        assert r.conditional_entropy[k] == pytest.approx(ref.conditional_entropy(r.joint[k]), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Input layouts
# --------------------------------------------------------------------------------------------------

def feature_maps(seed: int, B: int, D: int, H: int, W: int, HL: int, WL: int, k: int):
    """(B, D, H, W) maps whose pixels cluster by a (B, HL, WL) label map (spatially blocky labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=(B, HL, WL))
    centres = rng.normal(size=(k, D))
    ri = ref.nearest_indices(H, HL)
    ci = ref.nearest_indices(W, WL)
    lab_small = labels[:, ri[:, None], ci[None, :]]  # (B, H, W)
    feats = centres[lab_small] + rng.normal(size=(B, H, W, D)) * 0.7  # overlapping: see informative_pair
    return np.ascontiguousarray(np.moveaxis(feats, -1, 1)), labels  # (B, D, H, W)


@pytest.mark.parametrize("n_pixels", [None, 40])
@pytest.mark.parametrize("label_res", [(6, 5), (13, 17), (3, 2)], ids=["same", "higher", "lower"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_feature_maps_equal_pixel_tables(dtype, label_res, n_pixels):
    """(B, D, H, W) + (B, H', W') labels == the pixel table built by the nearest rule (same pixel order).

    13 x 17 -> 6 x 5 is a non-integer downsampling factor: floor(i * 13 / 6) = 0, 2, 4, 6, 8, 10.
    """
    HL, WL = label_res
    fs, ls = feature_maps(1, 2, 4, 6, 5, HL, WL, 3)
    ft, lt = feature_maps(2, 3, 4, 6, 5, HL, WL, 4)
    fs, ft = fs.astype(dtype), ft.astype(dtype)
    kw = dict(n_pixels=n_pixels, repeats=2, epsilon=0.5, seed=3)
    r_maps = run(fs, ls, ft, lt, **kw)
    xs, ys = ref.maps_to_table(fs, ls)
    xt, yt = ref.maps_to_table(ft, lt)
    assert xs.shape == (2 * 30, 4) and xt.shape == (3 * 30, 4)
    r_tab = run(xs, ys, xt, yt, **kw)
    # Same pixels in the same order: the core gathers identical rows, so the results are bitwise equal.
    assert_same_result(r_maps, r_tab)
    # channels_last maps of the same data.
    r_cl = run(np.moveaxis(fs, 1, -1).copy(), ls, np.moveaxis(ft, 1, -1).copy(), lt, channels_last=True, **kw)
    assert_same_result(r_cl, r_tab)
    if n_pixels is None:
        R = ref.otce(xs.astype(np.float64), ys, xt.astype(np.float64), yt, 0.5)
        assert abs(r_maps.score - R.score) < (1e-5 if dtype == np.float64 else 1e-3)


def test_maps_with_ignored_label_pixels_equal_tables():
    fs, ls = feature_maps(3, 2, 3, 8, 8, 16, 16, 3)
    ft, lt = feature_maps(4, 2, 3, 8, 8, 16, 16, 3)
    ls = ls.copy()
    ls[:, :4, :] = 255  # label rows 0..3 -> feature rows 0, 1 (floor(i * 16 / 8) = 2i) are ignored
    xs, ys = ref.maps_to_table(fs, ls)
    xt, yt = ref.maps_to_table(ft, lt)
    assert np.sum(ys == 255) == 2 * 2 * 8
    keep = ys != 255
    r_maps = run(fs, ls, ft, lt, n_pixels=None, epsilon=0.3)
    r_tab = run(xs[keep], ys[keep], xt, yt, n_pixels=None, epsilon=0.3)
    assert_same_result(r_maps, r_tab)
    assert r_maps.n_pixels == (2 * 64 - 32, 2 * 64)


def test_last_stage_too_dense_for_max_density_gets_newton():
    """The benchmark's D = 256 data at eps = 1, 1500 pixels: the last stage's kernel (36 % of the
    entries within the cutoff) was too dense for a pattern (max_density 0.35), so it ran dense
    Sinkhorn without Newton, which crawled at ~1e-5 for thousands of iterations. The last stage now
    keeps patterns up to 50 % (kLastStageDensity), and a denser one falls back to a full kernel with
    Newton after 200 dense iterations (C++ test dense_last_stage_fallback): here 57 iterations."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).parent.parent / "bench" / "data.py")
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    xs, ys, xt, yt = bench_data.make_task_pair(256, 6000, 1, "float32", freq_spread=0.3)
    r = st.otce(xs, ys, xt, yt, n_pixels=1500, repeats=1, seed=1500, epsilon=1.0, threads=1, max_iter=3000)
    assert r.all_converged and r.iterations[0] < 300, (r.iterations, r.marginal_error)


@pytest.mark.parametrize("n_pixels, source, seed", [(1500, 1, 0), (1500, 2, 0), (2000, 2, 1), (2000, 1, 2)])
def test_no_cycle_of_overrelaxation_and_balancing(n_pixels, source, seed):
    """float32 demo draws whose last stage (dense, no Newton) had settled into a cycle of
    over-relaxed iterations and class balancing at marginal error 1.0-1.8e-6, above tol = 1e-6, and
    ran to max_iter (50,000 by default) where float64 and omega = 1 converged in ~30 iterations.
    StallBackoff (overrelaxation.hpp) now lowers omega when balanced blocks stop making progress."""
    from segtransfer._demo import make_demo

    demo = make_demo(0)
    s, t = demo.sources[source], demo.target
    r = st.otce(s.features, s.labels, t.features, t.labels, n_pixels=n_pixels, repeats=3, seed=seed,
                threads=1, max_iter=600)
    assert r.converged.all() and r.iterations.max() < 300, (r.iterations, r.marginal_error)
    assert r.marginal_error.max() <= 1e-6


# --------------------------------------------------------------------------------------------------
# Ignored pixels and label values
# --------------------------------------------------------------------------------------------------

def with_ignored(x, y, n_extra, ignore_values, rng, nasty=True):
    """Insert n_extra pixels labelled with ignore values at random places, with arbitrary features
    (huge values, NaN and inf when nasty): the valid pixels keep their relative order."""
    n = len(x) + n_extra
    pos = np.sort(rng.choice(n, n_extra, replace=False))
    mask = np.zeros(n, dtype=bool)
    mask[pos] = True
    X = np.empty((n, x.shape[1]), dtype=x.dtype)
    Y = np.empty(n, dtype=np.int64)
    X[~mask] = x
    Y[~mask] = y
    junk = rng.normal(size=(n_extra, x.shape[1])) * 1e6
    if nasty:
        junk[0, 0] = np.nan
        junk[1 % n_extra, -1] = np.inf
        junk[2 % n_extra, 0] = -np.inf
    X[mask] = junk
    Y[mask] = rng.choice(np.atleast_1d(ignore_values), n_extra)
    return X, Y


@pytest.mark.parametrize("n_pixels", [None, 100])
@pytest.mark.parametrize("ignore", [255, [255, 7], (7,), np.array([255, 7])],
                         ids=["int", "list", "tuple", "array"])
def test_ignored_pixels_change_nothing(ignore, n_pixels):
    rng = np.random.default_rng(20)
    xs, ys, xt, yt = informative_pair(11, 200, 180)
    ign = np.atleast_1d(ignore)
    Xs, Ys = with_ignored(xs, ys, 37, ign, rng)
    Xt, Yt = with_ignored(xt, yt, 23, ign, rng)
    r_clean = run(xs, ys, xt, yt, n_pixels=n_pixels, repeats=2, epsilon=0.3)
    r_dirty = run(Xs, Ys, Xt, Yt, n_pixels=n_pixels, repeats=2, epsilon=0.3, ignore_index=ignore)
    assert 255 not in r_dirty.source_classes and 7 not in r_dirty.target_classes
    if n_pixels is None:
        # Exactly the same valid pixels in the same order: bitwise-identical results.
        assert_same_result(r_clean, r_dirty)
    else:
        # Sampling draws among the valid pixels only (a draw is a set of positions among them), so the
        # same seed picks the same valid pixels whatever ignored pixels lie in between.
        assert r_dirty.n_pixels == (100, 100)
        assert np.all(np.isfinite(r_dirty.scores))
        assert_same_result(r_clean, r_dirty)


def test_ignore_list_mixing_signs_beyond_int64():
    """[-1, 2**63] is a list of ints, but NumPy reads it as float64: the values must stay exact."""
    xs, ys, xt, yt = informative_pair(12, 150, 150)
    r_ref = run(xs[20:], ys[20:], xt, yt, n_pixels=None)
    ys_u = ys.astype(np.uint64)
    ys_u[:20] = 2**63
    r_u = run(xs, ys_u, xt, yt.astype(np.uint64), n_pixels=None, ignore_index=[-1, 2**63])
    ys_i = ys.astype(np.int64)
    ys_i[:20] = -1
    r_i = run(xs, ys_i, xt, yt, n_pixels=None, ignore_index=(-1, 2**63))
    for r in (r_u, r_i):
        assert r.n_pixels == (130, 150)
        np.testing.assert_array_equal(r.scores, r_ref.scores)
    with pytest.raises(ValueError, match="outside the 64-bit integer range"):
        run(xs, ys, xt, yt, n_pixels=None, ignore_index=[-1, 2**70])


def test_ignore_index_none_counts_255_as_a_class():
    xs, ys, xt, yt = informative_pair(12, 150, 150)
    ys = ys.copy()
    ys[:20] = 255
    r = run(xs, ys, xt, yt, n_pixels=None, ignore_index=None)
    assert 255 in r.source_classes and r.n_pixels == (150, 150)
    r_ign = run(xs, ys, xt, yt, n_pixels=None)
    assert 255 not in r_ign.source_classes and r_ign.n_pixels == (130, 150)


@pytest.mark.parametrize("label_dtype", [np.uint8, np.int16, np.int32, np.int64, np.uint64])
def test_non_contiguous_labels(label_dtype):
    xs, ys, xt, yt = informative_pair(13, 200, 180)
    src_vals = np.array([3, 17, 200])
    tgt_vals = np.array([0, 5, 9, 250])
    r_codes = run(xs, ys, xt, yt, n_pixels=None, epsilon=0.3)
    r = run(xs, src_vals[ys].astype(label_dtype), xt, tgt_vals[yt].astype(label_dtype), n_pixels=None, epsilon=0.3)
    np.testing.assert_array_equal(r.source_classes, src_vals)
    np.testing.assert_array_equal(r.target_classes, tgt_vals)
    np.testing.assert_array_equal(r.scores, r_codes.scores)
    np.testing.assert_array_equal(r.joint, r_codes.joint)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_label_codes_equal_numpy_unique(dtype):
    """pixel_table counts labels that span a short range instead of sorting them: the classes and
    codes must be np.unique's, at either end of the dtype's range and across its sign."""
    from segtransfer._arrays import _classes_and_codes

    rng = np.random.default_rng(21)
    info = np.iinfo(dtype)
    lows = [0, int(info.min), int(info.max) - 40, max(int(info.min), -5)]
    for lo in lows:
        for span in (0, 3, 40, 300):
            hi = min(lo + span, int(info.max))
            v = rng.integers(lo, hi, size=500, endpoint=True, dtype=dtype)
            classes, codes = _classes_and_codes(v)
            ref_classes, ref_codes = np.unique(v, return_inverse=True)
            assert classes.dtype == ref_classes.dtype
            np.testing.assert_array_equal(classes, ref_classes)
            np.testing.assert_array_equal(codes, ref_codes)
    extremes = np.array([info.max, info.min, info.max], dtype=dtype)  # a span wider than the labels: sorted
    np.testing.assert_array_equal(_classes_and_codes(extremes)[1], np.unique(extremes, return_inverse=True)[1])


@pytest.mark.parametrize("vals", [[-(2**40), 3, 2**40], [2**63 + 5, 2**63 + 9, 2**64 - 1]], ids=["wide", "uint64-top"])
def test_labels_far_apart_or_near_the_dtype_limit(vals):
    xs, ys, xt, yt = informative_pair(13, 200, 180)
    dtype = np.uint64 if vals[0] >= 2**63 else np.int64
    src_vals = np.array(vals, dtype=dtype)
    r_codes = run(xs, ys, xt, yt, n_pixels=None, epsilon=0.3)
    r = run(xs, src_vals[ys], xt, yt, n_pixels=None, epsilon=0.3)
    np.testing.assert_array_equal(r.source_classes, src_vals)
    np.testing.assert_array_equal(r.scores, r_codes.scores)
    np.testing.assert_array_equal(r.joint, r_codes.joint)


def test_negative_label_values_are_ordinary_classes():
    xs, ys, xt, yt = informative_pair(14, 150, 150)
    vals = np.array([-5, -1, 1000])
    r = run(xs, vals[ys], xt, yt, n_pixels=None, epsilon=0.3)
    r0 = run(xs, ys, xt, yt, n_pixels=None, epsilon=0.3)
    np.testing.assert_array_equal(r.source_classes, vals)
    np.testing.assert_array_equal(r.scores, r0.scores)


# --------------------------------------------------------------------------------------------------
# Array flavours: torch, JAX, strides
# --------------------------------------------------------------------------------------------------

def test_torch_cpu_tensors_equal_numpy():
    torch = pytest.importorskip("torch")
    xs, ys, xt, yt = informative_pair(15, 150, 140)
    kw = dict(n_pixels=100, repeats=2, epsilon=0.3)
    for dt, tdt in ((np.float32, torch.float32), (np.float64, torch.float64)):
        r_np = run(xs.astype(dt), ys, xt.astype(dt), yt, **kw)
        r_t = run(torch.tensor(xs, dtype=tdt), torch.tensor(ys), torch.tensor(xt, dtype=tdt),
                  torch.tensor(yt), **kw)
        assert_same_result(r_np, r_t)
        # Tensors that require grad and non-contiguous tensor views work too.
        xs_t = torch.tensor(xs, dtype=tdt, requires_grad=True)
        xt_t = torch.tensor(np.ascontiguousarray(xt.T), dtype=tdt).T  # transposed view, not contiguous
        assert not xt_t.is_contiguous()
        r_g = run(xs_t, torch.tensor(ys), xt_t, torch.tensor(yt), **kw)
        assert_same_result(r_np, r_g)


def test_torch_feature_maps_equal_numpy():
    torch = pytest.importorskip("torch")
    fs, ls = feature_maps(5, 2, 3, 6, 6, 12, 12, 3)
    ft, lt = feature_maps(6, 2, 3, 6, 6, 12, 12, 3)
    r_np = run(fs.astype(np.float32), ls, ft.astype(np.float32), lt, n_pixels=None)
    r_t = run(torch.from_numpy(fs.astype(np.float32)), torch.from_numpy(ls), torch.from_numpy(ft.astype(np.float32)),
              torch.from_numpy(lt), n_pixels=None)
    assert_same_result(r_np, r_t)
    # channels_last from a permuted torch view (no copy).
    r_cl = run(torch.from_numpy(fs.astype(np.float32)).permute(0, 2, 3, 1), torch.from_numpy(ls),
               torch.from_numpy(ft.astype(np.float32)).permute(0, 2, 3, 1), torch.from_numpy(lt),
               n_pixels=None, channels_last=True)
    assert_same_result(r_np, r_cl)


def test_torch_half_precision_features_are_refused_with_a_torch_hint():
    # bfloat16 is what mixed-precision encoders emit; NumPy cannot read it at all.
    torch = pytest.importorskip("torch")
    xs, ys, xt, yt = informative_pair(15, 150, 140)
    for tdt in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match=r"source_features has dtype .*float16.*float32 and float64.*\.float\(\)"):
            st.otce(torch.tensor(xs, dtype=tdt), torch.tensor(ys), torch.tensor(xt), torch.tensor(yt), n_pixels=100)


def test_torch_meta_tensors_are_refused_as_holding_no_values():
    torch = pytest.importorskip("torch")
    xs, ys, xt, yt = informative_pair(15, 150, 140)
    with pytest.raises(ValueError, match=r"source_features is a torch tensor on the 'meta' device"):
        st.otce(torch.empty(xs.shape, device="meta"), ys, xt, yt, n_pixels=100)


def test_torch_lazy_negation_and_sparse_layouts():
    """torch exports a view with a pending negation (its neg bit) as the un-negated storage: read in
    place it would score the negated features. Sparse tensors have no storage to read."""
    torch = pytest.importorskip("torch")
    xs, ys, xt, yt = informative_pair(15, 150, 140)
    base = torch.tensor(xs)
    negated_view = torch.complex(torch.zeros_like(base), -base).conj().imag  # equals base, neg bit set
    assert negated_view.is_neg() and torch.equal(negated_view, base)
    r_np = run(xs, ys, xt, yt, n_pixels=None)
    assert_same_result(r_np, run(negated_view, torch.tensor(ys), xt, yt, n_pixels=None))
    with pytest.raises(TypeError, match=r"source_features is a torch tensor with layout torch.sparse_coo.*to_dense"):
        st.otce(base.to_sparse(), ys, xt, yt, n_pixels=None)


class _Tensor:
    """Stands in for a torch tensor whose neg bit is set: its DLPack export is the un-negated storage
    (what torch 2.13 exports), resolve_neg() the values it means."""

    __module__ = "torch"

    def __init__(self, values: np.ndarray, neg: bool) -> None:
        self.values, self.neg = values, neg
        self.layout = "torch.strided"

    def is_neg(self) -> bool:
        return self.neg

    def resolve_neg(self) -> "_Tensor":
        return _Tensor(self.values, False)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)

    def __dlpack__(self, *args, **kwargs):
        return (-self.values if self.neg else self.values).__dlpack__()


def test_pending_negation_is_resolved_before_export():
    xs, ys, xt, yt = informative_pair(15, 150, 140)
    r_np = run(xs, ys, xt, yt, n_pixels=None)
    assert_same_result(r_np, run(_Tensor(xs, neg=True), ys, xt, yt, n_pixels=None))


def test_failed_dlpack_export_is_named():
    class Refuses:
        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, *args, **kwargs):
            raise BufferError("cannot export")

    xs, ys, xt, yt = informative_pair(15, 150, 140)
    with pytest.raises(TypeError, match=r"source_features could not be exported through DLPack \(BufferError: cannot export\)"):
        st.otce(Refuses(), ys, xt, yt, n_pixels=None)


def test_jax_arrays_equal_numpy():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    xs, ys, xt, yt = informative_pair(15, 150, 140)
    kw = dict(n_pixels=100, repeats=2, epsilon=0.3)
    r_np = run(xs.astype(np.float32), ys.astype(np.int32), xt.astype(np.float32), yt.astype(np.int32), **kw)
    r_j = run(jnp.asarray(xs, dtype=jnp.float32), jnp.asarray(ys, dtype=jnp.int32),
              jnp.asarray(xt, dtype=jnp.float32), jnp.asarray(yt, dtype=jnp.int32), **kw)
    assert_same_result(r_np, r_j)
    fs, ls = feature_maps(5, 2, 3, 6, 6, 12, 12, 3)
    ft, lt = feature_maps(6, 2, 3, 6, 6, 12, 12, 3)
    r_np = run(fs.astype(np.float32), ls.astype(np.int32), ft.astype(np.float32), lt.astype(np.int32), n_pixels=None)
    r_j = run(jnp.asarray(fs, dtype=jnp.float32), jnp.asarray(ls, dtype=jnp.int32),
              jnp.asarray(ft, dtype=jnp.float32), jnp.asarray(lt, dtype=jnp.int32), n_pixels=None)
    assert_same_result(r_np, r_j)
    with pytest.raises(TypeError, match=r"source_features has dtype bfloat16; only float32 and float64"):
        st.otce(jnp.asarray(xs, dtype=jnp.bfloat16), ys, xt, yt, n_pixels=100)


def test_jax_float64_and_sinkhorn_equal_numpy():
    """JAX makes float64 arrays only with x64 enabled (else it silently stores float32): under it
    they are solved in float64 like NumPy's; ``sinkhorn`` reads JAX points and weights the same way."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    enable_x64 = getattr(jax, "enable_x64", None)  # older jax has it in jax.experimental only
    if enable_x64 is None:
        enable_x64 = getattr(getattr(jax, "experimental", None), "enable_x64", None)
    if enable_x64 is None:
        pytest.skip("this jax has no enable_x64 context manager")
    xs, ys, xt, yt = informative_pair(15, 150, 140)
    with enable_x64(True):
        r_np = run(xs, ys, xt, yt, n_pixels=100, repeats=2, epsilon=0.3)
        r_j = run(jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(xt), jnp.asarray(yt), n_pixels=100, repeats=2,
                  epsilon=0.3)
        assert r_j.dtype == "float64"
        assert_same_result(r_np, r_j)
        a = np.linspace(1.0, 2.0, 150)
        a /= a.sum()
        s_np = st.sinkhorn(xs, xt, epsilon=0.5, a=a, threads=1)
        s_j = st.sinkhorn(jnp.asarray(xs), jnp.asarray(xt), epsilon=0.5, a=jnp.asarray(a), threads=1)
    assert s_j.converged and s_j.iterations == s_np.iterations
    np.testing.assert_array_equal(s_j.f, s_np.f)
    np.testing.assert_array_equal(s_j.g, s_np.g)
    assert s_j.transport_cost == s_np.transport_cost


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_strided_arrays_equal_contiguous_copies(dtype):
    xs, ys, xt, yt = informative_pair(16, 160, 150, d=6)
    xs, xt = xs.astype(dtype), xt.astype(dtype)
    kw = dict(n_pixels=None, epsilon=0.3)
    base_rev = run(np.ascontiguousarray(xs[::-1]), ys[::-1].copy(), xt, yt, **kw)
    # Negative strides on the pixel axis (labels reversed alike).
    assert_same_result(run(xs[::-1], ys[::-1], xt, yt, **kw), base_rev)
    # Negative stride on the channel axis: the same as reversing channels in a copy.
    base_ch = run(np.ascontiguousarray(xs[:, ::-1]), ys, np.ascontiguousarray(xt[:, ::-1]), yt, **kw)
    assert_same_result(run(xs[:, ::-1], ys, xt[:, ::-1], yt, **kw), base_ch)
    # Fortran order.
    base = run(xs, ys, xt, yt, **kw)
    assert_same_result(run(np.asfortranarray(xs), ys, np.asfortranarray(xt), yt, **kw), base)
    # Every other channel of a wider array, every other pixel of a longer one, strided labels too.
    wide = np.zeros((2 * len(xs), 2 * xs.shape[1]), dtype=dtype)
    wide[::2, ::2] = xs
    wide[1::2] = np.nan  # never read: not part of the view
    lab = np.zeros(2 * len(ys), dtype=np.int64)
    lab[::2] = ys
    lab[1::2] = 255
    assert_same_result(run(wide[::2, ::2], lab[::2], xt, yt, **kw), base)
    # Strided (B, D, H, W) maps: a view with negative strides on H and a step on W.
    fs, ls = feature_maps(7, 2, 3, 6, 8, 6, 8, 3)
    ft, lt = feature_maps(8, 2, 3, 6, 8, 6, 8, 3)
    fs, ft = fs.astype(dtype), ft.astype(dtype)
    view = fs[:, :, ::-1, ::2]
    r_view = run(view, ls[:, ::-1, ::2], ft, lt, **kw)
    r_copy = run(np.ascontiguousarray(view), np.ascontiguousarray(ls[:, ::-1, ::2]), ft, lt, **kw)
    assert_same_result(r_view, r_copy)


def test_big_endian_features_equal_native():
    xs, ys, xt, yt = informative_pair(17, 120, 110)
    r = run(xs, ys, xt, yt, n_pixels=None)
    r_be = run(xs.astype(">f8"), ys.astype(">i4"), xt.astype(">f8"), yt, n_pixels=None)
    assert_same_result(r, r_be)


def test_sampled_scores_are_reasonable_estimates_of_the_full_score():
    """Sampling n of N pixels is an estimator of the same quantity: mean of repeats near the full score."""
    xs, ys, xt, yt = informative_pair(18, 600, 600)
    full = run(xs, ys, xt, yt, n_pixels=None, epsilon=0.5).score
    sampled = run(xs, ys, xt, yt, n_pixels=300, repeats=8, epsilon=0.5)
    assert abs(sampled.score - full) < 4 * sampled.std + 0.05
    assert sampled.n_pixels == (300, 300)


def test_no_warning_when_converged_and_warning_when_not():
    xs, ys, xt, yt = informative_pair(19, 120, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(xs, ys, xt, yt, n_pixels=None, epsilon=0.3)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        r = run(xs, ys, xt, yt, n_pixels=100, repeats=2, epsilon=0.05, max_iter=1)
    assert not r.all_converged and not np.any(r.converged)
    assert np.all(r.iterations == 1)
    assert np.all(r.marginal_error > r.tol)
    assert np.all(np.isfinite(r.scores))
    assert "NOT converged" in repr(r)


# --------------------------------------------------------------------------------------------------
# Sampling, timeout, consistency with sinkhorn()
# --------------------------------------------------------------------------------------------------

def drawn_pixels(r, n):
    """With one class per pixel, the joint's marginals times n are the indicators of the drawn pixels."""
    rows = r.joint.sum(2) * n  # (R, Ns)
    cols = r.joint.sum(1) * n  # (R, Nt)
    for m in (rows, cols):
        np.testing.assert_allclose(m, np.round(m), atol=1e-3)
    return np.round(rows).astype(int), np.round(cols).astype(int)


@pytest.fixture(scope="module")
def unique_label_tables():
    rng = np.random.default_rng(30)
    Ns, Nt = 80, 200
    return rng.normal(size=(Ns, 2)), np.arange(Ns) * 3, rng.normal(size=(Nt, 2)), np.arange(Nt) + 1000


def test_each_draw_takes_n_distinct_pixels(unique_label_tables):
    xs, ys, xt, yt = unique_label_tables
    n = 20
    r = run(xs, ys, xt, yt, n_pixels=n, repeats=10, epsilon=2.0, seed=3)
    rows, cols = drawn_pixels(r, n)
    for ind in (rows, cols):
        assert set(np.unique(ind)) <= {0, 1}  # never the same pixel twice in a draw
        np.testing.assert_array_equal(ind.sum(1), n)


def test_sampling_is_uniform_over_seeds(unique_label_tables):
    """Each pixel is in a draw with probability n / N. One draw for each of S seeds: the inclusion counts
    are Binomial(S, n/N) per pixel (slightly negatively correlated), so their chi-square statistic over
    N cells is ~ N - 1 +- sqrt(2 (N - 1)); we allow 5 sigma."""
    xs, ys, xt, yt = unique_label_tables
    n, S, Nt = 20, 250, len(yt)
    inc = np.zeros(Nt)
    for seed in range(S):
        _, cols = drawn_pixels(run(xs, ys, xt, yt, n_pixels=n, repeats=1, epsilon=2.0, seed=seed), n)
        inc += cols[0]
    expected = S * n / Nt
    chi2 = float(((inc - expected) ** 2 / expected).sum())
    assert chi2 < (Nt - 1) + 5 * np.sqrt(2 * (Nt - 1))
    assert inc.min() > 0  # every pixel can be drawn


def test_repeats_are_independent_draws(unique_label_tables):
    """Repeats are meant to be independent draws (their spread is reported as `std`). Two independent
    draws of n out of N share n^2 / N pixels on average (hypergeometric, variance <= n^2/N); here
    n^2/N = 2 for the target side and 5 for the source side. Over R - 1 consecutive pairs the mean
    overlap has a standard error <= sqrt(n^2/N / (R - 1)), ~0.2 / 0.3: 1.5 (target) and 2.0 (source)
    above the expectation are > 5 sigma."""
    xs, ys, xt, yt = unique_label_tables
    n, R = 20, 50
    r = run(xs, ys, xt, yt, n_pixels=n, repeats=R, epsilon=2.0, seed=7)
    rows, cols = drawn_pixels(r, n)
    for ind, N, slack in ((cols, len(yt), 1.5), (rows, len(ys), 2.0)):
        overlap = (ind[:-1] * ind[1:]).sum(1)  # pixels shared by repeat k and k + 1
        assert overlap.mean() < n * n / N + slack, (
            f"consecutive repeats share {overlap.mean():.1f} of {n} pixels on average, "
            f"independent draws share {n * n / N:.1f}")
        far = (ind[:-10] * ind[10:]).sum(1)  # and repeats further apart
        assert far.mean() < n * n / N + slack


def test_sampled_class_counts_are_hypergeometric():
    """Class counts of a draw of n distinct pixels out of N are hypergeometric: mean n p and variance
    n p (1 - p) (N - n) / (N - 1), half the binomial variance at n = N / 2 (with replacement would give
    the binomial one). Seeds 0..R-1, one repeat each (independent streams), R = 300: the sample variance
    has a relative standard error sqrt(2 / R) ~ 8 %, so [0.7, 1.3] x hypergeometric is a > 3.5-sigma
    band that excludes the binomial (x 1.97)."""
    rng = np.random.default_rng(33)
    N, n, R = 60, 30, 300
    xs, xt = rng.normal(size=(N, 2)), rng.normal(size=(N, 2))
    ys = np.arange(N) % 2
    yt = np.repeat([0, 1, 2], [20, 20, 20])  # p = 1/3
    counts = np.empty(R)
    for seed in range(R):
        r = run(xs, ys, xt, yt, n_pixels=n, repeats=1, epsilon=2.0, seed=seed)
        c = r.joint[0].sum(0) * n
        np.testing.assert_allclose(c, np.round(c), atol=1e-3)
        counts[seed] = np.round(c[0])
    p = 1 / 3
    hyper = n * p * (1 - p) * (N - n) / (N - 1)
    assert abs(counts.mean() - n * p) < 4 * np.sqrt(hyper / R)
    assert 0.7 * hyper < counts.var(ddof=1) < 1.3 * hyper


def test_timeout_stops_and_reports():
    """A solve that cannot converge in any sensible time (C/eps ~ 1e6, huge max_iter) stops at the
    timeout, reports it and warns; the result still holds finite numbers from the last iterate.
    2400 points: the error stalls at float64's resolution, where the solver stops by itself
    (test_error_stuck_at_float64_resolution_returns), after ~2.2 s on a Zen 5 core; at 1200 points
    that took 0.32 s there and raced the 0.3 s timeout (session 42). sinkhorn's solve of these
    points takes longer still, so its timeout of 0.05 s leaves a wider margin."""
    xs, ys, xt, yt = hard_problem(2400)
    with pytest.warns(RuntimeWarning, match="timeout"):
        r = run(xs, ys, xt, yt, n_pixels=None, epsilon=1e-4, tol=1e-12, max_iter=10**9, timeout=0.3)
    assert r.timed_out.tolist() == [True]
    assert not r.all_converged
    assert r.iterations[0] < 10**9
    assert np.all(np.isfinite(r.scores)) and np.all(np.isfinite(r.joint))
    sr_warn = pytest.warns(RuntimeWarning, match="did not reach")
    with sr_warn:
        sr = st.sinkhorn(xs, xt, epsilon=1e-4, tol=1e-12, max_iter=10**9, timeout=0.05, threads=1)
    assert sr.timed_out is True and sr.converged is False


def test_transport_cost_agrees_with_sinkhorn():
    """otce's W_D on all pixels is the entropic OT cost between the two clouds (uniform weights), the
    same quantity st.sinkhorn returns; otce reorders pixels by class, which OT does not see."""
    xs, ys, xt, yt = informative_pair(32, 200, 170)
    r = run(xs, ys, xt, yt, n_pixels=None, epsilon=0.4, tol=1e-10)
    sr = st.sinkhorn(xs, xt, epsilon=0.4, tol=1e-10, threads=1)
    # Both within 2 delta = 2e-6 of the exact value (test_sinkhorn.py), relative to C_max.
    cmax = float(ref.sq_dists(xs, xt).max())
    assert abs(r.transport_cost[0] - sr.transport_cost) <= cmax * 4 * DELTA64
    # ... and the joint is the plan of st.sinkhorn summed over label blocks.
    joint = ref.joint_labels(sr.plan(xs, xt), ys, yt)
    np.testing.assert_allclose(r.joint[0], joint, rtol=4 * DELTA64, atol=1e-15)


# ------------------------------------------------------------------------------------------- blocked

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blocked_mode_matches_stored_cost(dtype):
    """blocked=True recomputes the cost instead of storing it; it solves the same problem to the same
    tol, so the two agree within what two converged plans may differ by. float64 at tol 1e-10: both within
    delta = 1e-6 of the reference in f/eps (module docstring), so the scores within 2 * 1e-5 and the joint
    entries within 2 * 2e-6 relative. float32 at tol 1e-6: each within 2 f32_delta (2 + log Ct) + tol of
    the float64 answer on the same points, so twice that between them."""
    xs, ys, xt, yt = informative_pair(3)
    xs, xt = xs.astype(dtype), xt.astype(dtype)
    kw = dict(n_pixels=200, repeats=3, seed=4, threads=1)
    if dtype == np.float64:
        kw["tol"] = TOL64
    stored = st.otce(xs, ys, xt, yt, **kw)
    blocked = st.otce(xs, ys, xt, yt, blocked=True, **kw)
    assert blocked.blocked and not stored.blocked
    assert blocked.all_converged and stored.all_converged
    assert np.all(blocked.marginal_error <= (TOL64 if dtype == np.float64 else 1e-6))
    if dtype == np.float64:
        score_tol, joint_rel = 2e-5, 4e-6
    else:
        delta = f32_delta(xs, xt, 0.1)
        score_tol = 2 * (2 * delta * (2 + np.log(4)) + 1e-6)
        joint_rel = 2 * (2 * delta + 1e-6)
    np.testing.assert_allclose(blocked.scores, stored.scores, rtol=0, atol=score_tol)
    np.testing.assert_allclose(blocked.joint, stored.joint, rtol=joint_rel, atol=1e-12)
    np.testing.assert_allclose(blocked.transport_cost, stored.transport_cost, rtol=joint_rel)


@pytest.mark.parametrize("blocked", [False, True])
def test_large_feature_scale_converges_in_float32(blocked):
    """Features 100x larger (costs 10^4x) at the default epsilon: exponents of the intermediate stages
    reach ~10^7 there, where forming them in float (float_stage_exponents) put a relative error of
    ~0.3 on every term and those stages stalled for all of max_iter (5,000 here; measured before the
    guard: not converged, scores 2e-3 off). Such stages now form their exponents in double: float32
    input converges in as many iterations as float64 input on the same pixels, to the same score
    (measured: 1e-10 apart; allowed: the default tol's 1e-6 on both sides)."""
    rng = np.random.default_rng(0)

    def side(shift):
        lab = rng.integers(0, 4, size=(8, 16, 16))
        return (rng.normal(size=(8, 16, 16, 19)) + 3.0 * lab[..., None] + shift) * 100.0, lab

    xs, ys = side(0.0)
    xt, yt = side(0.5)
    kw = dict(n_pixels=500, repeats=2, seed=0, max_iter=5000, blocked=blocked, threads=1)
    r32 = st.otce(xs.astype(np.float32), ys, xt.astype(np.float32), yt, **kw)
    r64 = st.otce(xs, ys, xt, yt, **kw)
    assert r32.all_converged and r64.all_converged
    assert np.all(r32.iterations < 1000)
    np.testing.assert_allclose(r32.scores, r64.scores, rtol=0, atol=2e-6)


def test_blocked_mode_is_thread_count_independent():
    """The blocked solver adds its column sums over fixed row ranges in a fixed order (blocked.cpp). One
    repeat, so that the solve itself gets the threads (repeats would run side by side, one thread each),
    of 330 pixels a side: above parallel_min_entries (10^5 entries), below which it runs on one thread."""
    xs, ys, xt, yt = informative_pair(5, 400, 400)
    kw = dict(n_pixels=330, repeats=1, seed=1, blocked=True)
    one = st.otce(xs, ys, xt, yt, threads=1, **kw)
    three = st.otce(xs, ys, xt, yt, threads=3, **kw)
    assert np.array_equal(one.scores, three.scores) and np.array_equal(one.joint, three.joint)
    assert np.array_equal(one.iterations, three.iterations)


@pytest.mark.parametrize("blocked", [False, True])
def test_error_stuck_at_float64_resolution_returns(blocked):
    """Source features ~1.3e5 (largest cost / epsilon ~ 1e11): marginal errors near 1e-5 are float64
    rounding, which no iteration removes. Found by the fuzzer: the last stage iterated until max_iter
    (here 2**62, so it never returned). It now stops once its error stalls that close to the floor
    and reports what it has (converged or not, certified either way)."""
    rng = np.random.default_rng(0)
    xs = np.full((12, 3), 125730.22109339)
    ys = np.array([0, 1, 0, 0, 0, 1, 1, 2, 1, 0, 0, 1])
    xt = rng.standard_normal((12, 3)).astype(np.float32)
    yt = np.array([0, 1, 1, 0, 0, 0, 0, 0, 0, 2, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # not converged is a documented outcome here
        r = st.otce(xs, ys, xt, yt, n_pixels=2, repeats=2, epsilon=0.5, max_iter=2**62, seed=0, timeout=60,
                    blocked=blocked)
    assert not r.timed_out.any()
    assert r.iterations.max() < 100_000
    assert np.all(np.isfinite(r.marginal_error))


@pytest.mark.parametrize("blocked", [False, True])
def test_certificate_at_float64_resolution_ends_the_solve(blocked):
    """Found by the CI fuzzer (tests/fuzz/corpus): the same two points ~6e5 apart as source and target
    (largest cost / epsilon ~ 8.6e11). The last stage's pattern estimate was exactly 0 and every
    certificate 4.3e-4, all of it what float64 cannot resolve at that scale; a lower target asked no
    work of an estimate of 0, so the stored solver certified the same point forever without an iteration
    (max_iter never came). It now stops when the certificate's rounding term alone exceeds tol or
    rounds do no work, and says the error stalled at float64's resolution."""
    x = np.array([[125730.22109339, -132104.8632913, 640422.65044328],
                  [104900.11715304, -535669.37316111, 361595.05490948]])
    y = np.array([0, 1])
    with pytest.warns(RuntimeWarning, match="resolution"):
        r = st.otce(x, y, x, y, n_pixels=2, repeats=1, epsilon=0.5, max_iter=2**62, threads=1, timeout=60,
                    blocked=blocked)
    assert not r.converged.any() and not r.timed_out.any()
    assert r.iterations.max() < 1000
    assert 1e-4 < r.marginal_error.max() < 1e-3  # the float64 floor at this cost scale, reported as such


def test_nearly_unregularised_grid_problem_converges():
    """20 x 23 points on an integer grid (ties), largest cost / epsilon 1e8 (a seeded sweep of small
    problems at 10^7-10^10, tests/fuzz/stall_sweep.py, session 28): the error sat at 4.35e-3 while the
    potentials drifted and the pattern went stale every ~68,000 iterations; with max_iter = 2**62 the
    solve never returned, and from session 28 on it ended after rounds without progress, unconverged.
    The pattern had fallen apart into components whose masses do not balance (7 rows against 8
    columns, the next entry out ~1.7e6 eps away); the Hungarian dual step that shifts such a
    component (shift_imbalanced_component, session 31) makes it converge in under 1,000 iterations.
    Checked against the exact optimal transport cost (POT's network simplex) and the NumPy plan."""
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(37)
    x, y = np.round(rng.normal(size=(20, 5))), np.round(rng.normal(size=(23, 5)))
    s = np.sqrt(1e8 * 0.5 / ((x[:, None] - y[None]) ** 2).sum(-1).max())
    x, y = x * s, y * s
    r = st.sinkhorn(x, y, epsilon=0.5, max_iter=2**62, threads=1, timeout=120)
    assert r.converged and r.iterations < 5_000, (r.marginal_error, r.iterations)
    a, b = np.full(20, 1 / 20), np.full(23, 1 / 23)
    cost = ref.sq_dists(x, y)
    plan = r.plan(x, y)
    assert np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum() <= 2e-6
    exact = float(ot.emd2(a, b, cost))
    # The entropic plan costs at most eps log(n m) more, up to what its marginal error moves.
    assert -cost.max() * 2e-6 <= r.transport_cost - exact <= 0.5 * np.log(20 * 23) + cost.max() * 2e-6


def test_weakly_joined_components_converge_at_a_tight_tol():
    """12 x 3 points at largest cost / epsilon ~ 6.7e3 and tol 2e-10 (the same sweep, tight tols):
    two groups of 4 rows, each on its own column, joined only by entries of ~2e-8 while their rows
    were off by +-4.4e-10. Newton's damping, kept at >= 1e-4, swamped that direction: every step
    gained ~1e-4 of the error and the solve took 9.8 million iterations (the default max_iter ended
    it unconverged). Below an error of 1e-7, a step gaining under 1 % now cuts the damping 1000-fold
    (next_damping, kernels.hpp): 42 iterations. Checked against the NumPy plan of the returned
    potentials."""
    x = np.array([[6.841300990491287, -4.480804780616202, 15.448668398104969, -6.012887022133728, -5.4314542478018994],
                  [-3.1640783289311707, -8.18192390910582, -15.950284865034492, -1.4563828033266164, -22.101607967039797],
                  [-16.407368404187054, 6.697651550193295, 23.08324791867921, -7.862776993133818, -19.27076465716182],
                  [6.656773303536421, 2.9218998912976124, -21.228388829346, -13.26325921543995, -10.518890369143305],
                  [4.440314713802948, -18.790224127948033, -1.3920593560493242, -10.370307365927067, 8.588698049955962],
                  [15.179291717328377, 10.50526132835305, -6.989608103091828, 9.17034765455852, -6.278176559081267],
                  [-2.484836893050773, 3.0542461413195277, -4.682292353341964, 15.317573751945634, 13.709373729380536],
                  [-3.667579449969348, 8.942533500204643, -7.119536490446253, 16.51161721186336, -3.2351615742609994],
                  [-4.597432706422059, -6.065163134752219, -11.510559742552285, -3.5831983375045624, 10.390094938105575],
                  [-5.926395609704525, 10.431176949507446, -2.7230168011899285, -29.421343063299293, -10.556213499679348],
                  [-6.580433950051844, -21.950862413809638, 3.967723904394005, 12.131108021702813, -10.131586133738214],
                  [-18.739720037524755, -6.262630933491436, -0.563905631570429, -0.7990675401975286, 18.771096372197974]])
    y = np.array([[19.905509226220317, 8.074655530935454, -7.400868480190695, 7.0291605390466305, 2.256906885244857],
                  [-12.311510478236373, -19.856130781620912, 23.485685091756174, -13.804973365335956, 8.06439639528138],
                  [16.299980071772474, -9.221493904997487, -5.477713085139957, -20.210633742473785, -12.422063854525634]])
    r = st.sinkhorn(x, y, epsilon=0.5, tol=2e-10, threads=1)
    assert r.converged and r.iterations < 1000
    # The certificate against a NumPy plan of the returned potentials (float64, dense).
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    plan = np.exp((r.f[:, None] + r.g[None] - cost) / 0.5) / (12 * 3)
    err = np.abs(plan.sum(1) - 1 / 12).sum() + np.abs(plan.sum(0) - 1 / 3).sum()
    assert err <= 2e-10 and err <= r.marginal_error * (1 + 1e-6) + 1e-15


def _medium_sweep_case(rng: np.random.Generator):
    """The next call of tests/fuzz/medium_sweep.py's generator (its data and keyword arguments)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
    try:
        import medium_sweep
    finally:
        sys.path.pop(0)
    return medium_sweep._case(rng)


def _medium_sweep_case_at(state: int, inc: int, uinteger: int, has_uint32: int = 1):
    """The sweep's call whose generator state (PCG64) was saved just before it: no replay of the calls
    before it."""
    rng = np.random.default_rng()
    rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc},
                               "has_uint32": has_uint32, "uinteger": uinteger}
    return _medium_sweep_case(rng)


def _otce_at_the_floor(xs, ls, xt, lt, n_pixels: int, seed: int):
    """One draw at eps = 0.1, tol 1e-8, which float64 cannot resolve at these cost scales: the solve
    must end unconverged and say why."""
    with pytest.warns(RuntimeWarning, match="stopped falling"):
        r = st.otce(xs, ls, xt, lt, n_pixels=n_pixels, repeats=1, epsilon=0.1, seed=seed, tol=1e-8, threads=1)
    assert not r.converged[0]
    return r


def test_intermediate_stage_shifts_a_component_whose_masses_do_not_balance():
    """A draw from tests/fuzz/medium_sweep.py (seed 17, call 166; session 41): 1,256 float32 pixels a
    side, D = 64, 25 x 15 classes, eps = 0.1, tol 1e-8. At eps = 1.6 the error sat at 1.59e-2 (a
    component of the pattern whose masses do not balance), and so at 0.8 and 0.4: ~1,400 iterations and
    three pattern refreshes a stage before each handed over, 4,353 iterations in all, until the last
    stage's Newton rounds found the component. The intermediate stage now shifts it after a refresh
    without progress: 1,986 iterations, the same score."""
    rng = np.random.default_rng(17)
    for _ in range(166):
        xs, ls, xt, lt, kw = _medium_sweep_case(rng)
    assert xs.shape == (2541, 64) and kw["n_pixels"] == 1256 and kw["tol"] == 1e-8  # the generator is unchanged
    r = st.otce(xs, ls, xt, lt, n_pixels=kw["n_pixels"], repeats=1, epsilon=kw["epsilon"], seed=kw["seed"],
                tol=kw["tol"], threads=1)
    assert r.all_converged and r.marginal_error[0] <= 1e-8
    assert r.iterations[0] < 3000
    assert abs(r.score - (-2.6990207703)) < 1e-7


def test_lost_patterns_end_their_dense_crawl():
    """A draw from tests/fuzz/medium_sweep.py (seed 5101, call 3692; session 51; the generator's state
    before that call is restored rather than replayed): 1,726 float64 pixels a side, D = 64 with channel
    scales 10^-3..10^2 (cost / eps ~1.3e8), tol 1e-8. At eps = 1.6 its pattern lost a row or column and
    the dense pair of c-transforms did not bring it back: eps = 0.8 ran 4,381 dense iterations (37 s),
    and the last stage's full-kernel fallback failed the same way and crawled densely at 1.16e-2 until
    max_iter (over 300 s). Now the full kernel gets the same pair and holds, and the lost intermediate
    stage runs at most 100 dense iterations: ~2,100 iterations in all, ending at float64's resolution
    (rounding ~3e-7 here), unconverged as before and saying so."""
    xs, ls, xt, lt, kw = _medium_sweep_case_at(58706972490557452323950196281741322485,
                                               239736922789125310330380224244730179481, 3264692429)
    assert xs.shape == (2292, 64) and xt.shape == (1726, 64) and kw["seed"] == 12  # the generator is unchanged
    r = _otce_at_the_floor(xs, ls, xt, lt, n_pixels=1726, seed=12)
    assert r.marginal_error[0] < 2e-6
    assert r.iterations[0] < 5000, r.iterations
    assert -np.log(len(np.unique(lt))) <= r.score <= 0


def test_stalled_intermediate_stages_hand_over_early():
    """A draw from tests/fuzz/medium_sweep.py (seed 5102, call 1564; session 52; the generator's state
    before that call is restored): 1,373 float32 pixels a side, D = 256 with channel scales 10^-3..10^2,
    tol 1e-8. Its stages from eps = 819 down to 6.4 sat at errors of 1e-2 to 2e-2, gaining under 0.1 %
    per hundreds of iterations, until the stall rule (kIntermediateStallIterations, stopping.hpp) handed
    each over: 14,993 iterations with the rule at 1,000 iterations, 6,808 at 200, the same score to
    2e-10. The last stage ends at float64's resolution either way, unconverged and saying so."""
    xs, ls, xt, lt, kw = _medium_sweep_case_at(213001217873870845015038751414584609986,
                                               21528361810366870782383490008383830237, 3511099752)
    assert xs.shape == (2461, 256) and xt.shape == (1373, 256) and kw["seed"] == 420  # the generator is unchanged
    r = _otce_at_the_floor(xs, ls, xt, lt, n_pixels=1373, seed=420)
    assert r.marginal_error[0] < 1e-6
    assert r.iterations[0] < 10_000, r.iterations
    assert abs(r.score - (-2.5292780978)) < 1e-6


def test_an_extrapolated_start_that_overflows_is_undone():
    """A call from tests/fuzz/medium_sweep.py (seed 5301, call 1073; session 53; the generator's state
    before it is restored): 1,351 / 2,283 float64 pixels, D = 256 with channel scales up to ~10^3
    (cost / eps ~2e10), 3 draws, tol 1e-6. In the third draw every stage from eps = 6.4 to 0.4 stalled
    at ~2e-2 and handed over; the last stage started from their potentials extrapolated in epsilon, its
    plan overflowed at the first iteration, Newton ran on it, and the draw ended at a marginal error of
    0.40 after 16,234 iterations (the blocked solver, flagged by its time, reached 3e-6). The stage now
    starts again from the stage before's end: all three draws end at float64's resolution (~6e-6
    here), unconverged and saying so."""
    xs, ls, xt, lt, kw = _medium_sweep_case_at(179518394493827542891891807311808840952,
                                               287702539018185026255538717682156499955, 1646406009, 0)
    assert xs.shape == (1351, 256) and xt.shape == (2283, 256) and kw["seed"] == 251  # the generator is unchanged
    with pytest.warns(RuntimeWarning, match="stopped falling"):
        r = st.otce(xs, ls, xt, lt, n_pixels=1351, repeats=3, epsilon=0.1, seed=251, tol=1e-6, threads=1)
    assert np.all(r.marginal_error < 2e-5), r.marginal_error
    assert abs(r.score - (-3.10858)) < 1e-4  # the blocked solver's -3.1085810 at 3e-6


def test_a_futile_round_that_makes_its_pattern_stale_shifts_a_component():
    """A call from tests/fuzz/medium_sweep.py (seed 5207, call 1691; session 54; the generator's state
    before it is restored), drawn blocked and solved here in the stored mode: 2,753 / 1,838 float32
    pixels, D = 256 with features up to ~10^5 (cost / eps ~7e10), 3 draws, tol 1e-4. In the second draw
    every last-stage Newton round from the same point took ten dual-ascent steps, kept its start (its
    best point), and ended on a stale pattern; the refresh rebuilt the same pattern, so the same round
    ran eleven times, and the draw ended at 1.16e-3, unconverged. A round that gains nothing and goes
    stale now shifts an imbalanced component as a futile round does: every draw converges, to the
    blocked solver's score (-2.46912315) within 2e-7."""
    xs, ls, xt, lt, kw = _medium_sweep_case_at(35214024097669415415199387376243389030,
                                               11540178539258878361578057966403171397, 628280976, 0)
    assert xs.shape == (2753, 256) and xt.shape == (1838, 256) and kw["seed"] == 270  # the generator is unchanged
    r = st.otce(xs, ls, xt, lt, n_pixels=1838, repeats=3, epsilon=0.1, seed=270, tol=1e-4, threads=1)
    assert r.all_converged and np.all(r.marginal_error <= 1e-4), r.marginal_error
    assert abs(r.score - (-2.46912315)) < 1e-6


def test_pattern_that_loses_a_row_or_column_stays_sparse():
    """A draw from tests/fuzz/medium_sweep.py (seed 2, call 255; session 29): 1,709 pixels a side, D = 8
    with channel scales 10^-3..10^2 (cost / eps ~2e6), 10 x 28 classes. A stage's pattern, built right
    after a sparse one, lost every entry of a row or column; the stage then ran dense (2,786 iterations
    at eps = 0.8), and the last stage crawled densely for minutes. One dense pair of c-transforms and a
    second try keep it sparse: under 1,000 iterations, under a second."""
    from pathlib import Path

    d = np.load(Path(__file__).parent / "data" / "otce_lost_column.npz")
    r = st.otce(d["xs"], d["ls"], d["xt"], d["lt"], n_pixels=1709, repeats=1, epsilon=0.1, seed=671, tol=1e-6,
                threads=1)
    assert r.all_converged and r.marginal_error[0] <= 1e-6
    assert r.iterations[0] < 3000
