"""Numerics shared by the benchmark's contenders: the common plan evaluator, a NumPy replica of POT's
plain log-domain Sinkhorn (used to count iterations where POT itself is too slow), the authors'
dense-tensor Sinkhorn recipe, and thin POT wrappers.

Nothing here is copied from POT or from the paper's code; POT's iteration is re-derived from its
documented algorithm and checked against POT itself (``harness.py --validate-replica``).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Exponents are clamped here before np.exp: exp of arguments below about -708 (results that are
#: subnormal or zero) takes a slow path that is 15-80x slower on this CPU, and at eps = 0.1 most plan
#: entries are that small. Each clamped entry then contributes e^-700 ~ 1e-304 instead of less,
#: i.e. at most N^2 * 1e-304 ~ 1e-296 to any sum: invisible in float64.
EXP_FLOOR = -700.0

# ----------------------------------------------------------------------------------------------
# Cost and evaluation (float64, streamed in row blocks; the N x N plan is never held at once)
# ----------------------------------------------------------------------------------------------


def centred64(xs: np.ndarray, xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs = np.asarray(xs, dtype=np.float64)
    xt = np.asarray(xt, dtype=np.float64)
    mu = (xs.sum(0) + xt.sum(0)) / (xs.shape[0] + xt.shape[0])
    return xs - mu, xt - mu


def cost_block(xs_c: np.ndarray, xt_c: np.ndarray, xt_sq: np.ndarray, rows: slice) -> np.ndarray:
    """Exact-as-float64-allows squared distances for a block of rows (centred inputs)."""
    xb = xs_c[rows]
    c = xb @ xt_c.T
    c *= -2.0
    c += np.einsum("ij,ij->i", xb, xb)[:, None]
    c += xt_sq[None, :]
    np.maximum(c, 0.0, out=c)
    return c


def cost64(xs: np.ndarray, xt: np.ndarray) -> np.ndarray:
    xs_c, xt_c = centred64(xs, xt)
    return cost_block(xs_c, xt_c, np.einsum("ij,ij->i", xt_c, xt_c), slice(None))


def conditional_entropy(joint: np.ndarray) -> float:
    """H(column label | row label) in nats of a (normalised here) joint table."""
    p = np.asarray(joint, dtype=np.float64)
    p = p / p.sum()
    ps = p.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p / ps), 0.0)
    return float(-t.sum())


def _onehot(codes: np.ndarray, k: int) -> np.ndarray:
    o = np.zeros((codes.shape[0], k))
    o[np.arange(codes.shape[0]), codes] = 1.0
    return o


def evaluate(xs, xt, ls, lt, *, f=None, g=None, eps=0.1, plan=None, block=256) -> dict:
    """Marginal error, transport cost, joint label table and H(Yt|Ys) of one plan, all in float64.

    The plan is either given densely (``plan``, any float dtype: evaluated as returned) or by
    potentials in segtransfer's convention, pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) with uniform
    a, b and C the float64 squared distances. ``ls``/``lt`` are label codes 0..Cs-1 / 0..Ct-1.
    marginal_error = ||pi 1 - a||_1 + ||pi^T 1 - b||_1 with a = b = uniform.
    """
    n, m = xs.shape[0], xt.shape[0]
    cs, ct = int(ls.max()) + 1, int(lt.max()) + 1
    xs_c, xt_c = centred64(xs, xt)
    xt_sq = np.einsum("ij,ij->i", xt_c, xt_c)
    ot_t = _onehot(lt, ct)
    row = np.empty(n)
    col = np.zeros(m)
    joint = np.zeros((cs, ct))
    tcost = 0.0
    if plan is None:
        f = np.asarray(f, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        shift_g = g / eps - math.log(m)  # log b_j + g_j / eps
    for r0 in range(0, n, block):
        rows = slice(r0, min(n, r0 + block))
        c = cost_block(xs_c, xt_c, xt_sq, rows)
        if plan is None:
            p = c * (-1.0 / eps)
            p += shift_g[None, :]
            p += ((f[rows] / eps) - math.log(n))[:, None]
            np.maximum(p, EXP_FLOOR, out=p)
            np.exp(p, out=p)
        else:
            p = np.asarray(plan[rows], dtype=np.float64)
        row[rows] = p.sum(1)
        col += p.sum(0)
        tcost += float(np.einsum("ij,ij->", p, c))
        np.add.at(joint, ls[rows], p @ ot_t)
    err_row = float(np.abs(row - 1.0 / n).sum())
    err_col = float(np.abs(col - 1.0 / m).sum())
    return {
        "marginal_error": err_row + err_col,
        "marginal_error_rows": err_row,
        "marginal_error_cols": err_col,
        "transport_cost": tcost,
        "mass": float(row.sum()),
        "conditional_entropy": conditional_entropy(joint),
        "finite": bool(np.isfinite(row).all() and np.isfinite(col).all()),
    }


# ----------------------------------------------------------------------------------------------
# Replica of POT's ot.sinkhorn(method="sinkhorn_log"): same iteration, faster NumPy
# ----------------------------------------------------------------------------------------------


class PlainLogSinkhorn:
    """POT's ``sinkhorn_log`` iteration in float64, re-implemented for speed.

    POT (0.9.x) keeps log-scalings u (rows) and v (columns), both starting at 0, with
    pi = exp(-C/eps + u_i + v_j), and in each iteration ii = 0, 1, ... does

        v = log b - logsumexp_i(-C/eps + u)      (columns exact)
        u = log a - logsumexp_j(-C/eps + v)      (rows exact)

    and, only when ii % 10 == 0, measures ||pi^T 1 - b||_2 and stops below ``stopThr``.
    This class performs the same updates in cache-sized row blocks on two threads. Its logsumexp is
    shifted by the previous potential instead of the row maximum (exp cannot overflow there because
    the other marginal is exact, so every plan entry is <= a_i resp. <= b_j); rows whose sum
    underflows are recomputed with the maximum shift. The results agree with POT to rounding.

    Because the column sums of the current plan are exp(v_j + lse_j) = b_j exp(v_j - v_new_j), the
    next v-update yields the exact column marginal of the current iterate for free: the L1 and L2
    marginal errors after every iteration are recorded without extra passes (one iteration late).
    """

    def __init__(self, cost: np.ndarray, eps: float, threads: int = 2, block_rows: int | None = None):
        n, m = cost.shape
        self.n, self.m = n, m
        self.mr = np.multiply(cost, -1.0 / eps, dtype=np.float64)  # (n, m) = -C/eps
        self.mrt = np.ascontiguousarray(self.mr.T)                  # (m, n)
        self.loga = np.full(n, -math.log(n))
        self.logb = np.full(m, -math.log(m))
        self.a = np.exp(self.loga)
        self.b = np.exp(self.logb)
        self.u = np.zeros(n)
        self.v = np.zeros(m)
        self.prev_u, self.prev_v = self.u, self.v
        # ~0.5 MB of float64 per block keeps a block in L2 while it is added, exponentiated and summed.
        self.block_rows = block_rows or max(8, min(64, 2**19 // (8 * max(n, m))))
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.iterations = 0
        self.err_l1: list[float] = []  # err_l1[k-1]: L1 error of the iterate after k iterations
        self.err_l2: list[float] = []  # idem, POT's measure ||pi^T 1 - b||_2
        self.err_rows: list[float] = []

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()

    def _lse_rows(self, mat: np.ndarray, vec: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """log sum_k exp(mat[r, k] + vec[k]) for every row r, shifting row r by ``shift[r]``."""
        rows_total = mat.shape[0]
        out = np.empty(rows_total)

        def work(r0: int, r1: int) -> None:
            buf = np.empty((self.block_rows, mat.shape[1]))
            for s in range(r0, r1, self.block_rows):
                e = min(r1, s + self.block_rows)
                w = buf[: e - s]
                np.add(mat[s:e], vec[None, :], out=w)
                w += shift[s:e, None]
                np.maximum(w, EXP_FLOOR, out=w)  # see EXP_FLOOR
                np.exp(w, out=w)
                tot = w.sum(1)
                bad = ~(tot > 1e-280) | ~np.isfinite(tot)
                with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                    res = np.log(tot) - shift[s:e]
                if bad.any():  # exact max shift for the few rows that under/overflowed
                    for r in np.flatnonzero(bad):
                        z = mat[s + r] + vec
                        mx = z.max()
                        res[r] = mx + math.log(np.exp(z - mx).sum())
                out[s:e] = res

        if self.pool is None:
            work(0, rows_total)
        else:
            step = -(-rows_total // self.threads)
            futs = [self.pool.submit(work, r0, min(rows_total, r0 + step)) for r0 in range(0, rows_total, step)]
            for fu in futs:
                fu.result()
        return out

    def step(self) -> None:
        self.prev_u, self.prev_v = self.u, self.v
        # v-update; its logsumexp also gives the column sums of the current iterate.
        lse_v = self._lse_rows(self.mrt, self.u, self.v)
        v_new = self.logb - lse_v
        if self.iterations > 0:
            colsum = np.exp(self.v + lse_v)
            d = colsum - self.b
            self.err_l1.append(float(np.abs(d).sum()) + (self.err_rows[-1] if self.err_rows else 0.0))
            self.err_l2.append(float(np.sqrt((d * d).sum())))
        self.v = v_new
        lse_u = self._lse_rows(self.mr, self.v, self.u)
        self.u = self.loga - lse_u
        # Row error of the new iterate: rows are exact up to rounding; record it honestly anyway.
        self.err_rows.append(float(np.abs(np.exp(self.u + lse_u) - self.a).sum()))
        self.iterations += 1

    def finalize_error(self) -> None:
        """Record the error of the last iterate (costs one column logsumexp pass)."""
        if len(self.err_l1) < self.iterations:
            lse_v = self._lse_rows(self.mrt, self.u, self.v)
            d = np.exp(self.v + lse_v) - self.b
            self.err_l1.append(float(np.abs(d).sum()) + self.err_rows[-1])
            self.err_l2.append(float(np.sqrt((d * d).sum())))

    def potentials(self, eps: float, previous: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(f, g) in segtransfer's convention, pi = a b exp((f + g - C)/eps), of the last iterate
        (or of the one before it with ``previous=True``)."""
        u, v = (self.prev_u, self.prev_v) if previous else (self.u, self.v)
        return eps * (u - self.loga), eps * (v - self.logb)


def pot_check_points(n_max: int) -> list[int]:
    """Iteration counts after which POT's sinkhorn_log looks at its error: ii = 0, 10, 20, ... -> 1, 11, 21..."""
    return list(range(1, n_max + 1, 10))


def first_reaching(errors: list[float], target: float, pot_schedule: bool) -> int | None:
    """Smallest iteration count n (1-based) whose error is <= target; on POT's check schedule if asked."""
    for k, e in enumerate(errors, start=1):
        if e <= target and (not pot_schedule or (k - 1) % 10 == 0):
            return k
    return None


def extrapolate_iterations(errors: list[float], target: float) -> int | None:
    """Linear-convergence extrapolation: fit log(err) ~ n over the last third, solve for target."""
    k = len(errors)
    if k < 1000:  # too short a run: early Sinkhorn phases (plateaus) say nothing about the final rate
        return None
    lo = (2 * k) // 3
    ns = np.arange(lo + 1, k + 1, dtype=np.float64)
    le = np.log(np.maximum(np.asarray(errors[lo:], dtype=np.float64), 1e-300))
    slope, icpt = np.polyfit(ns, le, 1)
    if not slope < 0:
        return None
    return int(math.ceil((math.log(target) - icpt) / slope))


# ----------------------------------------------------------------------------------------------
# The authors' recipe: dense (N, N, D) difference tensor, eps-scaled log-Sinkhorn, sum|du| < 0.1
# ----------------------------------------------------------------------------------------------


def authors_tensor_bytes(n: int, m: int, d: int, itemsize: int) -> int:
    """Peak bytes of ((xs[:,None,:] - xt[None,:,:])**2).sum(-1): the difference tensor and its square
    are alive together."""
    return 2 * n * m * d * itemsize


def _lse(x: np.ndarray, axis: int) -> np.ndarray:
    mx = x.max(axis=axis, keepdims=True)
    return (mx + np.log(np.exp(x - mx).sum(axis=axis, keepdims=True))).squeeze(axis)


def authors_sinkhorn(xs: np.ndarray, xt: np.ndarray, eps: float, thresh: float = 0.1, max_iter: int = 100,
                     deadline: float | None = None) -> dict:
    """The published recipe as described: cost from the dense difference tensor, potentials u, v (in
    cost units) updated as u <- u + eps (log mu - lse_j((u_i + v_j - C_ij)/eps)), then v likewise,
    stopping when sum_i |u_i - u_prev_i| < thresh or after max_iter. Works in the features' dtype."""
    t0 = time.perf_counter()
    cost = ((xs[:, None, :] - xt[None, :, :]) ** 2).sum(-1)
    t_cost = time.perf_counter() - t0
    dt = cost.dtype
    n, m = cost.shape
    log_mu = np.full(n, -math.log(n), dtype=dt)
    log_nu = np.full(m, -math.log(m), dtype=dt)
    u = np.zeros(n, dtype=dt)
    v = np.zeros(m, dtype=dt)
    it, err, stop = 0, float("inf"), "max_iter"
    for it in range(1, max_iter + 1):
        u_prev = u
        u = eps * (log_mu - _lse((u[:, None] + v[None, :] - cost) / eps, 1)) + u
        v = eps * (log_nu - _lse((u[:, None] + v[None, :] - cost) / eps, 0)) + v
        err = float(np.abs(u - u_prev).sum())
        if err < thresh:
            stop = "rule"
            break
        if deadline is not None and time.perf_counter() > deadline:
            stop = "budget"
            break
    plan = np.exp((u[:, None] + v[None, :] - cost) / eps)
    return {"plan": plan, "iterations": it, "last_du": err, "stop": stop, "t_cost": t_cost,
            "elapsed": time.perf_counter() - t0}
