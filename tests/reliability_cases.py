"""Every bad or odd input we try, what the user gets, and the generator of docs/reliability.md.

Each case is an *expression* evaluated in the namespace built by ``namespace()``; the table in
docs/reliability.md prints that expression verbatim next to the observed outcome, and
tests/test_reliability.py runs the same expressions, so the document cannot drift from the tests
(test_reliability.py::test_reliability_doc_is_current fails when it does). Regenerate with

    python tests/reliability_cases.py --write
"""

from __future__ import annotations

import functools
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import segtransfer as st

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


# ------------------------------------------------------------------------------------------ the data

def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(60, 3)), rng.integers(0, 3, 60), rng.normal(size=(50, 3)), rng.integers(0, 2, 50)


class OnDevice:
    """What a GPU tensor looks like to the array-parsing layer: DLPack protocol methods reporting a
    non-host device. Exporting must never be attempted (that would touch the device)."""

    def __init__(self, arr: np.ndarray, device_type: int = 2) -> None:
        self._arr, self._device_type = arr, device_type

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self._device_type, 0)

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a device array must be refused before it is exported")


class CudaArrayInterface:
    """A CuPy/Numba-style device array: only ``__cuda_array_interface__``."""

    def __init__(self, arr: np.ndarray) -> None:
        self.__cuda_array_interface__ = {"shape": arr.shape, "typestr": arr.dtype.str, "data": (0, False),
                                         "version": 3}


class BrokenDevice:
    """An object whose ``__dlpack_device__`` does not follow the protocol."""

    def __dlpack_device__(self) -> str:
        return "cuda:0"


def on_device(arr: np.ndarray, device_type: int = 2) -> OnDevice:
    return OnDevice(arr, device_type)


def read_only(arr: np.ndarray) -> np.ndarray:
    out = arr.copy()
    out.flags.writeable = False
    return out


def negative_strides(arr: np.ndarray) -> np.ndarray:
    """The same values seen through negative strides on every axis."""
    flip = tuple(slice(None, None, -1) for _ in range(arr.ndim))
    return arr[flip].copy()[flip]


def strided(arr: np.ndarray) -> np.ndarray:
    """The same values every other element of a twice-as-large buffer on every axis."""
    big = np.zeros(tuple(2 * s for s in arr.shape), dtype=arr.dtype)
    every_other = tuple(slice(None, None, 2) for _ in range(arr.ndim))
    big[every_other] = arr
    return big[every_other]


def unaligned(arr: np.ndarray) -> np.ndarray:
    """The same values in a buffer that starts one byte past an aligned address."""
    raw = np.zeros(arr.nbytes + 1, dtype=np.uint8)
    out = np.ndarray(arr.shape, dtype=arr.dtype, buffer=raw, offset=1)
    out[...] = arr
    return out


def struct_field(arr: np.ndarray) -> np.ndarray:
    """The same values as a field of a packed structured array (strides of 9 bytes per float64)."""
    rec = np.zeros(arr.shape, dtype=[("x", arr.dtype), ("tag", np.int8)])
    rec["x"] = arr
    return rec["x"]


def set_at(arr: np.ndarray, index: Any, value: Any) -> np.ndarray:
    out = np.array(arr, dtype=np.result_type(arr, np.asarray(value)))
    out[index] = value
    return out


@functools.lru_cache(maxsize=None)
def namespace() -> dict[str, Any]:
    """Names the case expressions may use (documented at the top of docs/reliability.md)."""
    xs, ys, xt, yt = _data()
    big = np.random.default_rng(1).normal(size=(200_000, 1))
    return {
        "np": np, "st": st, "xs": xs, "ys": ys, "xt": xt, "yt": yt,
        "maps": np.random.default_rng(2).normal(size=(2, 3, 4, 5)),
        "labelmaps": np.random.default_rng(3).integers(0, 2, size=(2, 4, 5)),
        "big": big, "big_labels": np.arange(big.shape[0]),
        "otce": functools.partial(st.otce, n_pixels=None, threads=1),
        "sinkhorn": functools.partial(st.sinkhorn, threads=1),
        "on_device": on_device, "CudaArrayInterface": CudaArrayInterface, "BrokenDevice": BrokenDevice,
        "read_only": read_only, "negative_strides": negative_strides, "strided": strided,
        "unaligned": unaligned, "struct_field": struct_field, "set_at": set_at,
    }


def evaluate(expr: str) -> Any:
    return eval(expr, dict(namespace()))  # noqa: S307 - our own fixed expressions


@functools.lru_cache(maxsize=None)
def baseline() -> Any:
    return evaluate("otce(xs, ys, xt, yt)")


# ------------------------------------------------------------------------- checks of odd-but-valid input

def _entropy(labels: np.ndarray) -> float:
    p = np.unique(labels, return_counts=True)[1] / labels.size
    return float(-(p * np.log(p)).sum())


def same_as_baseline(r: Any) -> None:
    """Bit-identical to the call on the plain contiguous float64 arrays."""
    b = baseline()
    for name in ("scores", "conditional_entropy", "transport_cost", "joint", "marginal_error", "iterations",
                 "converged"):
        np.testing.assert_array_equal(getattr(r, name), getattr(b, name), err_msg=name)


def same_numbers_as_baseline(r: Any) -> None:
    """As same_as_baseline, but the class ids may differ (renamed labels)."""
    b = baseline()
    for name in ("scores", "joint", "transport_cost"):
        np.testing.assert_array_equal(getattr(r, name), getattr(b, name), err_msg=name)


def sane(r: Any) -> None:
    """Converged, finite, and 0 <= W_T <= log(Ct)."""
    assert r.all_converged, r.marginal_error
    assert np.all(np.isfinite(r.scores)) and np.all(np.isfinite(r.joint)) and np.all(np.isfinite(r.transport_cost))
    assert np.all(r.conditional_entropy >= 0)
    assert np.all(r.conditional_entropy <= math.log(r.target_classes.size) + 1e-12)


def independent_coupling(atol: float) -> Callable[[Any], None]:
    """When every cost is equal the plan is a b^T: W_T = H(Y_t) over the target pixels, joint = p_s p_t."""

    def check(r: Any) -> None:
        sane(r)
        _, ys, _, yt = _data()
        np.testing.assert_allclose(r.conditional_entropy, _entropy(yt), rtol=0, atol=atol)
        ps = np.unique(ys, return_counts=True)[1] / ys.size
        pt = np.unique(yt, return_counts=True)[1] / yt.size
        np.testing.assert_allclose(r.joint[0], np.outer(ps, pt), rtol=0, atol=atol)

    return check


def zero_cost(r: Any) -> None:
    independent_coupling(1e-12)(r)
    assert np.all(r.transport_cost == 0)


def zero_cost_float32(r: Any) -> None:
    # float32 inputs take their exponentials in float32 (relative error ~6e-8, see README
    # "Precision"): the plan is a b^T to that precision, not to float64's.
    # W_D: 0, or only the offset between the two sides' means, formed in float64 (~1e-81 for the
    # 1e-40 denormals, whose squared distances underflow in float32; centre_sides in otce.cpp).
    independent_coupling(1e-7)(r)
    assert np.all(np.abs(r.transport_cost) < 1e-70)


def as_float64_far_apart(r: Any) -> None:
    """The target 1000 away in every channel, float32: the score of the same float32 values solved
    in float64, to 1e-5 (test_otce.py's far-apart test derives the bound)."""
    sane(r)
    xs, ys, xt, yt = _data()
    r64 = st.otce(xs.astype(np.float32).astype(np.float64), ys, (xt + 1e3).astype(np.float32).astype(np.float64), yt,
                  n_pixels=None, threads=1, tol=1e-10)
    assert abs(r.score - r64.score) <= 1e-5, (r.score, r64.score)


def unconverged_but_finite(r: Any) -> None:
    assert not r.all_converged and np.all(r.iterations == 1)
    assert np.all(r.marginal_error > r.tol)
    for name in ("scores", "conditional_entropy", "transport_cost", "joint", "marginal_error"):
        assert np.all(np.isfinite(getattr(r, name))), name


def unconverged_beyond_total_mass(r: Any) -> None:
    unconverged_but_finite(r)
    assert np.all(r.marginal_error > 1.0)


def trivially_converged(r: Any) -> None:
    assert r.all_converged and np.all(np.isfinite(r.scores))
    assert r.marginal_error[0] > baseline().marginal_error[0]  # the loose tol was taken at its word


def classes_keep_their_values(expected_source: list[int]) -> Callable[[Any], None]:
    def check(r: Any) -> None:
        same_numbers_as_baseline(r)
        assert r.source_classes.tolist() == expected_source

    return check


def solved_in_float64(r: Any) -> None:
    sane(r)
    assert r.dtype == "float64"


def same_as_dropping_the_pixel(r: Any) -> None:
    xs, ys, xt, yt = _data()
    b = st.otce(xs[1:], ys[1:], xt, yt, n_pixels=None, threads=1)
    np.testing.assert_array_equal(r.scores, b.scores)
    np.testing.assert_array_equal(r.joint, b.joint)


def finite_sinkhorn(r: Any) -> None:
    assert r.converged and np.all(np.isfinite(r.f)) and np.all(np.isfinite(r.g)) and math.isfinite(r.transport_cost)


# ------------------------------------------------------------------------------------------ the cases

@dataclass(frozen=True)
class Case:
    group: str
    input: str  # what is wrong or odd, in words
    expr: str  # evaluated in namespace(); printed verbatim in the table
    raises: type[BaseException] | None = None
    match: str = ""  # regex searched in the message; must name the argument
    check: Callable[[Any], None] | None = None  # for accepted input: asserts the documented behaviour
    behaviour: str = ""  # the documented behaviour of accepted input, for the table
    warns: bool = False  # accepted, with a RuntimeWarning (non-convergence)

    @property
    def id(self) -> str:
        return re.sub(r"[^0-9A-Za-z]+", "-", f"{self.group} {self.input}").strip("-").lower()


def _err(group: str, what: str, expr: str, exc: type[BaseException], match: str) -> Case:
    return Case(group, what, expr, raises=exc, match=match)


def _ok(group: str, what: str, expr: str, check: Callable[[Any], None], behaviour: str, warns: bool = False) -> Case:
    return Case(group, what, expr, check=check, behaviour=behaviour, warns=warns)


S, N, L, A, F, LAY, DT, DEV, MEM = ("Shapes and ndim", "Pixel counts", "Labels", "Numeric arguments",
                                    "Feature values", "Memory layout", "Dtypes and containers", "Devices",
                                    "Memory")
V, T, M = ValueError, TypeError, MemoryError
SAME = "accepted; bit-identical to the plain contiguous float64 call"

CASES: list[Case] = [
    # -------------------------------------------------------------------------------- shapes and ndim
    _err(S, "1-D features", "otce(xs, ys, xt.ravel(), yt)", V, r"target_features must be a \(P, D\)"),
    _err(S, "3-D features", "otce(xs[None], ys, xt, yt)", V, r"source_features must be a \(P, D\)"),
    _err(S, "5-D features", "otce(xs, ys, xt[None, None, None], yt)", V, r"target_features must be"),
    _err(S, "2-D labels for a pixel table", "otce(xs, ys[:, None], xt, yt)", V, r"source_labels must be 1-D"),
    _err(S, "feature maps with flat labels", "otce(maps, labelmaps.reshape(2, -1), xt, yt)", V,
         r"source_labels must be 3-D"),
    _err(S, "feature and label maps of different batch size", "otce(maps, labelmaps[:1], xt, yt)", V,
         r"source_labels has 1 label maps but source_features has 2"),
    _ok(S, "label maps at another resolution than the features",
        "otce(maps, np.kron(labelmaps, np.ones((1, 3, 2), int)), xt, yt)", sane,
        "accepted; labels resized to the feature resolution by nearest neighbour (PyTorch rule)"),
    _err(S, "different channel counts on the two sides", "otce(xs, ys, xt[:, :2], yt)", V,
         r"target_features has 2 channels but source_features has 3"),
    _err(S, "sinkhorn: 1-D points", "sinkhorn(xs.ravel(), xt)", V, r"x must be a 2-D"),
    _err(S, "sinkhorn: different dimensions", "sinkhorn(xs, xt[:, :2])", V, r"x has 3 dimensions but y has 2"),
    _err(S, "0-d features", "otce(np.float64(1.0), ys, xt, yt)", V, r"source_features must be .*got shape \(\)"),
    _err(S, "0-d labels", "otce(xs, np.int64(1), xt, yt)", V, r"source_labels must be 1-D"),
    _err(S, "empty pixel table", "otce(xs[:0], ys[:0], xt, yt)", V, r"source_features has no pixels"),
    _err(S, "no channels", "otce(xs[:, :0], ys, xt[:, :0], yt)", V, r"source_features has no feature channels"),
    _err(S, "empty batch of maps", "otce(maps[:0], labelmaps[:0], xt, yt)", V, r"source_features has no pixels"),
    _err(S, "maps of height 0", "otce(maps[:, :, :0], labelmaps, xt, yt)", V, r"source_features has no pixels"),
    _err(S, "empty label maps", "otce(maps, labelmaps[:, :0], xt, yt)", V, r"source_labels has empty label maps"),
    _err(S, "sinkhorn: no points", "sinkhorn(xs[:0], xt)", V, r"x must have at least one point"),
    # ------------------------------------------------------------------------------------ pixel counts
    _err(N, "fewer labels than pixels", "otce(xs, ys[:-1], xt, yt)", V,
         r"source_labels has 59 labels but source_features has 60 pixels"),
    _err(N, "more labels than pixels", "otce(xs, ys, xt, np.concatenate([yt, yt[:3]]))", V,
         r"target_labels has 53 labels but target_features has 50 pixels"),
    _err(N, "n_pixels above the valid pixels of one side", "otce(xs, ys, xt, yt, n_pixels=55)", V,
         r"target_labels has 50 valid .*n_pixels=55"),
    _err(N, "sinkhorn: weights of the wrong length", "sinkhorn(xs, xt, a=np.full(59, 1 / 59))", V,
         r"a must have shape \(60,\)"),
    # -------------------------------------------------------------------------------------- labels
    _err(L, "every label ignored", "otce(xs, np.full(60, 255), xt, yt)", V, r"source_labels has no valid pixels"),
    _err(L, "every label ignored (a list of ignore values)", "otce(xs, ys, xt, yt, ignore_index=[0, 1])", V,
         r"target_labels has no valid pixels"),
    _err(L, "a single class", "otce(xs, np.zeros(60, int), xt, yt)", V, r"source_labels has a single class \(0\)"),
    _err(L, "a single class once ignored pixels are removed", "otce(xs, ys, xt, np.where(yt == 0, 255, 1))", V,
         r"target_labels has a single class \(1\)"),
    _ok(L, "labels outside int32", "otce(xs, ys + 2**40, xt, yt - 2**62)",
        classes_keep_their_values([2**40, 2**40 + 1, 2**40 + 2]),
        "accepted; any 64-bit integers are class ids, kept in `source_classes`/`target_classes`"),
    _ok(L, "uint64 labels above 2**63", "otce(xs, ys.astype(np.uint64) + 2**63, xt, yt)",
        classes_keep_their_values([2**63, 2**63 + 1, 2**63 + 2]), "accepted; compared exactly (not via float64)"),
    _ok(L, "negative labels", "otce(xs, ys - 5, xt, yt)", classes_keep_their_values([-5, -4, -3]),
        "accepted; ordinary classes"),
    _err(L, "ignore_index outside 64 bits", "otce(xs, ys, xt, yt, ignore_index=2**70)", V,
         r"ignore_index holds 1180591620717411303424, outside the 64-bit"),
    _err(L, "ignore_index not an integer", "otce(xs, ys, xt, yt, ignore_index=2.5)", T,
         r"ignore_index must be an int or a sequence of ints"),
    _err(L, "float labels", "otce(xs, ys.astype(float), xt, yt)", T, r"source_labels must hold integer class ids"),
    _err(L, "bool labels", "otce(xs, ys, xt, yt.astype(bool))", T, r"target_labels must hold integer class ids"),
    # ------------------------------------------------------------------------------ numeric arguments
    _err(A, "n_pixels = 0", "otce(xs, ys, xt, yt, n_pixels=0)", V, r"n_pixels must be >= 1, got 0"),
    _err(A, "negative n_pixels", "otce(xs, ys, xt, yt, n_pixels=-1)", V, r"n_pixels must be >= 1, got -1"),
    _err(A, "n_pixels beyond int64", "otce(xs, ys, xt, yt, n_pixels=2**64)", V, r"n_pixels must be <= 9223372036854775807"),
    _err(A, "float n_pixels", "otce(xs, ys, xt, yt, n_pixels=10.0)", T, r"n_pixels must be an int, got float"),
    _err(A, "float repeats", "otce(xs, ys, xt, yt, n_pixels=10, repeats=2.0)", T, r"repeats must be an int, got float"),
    _err(A, "repeats = 0", "otce(xs, ys, xt, yt, n_pixels=10, repeats=0)", V, r"repeats must be >= 1"),
    _err(A, "negative repeats", "otce(xs, ys, xt, yt, n_pixels=10, repeats=-2)", V, r"repeats must be >= 1"),
    _err(A, "huge repeats", "otce(xs, ys, xt, yt, n_pixels=10, repeats=10**12)", M,
         r"needs [0-9.]+ GB .*pixel indices.*lower repeats"),
    _err(A, "repeats beyond int64", "otce(xs, ys, xt, yt, n_pixels=10, repeats=2**63)", V,
         r"repeats must be <= 9223372036854775807"),
    _err(A, "max_iter = 0", "otce(xs, ys, xt, yt, max_iter=0)", V, r"max_iter must be >= 1"),
    _err(A, "negative max_iter", "sinkhorn(xs, xt, max_iter=-5)", V, r"max_iter must be >= 1"),
    _err(A, "float max_iter", "otce(xs, ys, xt, yt, max_iter=100.0)", T, r"max_iter must be an int, got float"),
    _err(A, "max_iter beyond int64", "otce(xs, ys, xt, yt, max_iter=2**63)", V,
         r"max_iter must be <= 9223372036854775807"),
    _ok(A, "huge max_iter", "otce(xs, ys, xt, yt, max_iter=2**62)", same_as_baseline,
        "accepted; the solve stops at convergence, at `timeout` when given, or once its error stops "
        "falling (~300,000 iterations without a 0.1 % gain at most; RuntimeWarning)"),
    _ok(A, "max_iter = 1", "otce(xs, ys, xt, yt, max_iter=1)", unconverged_beyond_total_mass,
        "accepted; RuntimeWarning 'did not reach tol'; `converged` False, every number finite, "
        "`marginal_error` says how far off the plan is (here above 1, the plan's total mass: the warning "
        "says the score is meaningless)", warns=True),
    _err(A, "epsilon = 0", "otce(xs, ys, xt, yt, epsilon=0.0)", V, r"epsilon must be a finite number > 0, got 0.0"),
    _err(A, "negative epsilon", "sinkhorn(xs, xt, epsilon=-0.1)", V, r"epsilon must be a finite number > 0"),
    _err(A, "NaN epsilon", "otce(xs, ys, xt, yt, epsilon=float('nan'))", V, r"epsilon must be a finite number"),
    _err(A, "infinite epsilon", "otce(xs, ys, xt, yt, epsilon=float('inf'))", V, r"epsilon must be a finite number"),
    _err(A, "epsilon as a string", "otce(xs, ys, xt, yt, epsilon='0.1')", T, r"epsilon must be a number, got str"),
    _ok(A, "tiny epsilon (1e-6)", "otce(xs, ys, xt, yt, epsilon=1e-6)", sane,
        "accepted; converges (nearly unregularised OT, Newton finish)"),
    _err(A, "epsilon so small that cost / epsilon > 1e12", "otce(xs, ys, xt, yt, epsilon=1e-300)", V,
         r"epsilon: is too small for the cost scale"),
    _ok(A, "huge epsilon (1e6)", "otce(xs, ys, xt, yt, epsilon=1e6)", independent_coupling(1e-6),
        "accepted; the plan tends to a b^T, so W_T -> H(Y_t) and joint -> p_s p_t (within 1e-6 here)"),
    _err(A, "tol = 0", "otce(xs, ys, xt, yt, tol=0.0)", V, r"tol must be a finite number > 0"),
    _ok(A, "huge tol", "otce(xs, ys, xt, yt, tol=1e300)", trivially_converged,
        "accepted and taken at its word: `converged` True after the first certification"),
    _err(A, "timeout = 0", "otce(xs, ys, xt, yt, timeout=0)", V, r"timeout must be a finite number > 0"),
    _err(A, "threads = 0", "otce(xs, ys, xt, yt, threads=0)", V, r"threads must be >= 1"),
    _err(A, "float threads", "otce(xs, ys, xt, yt, threads=1.5)", T, r"threads must be an int, got float"),
    _err(A, "negative timeout", "otce(xs, ys, xt, yt, timeout=-1.0)", V, r"timeout must be a finite number > 0"),
    _err(A, "absurd thread count", "otce(xs, ys, xt, yt, threads=100_000)", V, r"threads must be <= \d+"),
    _err(A, "blocked not a bool", "otce(xs, ys, xt, yt, blocked='yes')", T, r"blocked must be True or False, got str"),
    _err(A, "channels_last as a string", "otce(xs, ys, xt, yt, channels_last='False')", T,
         r"channels_last must be True or False, got str"),
    _err(A, "negative seed", "otce(xs, ys, xt, yt, n_pixels=10, seed=-1)", V, r"seed must be >= 0"),
    _err(A, "float seed", "otce(xs, ys, xt, yt, n_pixels=10, seed=1.0)", T, r"seed must be an int, got float"),
    _err(A, "seed beyond 63 bits", "otce(xs, ys, xt, yt, n_pixels=10, seed=2**63)", V, r"seed must be <= 9223372036854775807"),
    _err(A, "unknown sampling mode", "otce(xs, ys, xt, yt, sampling='stratified')", V,
         r"sampling must be one of \('uniform',\), got 'stratified'"),
    _err(A, "sampling in the wrong case", "otce(xs, ys, xt, yt, sampling='Uniform')", V, r"sampling must be one of"),
    _err(A, "sampling not a string", "otce(xs, ys, xt, yt, sampling=np.array(['uniform']))", V,
         r"sampling must be one of"),
    _err(A, "sinkhorn: weights not summing to 1", "sinkhorn(xs, xt, b=np.ones(50))", V, r"b must sum to 1"),
    _err(A, "sinkhorn: a zero weight", "sinkhorn(xs, xt, a=set_at(np.full(60, 1 / 60), [0, 1], [0, 2 / 60]))", V,
         r"a must hold finite weights > 0"),
    # -------------------------------------------------------------------------------- feature values
    _err(F, "NaN in a valid pixel", "otce(set_at(xs, (30, 2), np.nan), ys, xt, yt)", V,
         r"source_features: contains NaN or infinite values \(pixel 30\)"),
    _err(F, "NaN in a pixel that sampling would almost never draw",
         "otce(xs, ys, set_at(xt, (49, 0), np.nan), yt, n_pixels=5, repeats=1)", V,
         r"target_features: contains NaN or infinite values \(pixel 49\)"),
    _err(F, "positive infinity", "otce(xs, ys, set_at(xt, (0, 0), np.inf), yt)", V, r"target_features: contains NaN or infinite"),
    _err(F, "negative infinity", "otce(set_at(xs, (59, 1), -np.inf), ys, xt, yt)", V, r"source_features: contains NaN or inf"),
    _ok(F, "NaN in an ignored pixel", "otce(set_at(xs, 0, np.nan), set_at(ys, 0, 255), xt, yt)",
        same_as_dropping_the_pixel, "accepted; ignored pixels are never read (same result as dropping them)"),
    _err(F, "sinkhorn: NaN", "sinkhorn(set_at(xs, (3, 1), np.nan), xt)", V, r"x contains NaN or infinite values"),
    _ok(F, "denormal features (1e-310)", "otce(xs * 1e-310, ys, xt * 1e-310, yt)", zero_cost,
        "accepted; squared distances underflow to 0, so as for constant features"),
    _ok(F, "float32 denormals (1e-40)", "otce((xs * 1e-40).astype(np.float32), ys, (xt * 1e-40).astype(np.float32), yt)",
        zero_cost_float32, "accepted; as for constant features (to float32 precision; W_D keeps only the "
        "offset between the two sides' means, ~1e-81, formed in float64)"),
    _ok(F, "constant features (all distances 0)", "otce(np.ones_like(xs), ys, np.ones_like(xt), yt)", zero_cost,
        "accepted; plan = a b^T exactly: W_T = H(Y_t) of the target pixels, W_D = 0, joint = p_s p_t"),
    _ok(F, "one side constant", "otce(np.broadcast_to(xs[:1], xs.shape), ys, xt, yt)", independent_coupling(1e-9),
        "accepted; every source pixel sees the same costs, so again W_T = H(Y_t)"),
    _ok(F, "duplicated pixels", "otce(np.repeat(xs[:6], 10, axis=0), ys, xt, yt)", sane,
        "accepted; pixels with one label and identical features are solved as one point of their summed "
        "mass, which is exact (README, step 3)"),
    _err(F, "features of magnitude 1e6", "otce(xs * 1e6, ys, xt * 1e6, yt)", V,
         r"epsilon: is too small for the cost scale \(largest cost the solver works on 33982308060166"),
    _ok(F, "features offset by 1e6, float32", "otce((xs + 1e6).astype(np.float32), ys, (xt + 1e6).astype(np.float32), yt)",
        sane, "accepted; the cost is computed on centred points, so only the spread (quantised to "
        "float32's 0.06 at 1e6) matters"),
    _ok(F, "float32 target far from the source (1000 in every channel)",
        "otce(xs.astype(np.float32), ys, (xt + 1e3).astype(np.float32), yt)", as_float64_far_apart,
        "accepted; each side is centred on its own mean and the offset between them, a separable part of "
        "the cost, is carried in float64: the score of the same float32 values solved in float64 (to 1e-5)"),
    _err(F, "float32 features whose squared distances overflow (1e20)",
         "otce((xs * 1e20).astype(np.float32), ys, xt.astype(np.float32), yt)", V,
         r"features: squared distances between the features overflow"),
    # -------------------------------------------------------------------------------- memory layout
    _ok(LAY, "Fortran-ordered features", "otce(np.asfortranarray(xs), ys, xt, yt)", same_as_baseline, SAME),
    _ok(LAY, "negatively strided features and labels", "otce(negative_strides(xs), negative_strides(ys), xt, yt)",
        same_as_baseline, SAME + " (read in place)"),
    _ok(LAY, "every-other-element views", "otce(strided(xs), strided(ys), strided(xt), yt)", same_as_baseline,
        SAME + " (read in place)"),
    _ok(LAY, "read-only arrays", "otce(read_only(xs), read_only(ys), read_only(xt), read_only(yt))",
        same_as_baseline, SAME + " (never written)"),
    _ok(LAY, "big-endian features and labels", "otce(xs.astype('>f8'), ys.astype('>i8'), xt, yt)", same_as_baseline,
        SAME + " (features byte-swapped into a native copy)"),
    _ok(LAY, "misaligned buffer", "otce(unaligned(xs), ys, xt, yt)", same_as_baseline, SAME + " (aligned copy)"),
    _ok(LAY, "field of a packed structured array (9-byte strides)", "otce(struct_field(xs), ys, xt, yt)",
        same_as_baseline, SAME + " (contiguous copy)"),
    _ok(LAY, "nested Python lists", "otce(xs.tolist(), ys.tolist(), xt, yt)", same_as_baseline, SAME),
    # ------------------------------------------------------------------------------ dtypes and containers
    _err(DT, "float16 features", "otce(xs.astype(np.float16), ys, xt, yt)", T,
         r"source_features has dtype float16; only float32 and float64 are supported"),
    _err(DT, "integer features", "otce(xs, ys, xt.astype(np.int64), yt)", T,
         r"target_features has integer/bool dtype int64; features must be floating point"),
    _err(DT, "bool features", "otce(xs > 0, ys, xt, yt)", T, r"source_features has integer/bool dtype bool"),
    _err(DT, "complex features", "otce(xs.astype(complex), ys, xt, yt)", T,
         r"source_features has unsupported dtype complex128"),
    _err(DT, "object features", "otce(xs.astype(object), ys, xt, yt)", T, r"source_features has unsupported dtype object"),
    _err(DT, "string features", "otce(xs.astype('U3'), ys, xt, yt)", T, r"source_features has unsupported dtype <U3"),
    _err(DT, "ragged nested lists", "otce([[1.0, 2.0], [3.0]], ys, xt, yt)", T, r"source_features could not be read"),
    _err(DT, "sinkhorn: float16", "sinkhorn(xs, xt.astype(np.float16))", T, r"y has dtype float16"),
    _ok(DT, "float32 and float64 mixed", "otce(xs.astype(np.float32), ys, xt, yt)", solved_in_float64,
        "accepted; solved in float64 (`dtype` says so)"),
    # ----------------------------------------------------------------------------------------- devices
    _err(DEV, "CUDA tensor (DLPack) to a CPU-only build", "otce(on_device(xs), ys, xt, yt)", V,
         r"source_features lives on a CUDA device \(DLPack device type 2\); this segtransfer build computes on the "
         r"CPU only"),
    _err(DEV, "CUDA labels", "otce(xs, ys, xt, on_device(yt))", V, r"target_labels lives on a CUDA device"),
    _err(DEV, "ROCm tensor", "otce(xs, ys, on_device(xt, 10), yt)", V, r"target_features lives on a ROCm device"),
    _err(DEV, "CuPy-style __cuda_array_interface__", "otce(xs, ys, CudaArrayInterface(xt), yt)", V,
         r"target_features is a CUDA array; this segtransfer build computes on the CPU only"),
    _err(DEV, "mixed devices: target on the GPU, source on the host", "otce(xs, ys, on_device(xt), yt)", V,
         r"target_features lives on a CUDA device"),
    _err(DEV, "everything on the GPU", "otce(*(on_device(a) for a in (xs, ys, xt, yt)))", V,
         r"source_features lives on a CUDA device"),
    _err(DEV, "sinkhorn: weights on the GPU", "sinkhorn(xs, xt, a=on_device(np.full(60, 1 / 60)))", V,
         r"a lives on a CUDA device"),
    _err(DEV, "a broken __dlpack_device__", "otce(BrokenDevice(), ys, xt, yt)", T,
         r"source_features.__dlpack_device__\(\) did not return \(device_type, device_id\)"),
    # ------------------------------------------------------------------------------------------ memory
    _err(MEM, "dense problem larger than memory (sinkhorn)", "sinkhorn(big, big)", M,
         r"sinkhorn with 200000 x 200000 points needs 992.0 GB .* use fewer points"),
    _err(MEM, "dense problem larger than memory (otce, every pixel)", "otce(big, big_labels % 2, big, big_labels % 2)", M,
         r"needs 992.0 GB \(dense cost and truncated kernel: 992.0 GB.*lower n_pixels"),
    _err(MEM, "joint label tables larger than memory (200,000 distinct labels)",
         "otce(big, big_labels, big, big_labels, n_pixels=50)", M,
         r"joint label tables: .* the labels have 199999 x 199999 distinct classes"),
]

#: Parts of messages that depend on the machine, replaced in the document.
REDACT = [
    (re.compile(r"only [0-9.]+ [GM]B are available"), "only <80 % of free memory> are available"),
    (re.compile(r"threads must be <= \d+"), "threads must be <= <max(64, 4 x CPUs)>"),
    (re.compile(r"could not be read as an array: .*"), "could not be read as an array: <NumPy's reason>"),
]


# ------------------------------------------------------------------------------------------ running

@dataclass(frozen=True)
class Outcome:
    exception: BaseException | None
    result: Any
    warnings: list[str]


def run(case: Case) -> Outcome:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, exc = evaluate(case.expr), None
        except Exception as e:  # noqa: BLE001 - the outcome is what we document
            result, exc = None, e
    return Outcome(exc, result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])


def outcome_text(case: Case, out: Outcome) -> str:
    if out.exception is not None:
        msg = str(out.exception)
        for pattern, repl in REDACT:
            msg = pattern.sub(repl, msg)
        return f"**{type(out.exception).__name__}**: `{msg}`"
    return case.behaviour


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    lines = [
        "# Reliability: what bad and odd inputs do",
        "",
        "<!-- Generated by `python tests/reliability_cases.py --write`; do not edit by hand.",
        "     tests/test_reliability.py runs every row and fails when this file is out of date. -->",
        "",
        "Every row is a test (`tests/test_reliability.py`). The *call* column is the exact expression the test",
        "evaluates, with `otce = functools.partial(segtransfer.otce, n_pixels=None, threads=1)`,",
        "`sinkhorn = functools.partial(segtransfer.sinkhorn, threads=1)`, `xs` (60, 3) and `xt` (50, 3) standard",
        "normal float64, `ys` in {0, 1, 2}, `yt` in {0, 1}, `maps` (2, 3, 4, 5) with `labelmaps` (2, 4, 5),",
        "`big` (200000, 1), `big_labels = arange(200000)`. `on_device(a, t=2)` is an object whose",
        "`__dlpack_device__()` reports DLPack device type `t` (2 = CUDA): what a GPU tensor looks like to a build",
        "without CUDA. The helpers are in `tests/reliability_cases.py`. Exceptions name the argument at fault;",
        "inputs that are odd but valid are accepted with the behaviour stated (and asserted by the test).",
        "",
        "Policy: no input crashes the process, hangs, or returns NaN. Non-finite features among the valid",
        "(non-ignored) pixels are refused whatever the sampling would draw. Memory is estimated before any",
        "buffer whose size the user controls is allocated (dense cost, joint label tables, pixel indices),",
        "against 80 % of the least of MemAvailable, the cgroup's remaining limit and the address-space rlimit.",
        "",
    ]
    groups: dict[str, list[Case]] = {}
    for case in CASES:
        groups.setdefault(case.group, []).append(case)
    for group, cases in groups.items():
        lines += [f"## {group}", "", "| input | call | what the user gets |", "|---|---|---|"]
        for case in cases:
            lines.append(f"| {_cell(case.input)} | `{_cell(case.expr)}` | {_cell(outcome_text(case, run(case)))} |")
        lines.append("")
    lines += [
        "## Faults and load",
        "",
        "Tested in `tests/test_resources.py`; the fuzzing and sanitizer runs are in `.ci/run`.",
        "",
        "| situation | what happens |",
        "|---|---|",
        "| `timeout=` on a solve that cannot converge | each solve (each repeat) stops at its first check after "
        "the timeout, then certifies what it has and returns `converged=False`, `timed_out=True` and a "
        "RuntimeWarning naming the timeout; `max_iter` bounds the iterations of every solve the same way. The "
        "timeout is checked after every iteration and at every epsilon stage, so a solve overruns it by up to one "
        "iteration (~20-50 ms on the sparse kernels at N = 10^4; a dense float64 iteration at N = 10^4 ~0.6 s; "
        "in the blocked mode a whole pass over the plan) plus its certificate: one to three passes over the "
        "N x M plan (stored, N = 10^4: ~0.3-0.5 s; the blocked mode recomputes the cost for each: N = 2 x 10^4, "
        "D = 4, one thread: 4.3 s in all for `timeout=0.01`, N = 4 x 10^4: 16 s, and so on with N^2). The clock "
        "starts with the solve, after sampling and forming the cost (~1 s at N = 10^4 in float64 on a first "
        "call). Stopped before the last epsilon stage (a large problem with a very short timeout, or a tiny "
        "`max_iter`), a pair of c-transforms at the requested epsilon keeps every number finite (column "
        "marginal exact, error <= 2); the warning says the score is meaningless when the error exceeds 1. |",
        "| Ctrl-C during a call | KeyboardInterrupt within about 0.1 s (measured: 20-100 ms): the solver polls for "
        "signals every 50 ms with the GIL released in between, and calls made of many short solves (`repeats=10**5` "
        "at `n_pixels=8`) also check between repeats, at most every 50 ms. A signal in the first fraction of a second "
        "waits for the step under way before the first poll (input checks, sampling, forming the cost matrix): up to "
        "0.5-0.65 s measured at N = 8,000, D = 64, float32. The CLI exits with status 130. |",
        "| several Python threads calling at once | bit-identical to the same calls made serially: the GIL is released "
        "during solves and the core holds no shared mutable state. |",
        "| the same inputs and seed again, in another process, with another `threads` | bit-identical results (row "
        "blocks are fixed, sums are taken in a fixed order). The GPU path (issue 5) will document its own exceptions. |",
        "| `threads=` larger than the machine | accepted up to max(64, 4 x CPUs); more is refused (OpenMP would try to "
        "create them all and the process would die). |",
        "| an input that made the parser crash | fuzzed: `tests/fuzz/fuzz_api.py` (atheris when installed, else a "
        "seeded random mutator) drives `otce`/`sinkhorn` with decoded tiny arrays and arguments. `.ci/run` fuzzes "
        "it for 90 s from the corpus in `tests/fuzz/corpus/` (atheris from its wheel, coverage-guided on the "
        "Python package; the random mutator where no wheel installs), keeps new inputs outside the repo and fails "
        "on a finding, saved as `build/fuzz/crash-*`. The test-suite replays the corpus. |",
        "| memory errors in the C++ core | `SEGTRANSFER_SANITIZE=ON` builds the core and its unit tests with "
        "AddressSanitizer, LeakSanitizer and UndefinedBehaviorSanitizer; `.ci/run` builds them in `build/ci-san` "
        "and runs every unit test with leak detection on, UBSan halting at its first report and two OpenMP "
        "threads (about 4 min on 2 cores, cut off at 12 min); any report fails CI. |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--write" in sys.argv[1:]:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(text)
