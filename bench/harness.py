#!/usr/bin/env python3
"""OTCE benchmark: segtransfer's CPU path against POT and the authors' recipe, on the same data.

Every contender runs in a fresh subprocess (so its peak RSS is its own) under a time budget; the
harness evaluates every plan the same way (float64, streamed, ``peers.evaluate``) so marginal
errors and scores are comparable. See bench/README.md.

    python bench/harness.py                                   # full run (N 2000/5000/10000, D 19/256, K 10)
    python bench/harness.py --sizes 2000 --dims 19 --repeats 2 --budget-s 60   # quick run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data as bdata  # noqa: E402
import peers  # noqa: E402

CONTENDERS = ["segtransfer", "segtransfer-draw0", "segtransfer-blocked", "replica", "pot-f64", "pot-f32", "authors-sinkhorn",
              "authors-emd", "geomloss", "geomloss-0.9"]
# The blocked mode is for sizes the stored cost cannot hold and is ~10x slower below them: asked for
# by name (the scaling runs), not part of a default run.
DEFAULT_CONTENDERS = [c for c in CONTENDERS if c != "segtransfer-blocked"]
DESCRIPTIONS = {
    "segtransfer": "st.otce, default tol, K repeats (time = whole call / K)",
    "segtransfer-draw0": "st.sinkhorn on draw 0 (the reference for errors and scores)",
    "segtransfer-blocked": "st.otce(blocked=True): the cost recomputed, never stored; K repeats",
    "replica": "NumPy replica of POT's sinkhorn_log iteration (f64), run to the target error",
    "pot-f64": "ot.sinkhorn(method='sinkhorn_log'), float64, to the target error",
    "pot-f32": "ot.sinkhorn(method='sinkhorn_log'), float32, for as many iterations as f64 needs",
    "authors-sinkhorn": "authors' recipe: N x N x D tensor cost, log-Sinkhorn, stop sum|du| < 0.1",
    "authors-emd": "authors' default solver: ot.emd (exact), float64",
    "geomloss": "geomloss.SamplesLoss('sinkhorn', debias=False, potentials=True, backend='tensorized'), "
                "float32, default scaling 0.5 (eps-scaling, no stopping rule)",
    "geomloss-0.9": "as geomloss, scaling 0.9 (its 'more accurate' setting)",
}


# ================================================================================================
# Helpers
# ================================================================================================


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def mem_available_bytes() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem = float(line.split()[1]) / 1024**2
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "none"
    except Exception:  # noqa: BLE001
        commit = "none"
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("scipy", "ot", "segtransfer"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            versions[mod] = f"not importable ({type(exc).__name__})"
    for dist in ("torch", "geomloss"):  # metadata only: importing torch here would cost seconds and RSS
        try:
            from importlib.metadata import version as _version
            versions[dist] = _version(dist)
        except Exception:  # noqa: BLE001
            versions[dist] = "not installed"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": mem, "load_avg_at_start": os.getloadavg(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "git_commit": commit,
        "versions": versions, "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "host": platform.node(),
    }


def load_problem(spec: dict):
    """Pool, draws, and the draw-0 problem, identical in every worker."""
    xs, ys, xt, yt = bdata.make_task_pair(spec["dim"], spec["pool"], spec["seed"], spec["dtype"],
                                          freq_spread=spec["freq_spread"])
    idx_s, idx_t, how = bdata.draw_indices(ys, yt, spec["n"], spec["repeats"], spec["seed"])
    cs, ct = bdata.valid_codes(ys), bdata.valid_codes(yt)
    p = {
        "xs": xs, "ys": ys, "xt": xt, "yt": yt, "idx_s": idx_s, "idx_t": idx_t, "draws": how,
        "x0": np.ascontiguousarray(xs[idx_s[0]]), "y0": np.ascontiguousarray(xt[idx_t[0]]),
        "ls0": cs[idx_s[0]].astype(np.int64), "lt0": ct[idx_t[0]].astype(np.int64),
    }
    return p


# ================================================================================================
# Workers (one per subprocess)
# ================================================================================================


def w_segtransfer(spec, p, out, blocked=False):
    import segtransfer as st

    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        res = st.otce(p["xs"], p["ys"], p["xt"], p["yt"], n_pixels=spec["n"], repeats=spec["repeats"],
                      epsilon=spec["epsilon"], seed=spec["seed"], timeout=spec["st_timeout"], blocked=blocked)
        wall = time.perf_counter() - t0
    out["rss_solver_mb"] = rss_peak_mb()
    k = spec["repeats"]
    out.update(
        status="ok" if bool(np.all(res.converged)) else "not converged",
        time_k_s=wall, time_s=wall / k, time_est=False, elapsed_reported=res.elapsed,
        iterations=float(np.mean(res.iterations)), iterations_all=[int(i) for i in res.iterations],
        iterations_note="mean per repeat",
        marginal_error_self=float(np.max(res.marginal_error)),
        marginal_error_self_all=[float(e) for e in res.marginal_error],
        score=float(res.score), scores=[float(s) for s in res.scores], std=float(res.std),
        transport_cost=[float(c) for c in res.transport_cost],
        converged=[bool(c) for c in res.converged], dtype=getattr(res, "dtype", None),
        warnings=[str(w.message) for w in wlist],
    )


def w_segtransfer_blocked(spec, p, out):
    w_segtransfer(spec, p, out, blocked=True)


def w_segtransfer_draw0(spec, p, out):
    import segtransfer as st

    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        sr = st.sinkhorn(p["x0"], p["y0"], epsilon=spec["epsilon"], timeout=spec["st_timeout"])
        wall = time.perf_counter() - t0
    out["rss_solver_mb"] = rss_peak_mb()
    ev = peers.evaluate(p["x0"], p["y0"], p["ls0"], p["lt0"], f=sr.f, g=sr.g, eps=spec["epsilon"])
    out.update(
        status="ok" if sr.converged else "not converged", time_s=wall, time_est=False,
        time_k_s=wall * spec["repeats"], time_k_est=True,
        iterations=int(sr.iterations), marginal_error=ev["marginal_error"], marginal_error_self=sr.marginal_error,
        score=-ev["conditional_entropy"], transport_cost=ev["transport_cost"],
        transport_cost_self=sr.transport_cost, warnings=[str(w.message) for w in wlist],
    )


def w_replica(spec, p, out):
    """Plain log-domain Sinkhorn = POT's iteration, to the target L1 error, within the budget."""
    t0 = time.perf_counter()
    deadline = t0 + spec["budget_s"]
    target = spec["target_error"]
    cost = peers.cost64(p["x0"], p["y0"])
    rep = peers.PlainLogSinkhorn(cost, spec["epsilon"], threads=spec["replica_threads"])
    del cost
    n_exact = n_pot = None
    stop = "budget"
    while True:
        rep.step()
        errs = rep.err_l1  # errors known for iterates 1..iterations-1
        if n_exact is None:
            n_exact = peers.first_reaching(errs, target, pot_schedule=False)
        n_pot = peers.first_reaching(errs, target, pot_schedule=True)
        if n_pot is not None:
            stop = "target"
            break
        if rep.iterations >= spec["replica_max_iter"]:
            stop = "max_iter"
            break
        if time.perf_counter() > deadline:
            break
    wall = time.perf_counter() - t0
    per_iter = wall / rep.iterations
    # Evaluate the iterate POT would return: after n_pot iterations, i.e. the one before the last
    # step (the error of iterate k is known once step k + 1 has run); else the last one.
    if n_pot is not None and n_pot == rep.iterations - 1:
        f, g = rep.potentials(spec["epsilon"], previous=True)
        evaluated = n_pot
    else:
        rep.finalize_error()
        f, g = rep.potentials(spec["epsilon"])
        evaluated = rep.iterations
    rep.close()
    out["rss_solver_mb"] = rss_peak_mb()
    ev = peers.evaluate(p["x0"], p["y0"], p["ls0"], p["lt0"], f=f, g=g, eps=spec["epsilon"])
    est = None if n_pot is not None else peers.extrapolate_iterations(rep.err_l1, target)
    out.update(
        status="ok" if n_pot is not None else f"target not reached ({stop})",
        time_s=wall, time_est=False, time_k_s=wall * spec["repeats"], time_k_est=True,
        seconds_per_iter=per_iter, iterations_run=rep.iterations,
        iterations=n_pot if n_pot is not None else f">= {len(rep.err_l1)}",
        iterations_exact=n_exact, iterations_pot_schedule=n_pot, iterations_lower_bound=len(rep.err_l1),
        iterations_extrapolated=est, target_error=target,
        marginal_error=ev["marginal_error"], marginal_error_curve_last=rep.err_l1[-1],
        score=-ev["conditional_entropy"], transport_cost=ev["transport_cost"],
        error_curve=[(k, rep.err_l1[k - 1]) for k in _curve_points(len(rep.err_l1))],
        iterate_evaluated=evaluated,
    )


def _curve_points(k: int) -> list[int]:
    pts = sorted({int(round(x)) for x in np.geomspace(1, max(k, 1), 40)} | {k})
    return [q for q in pts if 1 <= q <= k]


def w_pot(spec, p, out, dtype):
    import ot

    t_start = time.perf_counter()
    deadline = t_start + spec["budget_s"]
    eps = spec["epsilon"]
    x = p["x0"].astype(dtype)
    y = p["y0"].astype(dtype)
    t0 = time.perf_counter()
    m = ot.dist(x, y)  # sqeuclidean, in dtype
    t_dist = time.perf_counter() - t0
    n = x.shape[0]
    a = np.full(n, 1.0 / n, dtype=dtype)
    b = np.full(y.shape[0], 1.0 / y.shape[0], dtype=dtype)

    def run(iters):
        t = time.perf_counter()
        plan, log = ot.sinkhorn(a, b, m, eps, method="sinkhorn_log", numItermax=iters, stopThr=0.0,
                                log=True, warn=False)
        return time.perf_counter() - t, plan, log

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # POT's log["u"] = exp(log_u) overflows: harmless
        t1, plan, log = run(1)
        del plan, log
        nb = spec["pot_bounded_iters"]
        if time.perf_counter() + t1 * (nb + 1) * 1.2 < deadline:
            t2, plan, log = run(1 + nb)
            per_iter = (t2 - t1) / nb
            bounded = f"runs of 1 and {1 + nb} iterations"
            it_bounded = 1 + nb
        else:
            t2, plan, log = t1, None, None
            per_iter = t1
            bounded = "one iteration only (budget)"
            it_bounded = 1
        del log
        out["rss_solver_mb"] = rss_peak_mb()
        if plan is not None:  # the bounded run's own error, for the record
            out["marginal_error_bounded_run"] = peers.evaluate(p["x0"], p["y0"], p["ls0"], p["lt0"],
                                                               plan=plan)["marginal_error"]
            out["iterations_bounded_run"] = it_bounded
        del plan
        overhead = max(t1 - per_iter, 0.0)  # -C/eps, final exp, first check
        count = spec.get("iterations_needed")       # POT-schedule count from the replica, or None
        lower = spec.get("iterations_lower_bound")
        extrap = spec.get("iterations_extrapolated")
        out.update(seconds_per_iter=per_iter, per_iter_from=bounded, t_dist=t_dist, t_overhead=overhead,
                   target_error=spec["target_error"])
        if count is not None:
            est_total = t_dist + overhead + count * per_iter
            if time.perf_counter() + est_total * 1.1 < deadline:
                t_full, plan, log = run(count)
                del log
                ev = peers.evaluate(p["x0"], p["y0"], p["ls0"], p["lt0"], plan=plan)
                reached = ev["marginal_error"] <= spec["target_error"] * (1 + 1e-6)
                out.update(status="ok (reached the target)" if reached else
                           f"ran the f64 count; error {ev['marginal_error']:.2e} > target {spec['target_error']:.2e}",
                           time_s=t_dist + t_full, time_est=False, iterations=count,
                           iterations_note="POT itself, run for the replica's count",
                           marginal_error=ev["marginal_error"], score=-ev["conditional_entropy"],
                           transport_cost=ev["transport_cost"], reached_target=reached)
            else:
                out.update(status="skipped (budget): time is est.", time_s=est_total, time_est=True,
                           iterations=count, iterations_note="replica's count (POT's iteration)",
                           marginal_error=None)
        elif lower is not None:
            out.update(status="skipped (budget): time is a lower bound", time_s=t_dist + overhead + lower * per_iter,
                       time_est=True, time_lower_bound=True, iterations=f">= {lower}",
                       iterations_extrapolated=extrap,
                       time_extrapolated=(t_dist + overhead + extrap * per_iter) if extrap else None,
                       marginal_error=None)
        else:
            out.update(status="per-iteration timing only", time_s=None, marginal_error=None)
    if out.get("time_s") is not None:
        out["time_k_s"] = out["time_s"] * spec["repeats"]
        out["time_k_est"] = True


def w_authors_sinkhorn(spec, p, out):
    x, y = p["x0"], p["y0"]
    need = peers.authors_tensor_bytes(x.shape[0], y.shape[0], x.shape[1], x.itemsize)
    need_total = need + 3 * x.shape[0] * y.shape[0] * x.itemsize  # + cost and two N x N temporaries
    avail = mem_available_bytes()
    out.update(tensor_bytes=need, bytes_needed=need_total, bytes_available=avail)
    if need_total > spec["mem_frac"] * avail:
        out.update(status=f"does not fit (needs {need_total / 1e9:.1f} GB, {avail / 1e9:.1f} GB available)",
                   time_s=None)
        return
    deadline = time.perf_counter() + spec["budget_s"]
    r = peers.authors_sinkhorn(x, y, spec["epsilon"], thresh=spec["authors_thresh"],
                               max_iter=spec["authors_max_iter"], deadline=deadline)
    out["rss_solver_mb"] = rss_peak_mb()
    ev = peers.evaluate(x, y, p["ls0"], p["lt0"], plan=r.pop("plan"))
    out.update(
        status={"rule": "stopped by their rule", "max_iter": f"stopped at max_iter={spec['authors_max_iter']}",
                "budget": "stopped (budget)"}[r["stop"]] + f" (last sum|du| = {r['last_du']:.3g})",
        time_s=r["elapsed"], time_est=False, time_k_s=r["elapsed"] * spec["repeats"], time_k_est=True,
        t_cost=r["t_cost"], iterations=r["iterations"], last_du=r["last_du"],
        marginal_error=ev["marginal_error"], score=-ev["conditional_entropy"], transport_cost=ev["transport_cost"],
    )


def w_authors_emd(spec, p, out):
    import ot

    n = spec["n"]
    if n > spec["emd_max_n"]:
        out.update(status=f"skipped (N > --emd-max-n {spec['emd_max_n']})", time_s=None)
        return
    t0 = time.perf_counter()
    m = ot.dist(p["x0"].astype(np.float64), p["y0"].astype(np.float64))
    a = np.full(n, 1.0 / n)
    plan, log = ot.emd(a, a.copy(), m, numItermax=10_000_000, log=True)
    wall = time.perf_counter() - t0
    out["rss_solver_mb"] = rss_peak_mb()
    ev = peers.evaluate(p["x0"], p["y0"], p["ls0"], p["lt0"], plan=plan)
    out.update(status="ok (exact)" if log.get("result_code", 1) == 1 else f"emd: {log.get('warning')}",
               time_s=wall, time_est=False, time_k_s=wall * spec["repeats"], time_k_est=True,
               iterations=None, marginal_error=ev["marginal_error"], score=-ev["conditional_entropy"],
               transport_cost=ev["transport_cost"])


def w_geomloss(spec, p, out, scaling):
    """GeomLoss's balanced entropic OT (eps-scaling Sinkhorn, tensorized PyTorch backend, float32).

    Mapping onto our problem (checked in geomloss 0.3.1's source, geomloss/_legacy/):
    - cost: for p=2 GeomLoss uses C'(x, y) = |x - y|^2 / 2 (``cost_routines[2] = squared_distances / 2``
      in sinkhorn_samples.py). Feeding it sqrt(2) x and sqrt(2) y gives C' = |x - y|^2 = our cost C.
    - eps: GeomLoss's temperature is eps = blur**p (``scaling_parameters``: ``eps = blur**p``), so
      blur = sqrt(eps) = sqrt(0.1) gives eps = 0.1 in those (= our) cost units. Its schedule starts at
      diameter**p (diameter of the sqrt(2)-scaled clouds) and multiplies eps by scaling**p per step down
      to blur**p; each step is one symmetric (averaged) Sinkhorn update, plus one initial and one final
      "extrapolation" update. There is no stopping rule: the schedule length is the iteration count.
    - potentials: ``softmin(eps, C, h) = -eps * logsumexp_j(h_j - C_ij / eps)`` and the updates are
      f_i = softmin(eps, C_xy, log b + g / eps), i.e. sum_j b_j exp((f_i + g_j - C_ij) / eps) = 1 at a
      fixed point; with debias=False, potentials=True it returns (f_ba, g_ab) as (F, G). So
      pi_ij = a_i b_j exp((F_i + G_j - C_ij) / eps) in cost units of C' = C: exactly segtransfer's
      convention, f = F and g = G with no shift or rescaling (besides float32 -> float64).
    """
    try:
        import torch
        import geomloss
        from geomloss._legacy.sinkhorn_divergence import scaling_parameters
    except ImportError as exc:
        out.update(status="not installed", time_s=None, note=f"{type(exc).__name__}: {exc}; "
                   "pip install torch==2.13.0 geomloss")
        return
    torch.set_num_threads(2)
    x, y = p["x0"], p["y0"]
    n, m = x.shape[0], y.shape[0]
    # tensorized backend with debias=False: C_xy and C_yx (float32) plus ~3 N x M temporaries in softmin
    need = 5 * n * m * 4
    avail = mem_available_bytes()
    out.update(bytes_needed=need, bytes_available=avail, scaling=scaling, torch_version=torch.__version__,
               geomloss_version=geomloss.__version__, torch_threads=torch.get_num_threads())
    if need > spec["mem_frac"] * avail:
        out.update(status=f"does not fit (needs {need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available)",
                   time_s=None)
        return
    eps = spec["epsilon"]
    blur = math.sqrt(eps)  # eps = blur**2 (p = 2)
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=False, potentials=True,
                                backend="tensorized")
    t0 = time.perf_counter()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) * math.sqrt(2.0)  # C' = |x-y|^2
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)) * math.sqrt(2.0)
    a = torch.full((n,), 1.0 / n, dtype=torch.float32)
    b = torch.full((m,), 1.0 / m, dtype=torch.float32)
    F, G = loss(a, xt, b, yt)
    wall = time.perf_counter() - t0
    out["rss_solver_mb"] = rss_peak_mb()
    diameter, eps_final, eps_list, _ = scaling_parameters(xt, yt, 2, blur, None, None, scaling)
    # F, G come back as (1, N), (1, M): the tensorized backend adds a batch axis before view_as.
    f = F.detach().numpy().astype(np.float64).reshape(n)
    g = G.detach().numpy().astype(np.float64).reshape(m)
    ev = peers.evaluate(x, y, p["ls0"], p["lt0"], f=f, g=g, eps=eps)
    over = wall > spec["budget_s"]
    out.update(
        status=(f"over budget ({wall:.0f} s > {spec['budget_s']:g} s); " if over else "")
        + f"done: eps-scaling schedule of {len(eps_list)} steps (no stopping rule)",
        time_s=wall, time_est=False, time_k_s=wall * spec["repeats"], time_k_est=True,
        iterations=len(eps_list) + 2,
        iterations_note="symmetric Sinkhorn updates: 1 initial + len(eps_list) annealing + 1 final extrapolation",
        eps_schedule_len=len(eps_list), eps_schedule_first=float(eps_list[0]), eps_final=float(eps_final),
        diameter=float(diameter), blur=blur,
        marginal_error=ev["marginal_error"], marginal_error_rows=ev["marginal_error_rows"],
        marginal_error_cols=ev["marginal_error_cols"], finite=ev["finite"],
        score=-ev["conditional_entropy"], transport_cost=ev["transport_cost"],
    )


WORKERS = {
    "segtransfer": w_segtransfer,
    "segtransfer-draw0": w_segtransfer_draw0,
    "segtransfer-blocked": w_segtransfer_blocked,
    "replica": w_replica,
    "pot-f64": lambda s, p, o: w_pot(s, p, o, np.float64),
    "pot-f32": lambda s, p, o: w_pot(s, p, o, np.float32),
    "authors-sinkhorn": w_authors_sinkhorn,
    "authors-emd": w_authors_emd,
    "geomloss": lambda s, p, o: w_geomloss(s, p, o, 0.5),
    "geomloss-0.9": lambda s, p, o: w_geomloss(s, p, o, 0.9),
}


def worker_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = {"contender": spec["contender"], "n": spec["n"], "dim": spec["dim"]}
    try:
        p = load_problem(spec)
        out["draws"] = p["draws"]
        out["rss_base_mb"] = rss_peak_mb()
        WORKERS[spec["contender"]](spec, p, out)
    except MemoryError as exc:
        out.update(status=f"error: MemoryError {exc}", time_s=None)
    except Exception as exc:  # noqa: BLE001
        out.update(status=f"error: {type(exc).__name__}: {exc}", time_s=None, traceback=traceback.format_exc())
    out["peak_rss_mb"] = rss_peak_mb()
    Path(out_path).write_text(json.dumps(out, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.bool_,)):
        return bool(o)
    return str(o)


def run_worker(spec: dict, timeout: float, env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="stbench-") as td:
        sp, op = Path(td, "spec.json"), Path(td, "out.json")
        sp.write_text(json.dumps(spec, default=_json_default))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(sp), str(op)],
                                  capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"contender": spec["contender"], "n": spec["n"], "dim": spec["dim"], "time_s": None,
                    "status": f"skipped (budget): killed after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if op.exists():
            res = json.loads(op.read_text())
        else:
            res = {"contender": spec["contender"], "n": spec["n"], "dim": spec["dim"], "time_s": None,
                   "status": f"error: worker exited {proc.returncode} (killed for memory?)",
                   "stderr_tail": proc.stderr[-2000:]}
        res["subprocess_wall_s"] = wall
        return res


# ================================================================================================
# Replica validation against POT itself (small N)
# ================================================================================================


def validate_replica(n: int, dim: int, seed: int, eps: float, pool: int, dtype: str, freq_spread: float,
                     budget_s: float, iters: int = 1500) -> dict:
    """Checks that PlainLogSinkhorn performs POT's iteration and counts iterations like POT does."""
    import ot

    spec = {"dim": dim, "pool": pool, "seed": seed, "dtype": dtype, "n": n, "repeats": 1, "freq_spread": freq_spread}
    p = load_problem(spec)
    cost = peers.cost64(p["x0"], p["y0"])
    a = np.full(n, 1.0 / n)
    out: dict = {"n": n, "dim": dim, "eps": eps}
    t_end = time.perf_counter() + budget_s

    def pot(iters, thr):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t = time.perf_counter()
            plan, log = ot.sinkhorn(a, a, cost, eps, method="sinkhorn_log", numItermax=iters, stopThr=thr,
                                    log=True, warn=False)
            return plan, log, time.perf_counter() - t

    # 1. Iterates: POT after k iterations (stopThr=0) vs the replica after k iterations.
    rep = peers.PlainLogSinkhorn(cost, eps, threads=2)
    iterate_diffs = []
    done = 0
    for k in (1, 11, 57, 200):
        while done < k:
            rep.step()
            done += 1
        _, log, _ = pot(k, 0.0)
        iterate_diffs.append({"iterations": k, "pot_niter_field": int(log["niter"]),
                              "max_abs_diff_log_u": float(np.abs(rep.u - log["log_u"]).max()),
                              "max_abs_diff_log_v": float(np.abs(rep.v - log["log_v"]).max())})
    out["iterates"] = iterate_diffs
    # 2. Stopping: run the replica on, then pick POT thresholds (its L2 rule) at several points of
    #    the curve and compare POT's stop with the replica's prediction.
    t_rep = time.perf_counter()
    n_rep = max(iters, done + 20)
    while done < n_rep:
        rep.step()
        done += 1
    rep.finalize_error()
    t_rep = time.perf_counter() - t_rep
    out["replica_seconds_per_iter"] = t_rep / max(1, n_rep - 200)
    out["replica_iterations"] = n_rep
    l2, l1 = rep.err_l2, rep.err_l1
    checks = []
    for frac in (0.1, 0.35, 0.7, 0.95):
        k_target = max(2, int(frac * len(l2)))
        thr = float(np.min(l2[: k_target])) * 1.0000001  # reached around k_target
        pred = peers.first_reaching(l2, thr, pot_schedule=True)
        if pred is None or time.perf_counter() > t_end:
            continue
        _, log, t = pot(pred + 50, thr)
        checks.append({"stopThr_L2": thr, "replica_predicts_iterations": pred,
                       "pot_iterations": int(log["niter"]) + 1, "pot_seconds": t, "match": int(log["niter"]) + 1 == pred})
    out["stop_checks"] = checks
    # 3. L1 target: POT run for the replica's L1 count must be below the target, 10 fewer above it.
    l1_checks = []
    for frac in (0.5, 0.9):
        k_target = max(12, int(frac * len(l1)))
        tgt = float(np.min(l1[: k_target])) * 1.0000001
        pred = peers.first_reaching(l1, tgt, pot_schedule=True)
        if pred is None or pred < 11 or time.perf_counter() > t_end:
            continue
        plan, _, _ = pot(pred, 0.0)
        e_at = peers.evaluate(p["x0"], p["y0"], p["ls0"], p["lt0"], plan=plan)["marginal_error"]
        plan, _, _ = pot(pred - 10, 0.0)
        e_before = peers.evaluate(p["x0"], p["y0"], p["ls0"], p["lt0"], plan=plan)["marginal_error"]
        l1_checks.append({"target_L1": tgt, "replica_count": pred, "pot_L1_at_count": e_at,
                          "pot_L1_10_before": e_before, "match": e_at <= tgt < e_before})
    out["l1_checks"] = l1_checks
    rep.close()
    out["all_match"] = (all(c["match"] for c in checks + l1_checks) and bool(checks)
                        and all(d["max_abs_diff_log_u"] < 1e-8 and d["max_abs_diff_log_v"] < 1e-8 for d in iterate_diffs))
    return out


# ================================================================================================
# Orchestration and report
# ================================================================================================


def fmt_num(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and (x == 0 or 1e-3 <= abs(x) < 1e5):
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:,.{max(0, digits - 1 - int(math.log10(abs(x))))}f}"
    return f"{x:.{digits - 1}e}" if isinstance(x, float) else str(x)


def _ratio(x: float) -> str:
    return f"{x:,.0f}×" if x >= 100 else f"{x:.3g}×"


def fmt_time(r) -> str:
    t = r.get("time_s")
    if t is None:
        # POT without an iteration count to reach (no segtransfer-draw0 in the run): its measured
        # cost of one iteration is all there is to compare, so the table shows it.
        per_iter = r.get("seconds_per_iter")
        return "—" if per_iter is None else f"{fmt_num(float(per_iter))} s an iteration"
    s = fmt_num(float(t))
    if r.get("time_lower_bound"):
        s = f">= {s} (est.)"
        if r.get("time_extrapolated"):
            s += f"; ~{fmt_num(float(r['time_extrapolated']))} (extrapolated)"
    elif r.get("time_est"):
        s = f"{s} (est.)"
    return s


def _progress_time(r) -> str:
    per_iteration_only = r.get("time_s") is None and r.get("seconds_per_iter") is not None
    return fmt_time(r) if per_iteration_only else f"{fmt_time(r)} s"  # that form carries its own unit


def build_table(results: list[dict], args) -> str:
    lines = ["| N | D | contender | time/solve (s) | time K solves (s) | iterations | marginal error (L1) | "
             "OTCE score | abs(score - ref) | peak RSS, MB (after data) | time ÷ segtransfer | RSS ÷ segtransfer | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_case: dict = {}
    for r in results:
        by_case.setdefault((r["n"], r["dim"]), []).append(r)
    for (n, d), rows in by_case.items():
        ref = next((r for r in rows if r["contender"] == "segtransfer"), None)
        ref0 = next((r for r in rows if r["contender"] == "segtransfer-draw0"), None)
        t_ref = ref.get("time_s") if ref else None
        rss_ref = ref.get("peak_rss_mb") if ref else None
        s_ref0 = ref0.get("score") if ref0 else None
        for r in rows:
            c = r["contender"]
            t = r.get("time_s")
            tk = r.get("time_k_s")
            tk_s = "—" if tk is None else fmt_num(float(tk)) + (" (est.)" if r.get("time_k_est") or r.get("time_est") else "")
            if r.get("time_lower_bound") and tk is not None:
                tk_s = ">= " + tk_s
            it = r.get("iterations")
            if isinstance(it, float):
                it = f"{it:,.0f}" + (" (mean)" if c in ("segtransfer", "segtransfer-blocked") else "")
            elif isinstance(it, int):
                it = f"{it:,}"
            if r.get("iterations_extrapolated"):
                it = f"{it}; est. {r['iterations_extrapolated']:,} (extrapolated)"
            me = r.get("marginal_error")
            if c in ("segtransfer", "segtransfer-blocked"):
                me_s = f"{fmt_num(r.get('marginal_error_self'))} (self-reported, max)"
            elif me is None:
                me_s = "—"
            else:
                me_s = fmt_num(me)
                if c == "segtransfer-draw0":
                    me_s += f" (self: {fmt_num(r.get('marginal_error_self'))})"
            sc = r.get("score")
            if c in ("segtransfer", "segtransfer-blocked"):
                sc_s = f"{sc:.5f} ± {r.get('std', 0):.4f} (mean of K)" if sc is not None else "—"
                diff = "—"
            else:
                sc_s = "—" if sc is None else f"{sc:.5f}"
                if c == "replica" and r.get("iterations_pot_schedule") is None and sc is not None:
                    sc_s += " (unconverged)"
                diff = "—" if sc is None or s_ref0 is None or c == "segtransfer-draw0" else f"{abs(sc - s_ref0):.2e}"
            ratio_t = "—"
            if t is not None and t_ref:
                ratio_t = _ratio(t / t_ref) + (" (est.)" if r.get("time_est") else "")
                if r.get("time_lower_bound"):
                    ratio_t = ">= " + ratio_t
            rss = r.get("peak_rss_mb")
            ratio_m = "—" if not rss or not rss_ref or r.get("time_s") is None else _ratio(rss / rss_ref)
            base = r.get("rss_base_mb")
            rss_s = "—" if not rss else f"{rss:,.0f}" + (f" ({base:,.0f})" if base else "")
            lines.append(f"| {n} | {d} | {c} | {fmt_time(r)} | {tk_s} | {it if it is not None else '—'} | {me_s} | "
                         f"{sc_s} | {diff} | {rss_s} | {ratio_t} | {ratio_m} | "
                         f"{r.get('status', '')} |")
    return "\n".join(lines)


def header(info: dict, args) -> str:
    v = info["versions"]
    return "\n".join([
        "# segtransfer OTCE benchmark",
        "",
        f"- date: {info['date']}; host: {info['host']}; git commit: {info['git_commit']}",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']:.1f} GiB RAM; "
        f"load average at start: {', '.join(f'{x:.2f}' for x in info['load_avg_at_start'])}",
        f"- versions: segtransfer {v.get('segtransfer')}, POT {v.get('ot')}, NumPy {v.get('numpy')}, "
        f"SciPy {v.get('scipy')}, Python {v.get('python')}, torch {v.get('torch')}, GeomLoss {v.get('geomloss')}",
        f"- command: `{info['command']}`",
        f"- settings: eps={args.epsilon}, K={args.repeats} repeats, features {args.dtype}, pool of {args.pool} pixels "
        f"per side (seed {args.seed}, target class-frequency spread {args.freq_spread}), budget {args.budget_s:g} s per contender "
        f"(segtransfer: timeout {args.st_timeout or args.budget_s / args.repeats:g} s per solve), authors' rule "
        f"sum|du| < {args.authors_thresh} with max_iter={args.authors_max_iter}",
    ])


NOTES = """
Notes
- time/solve: one OT problem (draw 0) including its cost matrix; for `segtransfer` the whole `st.otce` call
  (sampling, K solves, label statistics) divided by K. "time K solves" is measured for `segtransfer` and
  K × time/solve (est.) for the others. "(est.)" marks numbers that were not measured end to end:
  POT's time to the target = its measured per-iteration time (bounded runs of 1 and 1+B iterations,
  B = --pot-bounded-iters; difference / B) × the iteration count needed + cost matrix and fixed overhead.
- iterations for POT: the count POT's `sinkhorn_log` (plain log-domain Sinkhorn from zero potentials,
  error looked at every 10th iteration) needs to reach the L1 marginal error of `segtransfer-draw0`,
  counted by the `replica` (same iteration in NumPy, checked against POT itself, see validation). ">= X":
  the replica did not reach the target within the budget; "est. Y (extrapolated)": linear-rate fit of
  log(error) over the last third of the replica's run — an extrapolation, not a measurement.
- marginal error: ||pi 1 - a||_1 + ||pi^T 1 - b||_1 computed by the harness in float64 for every
  contender, from the returned plan (POT, emd, authors) or from the potentials with the float64 cost
  (segtransfer, replica). For segtransfer with float32 features the float64 evaluation includes the
  float32 rounding of its cost; "self" is what segtransfer reports on its own cost. GeomLoss: from its
  returned potentials (F, G) = (f, g) (features scaled by sqrt(2) so its cost |x-y|^2/2 is ours,
  blur = sqrt(eps)); its "iterations" are the symmetric updates of its eps-scaling schedule (no stopping rule).
- abs(score - ref): against `segtransfer-draw0`, i.e. the same pixels (draw 0) solved by segtransfer.
- peak RSS: ru_maxrss of the contender's own fresh subprocess (includes Python, NumPy and the data pool).
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    ap.add_argument("--dims", type=int, nargs="+", default=[19, 256])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=300.0, help="time budget per contender and case")
    ap.add_argument("--st-timeout", type=float, default=None,
                    help="segtransfer's per-solve timeout in s (default: budget / K, so st.otce fits the budget)")
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=40_000, help="pixels per side in the synthetic data")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--freq-spread", type=float, default=0.3,
                    help="log-normal spread of the target's class frequencies around the source's")
    ap.add_argument("--contenders", nargs="+", default=DEFAULT_CONTENDERS, choices=CONTENDERS)
    ap.add_argument("--target-error", type=float, default=None,
                    help="L1 marginal error POT must reach (default: what segtransfer-draw0 reached)")
    ap.add_argument("--target-from", choices=["self", "harness"], default="self",
                    help="which of segtransfer-draw0's errors is the target: its self-reported one (on its "
                         "own cost) or the harness's float64 evaluation (includes float32 cost rounding)")
    ap.add_argument("--pot-bounded-iters", type=int, default=10)
    ap.add_argument("--replica-threads", type=int, default=2)
    ap.add_argument("--replica-max-iter", type=int, default=1_000_000)
    ap.add_argument("--authors-thresh", type=float, default=0.1)
    ap.add_argument("--authors-max-iter", type=int, default=100)
    ap.add_argument("--emd-max-n", type=int, default=5000)
    ap.add_argument("--mem-frac", type=float, default=0.8, help="fraction of available memory a dense tensor may use")
    ap.add_argument("--no-validate", action="store_true", help="skip the replica-vs-POT validation")
    ap.add_argument("--validate-n", type=int, default=300)
    ap.add_argument("--validate-iters", type=int, default=1500)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    info = machine_info()
    print(header(info, args), flush=True)
    report = {"info": info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": [], "validation": None}
    json_path = args.out / f"bench-{stamp}.json"
    md_path = args.out / f"bench-{stamp}.md"

    def save():
        json_path.write_text(json.dumps(report, indent=1, default=_json_default))
        draws = sorted({r.get("draws") for r in report["results"] if r.get("draws")})
        md = header(info, args)
        if draws:
            md += ("\n- pixel draws: " + ", ".join(draws) +
                   (" (segtransfer's own sampler: every contender sees the pixels st.otce drew)"
                    if draws == ["segtransfer"] else " (NumPy draw: segtransfer's sampler was not reachable)"))
        md += "\n\n" + build_table(report["results"], args) + "\n" + NOTES
        if report["validation"] is not None:
            md += "\nReplica validation (NumPy plain log-Sinkhorn vs POT itself)\n```\n" + \
                  json.dumps(report["validation"], indent=1, default=_json_default) + "\n```\n"
        md_path.write_text(md)

    if not args.no_validate and ("replica" in args.contenders):
        print(f"\n[validate] replica vs POT at N={args.validate_n}, D={args.dims[0]} ...", flush=True)
        t0 = time.perf_counter()
        try:
            report["validation"] = validate_replica(args.validate_n, args.dims[0], args.seed, args.epsilon,
                                                    args.pool, args.dtype, args.freq_spread,
                                                    min(args.budget_s, 240.0), args.validate_iters)
        except Exception as exc:  # noqa: BLE001
            report["validation"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        v = report["validation"]
        print(f"[validate] {time.perf_counter() - t0:.0f} s; all match: {v.get('all_match')}; "
              f"stop checks: {[(c['replica_predicts_iterations'], c['pot_iterations']) for c in v.get('stop_checks', [])]}; "
              f"L1 checks: {[(c['replica_count'], c['match']) for c in v.get('l1_checks', [])]}", flush=True)
        save()

    grace = 120.0
    for d in args.dims:
        for n in args.sizes:
            case = []
            base = {"n": n, "dim": d, "repeats": args.repeats, "seed": args.seed, "pool": args.pool,
                    "dtype": args.dtype, "freq_spread": args.freq_spread, "epsilon": args.epsilon, "budget_s": args.budget_s,
                    "pot_bounded_iters": args.pot_bounded_iters, "replica_threads": args.replica_threads,
                    "replica_max_iter": args.replica_max_iter, "authors_thresh": args.authors_thresh,
                    "authors_max_iter": args.authors_max_iter, "emd_max_n": args.emd_max_n, "mem_frac": args.mem_frac,
                    "target_error": args.target_error,
                    "st_timeout": args.st_timeout or args.budget_s / args.repeats}
            for c in args.contenders:
                spec = dict(base, contender=c)
                if spec["target_error"] is None:
                    ref0 = next((r for r in case if r["contender"] == "segtransfer-draw0"), None) or {}
                    key = "marginal_error_self" if args.target_from == "self" else "marginal_error"
                    spec["target_error"] = ref0.get(key) or ref0.get("marginal_error") or 1e-6
                rep = next((r for r in case if r["contender"] == "replica"), None)
                if c.startswith("pot-") and rep is not None:
                    spec["iterations_needed"] = rep.get("iterations_pot_schedule")
                    spec["iterations_lower_bound"] = rep.get("iterations_lower_bound")
                    spec["iterations_extrapolated"] = rep.get("iterations_extrapolated")
                print(f"\n[N={n} D={d}] {c}: {DESCRIPTIONS[c]} ...", flush=True)
                t0 = time.perf_counter()
                limit = args.budget_s
                if c in ("segtransfer", "segtransfer-blocked"):
                    limit = max(limit, spec["st_timeout"] * args.repeats)
                elif c == "segtransfer-draw0":
                    limit = max(limit, spec["st_timeout"])
                r = run_worker(spec, timeout=limit + grace)
                r["description"] = DESCRIPTIONS[c]
                case.append(r)
                report["results"].append(r)
                save()
                print(f"[N={n} D={d}] {c}: {r.get('status')}; time/solve {_progress_time(r)}; iterations "
                      f"{r.get('iterations')}; marginal error {fmt_num(r.get('marginal_error'))}; score "
                      f"{fmt_num(r.get('score'), 6)}; peak RSS {fmt_num(r.get('peak_rss_mb'), 4)} MB "
                      f"({time.perf_counter() - t0:.0f} s wall)", flush=True)
    table = build_table(report["results"], args)
    print("\n" + table + "\n" + NOTES)
    save()
    print(f"wrote {md_path}\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
