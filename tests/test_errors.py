"""Bad input is refused with ValueError / TypeError / MemoryError whose message names the argument.

One example per kind of bad input lives in reliability_cases.py (and docs/reliability.md, generated from it);
this file holds the systematic variants (every side, position, dtype) and the isolated overflow checks."""

from __future__ import annotations

import resource

import numpy as np
import pytest

import segtransfer as st


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(60, 3))
    ys = rng.integers(0, 3, 60)
    xt = rng.normal(size=(50, 3))
    yt = rng.integers(0, 2, 50)
    return xs, ys, xt, yt


def call(data, **kw):
    xs, ys, xt, yt = data
    args = dict(source_features=xs, source_labels=ys, target_features=xt, target_labels=yt, n_pixels=None,
                threads=1)
    args.update(kw)
    return st.otce(**args)


# ---------------------------------------------------------------------------------------------- shapes

def test_mismatched_channel_counts(data):
    xs, ys, xt, yt = data
    with pytest.raises(ValueError, match="target_features.*channels"):
        call(data, target_features=np.hstack([xt, xt]))
    maps = np.zeros((1, 3, 2, 2))
    maps[0, :, 0, 0] = 1.0
    with pytest.raises(ValueError, match="channels"):
        call(data, source_features=maps, source_labels=np.array([[[0, 1], [0, 1]]]),
             target_features=xt[:, :2])


# -------------------------------------------------------------------------------------- non-finite values

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["first", "last", "middle-last-channel"])
@pytest.mark.parametrize("side", ["source", "target"])
def test_non_finite_features_among_valid_pixels(data, bad, where, side):
    """Rejected whatever the sampling: n_pixels=5 almost never draws the bad pixel."""
    xs, ys, xt, yt = (a.copy() for a in data)
    x = xs if side == "source" else xt
    i, j = {"first": (0, 0), "last": (len(x) - 1, 2), "middle-last-channel": (len(x) // 2, 2)}[where]
    x[i, j] = bad
    for n_pixels in (None, 5):
        with pytest.raises(ValueError, match=f"{side}_features.*(NaN|infinite)"):
            call((xs, ys, xt, yt), n_pixels=n_pixels, repeats=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_in_feature_maps(dtype):
    rng = np.random.default_rng(1)
    fs = rng.normal(size=(2, 3, 4, 4)).astype(dtype)
    ls = rng.integers(0, 2, size=(2, 8, 8))
    ft = rng.normal(size=fs.shape).astype(dtype)
    fs[1, 2, 3, 3] = np.nan  # last pixel of the last map, last channel
    with pytest.raises(ValueError, match="source_features"):
        st.otce(fs, ls, ft, ls, n_pixels=None)
    with pytest.raises(ValueError, match="target_features"):
        st.otce(ft, ls, fs, ls, n_pixels=4)
    # channels_last maps too
    cl = np.moveaxis(fs, 1, -1).copy()
    with pytest.raises(ValueError, match="source_features"):
        st.otce(cl, ls, np.moveaxis(ft, 1, -1).copy(), ls, n_pixels=4, channels_last=True)


@pytest.mark.parametrize("layout", ["maps", "channels_last", "strided_maps"])
def test_non_finite_maps_name_the_pixel_and_spare_ignored_ones(layout):
    """The finiteness check reads channel planes in one pass where pixels are contiguous: it must
    still skip ignored pixels and report the first bad valid pixel (flat index over B x H x W)."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=(3, 4, 6, 10)).astype(np.float32)  # (B, D, H, W)
    labels = rng.integers(0, 3, size=(3, 6, 5))
    labels[0, 0, 0] = 255
    if layout == "strided_maps":
        fs = base[:, :, :, ::2]  # pixels two elements apart: the per-pixel loop
    else:
        fs = base[:, :, :, :5].copy()
    if layout == "channels_last":
        fs = np.moveaxis(fs, 1, -1).copy()
    kw = {"channels_last": layout == "channels_last", "n_pixels": 10, "repeats": 1}
    ft = np.ascontiguousarray(fs) * 0.5

    def put(b, h, w, value):
        x = fs.copy()
        if layout == "channels_last":
            x[b, h, w, 3] = value
        else:
            x[b, 3, h, w] = value
        return x

    st.otce(put(0, 0, 0, np.nan), labels, ft, labels, **kw)  # the ignored pixel: accepted
    for b, h, w in [(2, 5, 4), (1, 0, 3), (0, 0, 1)]:
        with pytest.raises(ValueError, match=rf"source_features: contains NaN or infinite values \(pixel {b * 30 + h * 5 + w}\)"):
            st.otce(put(b, h, w, np.inf), labels, ft, labels, **kw)


def test_sinkhorn_non_finite(data):
    xs, _, xt, _ = data
    x = xs.copy()
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        st.sinkhorn(x, xt)
    y = xt.copy()
    y[-1, -1] = np.inf
    with pytest.raises(ValueError, match="y contains NaN"):
        st.sinkhorn(xs, y)


# ------------------------------------------------------------------------------------ numeric arguments

@pytest.mark.parametrize("eps", [0.0, -0.1, np.nan, np.inf, -np.inf])
def test_bad_epsilon_value(data, eps):
    with pytest.raises(ValueError, match="epsilon"):
        call(data, epsilon=eps)
    with pytest.raises(ValueError, match="epsilon"):
        st.sinkhorn(data[0], data[2], epsilon=eps)


@pytest.mark.parametrize("eps", ["0.1", None, True, [0.1]])
def test_bad_epsilon_type(data, eps):
    with pytest.raises(TypeError, match="epsilon"):
        call(data, epsilon=eps)


def test_n_pixels(data):
    xs, ys, xt, yt = data
    with pytest.raises(ValueError, match="source_labels.*60 valid.*n_pixels=61"):
        call(data, n_pixels=61)
    with pytest.raises(ValueError, match="target_labels.*50 valid.*n_pixels=55"):
        call(data, n_pixels=55)
    # Ignored pixels do not count as available.
    with pytest.raises(ValueError, match="source_labels.*n_pixels"):
        call(data, source_labels=np.where(np.arange(60) < 20, 255, ys), n_pixels=45)
    for bad in (0, -1, -100):
        with pytest.raises(ValueError, match="n_pixels"):
            call(data, n_pixels=bad)
    for bad in (1.5, 10.0, "10", True):
        with pytest.raises(TypeError, match="n_pixels"):
            call(data, n_pixels=bad)


@pytest.mark.parametrize("seed", [2**62, 2**63 - 1, 2**63, 2**64 + 3])
def test_huge_seed_works_or_is_refused_naming_seed(data, seed):
    """Validation accepts any Python int >= 0 as seed; it must then either work or be refused with an
    error about `seed`, not leak pybind11's 'incompatible function arguments' from the binding."""
    try:
        r = call(data, n_pixels=10, repeats=2, seed=seed)
    except (ValueError, TypeError, OverflowError) as exc:
        msg = str(exc)
        assert "incompatible function arguments" not in msg, f"internal binding error leaked: {msg[:300]}"
        assert "seed" in msg
    else:
        assert np.all(np.isfinite(r.scores)) and r.seed == seed


@pytest.mark.parametrize("tol", [0.0, -1e-6, np.nan, np.inf])
def test_bad_tol(data, tol):
    with pytest.raises(ValueError, match="tol"):
        call(data, tol=tol)
    with pytest.raises(ValueError, match="tol"):
        st.sinkhorn(data[0], data[2], tol=tol)


# ------------------------------------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, object, np.float16, np.int32, np.int64,
                                   np.uint8, np.bool_, "U3", "datetime64[s]"])
@pytest.mark.parametrize("side", ["source", "target"])
def test_bad_feature_dtypes(data, dtype, side):
    xs, ys, xt, yt = data
    bad = (xs if side == "source" else xt).astype(dtype)
    kw = {f"{side}_features": bad}
    with pytest.raises(TypeError, match=f"{side}_features"):
        call(data, **kw)


@pytest.mark.parametrize("dtype", [np.complex128, object, np.float16, np.int64])
def test_bad_sinkhorn_dtypes(data, dtype):
    xs, _, xt, _ = data
    with pytest.raises(TypeError, match="x"):
        st.sinkhorn(xs.astype(dtype), xt)
    with pytest.raises(TypeError, match="y"):
        st.sinkhorn(xs, xt.astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, np.complex128, object])
def test_bad_label_dtypes(data, dtype):
    xs, ys, xt, yt = data
    with pytest.raises(TypeError, match="source_labels"):
        call(data, source_labels=ys.astype(dtype))
    with pytest.raises(TypeError, match="target_labels"):
        call(data, target_labels=yt.astype(dtype))


def test_unconvertible_input(data):
    with pytest.raises(TypeError, match="source_features"):
        call(data, source_features=[[1.0, 2.0], [3.0]])  # ragged


def test_bad_ignore_index(data):
    for bad in (2.5, [255.0], "255", [[255]], True, [255, True], (255, np.True_)):
        with pytest.raises(TypeError, match="ignore_index"):
            call(data, ignore_index=bad)


def test_empty_ignore_index_sequence_means_nothing_ignored(data):
    """`ignore_index` is 'an int, a sequence, or None'; an empty sequence ignores nothing, like None."""
    xs, ys, xt, yt = data
    ys = np.where(np.arange(60) < 5, 255, ys)  # 255 is then an ordinary class
    r_none = call((xs, ys, xt, yt), ignore_index=None)
    assert 255 in r_none.source_classes
    r_arr = call((xs, ys, xt, yt), ignore_index=np.array([], dtype=np.int64))
    np.testing.assert_array_equal(r_arr.scores, r_none.scores)
    r_list = call((xs, ys, xt, yt), ignore_index=[])
    np.testing.assert_array_equal(r_list.scores, r_none.scores)


# ------------------------------------------------------------------------------------ sinkhorn weights

def test_sinkhorn_bad_weights(data):
    xs, _, xt, _ = data
    n, m = len(xs), len(xt)
    with pytest.raises(ValueError, match=r"a must have shape \(60,\)"):
        st.sinkhorn(xs, xt, a=np.full(n - 1, 1 / (n - 1)))
    with pytest.raises(ValueError, match="b must sum to 1"):
        st.sinkhorn(xs, xt, b=np.full(m, 1.0))
    w = np.full(n, 1 / n)
    w[0], w[1] = 0.0, 2 / n
    with pytest.raises(ValueError, match="a must hold finite weights > 0"):
        st.sinkhorn(xs, xt, a=w)
    w[0], w[1] = -1 / n, 3 / n
    with pytest.raises(ValueError, match="a must hold"):
        st.sinkhorn(xs, xt, a=w)
    w = np.full(m, 1 / m)
    w[4] = np.nan
    with pytest.raises(ValueError, match="b must hold"):
        st.sinkhorn(xs, xt, b=w)
    with pytest.raises(TypeError, match="a must be real"):
        st.sinkhorn(xs, xt, a=np.full(n, 1 / n, dtype=complex))


def test_sinkhorn_bad_shapes(data):
    xs, _, xt, _ = data
    with pytest.raises(ValueError, match="x must be a 2-D"):
        st.sinkhorn(xs.ravel(), xt)
    with pytest.raises(ValueError, match="y must be a 2-D"):
        st.sinkhorn(xs, xt[None])
    with pytest.raises(ValueError, match="x must have at least one point"):
        st.sinkhorn(xs[:0], xt)
    with pytest.raises(ValueError, match="x has 3 dimensions but y has 2"):
        st.sinkhorn(xs, xt[:, :2])


# ----------------------------------------------------------------------------------- numerically hopeless

# These run in a child process with a 3 GB address-space limit: with the float32 case, the core was
# seen to grow a buffer without bound (all of the machine's memory, then std::bad_alloc), which must not
# take the test runner, or anything else on the machine, with it.
_ISOLATED = r"""
import json, resource, sys, warnings
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
import numpy as np
import segtransfer as st
warnings.simplefilter("ignore", RuntimeWarning)
rng = np.random.default_rng(0)
xs = rng.normal(size=(60, 3)); ys = rng.integers(0, 3, 60)
xt = rng.normal(size=(50, 3)); yt = rng.integers(0, 2, 50)
case = json.loads(sys.argv[1])
dt = np.dtype(case["dtype"])
a = (xs * case["scale"]).astype(dt)
b = xt.astype(dt)
try:
    if case["fn"] == "otce":
        r = st.otce(a, ys, b, yt, n_pixels=None, epsilon=case["eps"], threads=1)
        out = {"ok": True, "finite": bool(np.all(np.isfinite(r.scores)) and np.all(np.isfinite(r.joint))),
               "scores": [float(v) for v in r.scores]}
    else:
        r = st.sinkhorn(a, b, epsilon=case["eps"], threads=1)
        out = {"ok": True, "finite": bool(np.all(np.isfinite(r.f)) and np.all(np.isfinite(r.g))
                                          and np.isfinite(r.transport_cost)), "scores": [r.transport_cost]}
except Exception as exc:
    out = {"ok": False, "type": type(exc).__name__, "msg": str(exc)[:300]}
print(json.dumps(out))
"""


def run_isolated(**case):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _ISOLATED, json.dumps(case)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fn", ["otce", "sinkhorn"])
@pytest.mark.parametrize("dtype,scale", [("float32", 1e20), ("float64", 1e160)])
def test_finite_features_whose_costs_overflow_are_refused_or_handled(fn, dtype, scale):
    """Every feature is finite, but |x - y|^2 overflows the dtype (float32: |x| ~ 1e20 -> 1e40 > 3.4e38).
    The library must either refuse the input (ValueError naming the features) or return finite numbers:
    neither a NaN score nor exhausting memory (MemoryError: std::bad_alloc) is acceptable."""
    out = run_isolated(fn=fn, dtype=dtype, scale=scale, eps=0.1)
    if out["ok"]:
        assert out["finite"], f"finite input gave non-finite results {out['scores']}"
    else:
        assert out["type"] == "ValueError" and ("features" in out["msg"] or out["msg"].startswith(("x", "y"))), out


def test_epsilon_so_small_that_cost_over_eps_overflows_is_refused_or_handled():
    """epsilon = 1e-300 passes validation (finite, > 0) but C / eps overflows to inf: refuse (ValueError
    naming epsilon) or cope (finite score); NaN is neither."""
    out = run_isolated(fn="otce", dtype="float64", scale=1.0, eps=1e-300)
    if out["ok"]:
        assert out["finite"], f"epsilon=1e-300 gave scores {out['scores']}"
    else:
        assert out["type"] == "ValueError" and "epsilon" in out["msg"], out


# ------------------------------------------------------------------------------------------------ memory

def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def test_memory_error_before_allocating():
    """2e5 valid pixels per side with n_pixels=None: the dense float32 cost and the truncated kernels
    at their densest would take 20 * 2e5 * 2e5 bytes = 800 GB. The core checks that against the available memory before
    allocating and raises MemoryError telling the user to lower n_pixels (the message proves it is the
    pre-check, not a failed allocation); the peak RSS shows nothing big was touched."""
    n = 200_000
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 1)).astype(np.float32)  # 800 kB
    y = (np.arange(n) % 2).astype(np.int32)
    before = _maxrss_bytes()
    with pytest.raises(MemoryError, match=r"needs [0-9.]+ GB.*lower n_pixels"):
        st.otce(x, y, x, y, n_pixels=None)
    # Sampled: 1.5e5 per side -> 450 GB.
    with pytest.raises(MemoryError, match=r"needs [0-9.]+ GB.*n_pixels"):
        st.otce(x, y, x, y, n_pixels=150_000, repeats=1)
    with pytest.raises(MemoryError, match="GB"):
        st.sinkhorn(x, x)
    assert _maxrss_bytes() - before < 512 * 2**20


def test_memory_error_points_to_blocked_mode_and_blocked_is_checked(monkeypatch):
    """The dense refusal names the way out (blocked=True); blocked takes booleans only, and its own
    estimate is checked too (a budget of 1 MB refuses even the blocked buffers of 2e4 points)."""
    n = 200_000
    x = np.zeros((n, 1), dtype=np.float32)
    y = (np.arange(n) % 2).astype(np.int32)
    with pytest.raises(MemoryError, match=r"pass blocked=True to recompute the cost instead of storing it"):
        st.otce(x, y, x, y, n_pixels=None)
    with pytest.raises(MemoryError, match=r"pass blocked=True"):
        st.sinkhorn(x, x)
    with pytest.raises(TypeError, match="blocked must be True or False"):
        st.otce(x, y, x, y, blocked="yes")
    with pytest.raises(TypeError, match="blocked must be True or False"):
        st.sinkhorn(x[:10], x[:10], blocked=1)
    from segtransfer import _api
    monkeypatch.setattr(_api, "_memory_budget", lambda: 1e6)
    with pytest.raises(MemoryError, match=r"blocked solver's buffers"):
        st.otce(x, y, x, y, n_pixels=20_000, repeats=1, blocked=True)


# ------------------------------------------------------------------------------ non-convergence warnings

def test_unconverged_warnings_grade_the_damage_and_advise_by_cause():
    """The warning says what an unconverged plan is worth (L1 marginal error above 1: meaningless;
    above 1e-2: unreliable; else: may be off) and gives advice that fits why the solve stopped:
    raising max_iter cannot help a solve that stalled at float64's resolution, and a solve whose error
    ended above 1 diverged rather than stalled."""
    from segtransfer._api import stop_cause, unconverged_effect

    assert "meaningless" in unconverged_effect(1.3) and "meaningless" in unconverged_effect(float("nan"))
    assert "unreliable" in unconverged_effect(0.9) and "unreliable" in unconverged_effect(0.02)
    assert unconverged_effect(5e-3) == "the score may be off"
    assert stop_cause(True, True, 0.5) == "timeout"
    assert stop_cause(False, True, 1e-3) == "stalled" and stop_cause(False, True, 1.0) == "stalled"
    assert stop_cause(False, False, 1e-3) == "max_iter" and stop_cause(False, False, float("nan")) == "max_iter"
    # An error above the plan's total mass is no resolution limit: the iterate ran away (a draw of
    # session 38's build ended at 5.7e188 and was said to have stalled at float64's resolution).
    assert stop_cause(False, True, 5.7e188) == "diverged" and stop_cause(False, True, float("nan")) == "diverged"

    rng = np.random.default_rng(0)
    xs, ys, xt, yt = rng.normal(size=(60, 3)), rng.integers(0, 3, 60), rng.normal(size=(50, 3)), rng.integers(0, 2, 50)
    with pytest.warns(RuntimeWarning, match=r"max_iter=1 reached.*meaningless\. Raise max_iter, or loosen tol\."):
        st.otce(xs, ys, xt, yt, n_pixels=None, max_iter=1)
    with pytest.warns(RuntimeWarning, match=r"float64's resolution") as caught:
        st.otce(xs, ys, xt, yt, n_pixels=None, epsilon=1e-9, threads=1)
    assert "Raise max_iter" not in str(caught[0].message)
    with pytest.warns(RuntimeWarning, match=r"float64's resolution") as caught:
        st.sinkhorn(xs, xt, epsilon=1e-9, threads=1)
    assert "Raise max_iter" not in str(caught[0].message)


def test_cgroup_room_leaves_out_reclaimable_page_cache(tmp_path):
    """The cgroup's usage counts page cache that the kernel reclaims first; a container that has
    read a lot of data must not look full. v2 (memory.max) and v1 (memory/memory.limit_in_bytes)."""
    from segtransfer._api import _cgroup_room

    assert _cgroup_room(str(tmp_path)) is None
    (tmp_path / "memory.max").write_text("8000000000\n")
    (tmp_path / "memory.current").write_text("7000000000\n")
    assert _cgroup_room(str(tmp_path)) == 1e9  # no memory.stat: usage taken as it is
    (tmp_path / "memory.stat").write_text("anon 1000000000\nfile 6000000000\ninactive_file 5500000000\n")
    assert _cgroup_room(str(tmp_path)) == 6.5e9
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_room(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("4000000000\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("3900000000\n")
    (v1 / "memory" / "memory.stat").write_text("cache 3000000000\ntotal_inactive_file 2900000000\n")
    assert _cgroup_room(str(v1)) == 3e9


def test_memory_error_for_a_small_budget_reads_cleanly(monkeypatch):
    from segtransfer import _api

    monkeypatch.setattr(_api, "_memory_budget", lambda: 2e4)
    x = np.random.default_rng(0).normal(size=(200, 2))
    with pytest.raises(MemoryError) as info:
        st.sinkhorn(x, x)
    assert "()" not in str(info.value) and "0.0 MB" not in str(info.value), str(info.value)


def test_mixed_precision_copy_is_counted_before_it_is_made(monkeypatch):
    """Mixed float32/float64 features are solved in float64: the float32 side is converted whole,
    every pixel of it, so the memory check must count that copy and name the way out."""
    from segtransfer import _api

    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(20000, 40)).astype(np.float32), rng.integers(0, 3, 20000)
    xt, yt = rng.normal(size=(500, 40)), rng.integers(0, 2, 500)
    monkeypatch.setattr(_api, "_memory_budget", lambda: 5e6)
    with pytest.raises(MemoryError, match=r"float64 copy of the float32 features: 6\.4 MB.*one precision"):
        st.otce(xs, ys, xt, yt, n_pixels=50, repeats=1, threads=1)
    st.otce(xs.astype(np.float64), ys, xt, yt, n_pixels=50, repeats=1, threads=1)  # one precision: fits
