"""Package surface: version, CUDA query, result objects (repr, to_dict, immutability)."""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import metadata

import numpy as np
import pytest

import segtransfer as st


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(80, 3))
    ys = rng.integers(0, 3, 80)
    xt = rng.normal(size=(70, 3)) + 0.2
    yt = np.array([5, 9])[rng.integers(0, 2, 70)]
    return st.otce(xs, ys, xt, yt, n_pixels=40, repeats=3, epsilon=0.5, seed=4, threads=1)


def test_version():
    assert isinstance(st.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.+-].*)?", st.__version__)
    assert st.__version__ == metadata.version("segtransfer")


def test_public_names():
    for name in st.__all__:
        assert hasattr(st, name), name
    assert callable(st.otce) and callable(st.sinkhorn) and callable(st.cuda_available)
    assert isinstance(st.DEFAULT_TOL, float) and st.DEFAULT_TOL > 0
    assert isinstance(st.DEFAULT_MAX_ITER, int) and st.DEFAULT_MAX_ITER >= 1


def test_cuda_available_is_false_bool_here():
    avail = st.cuda_available()
    assert type(avail) is bool
    assert avail is False  # this machine has no GPU
    assert st.cuda_available() is avail  # cheap and stable


def test_otce_result_fields(result):
    r = result
    assert isinstance(r, st.OTCEResult)
    assert isinstance(r.score, float) and isinstance(r.std, float)
    assert r.scores.shape == r.conditional_entropy.shape == r.transport_cost.shape == (3,)
    assert r.iterations.shape == r.converged.shape == r.marginal_error.shape == (3,)
    assert r.timed_out.shape == (3,) and r.timed_out.dtype == np.bool_ and not r.timed_out.any()
    assert r.joint.shape == (3, 3, 2)
    np.testing.assert_array_equal(r.source_classes, [0, 1, 2])
    np.testing.assert_array_equal(r.target_classes, [5, 9])
    assert r.n_pixels == (40, 40) and r.repeats == 3 and r.seed == 4
    assert r.epsilon == 0.5 and r.tol == st.DEFAULT_TOL
    assert r.dtype == "float64"
    assert r.elapsed > 0
    assert r.all_converged is True


def test_otce_result_repr(result):
    text = repr(result)
    assert text.startswith("OTCEResult(")
    assert f"{result.score:.6f}" in text
    assert "repeats=3" in text and "n_pixels=(40, 40)" in text and "epsilon=0.5" in text
    assert "converged" in text and "NOT" not in text


def test_otce_result_to_dict_is_json_serialisable(result):
    d = result.to_dict()
    text = json.dumps(d)  # must not raise: no numpy arrays or numpy scalars left
    back = json.loads(text)
    assert back["score"] == pytest.approx(result.score)
    assert back["scores"] == pytest.approx(result.scores.tolist())
    assert np.asarray(back["joint"]).shape == (3, 3, 2)
    assert back["source_classes"] == [0, 1, 2] and back["target_classes"] == [5, 9]
    assert back["converged"] == [True, True, True]
    assert back["all_converged"] is True
    assert back["dtype"] == "float64"
    assert list(back["n_pixels"]) == [40, 40]
    for f in dataclasses.fields(result):
        assert f.name in d, f.name


def test_to_dict_of_unconverged_result_is_json_serialisable():
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(30, 2))
    with pytest.warns(RuntimeWarning):
        r = st.otce(xs, np.arange(30) % 2, xs + 0.1, np.arange(30) % 3, n_pixels=None, max_iter=1, epsilon=0.01,
                     threads=1)
    back = json.loads(json.dumps(r.to_dict()))
    assert back["all_converged"] is False and back["converged"] == [False]
    assert back["std"] == 0.0 and back["repeats"] == 1


def test_result_is_immutable(result):
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.score = 1.0  # type: ignore[misc]


def test_results_compare_and_hash_by_identity(result):
    """Field-wise equality would compare arrays (ValueError for K > 1) and hashing would hash them."""
    assert result == result and hash(result) == hash(result)
    other = dataclasses.replace(result)
    assert other != result and len({result, other}) == 2


def test_sinkhorn_result():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 2))
    y = rng.normal(size=(15, 2))
    r = st.sinkhorn(x, y, epsilon=0.5, threads=1)
    assert isinstance(r, st.SinkhornResult)
    assert isinstance(r.transport_cost, float) and isinstance(r.iterations, int)
    assert isinstance(r.converged, bool) and isinstance(r.marginal_error, float)
    assert r.epsilon == 0.5 and r.tol == st.DEFAULT_TOL and r.timed_out is False
    assert r.f.shape == (20,) and r.g.shape == (15,)
    p = r.plan(x, y)
    assert p.shape == (20, 15) and p.dtype == np.float64
    assert p.sum() == pytest.approx(1.0, abs=2 * st.DEFAULT_TOL)
    assert "SinkhornResult(" in repr(r)


def test_sinkhorn_plan_checks_its_points_and_weights():
    """A wrong point count gave a bare NumPy broadcast error; points of another dimension gave a plan of
    total mass ~1e14 without a word."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(15, 3))
    r = st.sinkhorn(x, y, epsilon=0.5, threads=1)
    assert r.dim == 3
    with pytest.raises(ValueError, match=r"x must be the solve's 20 points"):
        r.plan(x[:5], y)
    with pytest.raises(ValueError, match=r"y must be the solve's 15 points"):
        r.plan(x, y[:, 0])
    with pytest.raises(ValueError, match="x has 3 dimensions but y has 2"):
        r.plan(x, y[:, :2])
    with pytest.raises(ValueError, match="the solve's points had 3"):
        r.plan(x[:, :2], y[:, :2])
    with pytest.raises(ValueError, match=r"a must hold one weight per point \(20,\)"):
        r.plan(x, y, a=np.full(19, 1 / 19))


def test_sinkhorn_warning_speaks_of_the_transport_cost():
    """sinkhorn() has no score: its non-convergence warning named one."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 2)), rng.normal(size=(30, 2))
    with pytest.warns(RuntimeWarning, match="did not reach tol") as caught:
        st.sinkhorn(x, y, epsilon=0.01, max_iter=1, threads=1)
    message = str(caught[0].message)
    assert "transport cost" in message and "score" not in message


def test_sinkhorn_plan_uses_the_solve_weights():
    """plan() rebuilt with uniform weights after a weighted solve missed its marginals by ~1."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 2)), rng.normal(size=(25, 2))
    a, b = rng.uniform(0.1, 1, 30), rng.uniform(0.1, 1, 25)
    a, b = a / a.sum(), b / b.sum()
    r = st.sinkhorn(x, y, epsilon=0.5, a=a, b=b, threads=1)
    np.testing.assert_array_equal(r.a, a)
    p = r.plan(x, y)
    err = np.abs(p.sum(1) - a).sum() + np.abs(p.sum(0) - b).sum()
    assert r.converged and err <= 2 * st.DEFAULT_TOL
    assert st.sinkhorn(x, y, epsilon=0.5, threads=1).a is None


def test_zero_entropy_scores_positive_zero():
    # One pixel a side: Y_t is determined by Y_s, W_T = 0, and OTCE must print as 0, not -0.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    y = rng.integers(0, 3, 50)
    res = st.otce(x, y, x, y, n_pixels=1, repeats=3)
    assert np.all(res.conditional_entropy == 0.0)
    assert not np.any(np.signbit(res.scores)) and not np.signbit(res.score)
