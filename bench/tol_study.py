"""How far from the fully converged OTCE score a solve stopped at `tol` lands (issue 2: the default
tol must keep |score - converged score| <= 1e-4). Solves the harness's draws one by one at several
tolerances; the tightest is the reference. Prints a Markdown table for bench/RESULTS.md.

    PYTHONPATH=python python bench/tol_study.py --dims 19 256 --draws 3
"""

from __future__ import annotations

import argparse
import time
import warnings

import data
import segtransfer as st

TOLS = (1e-4, 1e-5, 1e-6, 1e-8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[19, 256])
    ap.add_argument("--draws", type=int, default=3, help="first DRAWS of the harness's K = 10 draws")
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args()
    head = " | ".join(f"tol {t:.0e}: abs(score - ref)" for t in TOLS[:-1])
    times = " / ".join(f"{t:.0e}" for t in TOLS)
    print(f"| D | draw | {head} | time at {times} (s) | certified error at {TOLS[-1]:.0e} |")
    print("|---|---|" + "---|" * (len(TOLS) - 1) + "---|---|")
    warnings.simplefilter("ignore", RuntimeWarning)
    for dim in args.dims:
        xs, ys, xt, yt = data.make_task_pair(dim, 40_000, seed=0, dtype="float32", freq_spread=0.3)
        idx_s, idx_t, how = data.draw_indices(ys, yt, args.n, 10, seed=0)
        assert how == "segtransfer", "needs segtransfer's sampler to reproduce the harness's draws"
        for k in range(args.draws):
            scores, secs, errs = [], [], []
            for tol in TOLS:
                t0 = time.perf_counter()
                r = st.otce(xs[idx_s[k]], ys[idx_s[k]], xt[idx_t[k]], yt[idx_t[k]], n_pixels=None, repeats=1,
                            tol=tol)
                secs.append(time.perf_counter() - t0)
                if not r.converged.all():
                    raise SystemExit(f"D={dim} draw {k} did not converge at tol={tol:g}")
                scores.append(r.score)
                errs.append(float(r.marginal_error[0]))
            ref = scores[-1]
            gaps = " | ".join(f"{abs(s - ref):.1e}" for s in scores[:-1])
            print(f"| {dim} | {k} | {gaps} | {' / '.join(f'{s:.1f}' for s in secs)} | {errs[-1]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
