"""One OTCE draw of the harness's data, stored or blocked, for the scaling rows of RESULTS.md.

    PYTHONPATH=python python bench/one_draw.py --n 100000 --dim 19 --blocked --timeout 1800

Same data and pixels as `harness.py --sizes N --dims D --repeats 1 --pool max(40000, 2N)` (otce's own
draw with seed 0). Run it under `/usr/bin/time -v` for the peak RSS, with SEGTRANSFER_DEBUG=1 for the
solver's stage log on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as bdata  # noqa: E402
import segtransfer as st  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="pixels per side")
    ap.add_argument("--dim", type=int, default=19)
    ap.add_argument("--blocked", action="store_true", help="recompute the cost instead of storing it")
    ap.add_argument("--timeout", type=float, default=None, help="seconds (the solve reports not converged)")
    args = ap.parse_args()
    xs, ys, xt, yt = bdata.make_task_pair(args.dim, max(40_000, 2 * args.n), seed=0, dtype="float32",
                                          freq_spread=0.3)
    t = time.perf_counter()
    r = st.otce(xs, ys, xt, yt, n_pixels=args.n, repeats=1, seed=0, timeout=args.timeout, blocked=args.blocked)
    print(f"N={args.n} D={args.dim} blocked={args.blocked}: {time.perf_counter() - t:.1f} s, "
          f"iterations {int(r.iterations[0])}, converged {bool(r.converged[0])}, marginal error "
          f"{float(r.marginal_error[0]):.2e}, score {r.score:.9f}")


if __name__ == "__main__":
    main()
