"""segtransfer.sinkhorn against POT and the independent NumPy reference (tests/reference.py).

Notation: n, m points, d dims, C_max = max cost, ratio = C_max / eps (how hard the problem is: POT's plain
Sinkhorn converges for ratio <~ 100 in a few hundred iterations, ratio ~ 1000 is the hard regime).

Tolerances (all derived below, checked against measurements in a comment where they are loose):

float64 (library tol TOL64 = 1e-10 on the L1 marginal error, reference tol 1e-13):
  * potentials: when the row marginals are off by a relative r_i, the exact next half-step moves f_i by
    eps*log(1 + r_i) ~ eps*r_i, and the distance to the fixed point is about that step over (1 - lambda),
    lambda the contraction rate of Sinkhorn. The errors are spread over all points, so |r_i| ~ t (the L1
    error) rather than the worst case t / min(a); with 1 - lambda >~ 1e-3 (what a reference that reaches
    1e-13 within 8000 iterations implies: lambda^8000 <~ 1e-10) that is |df| / eps <~ 1e-10 / 1e-3 = 1e-7.
    We ask POT_F64 = 1e-6, 10x headroom (measured: 1e-11 .. 3e-8; even a badly conditioned instance
    needing 1e5 reference iterations stays at 3.5e-7).
  * plan: |dP_ij| = P_ij |exp((df_i + dg_j)/eps) - 1| <= P_ij * 2 delta (delta = the potential bound), so
    ||dP||_1 <= 2 delta (the plan has mass 1).
  * transport cost: |<dP, C>| <= C_max ||dP||_1.
  * marginals of sr.plan(): certified <= TOL64 on the library's cost matrix; sr.plan() recomputes the cost
    as sum((x - y)^2) in float64, which differs from the library's centred GEMM by ~1e-15 * C_max, an
    exponent change of ~1e-15 * ratio <= 1e-12: negligible next to 2 delta.

float32 inputs (library tol TOL32 = 1e-6; reference in float64 on the SAME float32-rounded points, so
input rounding is not counted):
  * the library forms the cost in float32 as |x_c|^2 + |y_c|^2 - 2 x_c.y_c (centred points: each side on
    its own mean on the CPU, the joint mean on the GPU; S below uses the joint mean, which bounds both), each of the
    d + 2 terms rounded with unit roundoff u = 2^-24 ~ 6e-8 relative to S = max(|x_c|^2 + |y_c|^2), so
    |dC| <= (d + 3) u S. A soft-min is 1-Lipschitz in the sup norm, so the potentials move by about
    |dC| per side: exponent error <~ 2 (d + 3) u S / eps; we allow twice that.
  * on top: the float32 exponentials of the inner loop (relative 1e-7 per term, ~1e-7 on a log-sum-exp,
    i.e. 1e-7 in f/eps; they also put a floor of ~1e-7 under the reachable marginal error, which is why
    TOL32 is not smaller) and the convergence term of the float64 item with t = TOL32:
    1e-6 / (1 - lambda) <= 1e-6 / 1e-3 = 1e-3. We add 1e-3.
    So f32_delta = 4 (d + 3) u S / eps + 1e-3. Measured: 1e-6 .. 7e-6 at ratio <= 100 (bound ~1.1e-3),
    3e-5 at ratio 1000, and 5.4e-4 for one weighted ratio-1000 instance (100 x 120, seed 13) whose error
    is the convergence term (tol 3e-7 brings it to 1.7e-4), against a bound of 2e-3.
  * plan and cost follow as in float64 with delta = f32_delta.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import segtransfer as st
from helpers import ONE_THREAD, f32_delta, weights
import reference as ref

TOL64 = 1e-10
TOL32 = 1e-6
POT_F64 = 1e-6  # |df|/eps bound in float64, see the module docstring


def make_problem(seed: int, n: int, m: int, d: int, ratio: float, uniform: bool):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(m, d)) * 0.8 + 0.3
    cost = ref.sq_dists(x, y)
    eps = float(cost.max() / ratio)
    a = None if uniform else weights(rng, n)
    b = None if uniform else weights(rng, m)
    return x, y, eps, a, b


def full(w, n):
    return np.full(n, 1.0 / n) if w is None else w


def pot_potentials(x, y, eps, a, b, *, stop=1e-14, iters=200_000):
    """POT's log-domain Sinkhorn in float64 turned into our (f, g): f = eps (log_u - log a) (+ const)."""
    ot = pytest.importorskip("ot")  # only the POT comparisons need it
    a_, b_ = full(a, len(x)), full(b, len(y))
    cost = ref.sq_dists(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a POT non-convergence warning would make it a bad reference
        plan, log = ot.sinkhorn(a_, b_, cost, eps, method="sinkhorn_log", stopThr=stop, numItermax=iters,
                                log=True)
    assert ref.marginal_error(plan, a_, b_) < 1e-11, "POT reference did not converge"
    f = eps * (np.asarray(log["log_u"]) - np.log(a_))
    g = eps * (np.asarray(log["log_v"]) - np.log(b_))
    return f, g, plan, float((plan * cost).sum())


def check_against(sr, x, y, eps, a, b, f_ref, g_ref, plan_ref, cost_ref, delta, tol):
    """Potentials (gauge removed), plan, marginals and transport cost of the library vs a reference."""
    n, m = len(x), len(y)
    a_, b_ = full(a, n), full(b, m)
    assert sr.converged and sr.marginal_error <= tol
    assert sr.f.shape == (n,) and sr.g.shape == (m,)
    assert sr.f.dtype == np.float64 and sr.g.dtype == np.float64
    fl, gl = ref.center_potentials(sr.f, sr.g, a_)
    fr, gr = ref.center_potentials(f_ref, g_ref, a_)
    assert np.max(np.abs(fl - fr)) / eps <= delta
    assert np.max(np.abs(gl - gr)) / eps <= delta
    # The gauge-free combination f_i + g_j matters for the plan: check it directly too.
    assert np.max(np.abs((sr.f[:, None] + sr.g[None, :]) - (f_ref[:, None] + g_ref[None, :]))) / eps <= 2 * delta
    plan = sr.plan(x, y, a, b)
    assert plan.shape == (n, m)
    assert np.abs(plan - plan_ref).sum() <= 2 * delta + tol
    # Marginals of the rebuilt plan (see docstring: certified tol + recomputation difference).
    assert np.abs(plan.sum(1) - a_).sum() + np.abs(plan.sum(0) - b_).sum() <= 2 * tol + 2 * delta
    cmax = float(ref.sq_dists(x, y).max())
    assert abs(sr.transport_cost - cost_ref) <= cmax * (2 * delta + tol)
    assert sr.transport_cost > 0


MODERATE = [  # (seed, n, m, d, ratio): n != m everywhere, ratio up to 100 (POT converges quickly)
    (1, 50, 70, 2, 10.0),
    (2, 120, 90, 5, 50.0),
    (3, 300, 200, 20, 100.0),
]


@pytest.mark.parametrize("blocked", [False, True], ids=["stored", "blocked"])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
@pytest.mark.parametrize("seed,n,m,d,ratio", MODERATE)
def test_float64_matches_pot(seed, n, m, d, ratio, uniform, blocked):
    x, y, eps, a, b = make_problem(seed, n, m, d, ratio, uniform)
    f, g, plan, cost = pot_potentials(x, y, eps, a, b)
    sr = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, tol=TOL64, blocked=blocked, **ONE_THREAD)
    assert sr.blocked == blocked
    check_against(sr, x, y, eps, a, b, f, g, plan, cost, POT_F64, TOL64)
    # The library's own marginal error is what the dense plan shows (it is measured on the full plan).
    a_, b_ = full(a, n), full(b, m)
    assert sr.marginal_error == pytest.approx(ref.marginal_error(sr.plan(x, y, a, b), a_, b_), abs=1e-12)


@pytest.mark.parametrize("blocked", [False, True], ids=["stored", "blocked"])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
@pytest.mark.parametrize("seed,n,m,d,ratio", MODERATE)
def test_float32_matches_pot(seed, n, m, d, ratio, uniform, blocked):
    x, y, eps, a, b = make_problem(seed, n, m, d, ratio, uniform)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    # Reference in float64 on the float32-rounded points: only the library's float32 arithmetic counts.
    f, g, plan, cost = pot_potentials(x32.astype(np.float64), y32.astype(np.float64), eps, a, b)
    sr = st.sinkhorn(x32, y32, epsilon=eps, a=a, b=b, tol=TOL32, blocked=blocked, **ONE_THREAD)
    check_against(sr, x32, y32, eps, a, b, f, g, plan, cost, f32_delta(x32, y32, eps), TOL32)


@pytest.mark.parametrize("blocked", [False, True], ids=["stored", "blocked"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
def test_duplicated_points_match_pot(uniform, dtype, blocked):
    """Bit-identical points are solved as one point of their summed weight (otce.cpp, first_copies)
    and given its potentials: the same answer as POT's on every point, within the bounds above.
    120 and 90 distinct points, each side 2.5x repeated, every weight different."""
    x0, y0, eps, _, _ = make_problem(2, 120, 90, 5, 50.0, True)
    rng = np.random.default_rng(7)
    i = np.concatenate([np.arange(120), rng.integers(0, 120, 180)])
    j = np.concatenate([np.arange(90), rng.integers(0, 90, 135)])
    x, y = x0[i].astype(dtype), y0[j].astype(dtype)
    a = None if uniform else weights(rng, len(x))
    b = None if uniform else weights(rng, len(y))
    f, g, plan, cost = pot_potentials(x.astype(np.float64), y.astype(np.float64), eps, a, b)
    tol = TOL64 if dtype == np.float64 else TOL32
    delta = POT_F64 if dtype == np.float64 else f32_delta(x, y, eps)
    sr = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, tol=tol, blocked=blocked, **ONE_THREAD)
    check_against(sr, x, y, eps, a, b, f, g, plan, cost, delta, tol)
    np.testing.assert_array_equal(sr.f, sr.f[np.arange(120)][i])  # one potential a merged point
    np.testing.assert_array_equal(sr.g, sr.g[np.arange(90)][j])


@pytest.mark.parametrize("blocked", [False, True], ids=["stored", "blocked"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
@pytest.mark.parametrize("seed,n,m,d,ratio", [(17, 60, 45, 3, 1000.0), (13, 100, 120, 5, 1000.0)])
def test_hard_regime_matches_numpy_reference(seed, n, m, d, ratio, uniform, dtype, blocked):
    """cost/eps ~ 10^3: plain Sinkhorn needs tens of thousands of iterations; the reference anneals eps.

    Well-conditioned instances only: the reference must reach 1e-13 within 8000 iterations (it raises
    otherwise). At C/eps ~ 10^3 random clouds are often nearly decomposable (groups of points linked by
    a mass of ~e^-20), and there a marginal error t only pins the groups' relative potentials to
    ~t / (1 - lambda) with lambda -> 1: e.g. seed 12, 150 x 200, d = 10, uniform needs 1.1e5 reference
    iterations and float32 at tol 1e-6 leaves |df|/eps = 8e-3 on one group, which is correct behaviour
    of a solver stopped at that marginal error, not a bug (tol 1e-7 brings it to 8e-4).
    """
    x, y, eps, a, b = make_problem(seed, n, m, d, ratio, uniform)
    x, y = x.astype(dtype), y.astype(dtype)
    r = ref.sinkhorn(ref.sq_dists(x, y), eps, a, b, tol=1e-13, max_iter=8000)
    tol = TOL64 if dtype == np.float64 else TOL32
    delta = POT_F64 if dtype == np.float64 else f32_delta(x, y, eps)
    sr = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, tol=tol, blocked=blocked, **ONE_THREAD)
    check_against(sr, x, y, eps, a, b, r.f, r.g, r.plan, r.transport_cost, delta, tol)


@pytest.mark.parametrize("blocked", [False, True], ids=["stored", "blocked"])
def test_hard_regime_matches_pot_small(blocked):
    """The hard regime against POT too (plain log-domain Sinkhorn, ~5000 iterations at this size)."""
    x, y, eps, a, b = make_problem(21, 30, 25, 3, 1000.0, uniform=False)
    f, g, plan, cost = pot_potentials(x, y, eps, a, b, stop=1e-13)
    sr = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, tol=TOL64, blocked=blocked, **ONE_THREAD)
    check_against(sr, x, y, eps, a, b, f, g, plan, cost, POT_F64, TOL64)


@pytest.mark.parametrize("seed,n,m,d,ratio", [(31, 80, 60, 4, 30.0), (32, 100, 130, 6, 300.0)])
def test_numpy_reference_and_pot_agree(seed, n, m, d, ratio):
    """Sanity check of the reference itself: two independent implementations, one fixed point."""
    x, y, eps, a, b = make_problem(seed, n, m, d, ratio, uniform=False)
    f, g, plan, cost = pot_potentials(x, y, eps, a, b)
    r = ref.sinkhorn(ref.sq_dists(x, y), eps, a, b, tol=1e-13)
    fr, gr = ref.center_potentials(r.f, r.g, a)
    fp, gp = ref.center_potentials(f, g, a)
    assert np.max(np.abs(fr - fp)) / eps < 1e-8
    assert np.max(np.abs(gr - gp)) / eps < 1e-8
    assert np.abs(r.plan - plan).sum() < 1e-9


def test_non_convergence_warns_and_reports():
    x, y, eps, a, b = make_problem(41, 80, 60, 4, 300.0, uniform=True)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        sr = st.sinkhorn(x, y, epsilon=eps, max_iter=1, **ONE_THREAD)
    assert sr.converged is False
    assert sr.iterations == 1
    assert sr.marginal_error > sr.tol
    assert not sr.timed_out
    # ... and the reported error is still the true one of the dense plan built from what came back.
    plan = sr.plan(x, y)
    assert sr.marginal_error == pytest.approx(ref.marginal_error(plan, full(None, 80), full(None, 60)), rel=1e-9)


def test_converged_run_does_not_warn():
    x, y, eps, a, b = make_problem(42, 40, 30, 3, 20.0, uniform=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sr = st.sinkhorn(x, y, epsilon=eps, **ONE_THREAD)
    assert sr.converged and sr.marginal_error <= st.DEFAULT_TOL
    assert sr.tol == st.DEFAULT_TOL and sr.epsilon == eps


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_single_source_point_is_exact(dtype):
    """n = 1: the only coupling is pi_1j = b_j, so <pi, C> = sum_j b_j C_1j exactly (any eps)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 3)).astype(dtype)
    y = rng.normal(size=(40, 3)).astype(dtype)
    b = weights(rng, 40)
    sr = st.sinkhorn(x, y, epsilon=0.05, b=b, **ONE_THREAD)
    cost = ref.sq_dists(x, y)[0]
    assert sr.converged
    plan = sr.plan(x, y, None, b)
    # float32: exponent error up to (d + 3) u C_max / eps ~ 6 * 6e-8 * 20 / 0.05 ~ 1.5e-4, see docstring.
    rtol = 1e-9 if dtype == np.float64 else 1e-3
    np.testing.assert_allclose(plan[0], b, rtol=rtol)
    assert sr.transport_cost == pytest.approx(float(b @ cost), rel=rtol)


def test_translation_invariance():
    """Moving both clouds by the same vector changes no distance, so nothing else may change."""
    x, y, eps, a, b = make_problem(51, 70, 50, 5, 100.0, uniform=False)
    shift = np.array([30.0, -20.0, 5.0, 100.0, -7.0])
    r0 = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, tol=TOL64, **ONE_THREAD)
    r1 = st.sinkhorn(x + shift, y + shift, epsilon=eps, a=a, b=b, tol=TOL64, **ONE_THREAD)
    f0, g0 = ref.center_potentials(r0.f, r0.g, a)
    f1, g1 = ref.center_potentials(r1.f, r1.g, a)
    # The shifted cost is formed from |x|^2 ~ 1e4: rounding 1e4 * 1e-16 = 1e-12 per entry (centring
    # removes most of it), far below the potential bound.
    assert np.max(np.abs(f0 - f1)) / eps < POT_F64
    assert np.max(np.abs(g0 - g1)) / eps < POT_F64
    assert r1.transport_cost == pytest.approx(r0.transport_cost, rel=1e-8)


def test_swapping_sides_swaps_potentials():
    x, y, eps, a, b = make_problem(52, 60, 45, 3, 100.0, uniform=False)
    r_xy = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, tol=TOL64, **ONE_THREAD)
    r_yx = st.sinkhorn(y, x, epsilon=eps, a=b, b=a, tol=TOL64, **ONE_THREAD)
    f1, g1 = ref.center_potentials(r_xy.f, r_xy.g, a)
    f2, g2 = ref.center_potentials(r_yx.g, r_yx.f, a)
    assert np.max(np.abs(f1 - f2)) / eps < POT_F64
    assert np.max(np.abs(g1 - g2)) / eps < POT_F64
    np.testing.assert_allclose(r_xy.plan(x, y, a, b), r_yx.plan(y, x, b, a).T, atol=1e-9)
    assert r_xy.transport_cost == pytest.approx(r_yx.transport_cost, rel=1e-8)


def test_mixed_precision_is_solved_in_float64():
    x, y, eps, a, b = make_problem(53, 40, 50, 4, 50.0, uniform=True)
    x32 = x.astype(np.float32)
    mixed = st.sinkhorn(x32, y, epsilon=eps, **ONE_THREAD)
    both64 = st.sinkhorn(x32.astype(np.float64), y, epsilon=eps, **ONE_THREAD)
    np.testing.assert_array_equal(mixed.f, both64.f)
    np.testing.assert_array_equal(mixed.g, both64.g)
    assert mixed.transport_cost == both64.transport_cost


def test_default_uniform_weights_equal_explicit_uniform():
    x, y, eps, a, b = make_problem(54, 33, 47, 3, 50.0, uniform=True)
    r0 = st.sinkhorn(x, y, epsilon=eps, **ONE_THREAD)
    r1 = st.sinkhorn(x, y, epsilon=eps, a=np.full(33, 1 / 33), b=np.full(47, 1 / 47), **ONE_THREAD)
    np.testing.assert_allclose(r0.f, r1.f, rtol=0, atol=1e-12 * eps)
    np.testing.assert_allclose(r0.g, r1.g, rtol=0, atol=1e-12 * eps)


def test_repeatable_and_thread_count_independent():
    # 350 x 300 points: above parallel_min_entries (10^5), below which a solve runs on one thread anyway.
    x, y, eps, a, b = make_problem(55, 350, 300, 4, 200.0, uniform=False)
    r1 = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, threads=1)
    r1b = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, threads=1)
    r2 = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, threads=2)
    for other in (r1b, r2):
        np.testing.assert_array_equal(r1.f, other.f)
        np.testing.assert_array_equal(r1.g, other.g)
        assert r1.transport_cost == other.transport_cost
        assert r1.iterations == other.iterations


def test_identical_clouds_small_eps_is_nearly_identity():
    """x = y with separated points and eps << min distance: the plan is ~ diag(a), cost ~ 0."""
    rng = np.random.default_rng(56)
    x = rng.normal(size=(40, 3)) * 3
    dmin = np.sqrt(ref.sq_dists(x, x)[~np.eye(40, dtype=bool)].min())
    eps = dmin ** 2 / 40  # off-diagonal exponents <= -40 relative to the diagonal
    a = weights(rng, 40)
    sr = st.sinkhorn(x, x, epsilon=eps, a=a, b=a, tol=TOL64, **ONE_THREAD)
    plan = sr.plan(x, x, a, a)
    np.testing.assert_allclose(np.diag(plan), a, rtol=1e-6)
    assert sr.transport_cost < 1e-6 * dmin ** 2


try:
    from hypothesis import assume, given, settings, strategies as hst
except ImportError:  # pragma: no cover - hypothesis comes with the [test] extra
    def test_random_small_problems_match_reference():
        pytest.skip("hypothesis is not installed")
else:
    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(n=hst.integers(2, 40), m=hst.integers(2, 40), d=hst.integers(1, 6),
           ratio=hst.floats(1.0, 100.0), seed=hst.integers(0, 2**31 - 1), uniform=hst.booleans(),
           blocked=hst.booleans())
    def test_random_small_problems_match_reference(n, m, d, ratio, seed, uniform, blocked):
        """Random tiny problems, including degenerate shapes (2 x 2, d = 1).

        Tiny clouds are often nearly decomposable (two pairs of points linked by a mass of ~1e-5): there the
        potentials of the blocks relative to each other are pinned only to ~t / (1 - lambda) with 1 - lambda ~
        the linking mass, e.g. 1e-10 / 1e-5 = 1e-5 (measured: 1.7e-6 for n = m = 2, d = 1, ratio 44, seed 1).
        So potentials get 1e-4 here, while the plan, which such a shift barely moves (the linking mass
        changes by a factor e^(1e-4)), keeps the float64 bound. Instances the reference itself cannot bring
        to 1e-13 within 20000 iterations are discarded (no trustworthy reference).
        """
        x, y, eps, a, b = make_problem(seed, n, m, d, ratio, uniform)
        try:
            r = ref.sinkhorn(ref.sq_dists(x, y), eps, a, b, tol=1e-13, max_iter=20_000)
        except RuntimeError:
            assume(False)
        tol = 1e-9
        sr = st.sinkhorn(x, y, epsilon=eps, a=a, b=b, tol=tol, blocked=blocked, **ONE_THREAD)
        a_, b_ = full(a, n), full(b, m)
        assert sr.converged and sr.marginal_error <= tol
        plan = sr.plan(x, y, a, b)
        assert ref.marginal_error(plan, a_, b_) <= 2 * tol
        assert np.abs(plan - r.plan).sum() <= 2 * POT_F64
        assert abs(sr.transport_cost - r.transport_cost) <= float(ref.sq_dists(x, y).max()) * 2 * POT_F64
        fl, gl = ref.center_potentials(sr.f, sr.g, a_)
        fr, gr = ref.center_potentials(r.f, r.g, a_)
        assert np.max(np.abs(fl - fr)) / eps <= 1e-4
        assert np.max(np.abs(gl - gr)) / eps <= 1e-4


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_isolated_point_at_large_eps_converges_quickly(dtype):
    """One target point far from every source point: at eps = 3 its mass converges at a sublinear rate
    under Sinkhorn (50,000 iterations before Newton was used on small dense last stages). The marginal
    error is recomputed in NumPy from the returned potentials, so the fix cannot have just relaxed the
    solver's own check. float32: the solver certifies on its float32 cost, whose exponents differ from
    the float64 ones by at most f32_delta (helpers), which moves every plan entry by a factor within
    exp(+-delta), hence each marginal by at most expm1(delta) of its mass."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(50, 19)) * 3.0).astype(dtype)
    y = (rng.normal(size=(50, 19)) * 3.0 + 0.5).astype(dtype)
    y[0] += 15.0
    sr = st.sinkhorn(x, y, epsilon=3.0)
    assert sr.converged and sr.iterations < 2_000, (sr.iterations, sr.marginal_error)
    a = np.full(50, 1 / 50)
    p = ref.plan(ref.sq_dists(x.astype(np.float64), y.astype(np.float64)), a, a, sr.f, sr.g, 3.0)
    bound = 1e-6 if dtype == np.float64 else 1e-6 + 2 * np.expm1(f32_delta(x, y, 3.0))
    assert ref.marginal_error(p, a, a) <= bound


def test_float32_solve_does_not_cycle_above_tol():
    """1500 demo pixels a side in float32: over-relaxed iterations and class balancing had settled
    into a cycle at marginal error ~1.05e-6, above tol (6 of 12 such draws ran to max_iter)."""
    from segtransfer._demo import make_demo

    demo = make_demo(0)
    fs, ft = demo.sources[1].features, demo.target.features
    fs, ft = (f.transpose(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in (fs, ft))
    for seed in (10, 11):
        rng = np.random.default_rng(seed)
        x, y = fs[rng.choice(len(fs), 1500, replace=False)], ft[rng.choice(len(ft), 1500, replace=False)]
        sr = st.sinkhorn(x, y, threads=1, max_iter=3000)
        assert sr.converged and sr.iterations < 300, (sr.iterations, sr.marginal_error)


def test_tight_tol_on_a_very_sparse_plan_converges():
    """300 x 300 points in 19 dimensions at eps = 0.1: ~7 kernel entries a row, nearly separate
    components. With tol 1e-10 the stored mode's Newton steps stalled at 3-7e-10 until max_iter (its
    operator held float-rounded plan entries against the exact row and column sums, which broke the
    null vector the weak couplings live next to); the blocked mode, with double entries, converged in
    72 iterations. Both must converge now, to the same plan."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 19))
    y = rng.standard_normal((300, 19)) + 0.1
    out = {}
    for blocked in (False, True):
        sr = st.sinkhorn(x, y, epsilon=0.1, tol=1e-10, max_iter=2000, blocked=blocked, **ONE_THREAD)
        assert sr.converged and sr.marginal_error <= 1e-10 and sr.iterations < 300, (blocked, sr.iterations,
                                                                                    sr.marginal_error)
        out[blocked] = sr
    s, b = out[False], out[True]
    # The same plan, not the same potentials: a point matched to one target alone forms a component of
    # its own, whose split of f_i + g_j between the sides the marginals do not fix (measured: 0.58 eps
    # apart between the two modes for one such pair). Both plans are within 1e-10 of the marginals
    # and of the solution, so they differ by a few 1e-10 at most (measured 4.4e-11); the cost follows
    # (|<dP, C>| <= C_max ||dP||_1, C_max ~ 100 here; measured 1e-12 relative).
    assert np.abs(s.plan(x, y) - b.plan(x, y)).sum() < 5e-10
    assert s.transport_cost == pytest.approx(b.transport_cost, rel=1e-9)


@pytest.mark.parametrize("blocked", [False, True], ids=["stored", "blocked"])
def test_unreachable_tol_returns_the_best_certified_point(blocked):
    """float32 clusters far apart, tol 1e-12 (below what the solve resolves): the first certificate
    had 9.1e-12; the rounds asking more of it then ended at 1.1e-7 (stored) / 7.2e-8 (blocked) after
    max_iter. Unconverged, but the result is the best point certified on the way."""
    rng = np.random.default_rng(0)
    cen = rng.standard_normal((4, 8)) * 5.0
    x = (cen[rng.integers(0, 3, 300)] + 0.3 * rng.standard_normal((300, 8))).astype(np.float32)
    y = (cen[rng.integers(0, 4, 250) % 3] + 0.3 * rng.standard_normal((250, 8)) + 0.2).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = st.sinkhorn(x, y, epsilon=0.1, tol=1e-12, max_iter=3000, blocked=blocked, **ONE_THREAD)
        loose = st.sinkhorn(x, y, epsilon=0.1, tol=1e-10, blocked=blocked, **ONE_THREAD)
    assert loose.converged
    assert not sr.converged and sr.marginal_error <= max(loose.marginal_error, 1e-10)


def test_near_unregularised_problem_widens_a_pattern_that_cannot_carry_the_plan():
    """Clustered points scaled by 300 at eps = 0.1 (cost / eps ~ 5.6e7, ~1.5 kernel entries a row): on
    the last stage's 30 eps pattern a group of rows reached its columns only through entries beyond
    the cutoff, and with unequal masses that group is infeasible there. The stored mode sat at exactly
    1/200 x 2 - 1/150 = 3.333e-3 until max_iter while the blocked mode (no pattern) converged; the
    last stage now widens its cutoff to 700 eps when a refresh finds no progress."""
    rng = np.random.default_rng(6)
    cen = rng.standard_normal((4, 4))
    ys, yt = rng.integers(0, 3, 200), rng.integers(0, 4, 150)
    x = (cen[ys] + 0.7 * rng.standard_normal((200, 4))) * 300
    y = (cen[yt % 3] + 0.7 * rng.standard_normal((150, 4)) + 0.2) * 300
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = st.sinkhorn(x, y, epsilon=0.1, max_iter=6000, **ONE_THREAD)
        b = st.sinkhorn(x, y, epsilon=0.1, max_iter=6000, blocked=True, **ONE_THREAD)
    assert s.converged and b.converged, (s.marginal_error, b.marginal_error)
    # Both within tol = 1e-6 of the marginals; nearly unregularised, so the plans agree to ~tol.
    assert np.abs(s.plan(x, y) - b.plan(x, y)).sum() < 1e-5


def _check_nearly_unregularised_solution(sr, x, y, eps, tol):
    """A converged uniform-marginal solve near the unregularised limit, checked on the plan rebuilt from
    its potentials in NumPy and against the exact optimal transport cost (POT's network simplex): the
    entropic plan costs at most eps log(n m) more, up to what its marginal error moves."""
    ot = pytest.importorskip("ot")
    n, m = len(x), len(y)
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    assert ref.marginal_error(sr.plan(x, y), a, b) <= 2 * tol
    cost = ref.sq_dists(x, y)
    exact = float(ot.emd2(a, b, cost, numItermax=10**7))
    assert -cost.max() * 2 * tol <= sr.transport_cost - exact <= eps * np.log(n * m) + cost.max() * 2 * tol


@pytest.mark.parametrize("blocked", [False, True], ids=["stored", "blocked"])
def test_nearly_unregularised_component_short_of_rows(blocked):
    """181 x 183 points on a half-integer grid at cost / eps 1.3e9 (data/sinkhorn_short_of_rows.npz, the
    float32 points in float64). The last stage's components: one short of rows by more than the
    component shift's threshold, the excess it lacks spread over components each below it. The shift
    grew components short of columns only, so nothing moved: the stored mode sat at 1.9e-3 and the
    blocked one at 2.5e-3 until max_iter (its Sinkhorn phases flat at the imbalance for 600 .. 4,800
    iterations each). The component short of rows now grows on the transposed problem. Checked on the
    plan rebuilt from the potentials in NumPy and against POT's exact optimal transport cost."""
    pytest.importorskip("ot")
    d = np.load(Path(__file__).parent / "data" / "sinkhorn_short_of_rows.npz")
    x, y = d["x"].astype(np.float64), d["y"].astype(np.float64)
    eps, tol = 0.5, 1e-5
    sr = st.sinkhorn(x, y, epsilon=eps, tol=tol, max_iter=30_000, blocked=blocked, **ONE_THREAD)
    assert sr.converged and sr.iterations < 10_000, (sr.marginal_error, sr.iterations)
    _check_nearly_unregularised_solution(sr, x, y, eps, tol)


@pytest.mark.parametrize("blocked", [False, True], ids=["stored", "blocked"])
@pytest.mark.parametrize("seed", [2, 7, 41])
def test_nearly_unregularised_component_whose_masses_do_not_balance(seed, blocked):
    """cost / eps ~ 4e8 (seed 2: 103 x 46 random points; seed 7: 114 x 82 on a half-integer grid): the
    plan is nearly an unregularised one, and the last stage's pattern (the blocked mode's captured
    plan) falls apart into components joined only by entries below e^-700. One whose rows held more
    mass than its columns (or less) kept the error at that imbalance (1.7e-3 and 4.3e-3 / 1.7e-3) until
    max_iter in both modes: moving the mass needs that component's potentials shifted against the
    rest's by far more than Sinkhorn or Newton move them. The Hungarian algorithm's dual step does it
    (shift_imbalanced_component, kernels.hpp). Seed 41 (86 x 115 on the grid): the blocked mode looked
    for such components only after a round without progress and grew one of them a call, and took
    39,412 iterations (2,639 since session 32). Checked on the plan rebuilt from the potentials in
    NumPy, and against the exact optimal transport cost (POT's network simplex): the entropic plan
    costs at most eps log(n m) more, up to what its marginal error moves."""
    pytest.importorskip("ot")
    rng = np.random.default_rng(seed)
    n, m, d = int(rng.integers(20, 120)), int(rng.integers(20, 120)), int(rng.integers(1, 6))
    ratio = 10 ** rng.uniform(7, 9)
    kind = int(rng.integers(3))
    x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    if kind == 2:
        x, y = np.round(x * 2) / 2 + 1e-6 * rng.normal(size=(n, d)), np.round(y * 2) / 2
    scale = np.sqrt(ratio * 0.5 / ref.sq_dists(x, y).max())
    x, y = x * scale, y * scale
    eps, tol = 0.5, 1e-6
    sr = st.sinkhorn(x, y, epsilon=eps, tol=tol, blocked=blocked, **ONE_THREAD)
    assert sr.converged and sr.marginal_error <= tol, sr.marginal_error
    assert sr.iterations < 20_000
    _check_nearly_unregularised_solution(sr, x, y, eps, tol)


def test_blocked_keeps_newtons_point_when_the_sinkhorn_phase_after_it_ends_worse():
    """float32 clusters at cost / eps = 1e5, blocked, tol 1e-12 (below the floor): Newton reached
    ~1e-12 on its captured plan, then the Sinkhorn phase after it ended at 6e-8 every round, and the
    call returned 5.6e-8 after 50,000 iterations (8 s), where tol 1e-10 had certified 1.3e-10. It now
    keeps Newton's point and stops at the floor (1.3e-10, ~5,000 iterations)."""
    rng = np.random.default_rng(0)
    n, d, k = 400, 3, 6
    cx = rng.normal(size=(k, d)) * 10
    cy = cx + rng.normal(size=(k, d))
    x = ((cx[rng.integers(0, k, n)] + 0.3 * rng.normal(size=(n, d))) * 100).astype(np.float32)
    y = ((cy[rng.integers(0, k, n + 17)] + 0.3 * rng.normal(size=(n + 17, d))) * 100).astype(np.float32)
    xc, yc = x.astype(float) - x.astype(float).mean(0), y.astype(float) - y.astype(float).mean(0)
    eps = float((((xc[:, None] - yc[None]) ** 2).sum(-1)).max() / 1e5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = st.sinkhorn(x, y, epsilon=eps, tol=1e-12, max_iter=20000, blocked=True, **ONE_THREAD)
    assert not sr.converged and sr.marginal_error < 1e-9 and sr.iterations < 20000, (sr.marginal_error,
                                                                                       sr.iterations)


def test_float32_below_the_floor_stops_there():
    """float32 points at cost / eps = 1e4, tol 1e-11 (certified 1.04e-11 is the floor here): every
    Newton round began from a float-exponent hand-over phase that put the error back to ~6e-6, so the
    rounds never looked stuck and ran to max_iter (50,000 iterations). Newton now resumes directly
    after a certificate below newton_switch, and the solve stops at the floor."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = (rng.normal(size=(317, 3)) * 0.9 + 0.2).astype(np.float32)
    xc, yc = x.astype(float) - x.astype(float).mean(0), y.astype(float) - y.astype(float).mean(0)
    eps = float((((xc[:, None] - yc[None]) ** 2).sum(-1)).max() / 1e4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = st.sinkhorn(x, y, epsilon=eps, tol=1e-11, **ONE_THREAD)
    assert sr.iterations < 25_000 and sr.marginal_error < 2e-11, (sr.iterations, sr.marginal_error)


def test_blocked_solve_below_the_floor_ends_without_doubling_its_phases():
    """400 x 350 points at cost / eps = 10^7, tol 1e-13, below float64's floor there (~1e-8): the
    blocked solver's rounds end it after three certificates without a 0.1 % gain. Its Sinkhorn
    phases between rounds used to double there too (300 .. 4,800 iterations): 10,549 iterations;
    then they were 300 near the floor (3,949), where the stored solver took 5,145 (now 1,845). Since
    session 32 the rounds end once what float64 rounding can hide exceeds tol and the rest of the
    certificate is below it, as the stored solver's do: 2,079, the same certificate."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = rng.normal(size=(350, 5)) * 0.9 + 0.1
    eps = float(ref.sq_dists(x, y).max() / 1e7)
    with pytest.warns(RuntimeWarning, match="stopped falling"):
        sr = st.sinkhorn(x, y, epsilon=eps, tol=1e-13, blocked=True, **ONE_THREAD)
    assert not sr.converged and sr.marginal_error < 2e-8
    assert sr.iterations < 3000, sr.iterations


def test_float32_dense_last_stage_reaches_a_tight_tol():
    """3,500 points a side at eps = 3: the last stage's kernel is 99 % dense (1.2e7 entries), too dense
    for a pattern and above the 10^7 entries where the fallback to a full kernel and Newton used to
    stop. Its dense Sinkhorn, summing in float32, sat at 4.6e-7 until max_iter at tol 1e-9 (found by
    an audit); Newton on the full kernel converges as float64 does."""
    rng = np.random.default_rng(350064)
    x = rng.standard_normal((3500, 64)).astype(np.float32)
    y = (rng.standard_normal((3500, 64)) * 1.1 + 0.2).astype(np.float32)
    sr = st.sinkhorn(x, y, epsilon=3.0, tol=1e-9, max_iter=1000, threads=2)
    assert sr.converged and sr.marginal_error <= 1e-9 and sr.iterations < 200, (sr.iterations, sr.marginal_error)
