#!/usr/bin/env python3
"""Seeded sweep of medium-size ``otce`` calls (50-3,000 pixels a side, D in {1, ..., 256}, 1-29 classes)
on adversarial data: tight clusters, duplicates, a shifted target, integer grids, sparse one-hot
features, per-channel scales spanning 10^-3..10^2, imbalanced labels; epsilon 0.01-1, stored and
blocked, float32 and float64. Reports a call that takes over 10 s, runs past ``--limit`` (HANG), scores
outside [-log(Ct), 0] or NaN (BAD), or ends unconverged (UNCONV, with the warning it gave). Writes nothing
unless ``--save DIR`` is given (one .npz per reported call, with its keyword arguments).

    python tests/fuzz/medium_sweep.py --seed 1 --seconds 1500 [--mode stored]

``--mode stored`` (or ``blocked``) solves every call in that mode, the calls otherwise as drawn: the
blocked quarter of a mixed sweep takes most of its time, and the stored solves of blocked-drawn calls
found two stored failures (bench/RESULTS.md, sessions 53-54).

Session 29 (bench/RESULTS.md): its first run found two calls that never ended and several taking 10-27 s,
from class balancing on hundreds of tiny (class, cell) groups and from a small problem's last stage that
crawled densely; the UNCONV reports left are nearly unregularised calls (cost / eps >= ~10^7).
"""
from __future__ import annotations

import argparse
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import segtransfer as st


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    n, m = int(rng.integers(50, 3000)), int(rng.integers(50, 3000))
    d = int(rng.choice([1, 2, 3, 8, 19, 64, 256]))
    kind = int(rng.integers(7))
    cs, ct = int(rng.integers(1, 30)), int(rng.integers(1, 30))
    x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    if kind == 1:  # tight clusters shared by both sides
        k = int(rng.integers(2, 20))
        centres = rng.normal(size=(k, d)) * 5
        x = centres[rng.integers(0, k, n)] + 0.05 * rng.normal(size=(n, d))
        y = centres[rng.integers(0, k, m)] + 0.05 * rng.normal(size=(m, d))
    elif kind == 2:  # duplicated pixels
        x = np.resize(np.repeat(x[: max(1, n // 50)], 50, axis=0), (n, d))
    elif kind == 3:  # target shifted away
        y = y + rng.uniform(1, 100)
    elif kind == 4:  # integer grid (ties)
        x, y = np.round(x * 2), np.round(y * 2)
    elif kind == 5:  # sparse one-hot-like features
        x = (rng.random((n, d)) < 0.1).astype(float)
        y = (rng.random((m, d)) < 0.1).astype(float)
    elif kind == 6:  # channels on very different scales
        scales = 10 ** rng.uniform(-3, 2, size=d)
        x, y = x * scales, y * scales
    scale = 10 ** rng.uniform(-2, 2)
    dtype = str(rng.choice(["float32", "float64"]))
    xs, xt = (x * scale).astype(dtype), (y * scale).astype(dtype)
    ls, lt = rng.integers(0, cs, n), rng.integers(0, ct, m)
    if rng.random() < 0.3:
        ls = np.minimum(rng.geometric(0.5, n) - 1, cs)  # imbalanced classes
    kw = dict(n_pixels=int(min(n, m, rng.integers(20, 2000))), repeats=int(rng.integers(1, 4)),
              epsilon=float(rng.choice([0.1, 0.1, 0.01, 1.0])), seed=int(rng.integers(1000)),
              blocked=bool(rng.random() < 0.25), tol=float(rng.choice([1e-6, 1e-6, 1e-4, 1e-8])), threads=1)
    return xs, ls, xt, lt, kw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--limit", type=float, default=60.0, help="seconds before a call counts as a hang")
    ap.add_argument("--save", type=Path, default=None)
    ap.add_argument("--mode", choices=("any", "stored", "blocked"), default="any",
                    help="solve every call stored or blocked instead of as drawn (the same calls otherwise): "
                         "blocked calls take most of a mixed sweep's time")
    ns = ap.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    rng = np.random.default_rng(ns.seed)
    end = time.monotonic() + ns.seconds
    count = flagged = hangs = 0
    while time.monotonic() < end:
        xs, ls, xt, lt, kw = _case(rng)
        if ns.mode != "any":
            kw["blocked"] = ns.mode == "blocked"
        count += 1
        t = time.monotonic()
        try:
            signal.setitimer(signal.ITIMER_REAL, ns.limit)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r = st.otce(xs, ls, xt, lt, **kw)
            ct = len(np.unique(lt))
            ok = bool(np.all(np.isfinite(r.scores)) and np.all(r.scores <= 1e-9)
                      and np.all(r.scores >= -math.log(ct) - 1e-6))
            outcome = (f"score={r.score:.5f} converged={r.converged.tolist()} error={r.marginal_error.max():.2g} "
                       f"iterations={r.iterations.tolist()}")
            if not ok:
                outcome = "BAD " + outcome
            elif not r.all_converged:
                outcome = "UNCONV " + outcome + " " + (str(caught[-1].message)[:120] if caught else "NO WARNING")
        except Hang:
            outcome, hangs = "HANG", hangs + 1
        except (ValueError, MemoryError, TypeError) as exc:
            outcome = f"refused {type(exc).__name__}: {str(exc)[:80]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.monotonic() - t
        if elapsed > 10 or outcome.startswith(("BAD", "HANG", "UNCONV")):
            flagged += 1
            print(f"{elapsed:6.1f} s  #{count} {xs.shape} / {xt.shape} {xs.dtype} {kw}: {outcome}", flush=True)
            if ns.save is not None:
                ns.save.mkdir(parents=True, exist_ok=True)
                np.savez(ns.save / f"medium_{ns.seed}_{count}.npz", xs=xs, ls=ls, xt=xt, lt=lt, kw=repr(kw))
    print(f"{count} calls, {flagged} flagged, {hangs} hangs (limit {ns.limit:g} s)")
    return 1 if hangs else 0


if __name__ == "__main__":
    raise SystemExit(main())
