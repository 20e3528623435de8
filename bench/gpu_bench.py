"""Issue 5's GPU benchmark: OTCE at N = 10^4, K = 10, D in {19, 256}, epsilon = 0.1, on one GPU, side by side
with a plain PyTorch log-domain Sinkhorn, POT (torch backend) and GeomLoss (tensorized), in one process.

Every contender solves the same sampled pixels (``bdata.draw_indices``, which is segtransfer's own sampler) on
the same synthetic task pair as the CPU harness (``bench/data.py``). Potentials returned by a contender are
scored by one float64 evaluator on the GPU (``evaluate``): marginal error ``|pi 1 - a|_1 + |pi^T 1 - b|_1``,
W_D, and the OTCE score from the joint label table, so that "same accuracy" means the same measured error.

- segtransfer: ``st.otce(..., device="cuda")`` on torch CUDA tensors (read in place), all K repeats in one
  call, timed with the device synchronised; peak device memory is sampled from ``cudaMemGetInfo`` in a
  thread (the solver's allocations are its own, invisible to torch's allocator). Draw 0 is re-solved by
  ``st.sinkhorn(device="cuda")`` and by the CPU solver, and both potentials go through the evaluator.
  The GPU solver polishes the last epsilon stage with Newton's method (the default).
- segtransfer-sinkhorn, segtransfer-laststage, segtransfer-dense, segtransfer-ilp4 (not in the default list;
  they run last): the same with Sinkhorn only (``SEGTRANSFER_CUDA_NEWTON=0``, the GPU solver before session
  23), with Newton on the last stage only (``SEGTRANSFER_CUDA_STAGE_NEWTON=0``), with Newton's CG products
  over the dense plan instead of its pattern (``SEGTRANSFER_CUDA_SPARSE=0``), or with four log-sum-exp
  chains a thread in the Sinkhorn half-steps (``SEGTRANSFER_CUDA_ILP=4``, session 31, not yet run).
- torch-plain: the textbook log-domain Sinkhorn (alternating ``logsumexp`` half-steps on a stored cost),
  float64, all K problems batched, error checked every 10 iterations, stopped at segtransfer's worst
  marginal error or at the time budget.
- pot-torch: ``ot.sinkhorn(method="sinkhorn_log")`` on torch CUDA float64 tensors, draw 0, run for a bounded
  number of iterations; its iteration is the same as torch-plain's, so its time to the target is its
  measured time per iteration times torch-plain's iteration count (marked as an estimate).
- geomloss: ``SamplesLoss("sinkhorn", blur=sqrt(eps), scaling=s)`` tensorized, float32, all K draws one by
  one (see harness.w_geomloss for the mapping of its cost and epsilon onto ours).

Usage (on the GPU machine): ``python bench/gpu_bench.py --out results.json``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import data as bdata  # noqa: E402


class PeakDeviceMemory:
    """Largest drop of free device memory below the level at entry, sampled every ``period`` seconds."""

    def __init__(self, torch, period: float = 0.002) -> None:
        self.torch, self.period, self.peak = torch, period, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.torch.cuda.mem_get_info()[0]
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.base - self.torch.cuda.mem_get_info()[0])
            time.sleep(self.period)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def cost64(torch, x, y):
    """Squared distances in float64 on the GPU (centred first, as every contender is)."""
    x = x.double()
    y = y.double()
    mu = torch.cat([x, y]).mean(0)
    x, y = x - mu, y - mu
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T).clamp_min_(0.0)


def evaluate(torch, x, y, ls, lt, f, g, eps: float) -> dict:
    """Independent float64 scoring of a pair of potentials (uniform weights): the plan is
    pi_ij = exp((f_i + g_j - C_ij) / eps) / (n m)."""
    n, m = x.shape[0], y.shape[0]
    c = cost64(torch, x, y)
    f = torch.as_tensor(f, dtype=torch.float64, device=c.device)
    g = torch.as_tensor(g, dtype=torch.float64, device=c.device)
    p = torch.exp((f[:, None] + g[None, :] - c) / eps - math.log(n) - math.log(m))
    err = float((p.sum(1) - 1.0 / n).abs().sum() + (p.sum(0) - 1.0 / m).abs().sum())
    wd = float((p * c).sum())
    ls = torch.as_tensor(ls, device=c.device)
    lt = torch.as_tensor(lt, device=c.device)
    cs, ct = int(ls.max()) + 1, int(lt.max()) + 1
    rows = torch.zeros((cs, m), dtype=torch.float64, device=c.device).index_add_(0, ls, p)
    joint = torch.zeros((cs, ct), dtype=torch.float64, device=c.device).index_add_(1, lt, rows)
    joint = joint.cpu().numpy()
    joint = joint / joint.sum()
    ps = joint.sum(1, keepdims=True)
    nz = joint > 0
    h = float(-(joint[nz] * np.log((joint / np.broadcast_to(ps, joint.shape))[nz])).sum())
    del p, c
    return {"marginal_error": err, "transport_cost": wd, "score": -h, "finite": bool(np.isfinite(h))}


def problem(args, dim: int):
    xs, ys, xt, yt = bdata.make_task_pair(dim, args.pool, args.seed, "float32", freq_spread=args.freq_spread)
    idx_s, idx_t, how = bdata.draw_indices(ys, yt, args.n, args.repeats, args.seed)
    if how != "segtransfer":
        raise RuntimeError("segtransfer's sampler is not importable: the contenders would solve other pixels")
    cs, ct = bdata.valid_codes(ys), bdata.valid_codes(yt)
    return xs, ys, xt, yt, idx_s, idx_t, cs, ct


def time_otce(torch, st, args, prob, contender: str) -> tuple[dict, object]:
    """All K draws in one ``st.otce`` call on torch CUDA tensors (read in place), timed with the device
    synchronised, after a small warm-up call (context, modules)."""
    xs, ys, xt, yt = prob[:4]
    dev = torch.device("cuda")
    ts, tt = torch.from_numpy(xs).to(dev), torch.from_numpy(xt).to(dev)
    ls, lt = torch.from_numpy(ys).to(dev), torch.from_numpy(yt).to(dev)
    st.otce(ts, ls, tt, lt, n_pixels=500, repeats=2, epsilon=args.epsilon, device="cuda")
    torch.cuda.synchronize()
    with PeakDeviceMemory(torch) as mem:
        t0 = time.perf_counter()
        res = st.otce(ts, ls, tt, lt, n_pixels=args.n, repeats=args.repeats, epsilon=args.epsilon, seed=args.seed,
                      device="cuda", timeout=args.budget_s)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    out = {
        "contender": contender, "time_k_s": wall, "time_k_est": False,
        "iterations": float(np.mean(res.iterations)), "iterations_all": res.iterations.tolist(),
        "marginal_error": float(np.max(res.marginal_error)), "score": float(res.score), "std": float(res.std),
        "scores": res.scores.tolist(), "converged": bool(res.all_converged),
        "transport_cost0": float(res.transport_cost[0]), "peak_device_bytes": int(mem.peak),
        "dtype": res.dtype, "timed_out": bool(np.any(res.timed_out)),
    }
    return out, res


VARIANTS = {  # contender: (environment switch, its value, label)
    "segtransfer-sinkhorn": ("SEGTRANSFER_CUDA_NEWTON", "0", "segtransfer (cuda, Sinkhorn only)"),
    "segtransfer-laststage": ("SEGTRANSFER_CUDA_STAGE_NEWTON", "0", "segtransfer (cuda, Newton on the last stage only)"),
    "segtransfer-dense": ("SEGTRANSFER_CUDA_SPARSE", "0", "segtransfer (cuda, Newton's CG products dense)"),
    "segtransfer-ilp4": ("SEGTRANSFER_CUDA_ILP", "4", "segtransfer (cuda, 4 log-sum-exp chains a thread)"),
}


def run_segtransfer_variant(torch, st, args, prob, variant: str) -> dict:
    """segtransfer on the GPU with one of its switches set (VARIANTS), all K draws."""
    import os

    env, value, label = VARIANTS[variant]
    os.environ[env] = value
    try:
        return time_otce(torch, st, args, prob, label)[0]
    finally:
        del os.environ[env]


def run_segtransfer(torch, st, args, dim, prob) -> dict:
    xs, ys, xt, yt, idx_s, idx_t, cs, ct = prob
    dev = torch.device("cuda")
    out, _ = time_otce(torch, st, args, prob, "segtransfer (cuda)")
    # Draw 0 again, through sinkhorn() on the GPU and on the CPU, scored by the independent evaluator.
    x0, y0 = xs[idx_s[0]], xt[idx_t[0]]
    gx, gy = torch.from_numpy(x0).to(dev), torch.from_numpy(y0).to(dev)
    t0 = time.perf_counter()
    sr = st.sinkhorn(gx, gy, epsilon=args.epsilon, device="cuda", timeout=args.budget_s)
    gpu_s = time.perf_counter() - t0
    ev = evaluate(torch, gx, gy, cs[idx_s[0]], ct[idx_t[0]], sr.f, sr.g, args.epsilon)
    t0 = time.perf_counter()
    cr = st.sinkhorn(x0, y0, epsilon=args.epsilon, device="cpu")
    cpu_s = time.perf_counter() - t0
    evc = evaluate(torch, gx, gy, cs[idx_s[0]], ct[idx_t[0]], cr.f, cr.g, args.epsilon)
    out.update(draw0_gpu_sinkhorn={"iterations": sr.iterations, "converged": sr.converged, "seconds": gpu_s,
                                   "reported_error": sr.marginal_error, **ev},
               draw0_cpu_sinkhorn={"iterations": cr.iterations, "converged": cr.converged, "seconds": cpu_s,
                                   "reported_error": cr.marginal_error, **evc},
               draw0_score_gap_gpu_cpu=abs(ev["score"] - evc["score"]))
    return out


def run_torch_plain(torch, args, dim, prob, target: float) -> dict:
    """Batched plain log-domain Sinkhorn in float64: f_i = -eps lse_j((g_j - C_ij)/eps + log b_j), then g."""
    xs, ys, xt, yt, idx_s, idx_t, cs, ct = prob
    dev = torch.device("cuda")
    eps, k, n = args.epsilon, args.repeats, args.n
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    x = torch.from_numpy(xs[idx_s]).to(dev)
    y = torch.from_numpy(xt[idx_t]).to(dev)
    c = torch.stack([cost64(torch, x[i], y[i]) for i in range(k)])  # (K, n, m) float64
    log_w = -math.log(n)
    f = torch.zeros((k, n), dtype=torch.float64, device=dev)
    g = torch.zeros((k, n), dtype=torch.float64, device=dev)
    it, err = 0, math.inf
    while True:
        f = -eps * torch.logsumexp((g[:, None, :] - c) / eps + log_w, dim=2)
        g = -eps * torch.logsumexp((f[:, :, None] - c) / eps + log_w, dim=1)
        it += 1
        if it % 10 == 0:
            # Columns are exact after the g-step; the row error of the current plan is the marginal error.
            rows = torch.exp(torch.logsumexp((f[:, :, None] + g[:, None, :] - c) / eps, dim=2) + 2 * log_w)
            err = float((rows - 1.0 / n).abs().sum(1).max())
            if err <= target or time.perf_counter() - t0 > args.peer_budget_s:
                break
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ev = evaluate(torch, x[0], y[0], cs[idx_s[0]], ct[idx_t[0]], f[0], g[0], eps)
    return {"contender": "torch-plain (float64, batched K)", "time_k_s": wall, "time_k_est": False,
            "iterations": it, "marginal_error": err, "reached": err <= target, "score0": ev["score"],
            "marginal_error0": ev["marginal_error"], "peak_device_bytes": int(torch.cuda.max_memory_allocated())}


def run_pot(torch, args, dim, prob, iters_needed: int | None) -> dict:
    try:
        import ot
    except ImportError as exc:
        return {"contender": "pot-torch", "status": f"not installed: {exc}"}
    xs, ys, xt, yt, idx_s, idx_t, cs, ct = prob
    dev = torch.device("cuda")
    x = torch.from_numpy(xs[idx_s[0]]).to(dev)
    y = torch.from_numpy(xt[idx_t[0]]).to(dev)
    n = args.n
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    c = cost64(torch, x, y)
    ot.sinkhorn(a, a, c, args.epsilon, method="sinkhorn_log", numItermax=10, stopThr=0.0)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    plan, log = ot.sinkhorn(a, a, c, args.epsilon, method="sinkhorn_log", numItermax=args.pot_iters,
                            stopThr=0.0, log=True)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    per_iter = wall / args.pot_iters
    err = float((plan.sum(1) - a).abs().sum() + (plan.sum(0) - a).abs().sum())
    out = {"contender": "pot-torch (sinkhorn_log, float64)", "pot_version": ot.__version__,
           "iterations_run": args.pot_iters, "seconds_per_iteration": per_iter,
           "marginal_error_after_run": err, "peak_device_bytes": int(torch.cuda.max_memory_allocated())}
    if iters_needed:
        out.update(time_k_s=per_iter * iters_needed * args.repeats, time_k_est=True, iterations=iters_needed)
    return out


def run_geomloss(torch, args, dim, prob, scaling: float) -> dict:
    try:
        import geomloss
    except ImportError as exc:
        return {"contender": f"geomloss {scaling}", "status": f"not installed: {exc}"}
    xs, ys, xt, yt, idx_s, idx_t, cs, ct = prob
    dev = torch.device("cuda")
    eps, n = args.epsilon, args.n
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), scaling=scaling, debias=False,
                                potentials=True, backend="tensorized")
    a = torch.full((n,), 1.0 / n, dtype=torch.float32, device=dev)
    errs, scores, wall = [], [], 0.0
    torch.cuda.reset_peak_memory_stats()
    for k in range(args.repeats):
        x = torch.from_numpy(xs[idx_s[k]]).to(dev)
        y = torch.from_numpy(xt[idx_t[k]]).to(dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        # C' = |x - y|^2 / 2 in GeomLoss: sqrt(2) x, sqrt(2) y give our cost; eps = blur^2.
        f, g = loss(a, x * math.sqrt(2.0), a, y * math.sqrt(2.0))
        torch.cuda.synchronize()
        wall += time.perf_counter() - t0
        ev = evaluate(torch, x, y, cs[idx_s[k]], ct[idx_t[k]], f.reshape(n), g.reshape(n), eps)
        errs.append(ev["marginal_error"])
        scores.append(ev["score"])
    return {"contender": f"geomloss tensorized float32 (scaling {scaling})", "geomloss_version": geomloss.__version__,
            "time_k_s": wall, "time_k_est": False, "marginal_error": float(np.max(errs)),
            "score": float(np.mean(scores)), "peak_device_bytes": int(torch.cuda.max_memory_allocated())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[19, 256])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=40_000)
    ap.add_argument("--freq-spread", type=float, default=0.3)
    ap.add_argument("--budget-s", type=float, default=30.0, help="segtransfer's timeout per call")
    ap.add_argument("--peer-budget-s", type=float, default=15.0, help="torch-plain's time budget per case")
    ap.add_argument("--pot-iters", type=int, default=100)
    ap.add_argument("--contenders", nargs="+",
                    default=["segtransfer", "torch-plain", "pot", "geomloss"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    import segtransfer as st

    if not st.cuda_available():
        print("no usable CUDA device for segtransfer", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    results = {"device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "cases": {}}
    print(f"# {props.name}, torch {torch.__version__}; N={args.n}, K={args.repeats}, eps={args.epsilon}", flush=True)
    for dim in args.dims:
        prob = problem(args, dim)
        case: list[dict] = []
        results["cases"][str(dim)] = case

        def record(r: dict) -> None:
            case.append(r)
            print(json.dumps(r), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))

        target, iters_needed = None, None
        if "segtransfer" in args.contenders:
            r = run_segtransfer(torch, st, args, dim, prob)
            target = r["marginal_error"]
            record(r)
        target = target or 1e-6
        if "torch-plain" in args.contenders:
            r = run_torch_plain(torch, args, dim, prob, target)
            iters_needed = r["iterations"] if r["reached"] else None
            record(r)
            torch.cuda.empty_cache()
        if "pot" in args.contenders:
            record(run_pot(torch, args, dim, prob, iters_needed))
            torch.cuda.empty_cache()
        if "geomloss" in args.contenders:
            for s in (0.5, 0.9):
                record(run_geomloss(torch, args, dim, prob, s))
                torch.cuda.empty_cache()
    # The variants last, for every case (the Sinkhorn-only one runs to the time budget).
    for variant in (v for v in VARIANTS if v in args.contenders):
        for dim in args.dims:
            case = results["cases"][str(dim)]
            try:
                r = run_segtransfer_variant(torch, st, args, problem(args, dim), variant)
            except Exception as exc:  # noqa: BLE001 - report and go on
                r = {"contender": VARIANTS[variant][2], "status": f"failed: {type(exc).__name__}: {exc}"}
            case.append(r)
            print(json.dumps(r), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
