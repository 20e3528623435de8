"""Result types returned to users. Plain data: arrays plus the settings that produced them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


# eq=False: equality and hashing by identity. The generated field-wise forms would compare arrays
# (a ValueError for K > 1) and hash them (a TypeError).
@dataclass(frozen=True, eq=False)
class OTCEResult:
    """OTCE over ``repeats`` independent pixel draws.

    ``scores[k] = -conditional_entropy[k]``, where ``conditional_entropy[k] = H(Y_t | Y_s)`` in nats from
    the joint label distribution of draw ``k``'s entropic transport plan. ``score`` is their mean and
    ``std`` their sample standard deviation (``ddof=1``; 0 for a single repeat). Higher is better.
    """

    score: float
    scores: np.ndarray  # (K,)
    std: float
    conditional_entropy: np.ndarray  # (K,) W_T, nats
    transport_cost: np.ndarray  # (K,) W_D = <pi, C>
    joint: np.ndarray  # (K, Cs, Ct) joint label distributions (each sums to ~1)
    source_classes: np.ndarray  # (Cs,) label values of joint's rows
    target_classes: np.ndarray  # (Ct,) label values of joint's columns
    iterations: np.ndarray  # (K,) Sinkhorn iterations, all epsilon stages together
    converged: np.ndarray  # (K,) bool: marginal_error <= tol on the dense plan
    marginal_error: np.ndarray  # (K,) ||pi 1 - a||_1 + ||pi^T 1 - b||_1
    epsilon: float
    tol: float
    n_pixels: tuple[int, int]  # pixels per draw (source, target)
    repeats: int
    seed: int
    dtype: str  # computation precision: "float32" or "float64"
    elapsed: float  # seconds, whole call
    timed_out: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    blocked: bool = False  # solved with the cost recomputed, not stored (otce's blocked=True)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (lists instead of arrays)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        out["all_converged"] = self.all_converged
        return out

    def __repr__(self) -> str:
        conv = "converged" if self.all_converged else f"NOT converged ({int(np.sum(~self.converged))} repeats)"
        return (
            f"OTCEResult(score={self.score:.6f} ± {self.std:.6f}, repeats={self.repeats}, "
            f"n_pixels={self.n_pixels}, epsilon={self.epsilon}, {conv}, elapsed={self.elapsed:.2f}s)"
        )


@dataclass(frozen=True, eq=False)
class SinkhornResult:
    """Entropic OT between two point clouds. pi_ij = a_i b_j exp((f_i + g_j - |x_i - y_j|^2) / epsilon)."""

    f: np.ndarray  # (n,)
    g: np.ndarray  # (m,)
    transport_cost: float  # <pi, C>
    iterations: int
    converged: bool
    marginal_error: float
    epsilon: float
    tol: float
    timed_out: bool = False
    blocked: bool = False  # solved with the cost recomputed, not stored (sinkhorn's blocked=True)
    a: np.ndarray | None = None  # (n,) the weights the solve used; None: uniform
    b: np.ndarray | None = None  # (m,)
    dim: int | None = None  # the points' dimension in the solve (checked by plan)

    def plan(self, x: np.ndarray, y: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None) -> np.ndarray:
        """The dense (n, m) plan in float64, rebuilt from the potentials (O(n m) memory: small cases).

        ``a`` and ``b`` default to the weights of the solve (uniform when it had none).

        The cost is recomputed here in float64. For float32 inputs the solver worked on a float32
        cost, which carries the rounding of float32 arithmetic (relative ~1e-7 of the squared norms),
        and ``marginal_error`` certifies the potentials on that cost. On the exact cost every exponent
        moves by that rounding / epsilon, so this plan can miss its marginals by more than
        ``marginal_error`` says (small float32 problems at epsilon = 0.1: 5e-7 to 2e-5 against a
        reported 1e-8 to 5e-7). The miss grows with cost / epsilon: at ~1e8 (features of magnitude
        1e3 at epsilon = 0.1) the plan rebuilt here can be off by orders of magnitude in total mass.
        Solve float64 points for a plan that meets ``tol`` here too. In float64 too, the potentials
        are those of the cost as given: when the two sets lie far apart (costs of 1e8 and more), f + g
        - C cancels large numbers here and the rebuilt plan can miss its marginals by about
        largest cost / epsilon x 2^-52 (the solver itself works on each side centred, and is not
        limited so).
        """
        x64 = np.asarray(x, dtype=np.float64)
        y64 = np.asarray(y, dtype=np.float64)
        n, m = self.f.shape[0], self.g.shape[0]
        for name, arr, rows in (("x", x64, n), ("y", y64, m)):
            if arr.ndim != 2 or arr.shape[0] != rows:
                raise ValueError(f"{name} must be the solve's {rows} points as a ({rows}, d) array, got shape {arr.shape}")
        if x64.shape[1] != y64.shape[1]:
            raise ValueError(f"x has {x64.shape[1]} dimensions but y has {y64.shape[1]}")
        if self.dim is not None and x64.shape[1] != self.dim:
            raise ValueError(f"x and y have {x64.shape[1]} dimensions but the solve's points had {self.dim}")
        a = self.a if a is None else a
        b = self.b if b is None else b
        a = np.full(n, 1.0 / n) if a is None else np.asarray(a, dtype=np.float64)
        b = np.full(m, 1.0 / m) if b is None else np.asarray(b, dtype=np.float64)
        for name, w, rows in (("a", a, n), ("b", b, m)):
            if w.shape != (rows,):
                raise ValueError(f"{name} must hold one weight per point ({rows},), got shape {w.shape}")
        cost = ((x64[:, None, :] - y64[None, :, :]) ** 2).sum(-1)
        return a[:, None] * b[None, :] * np.exp((self.f[:, None] + self.g[None, :] - cost) / self.epsilon)
