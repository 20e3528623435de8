"""Dense NumPy prototype of the Newton polish planned for the CUDA solver (docs/cuda.md, "Next").

The GPU solver has only epsilon scaling and over-relaxed Sinkhorn, which at epsilon = 0.1 needs tens of
thousands of iterations (bench/RESULTS.md, "GPU, session 22"). This prototype checks, on the benchmark's
data and on the *dense* plan (what a GPU pass streams), that the CPU solver's Newton formulation
(sinkhorn.cpp, newton_polish) carries over: the column block eliminated exactly (CG on the Schur
complement S = D1 - P D2^-1 P^T), Levenberg-Marquardt damping (lambda from 1e-3, / 3 after a full step,
x 10 after a rejected one), forcing 0.1, and the two-level preconditioner z = D^-1 r + Z E^-1 Z^T r over
the source classes (E = Z^T S Z). Each CG iteration is one product S v: a column pass (P^T v) and a row
pass (P w) over the cost, i.e. the work of one Sinkhorn iteration on the GPU.

    python bench/gpu_newton_prototype.py --dim 19 --n 2000 [--no-coarse] [--floor 1e-6]

Starts from the CPU solver's potentials at tol 1e-1 (epsilon = 0.1), stops at 1e-7. Measured
2026-12-04 (draw 0, D = 19, N = 2000): 10 Newton steps and 263 products S v with the coarse level
(11 steps, 402 with the CPU's operator floor 1e-6), 906 with Jacobi alone; the same start through Sinkhorn with
over-relaxation (the GPU's current algorithm, emulated by the CPU solver with truncation, Newton and
multiscale off) had not reached 1e-6 after 40,000 iterations.
D = 256, N = 2000: 17 steps, 468 products with the coarse level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as bdata  # noqa: E402


def newton_schur(C, a, b, eps, f, g, row_class, *, coarse=True, floor=0.0, target=1e-7, max_steps=40, log=print):
    """Newton on the dual (f, g) of entropic OT with cost C; returns (f, g, error, steps, products)."""
    n, m = C.shape

    def plan(f, g):
        return np.exp((f[:, None] + g[None, :] - C) / eps) * a[:, None] * b[None, :]

    def error(p):
        return np.abs(p.sum(1) - a).sum() + np.abs(p.sum(0) - b).sum()

    p = plan(f, g)
    err, lam, products = error(p), 1e-3, 0
    groups = int(row_class.max()) + 1
    Z = np.zeros((n, groups))
    Z[np.arange(n), row_class] = 1.0
    for step in range(max_steps):
        if err <= target:
            return f, g, err, step, products
        r, c = p.sum(1), p.sum(0)
        pk = p * (p >= floor * min(a.min(), b.min()))  # CG's operator (the residuals use every entry)
        inv_c = 1.0 / ((1.0 + lam) * c)
        rhs = (a - r) - pk @ ((b - c) * inv_c)
        diag = (1.0 + lam) * r - (pk * pk * inv_c[None, :]).sum(1)
        dinv = np.where(diag > 1e-12 * r, 1.0 / diag, 0.0)

        def schur(v):
            nonlocal products
            products += 1
            return (1.0 + lam) * r * v - pk @ ((pk.T @ v) * inv_c)

        if coarse:
            U = pk.T @ Z
            E_inv = np.linalg.pinv(Z.T @ ((1.0 + lam) * r[:, None] * Z) - U.T @ (U * inv_c[:, None]))

        def precondition(v):
            return dinv * v + (Z @ (E_inv @ (Z.T @ v)) if coarse else 0.0)

        x = np.zeros(n)
        res = rhs.copy()
        z = precondition(res)
        d = z.copy()
        rz = res @ z
        stop = 0.1 * np.linalg.norm(rhs)
        for cg in range(1, 20 * n + 1):
            q = schur(d)
            alpha = rz / (d @ q)
            x += alpha * d
            res -= alpha * q
            if np.linalg.norm(res) <= stop:
                break
            z = precondition(res)
            rz, rz_old = res @ z, rz
            d = z + (rz / rz_old) * d
        w = (b - c - pk.T @ x) * inv_c
        t = 1.0
        while t > 1e-3:
            p_try = plan(f + t * eps * x, g + t * eps * w)
            err_try = error(p_try)
            if err_try < err:
                break
            t *= 0.5
        if err_try < err:
            f, g, p, err = f + t * eps * x, g + t * eps * w, p_try, err_try
            if t == 1.0:
                lam /= 3.0
        else:
            lam = max(1e-3, 10.0 * lam)
        log(f"step {step}: cg {cg} t {t:g} error {err:.3e} lambda {lam:.1e} products {products}")
    return f, g, err, max_steps, products


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=19)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--floor", type=float, default=0.0)
    ap.add_argument("--no-coarse", action="store_true")
    args = ap.parse_args(argv)
    import segtransfer as st

    xs, ys, xt, yt = bdata.make_task_pair(args.dim, 40_000, 0, "float32", freq_spread=0.3)
    idx_s, idx_t, _ = bdata.draw_indices(ys, yt, args.n, 1, 0)
    x, y = xs[idx_s[0]].astype(np.float64), xt[idx_t[0]].astype(np.float64)
    row_class = bdata.valid_codes(ys)[idx_s[0]]
    mu = np.concatenate([x, y]).mean(0)
    xc, yc = x - mu, y - mu
    C = np.maximum((xc**2).sum(1)[:, None] + (yc**2).sum(1)[None, :] - 2.0 * xc @ yc.T, 0.0)
    a, b = np.full(args.n, 1.0 / args.n), np.full(args.n, 1.0 / args.n)
    start = st.sinkhorn(x, y, epsilon=args.epsilon, tol=1e-1)
    print(f"start: error {start.marginal_error:.3e} after {start.iterations} CPU solver iterations")
    _, _, err, steps, products = newton_schur(C, a, b, args.epsilon, start.f.copy(), start.g.copy(), row_class,
                                              coarse=not args.no_coarse, floor=args.floor)
    print(f"error {err:.3e}: {steps} Newton steps, {products} products S v")
    return 0


if __name__ == "__main__":
    sys.exit(main())
