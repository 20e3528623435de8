"""Public functions: ``otce`` and ``sinkhorn``. Validation and dispatch here; numerics in ``_core``."""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import numpy as np

from . import _core, _device
from ._arrays import IgnoreIndex, check_features, pixel_table, to_host_array
from ._result import OTCEResult, SinkhornResult

#: L1 marginal error at which a solve counts as converged. Measured on N = 10^4 logit features at
#: epsilon = 0.1, D = 19 and 256: |score - fully converged score| <= 4.7e-8, against the 1e-4 required
#: (bench/RESULTS.md, "The default tol against a fully converged score").
DEFAULT_TOL = 1e-6
#: Sinkhorn iterations per solve, all epsilon stages together.
DEFAULT_MAX_ITER = 50_000
SAMPLING_MODES = ("uniform",)
#: Largest value the core's 64-bit counters (max_iter, n_pixels, repeats) hold.
_INT64_MAX = 2**63 - 1


def _max_threads() -> int:
    """Upper bound on ``threads``: OpenMP creates every thread asked for, and a request for 10^5 of
    them exhausts the address space (the process dies). Generous against real machines."""
    return max(64, 4 * (os.cpu_count() or 1))


def _check_int(value: Any, name: str, *, minimum: int, maximum: int = _INT64_MAX) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _read_number(path: str) -> float | None:
    try:
        with open(path) as fh:
            text = fh.read().split()
        return float(text[0]) if text and text[0] != "max" else None
    except (OSError, ValueError):
        return None


def _stat_value(path: str, key: str) -> float:
    try:
        with open(path) as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                if name == key:
                    return float(value)
    except (OSError, ValueError):
        pass
    return 0.0


def _cgroup_room(root: str) -> float | None:
    """What the container's memory cgroup (v2, else v1, under ``root``) leaves, or None without a limit.

    The usage counts the page cache, which the kernel reclaims before it refuses memory: inside a
    container that has read a lot of data it alone could exhaust the limit. Inactive file pages are
    taken back out, as container runtimes do for their "working set".
    """
    for limit_file, usage_file, stat_file, inactive in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        limit, usage = _read_number(f"{root}/{limit_file}"), _read_number(f"{root}/{usage_file}")
        if limit is not None and usage is not None and limit < 2**62:  # "no limit" is ~2**63
            working = max(usage - _stat_value(f"{root}/{stat_file}", inactive), 0.0)
            return max(limit - working, 0.0)
    return None


def _memory_budget() -> float:
    """Bytes the dense buffers may take: 80 % of the least of what the OS reports as available, what
    the container's cgroup leaves (MemAvailable shows the host's memory there) and what the address-space
    rlimit leaves (``ulimit -v``; exceeding it makes allocations fail however much RAM is free)."""
    limits: list[float] = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    limits.append(float(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    if not limits:
        try:
            limits.append(float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")))
        except (ValueError, OSError, AttributeError):
            pass
    room = _cgroup_room("/sys/fs/cgroup")
    if room is not None:
        limits.append(room)
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            vm = _read_number("/proc/self/statm")  # pages of address space in use
            used = vm * os.sysconf("SC_PAGE_SIZE") if vm is not None else 0.0
            limits.append(max(float(soft) - used, 0.0))
    except (ImportError, ValueError, OSError):
        pass
    if not limits:
        return 0.0  # unknown: let the allocator decide
    return max(0.8 * min(limits), 1.0)  # 0 would mean "unchecked" to the core


def _gigabytes(nbytes: float) -> str:
    if nbytes >= 1e8:
        return f"{nbytes / 1e9:.1f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.0f} kB"


def _check_memory(what: str, parts: dict[str, tuple[float, str]], budget: float) -> None:
    """Raise MemoryError, before anything is allocated, when the buffers ``parts`` (name: (bytes, what to
    lower)) exceed ``budget``; the message names the sizes and the argument behind the largest one."""
    total = sum(nbytes for nbytes, _ in parts.values())
    if budget <= 0 or total <= budget:
        return
    detail = ", ".join(f"{name}: {_gigabytes(nbytes)}" for name, (nbytes, _) in parts.items() if nbytes >= 1e6)
    _, hint = max(parts.values(), key=lambda p: p[0])
    raise MemoryError(
        f"{what} needs {_gigabytes(total)}{f' ({detail})' if detail else ''} but only {_gigabytes(budget)} "
        f"are available; {hint}"
    )


def _check_bool(value: Any, name: str) -> bool:
    # Truth-testing would take the string "False" (a CLI or config layer's) for True.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def _options(epsilon: float, tol: float | None, max_iter: int | None, timeout: float | None,
             threads: int | None, blocked: bool = False) -> _core.SinkhornOptions:
    opt = _core.SinkhornOptions()
    opt.blocked = _check_bool(blocked, "blocked")
    opt.epsilon = _check_positive(epsilon, "epsilon")
    opt.tol = DEFAULT_TOL if tol is None else _check_positive(tol, "tol")
    opt.max_iter = DEFAULT_MAX_ITER if max_iter is None else _check_int(max_iter, "max_iter", minimum=1)
    opt.timeout = 0.0 if timeout is None else _check_positive(timeout, "timeout")
    opt.num_threads = (0 if threads is None
                       else _check_int(threads, "threads", minimum=1, maximum=_max_threads()))
    return opt


def _solver_memory(n: int, m: int, d: int, itemsize: int, opt: Any, row_groups: int, col_groups: int,
                   extra: float, hint: str) -> tuple[str, tuple[float, str]]:
    """The CPU solver's buffers for ``_check_memory``: the blocked solver's, or the stored cost and
    kernels' (whose hint names the blocked mode as the way out). ``extra``: bytes on top of either."""
    if opt.blocked:
        return "blocked solver's buffers", (
            _core.blocked_bytes(n, m, d, itemsize, opt.num_threads or 64, row_groups, col_groups) + extra, hint)
    return "dense cost and truncated kernel", (
        _core.dense_bytes(n, m, itemsize) + extra,
        f"{hint}, or pass blocked=True to recompute the cost instead of storing it")


def _refuse_blocked_on_gpu(opt: Any) -> None:
    if opt.blocked:
        raise ValueError("blocked=True is a CPU mode; the CUDA solver does not have it (pass device='cpu')")


def otce(
    source_features: Any,
    source_labels: Any,
    target_features: Any,
    target_labels: Any,
    *,
    n_pixels: int | None = 10_000,
    repeats: int = 10,
    epsilon: float = 0.1,
    seed: int = 0,
    ignore_index: IgnoreIndex = 255,
    sampling: str = "uniform",
    tol: float | None = None,
    max_iter: int | None = None,
    channels_last: bool = False,
    timeout: float | None = None,
    threads: int | None = None,
    device: Any = None,
    blocked: bool = False,
) -> OTCEResult:
    """OTCE transferability of a source task to a target task (Tan, Li, Huang), higher is better.

    Features are a ``(P, D)`` pixel table with labels ``(P,)``, or feature maps ``(B, D, H, W)``
    (``(B, H, W, D)`` with ``channels_last=True``) with label maps ``(B, H', W')``, which are resized
    to the feature resolution by nearest neighbour (PyTorch's convention). Pixels whose label is in
    ``ignore_index`` (an int, a sequence, or None) are never sampled.

    Each of ``repeats`` draws takes ``n_pixels`` distinct valid pixels per side uniformly at random
    (``seed`` makes it reproducible), solves entropic OT with cost ``|f_s - f_t|^2`` and ``epsilon`` by a
    log-domain Sinkhorn with epsilon-scaling until the L1 marginal error is ``<= tol``, and scores
    ``-H(Y_t | Y_s)`` from the plan's joint label distribution. ``n_pixels=None`` uses every valid
    pixel once (no sampling, so a single repeat).

    Precision: float64 inputs are solved in float64. float32 inputs keep the cost in float32 and
    evaluate exponentials in float32, with exponents, potentials and sums in float64 (the intermediate
    epsilon stages, and the last stage's Sinkhorn iterations before its Newton steps, form their
    exponents in float32 where float32 resolves them, i.e. while (max |C| + max |f| + max |g|) /
    epsilon stays below ~1.7e4; Newton and the certificate never do). Mixed inputs are solved in
    float64.

    ``blocked=True`` recomputes the cost from the features at every Sinkhorn iteration instead of
    storing it: memory O((N + M) D) plus its Newton finish's truncated copy of the plan (entries
    with C - f - g < 20 epsilon, at most 2 GiB; beyond, its products are recomputed) instead of
    O(N M), for draws whose cost does not fit (the default refuses those with a MemoryError before
    allocating). It is slower: O(N M D) work per Sinkhorn iteration, no truncated kernel and no
    multiscale start (bench/RESULTS.md, "Blocked mode"); the certificate, ``tol`` and the results
    mean the same. CPU only.

    ``threads``: None uses every core (OpenMP's default). With several, the repeats run side by side,
    one thread each, as far as memory allows; a solve of fewer than 10^5 cost entries (N x M) takes
    one thread whatever is asked, as its barriers would cost more than the threads save (and stall on a
    loaded machine). The results are the same bits for any ``threads``.

    ``device``: None computes where the features live (host, or the CUDA device of DLPack /
    ``__cuda_array_interface__`` inputs, read in place); ``"cuda"`` / ``"cuda:N"`` computes on a GPU and
    copies host inputs' sampled pixels there; ``"cpu"`` refuses device inputs. See docs/cuda.md.
    On an H200, K = 10 draws of N = 10^4 at the paper's epsilon (0.1) converge in about 2.8 s (the CPU
    path: 10-21 s on 2 cores); ``converged`` / ``marginal_error`` always say how it went.
    """
    start = time.perf_counter()
    if not isinstance(sampling, str) or sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    repeats = _check_int(repeats, "repeats", minimum=1)
    seed = _check_int(seed, "seed", minimum=0)
    if n_pixels is not None:
        n_pixels = _check_int(n_pixels, "n_pixels", minimum=1)
    channels_last = _check_bool(channels_last, "channels_last")
    opt = _options(epsilon, tol, max_iter, timeout, threads, blocked)
    gpu = _device.placement(device, {"source_features": source_features, "target_features": target_features},
                            {"source_labels": source_labels, "target_labels": target_labels})
    if gpu is not None:
        _refuse_blocked_on_gpu(opt)
    make_table = pixel_table if gpu is None else gpu.pixel_table

    src = make_table(source_features, source_labels, channels_last=channels_last,
                     ignore_index=ignore_index, side="source")
    tgt = make_table(target_features, target_labels, channels_last=channels_last,
                     ignore_index=ignore_index, side="target")
    if src.features.shape[2] != tgt.features.shape[2]:
        raise ValueError(
            f"target_features has {tgt.features.shape[2]} channels but source_features has "
            f"{src.features.shape[2]}: both must come from the same encoder"
        )
    for side, table in (("source", src), ("target", tgt)):
        if table.classes.size < 2:
            raise ValueError(
                f"{side}_labels has a single class ({table.classes[0]}) among its valid pixels; "
                "OTCE compares label structure and needs at least two classes per side"
            )
    xs, xt = src.features, tgt.features
    dtype = np.dtype(np.float64) if xs.dtype != xt.dtype else xs.dtype
    if n_pixels is not None:
        # Checked here rather than by the sampler: n_pixels may exceed what its int64 argument holds.
        for side, table in (("source", src), ("target", tgt)):
            if n_pixels > table.num_valid:
                raise ValueError(
                    f"{side}_labels has {table.num_valid} valid (non-ignored) pixels, fewer than "
                    f"n_pixels={n_pixels}; lower n_pixels or pass n_pixels=None to use them all")
    k = 1 if n_pixels is None else repeats
    ns = src.num_valid if n_pixels is None else n_pixels
    nt = tgt.num_valid if n_pixels is None else n_pixels
    cs, ct, d = int(src.classes.size), int(tgt.classes.size), xs.shape[2]
    # Every buffer whose size the user controls, in bytes. The joint tables mirror the core's plan
    # summary (up to 64 row blocks of Cs x Ct partial tables per solve) plus the (K, Cs, Ct) output
    # and its NumPy copy; pixel indices are made by the sampler and copied once by the bindings.
    # Balancing groups: up to max_groups k-means cells per class (kMaxGroups, otce.hpp).
    groups = int(_core.max_groups)
    solver_memory = _solver_memory(ns, nt, d, dtype.itemsize, opt, groups * cs, groups * ct, 8.0 * (ns + nt) * d,
                                   "lower n_pixels")
    memory = {
        solver_memory[0]: solver_memory[1],
        "joint label tables": (8.0 * cs * ct * (66 + 2 * k),
                               f"the labels have {cs} x {ct} distinct classes: merge or ignore some"),
        "pixel indices": (16.0 * k * (ns + nt) if n_pixels is not None else 8.0 * (ns + nt), "lower repeats"),
    }
    if gpu is not None:  # device memory: estimated and checked by the CUDA solver before it allocates
        del memory[solver_memory[0]]
    mixed = gpu is None and xs.dtype != xt.dtype  # solved in float64 (the CUDA path converts itself)
    if mixed:  # the core reads one type: the float32 side is converted whole, every pixel of it
        memory["float64 copy of the float32 features"] = (8.0 * (xs if xs.dtype == np.float32 else xt).size,
                                                          "pass both feature arrays in one precision")
    budget = _memory_budget()
    _check_memory(f"otce with n_pixels={ns}/{nt} and {k} repeat(s)", memory, budget)
    if mixed:
        xs, xt = xs.astype(np.float64, copy=False), xt.astype(np.float64, copy=False)

    if n_pixels is None:
        idx_s = np.flatnonzero(src.codes >= 0)[None, :]
        idx_t = np.flatnonzero(tgt.codes >= 0)[None, :]
    else:
        # Independent streams for the two sides; each draw is reproducible from (seed, side, repeat).
        # On a GPU the draw is made there, and is the same as the host's.
        sample = _core.sample_pixels if gpu is None else gpu.sample_pixels
        idx_s = sample(src.codes, n_pixels, repeats, 2 * seed, "source_labels")
        idx_t = sample(tgt.codes, n_pixels, repeats, 2 * seed + 1, "target_labels")

    if gpu is not None:
        out = gpu.otce(src, tgt, idx_s, idx_t, opt)
    else:
        solve = _core.otce_f32 if xs.dtype == np.float32 else _core.otce_f64
        out = solve(xs, src.codes, int(src.classes.size), np.ascontiguousarray(idx_s, dtype=np.int64),
                    xt, tgt.codes, int(tgt.classes.size), np.ascontiguousarray(idx_t, dtype=np.int64),
                    opt, budget)
    ce = out["conditional_entropy"]
    scores = 0.0 - ce  # not -ce: a zero entropy scores 0.0, not -0.0
    res = OTCEResult(
        score=float(scores.mean()),
        scores=scores,
        std=float(scores.std(ddof=1)) if k > 1 else 0.0,
        conditional_entropy=ce,
        transport_cost=out["transport_cost"],
        joint=out["joint"],
        source_classes=src.classes,
        target_classes=tgt.classes,
        iterations=out["iterations"],
        converged=out["converged"],
        marginal_error=out["marginal_error"],
        epsilon=opt.epsilon,
        tol=opt.tol,
        n_pixels=(int(idx_s.shape[1]), int(idx_t.shape[1])),
        repeats=k,
        seed=seed,
        dtype=str(dtype),
        elapsed=time.perf_counter() - start,
        timed_out=out["timed_out"],
        blocked=opt.blocked,
    )
    if not res.all_converged:
        bad = np.flatnonzero(~res.converged)
        cause = stop_cause(bool(res.timed_out.any()), bool(np.all(res.iterations[bad] < opt.max_iter)),
                           float(np.max(res.marginal_error[bad])))
        why = {"timeout": "timeout reached", "stalled": _STALLED, "diverged": _DIVERGED,
               "max_iter": f"max_iter={opt.max_iter} reached"}
        worst = float(np.max(res.marginal_error))
        warnings.warn(
            f"OTCE: Sinkhorn did not reach tol={opt.tol:g} in {bad.size} of {k} repeats ({why[cause]}; worst "
            f"marginal error {worst:.3g}); {unconverged_effect(worst)}{_ADVICE[cause]}",
            RuntimeWarning,
            stacklevel=2,
        )
    return res


def stop_cause(timed_out: bool, below_max_iter: bool, worst: float) -> str:
    """Why a solve ended unconverged, from its worst L1 marginal error ``worst``: 'timeout',
    'max_iter', 'stalled' (its error stopped falling; more iterations would not help) or 'diverged'
    (it stopped with an error above the plan's total mass, or none: the iterate ran away, which
    resolution limits never do)."""
    if timed_out:
        return "timeout"
    if not below_max_iter:
        return "max_iter"
    return "stalled" if worst <= 1.0 else "diverged"


def unconverged_effect(worst: float, subject: str = "the score") -> str:
    """What a plan that missed tol with L1 marginal error ``worst`` is worth (warnings and CLI);
    ``subject``: what the caller got from it (otce: the score; sinkhorn: the transport cost)."""
    if not worst <= 1.0:
        # Above the plan's total mass (or NaN): the iterate diverged or was stopped before it
        # reached epsilon, and the plan is no coupling at all.
        return f"the plan is far from feasible and {subject} is meaningless"
    if worst > 1e-2:
        return f"the plan misses its marginals by over 1 % and {subject} is unreliable"
    return f"{subject} may be off"


_ADVICE = {"timeout": ". Raise timeout, or loosen tol.", "max_iter": ". Raise max_iter, or loosen tol.",
           "stalled": ".", "diverged": "."}


def _weights(w: Any, n: int, name: str) -> np.ndarray | None:
    if w is None:
        return None
    arr = to_host_array(w, name)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must hold finite weights > 0")
    if abs(arr.sum() - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1 (got {arr.sum():.8g})")
    return arr / arr.sum()


def sinkhorn(
    x: Any,
    y: Any,
    *,
    epsilon: float = 0.1,
    a: Any = None,
    b: Any = None,
    tol: float | None = None,
    max_iter: int | None = None,
    timeout: float | None = None,
    threads: int | None = None,
    device: Any = None,
    blocked: bool = False,
) -> SinkhornResult:
    """Entropic OT between point clouds ``x (n, d)`` and ``y (m, d)`` with cost ``|x_i - y_j|^2``.

    Returns potentials with ``pi_ij = a_i b_j exp((f_i + g_j - C_ij) / epsilon)``; ``a`` and ``b``
    (positive, summing to 1 within 1e-6, then divided by their sum so that they sum to 1 in float64)
    default to uniform weights. Same solver and precision rules as ``otce``;
    ``device`` and ``blocked`` as in ``otce``.
    """
    gpu = _device.placement(device, {"x": x, "y": y}, {"a": a, "b": b})
    if gpu is not None:
        opt = _options(epsilon, tol, max_iter, timeout, threads, blocked)
        _refuse_blocked_on_gpu(opt)
        shape: tuple[int, ...] = tuple(getattr(x, "shape", ()))
        dim = int(shape[1]) if len(shape) == 2 else None
        return _sinkhorn_result({**gpu.sinkhorn(x, y, a, b, opt, _weights), "dim": dim}, opt)
    xa = check_features(to_host_array(x, "x"), "x")
    ya = check_features(to_host_array(y, "y"), "y")
    for name, arr in (("x", xa), ("y", ya)):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D (points, dims) array, got shape {arr.shape}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"{name} must have at least one point and one dimension, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or infinite values")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"x has {xa.shape[1]} dimensions but y has {ya.shape[1]}")
    dtype = np.float64 if np.float64 in (xa.dtype, ya.dtype) else np.float32
    xa = np.ascontiguousarray(xa, dtype=dtype)
    ya = np.ascontiguousarray(ya, dtype=dtype)
    wa = _weights(a, xa.shape[0], "a")
    wb = _weights(b, ya.shape[0], "b")
    opt = _options(epsilon, tol, max_iter, timeout, threads, blocked)
    n, m = xa.shape[0], ya.shape[0]
    budget = _memory_budget()
    # Balancing groups: up to max_groups k-means cells per side (kMaxGroups, otce.hpp).
    groups = int(_core.max_groups)
    name, need = _solver_memory(n, m, xa.shape[1], np.dtype(dtype).itemsize, opt, groups, groups, 0.0,
                                "use fewer points (x and y)")
    _check_memory(f"sinkhorn with {n} x {m} points", {name: need}, budget)
    solve = _core.sinkhorn_f32 if dtype == np.float32 else _core.sinkhorn_f64
    out = solve(xa, ya, wa, wb, opt, budget)
    return _sinkhorn_result({**out, "a": wa, "b": wb, "dim": int(xa.shape[1])}, opt)


#: Why a solve that neither timed out nor spent max_iter stopped unconverged: the last stage's error
#: stopped falling, close to float64's resolution for the cost scale (rounding of order
#: largest cost / epsilon * 2**-52 in every exponent), where no iteration can lower it, or came
#: within twice that resolution where it exceeds tol (no certificate could pass) and stopped
#: falling fast there (a Newton step no longer halved it), or stalled on a
#: nearly unregularised problem (cost / epsilon ~ 1e7-1e10) after ~300,000 iterations without gain.
_STALLED = ("the marginal error stopped falling or reached float64's resolution for this cost scale, "
            "or stalled on a nearly unregularised problem; a larger epsilon or tol, or smaller features, "
            "would help")
#: Why a solve stopped with a marginal error above the plan's total mass (stop_cause's 'diverged').
_DIVERGED = "the iteration diverged, its potentials far from any coupling; a larger epsilon would help"


def _sinkhorn_result(out: dict[str, Any], opt: Any) -> SinkhornResult:
    """The result of either solver (same keys), with the non-convergence warning."""
    res = SinkhornResult(
        f=out["f"], g=out["g"], transport_cost=float(out["transport_cost"]), iterations=int(out["iterations"]),
        converged=bool(out["converged"]), marginal_error=float(out["marginal_error"]), epsilon=opt.epsilon,
        tol=opt.tol, timed_out=bool(out["timed_out"]), blocked=opt.blocked, a=out.get("a"), b=out.get("b"),
        dim=out.get("dim"),
    )
    if not res.converged:
        cause = stop_cause(res.timed_out, res.iterations < opt.max_iter, res.marginal_error)
        why = {"timeout": " (timeout reached)", "stalled": f" ({_STALLED})", "diverged": f" ({_DIVERGED})",
               "max_iter": ""}
        warnings.warn(
            f"sinkhorn: did not reach tol={opt.tol:g} (marginal error {res.marginal_error:.3g} after "
            f"{res.iterations} iterations{why[cause]}); "
            f"{unconverged_effect(res.marginal_error, 'its transport cost')}{_ADVICE[cause]}",
            RuntimeWarning,
            stacklevel=3,
        )
    return res


def cuda_available() -> bool:
    """True when this build has the CUDA backend and a CUDA device is usable right now."""
    return bool(_core.built_with_cuda()) and _core.cuda_device_count() > 0
