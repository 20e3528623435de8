#!/usr/bin/env python3
"""Seeded sweep for solves that never end: small random problems (2-24 points a side, 1-5 dims) scaled
to a largest cost / epsilon of 10^3-10^11.9, solved with max_iter=2**62 (so only the solver's own
stopping rules end them), stored and blocked, float64 and float32. A call still running after
``--limit`` seconds is interrupted (the solver polls Python signals) and reported as HANG; calls over
2 s are listed. Writes nothing unless ``--save DIR`` is given (one .npz per slow call).

    python tests/fuzz/stall_sweep.py --seed 3 --seconds 360               # tols of the fuzz target
    python tests/fuzz/stall_sweep.py --seed 1 --seconds 400 --tight       # tols down to 1e-12

Session 28 (bench/RESULTS.md): before its fixes, --tight found 7 hangs in 28,045 calls; after them,
--tight 33,593 calls and the fuzz target's tols 37,047 calls, no hang, the slowest 4.3 s.
"""
from __future__ import annotations

import argparse
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--limit", type=float, default=10.0, help="seconds before a call counts as a hang")
    ap.add_argument("--tight", action="store_true", help="tol drawn from 1e-12..1e-3 (log-uniform)")
    ap.add_argument("--save", type=Path, default=None)
    ns = ap.parse_args()
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGALRM, _alarm)
    rng = np.random.default_rng(ns.seed)
    end = time.monotonic() + ns.seconds
    count = slow = hangs = 0
    while time.monotonic() < end:
        n, m, d = (int(v) for v in (rng.integers(2, 25), rng.integers(2, 25), rng.integers(1, 6)))
        ratio = 10 ** rng.uniform(3, 11.9)
        kind = int(rng.integers(4))  # 0 random, 1 target near source points, 2 rounded (ties), 3 same sets
        x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d))
        if kind == 1:
            y = x[rng.integers(0, n, m)] + 1e-3 * rng.normal(size=(m, d))
        elif kind == 2:
            x, y = np.round(x), np.round(y)
        elif kind == 3:
            y = x.copy()
        c = ((x[:, None] - y[None]) ** 2).sum(-1).max()
        if c == 0:
            continue
        s = np.sqrt(ratio * 0.5 / c)
        dtype = str(rng.choice(["float64", "float32"]))
        tol = float(10 ** rng.uniform(-12, -3)) if ns.tight else float(rng.choice([1e-6, 1e-3, 1e-6, 1e-4]))
        kw = dict(epsilon=0.5, max_iter=2**62, blocked=bool(rng.integers(2)), tol=tol)
        xs, ys = (x * s).astype(dtype), (y * s).astype(dtype)
        t = time.monotonic()
        try:
            signal.setitimer(signal.ITIMER_REAL, ns.limit)
            r = st.sinkhorn(xs, ys, **kw)
            outcome = f"converged={r.converged} error={r.marginal_error:.3g} iterations={r.iterations}"
        except Hang:
            outcome, hangs = "HANG", hangs + 1
        except ValueError as exc:  # cost / epsilon beyond the solver's range: refused
            outcome = f"refused ({str(exc)[:40]})"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.monotonic() - t
        count += 1
        if elapsed > 2:
            slow += 1
            print(f"{elapsed:5.1f} s  {n} x {m}, d={d}, cost/eps {ratio:.2e}, kind {kind}, {dtype}, "
                  f"blocked={kw['blocked']}, tol {tol:.2g}: {outcome}", flush=True)
            if ns.save is not None:
                ns.save.mkdir(parents=True, exist_ok=True)
                np.savez(ns.save / f"slow_{ns.seed}_{count}.npz", x=xs, y=ys, tol=tol, blocked=kw["blocked"])
    print(f"{count} calls, {slow} over 2 s, {hangs} hangs (limit {ns.limit:g} s)")
    return 1 if hangs else 0


if __name__ == "__main__":
    raise SystemExit(main())
