"""Independent pure-NumPy reference for the quantities segtransfer computes.

Everything here is float64, dense and deliberately simple (no truncation, no over-relaxation, no
fast exponentials), so that it shares no code and no numerical shortcut with the C++ core.

Convention (the library's): pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps), C_ij = |x_i - y_j|^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def logsumexp(z: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(z), axis)) with the max-shift trick (no SciPy)."""
    mx = np.max(z, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    out = np.log(np.sum(np.exp(z - mx), axis=axis, keepdims=True)) + mx
    return np.squeeze(out, axis=axis)


def sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact-as-possible squared Euclidean distances in float64 (difference first, no GEMM trick)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def log_plan(cost: np.ndarray, a: np.ndarray, b: np.ndarray, f: np.ndarray, g: np.ndarray,
             eps: float) -> np.ndarray:
    return np.log(a)[:, None] + np.log(b)[None, :] + (f[:, None] + g[None, :] - cost) / eps


def plan(cost, a, b, f, g, eps) -> np.ndarray:
    return np.exp(log_plan(cost, a, b, f, g, eps))


def marginal_error(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """||pi 1 - a||_1 + ||pi^T 1 - b||_1, the library's convergence measure."""
    return float(np.abs(p.sum(1) - a).sum() + np.abs(p.sum(0) - b).sum())


@dataclass
class RefSinkhorn:
    f: np.ndarray
    g: np.ndarray
    plan: np.ndarray
    transport_cost: float
    marginal_error: float
    iterations: int


def sinkhorn(cost: np.ndarray, eps: float, a: np.ndarray | None = None, b: np.ndarray | None = None, *,
             tol: float = 1e-13, max_iter: int = 200_000, eps_scaling: bool = True) -> RefSinkhorn:
    """Dense log-domain Sinkhorn (alternate exact f and g updates) in float64.

    With ``eps_scaling`` the regularisation starts at max(C) and is halved down to ``eps``, each stage
    warm-starting the next (intermediate stages stop at a loose 1e-3); this only makes the hard regime
    (C/eps ~ 10^3) reachable in reasonable time and does not change the fixed point of the last stage.
    The last stage runs until the L1 marginal error of the dense plan is <= ``tol``.
    Raises RuntimeError if it cannot get there: a reference that did not converge is useless.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    a = np.full(n, 1.0 / n) if a is None else np.asarray(a, dtype=np.float64)
    b = np.full(m, 1.0 / m) if b is None else np.asarray(b, dtype=np.float64)
    la, lb = np.log(a), np.log(b)
    f = np.zeros(n)
    g = np.zeros(m)
    schedule = []
    if eps_scaling:
        e = float(cost.max())
        while e > eps:
            schedule.append(e)
            e *= 0.5
    schedule.append(float(eps))
    it = 0
    err = np.inf
    for s, e in enumerate(schedule):
        target = tol if s + 1 == len(schedule) else 1e-3
        while True:
            # f_i = -e log sum_j b_j exp((g_j - C_ij)/e) makes the row sums exactly a.
            f = -e * logsumexp(lb[None, :] + (g[None, :] - cost) / e, axis=1)
            g = -e * logsumexp(la[:, None] + (f[:, None] - cost) / e, axis=0)
            it += 1
            if it % 5 == 0 or it == 1:
                # Columns are exact after the g update; only the rows can be off.
                lp = log_plan(cost, a, b, f, g, e)
                err = float(np.abs(np.exp(logsumexp(lp, axis=1)) - a).sum())
                if err <= target:
                    break
            if it >= max_iter:
                raise RuntimeError(f"reference Sinkhorn did not converge: err={err:.3g} after {it} iterations")
    # Normalise the constant: the tests compare potentials after removing it anyway.
    p = plan(cost, a, b, f, g, eps)
    return RefSinkhorn(f=f, g=g, plan=p, transport_cost=float((p * cost).sum()),
                       marginal_error=marginal_error(p, a, b), iterations=it)


def center_potentials(f: np.ndarray, g: np.ndarray, a: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Remove the (f + c, g - c) gauge: shift so that the a-weighted mean of f is 0."""
    f = np.asarray(f, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    a = np.full(f.size, 1.0 / f.size) if a is None else np.asarray(a, dtype=np.float64)
    c = float(np.dot(a, f))
    return f - c, g + c


def joint_labels(p: np.ndarray, ys: np.ndarray, yt: np.ndarray, source_classes: np.ndarray | None = None,
                 target_classes: np.ndarray | None = None) -> np.ndarray:
    """P(ys, yt) = sum of pi_ij over pixel pairs (i, j) with labels (ys, yt); rows/cols sorted by label."""
    ys = np.asarray(ys)
    yt = np.asarray(yt)
    cs = np.unique(ys) if source_classes is None else np.asarray(source_classes)
    ct = np.unique(yt) if target_classes is None else np.asarray(target_classes)
    rs = np.searchsorted(cs, ys)
    rt = np.searchsorted(ct, yt)
    assert np.array_equal(cs[rs], ys) and np.array_equal(ct[rt], yt)
    S = np.zeros((cs.size, ys.size))
    S[rs, np.arange(ys.size)] = 1.0
    T = np.zeros((yt.size, ct.size))
    T[np.arange(yt.size), rt] = 1.0
    return S @ p @ T


def conditional_entropy(joint: np.ndarray) -> float:
    """H(Yt | Ys) = -sum_{s,t} P(s,t) log(P(s,t) / P(s)) in nats (joint normalised first)."""
    j = np.asarray(joint, dtype=np.float64)
    j = j / j.sum()
    ps = j.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(j > 0, j * np.log(j / ps), 0.0)
    return float(-terms.sum())


def entropy(labels: np.ndarray) -> float:
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclass
class RefOTCE:
    score: float
    conditional_entropy: float
    joint: np.ndarray
    transport_cost: float
    source_classes: np.ndarray
    target_classes: np.ndarray
    sinkhorn: RefSinkhorn


def otce(xs: np.ndarray, ys: np.ndarray, xt: np.ndarray, yt: np.ndarray, eps: float, *,
         tol: float = 1e-13) -> RefOTCE:
    """OTCE on exactly these pixels (uniform weights, no sampling): -H(Yt|Ys) of the plan's joint."""
    cost = sq_dists(xs, xt)
    sk = sinkhorn(cost, eps, tol=tol)
    cs, ct = np.unique(ys), np.unique(yt)
    joint = joint_labels(sk.plan, ys, yt, cs, ct)
    h = conditional_entropy(joint)
    return RefOTCE(score=-h, conditional_entropy=h, joint=joint, transport_cost=sk.transport_cost,
                   source_classes=cs, target_classes=ct, sinkhorn=sk)


def nearest_indices(out_size: int, in_size: int) -> np.ndarray:
    """PyTorch 'nearest': src = floor(dst * in / out), written independently with integers."""
    return np.array([(i * in_size) // out_size for i in range(out_size)], dtype=np.int64)


def maps_to_table(features: np.ndarray, labels: np.ndarray, channels_last: bool = False):
    """(B, D, H, W) [or (B, H, W, D)] maps + (B, H', W') labels -> (P, D) table + (P,) labels."""
    feats = np.asarray(features)
    if not channels_last:
        feats = np.moveaxis(feats, 1, -1)  # (B, H, W, D)
    B, H, W, D = feats.shape
    labels = np.asarray(labels)
    ri = nearest_indices(H, labels.shape[1])
    ci = nearest_indices(W, labels.shape[2])
    rows, labs = [], []
    for bb in range(B):
        for i in range(H):
            for j in range(W):
                rows.append(feats[bb, i, j])
                labs.append(labels[bb, ri[i], ci[j]])
    return np.array(rows, dtype=feats.dtype), np.array(labs, dtype=labels.dtype)
