"""Issue 3's end-to-end timing: one `st.otce` call with K repeats on the harness's data.

    PYTHONPATH=python python bench/k_repeats.py --dim 19 --repeats 10 --threads 2

N = 10^4 pixels a side drawn from a pool of 40,000 (`data.make_task_pair(D, 40000, seed=0, float32,
freq_spread=0.3)`, otce's own draws with seed 0), eps = 0.1 and the default tol. Prints the wall time,
the mean iterations a draw, whether every draw converged, the largest marginal error and the scores.
For an A/B of two builds, run both in one sitting: the 2-vCPU VMs drift by 5-10 % within an hour.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as bdata  # noqa: E402
import segtransfer as st  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=19)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=10_000, help="pixels per side")
    ap.add_argument("--tol", type=float, default=None, help="marginal error (default: otce's)")
    args = ap.parse_args()
    xs, ys, xt, yt = bdata.make_task_pair(args.dim, 40_000, seed=0, dtype="float32", freq_spread=0.3)
    kw: dict = dict(n_pixels=args.n, repeats=args.repeats, seed=0, threads=args.threads)
    if args.tol is not None:
        kw["tol"] = args.tol
    start = time.perf_counter()
    r = st.otce(xs, ys, xt, yt, **kw)
    wall = time.perf_counter() - start
    print(f"D={args.dim} K={args.repeats} threads={args.threads}: {wall:.2f} s, iterations {np.mean(r.iterations):.1f} "
          f"a draw, converged {bool(np.all(r.converged))}, max marginal error {np.max(r.marginal_error):.2e}, "
          f"score {r.score:.9f}")
    print("scores " + " ".join(f"{s:.8f}" for s in r.scores))


if __name__ == "__main__":
    main()
