"""The ``segtransfer`` command: ``demo``, ``score`` and ``info``.

Kept thin on purpose: every number comes from ``segtransfer.otce``; this module only loads inputs,
formats results and turns the library's exceptions into one-line messages with exit code 2, so a
shell script can tell bad input (2) from a demo whose ranking came out wrong (1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

import segtransfer as _st
from segtransfer._api import DEFAULT_MAX_ITER, stop_cause, unconverged_effect

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

#: The demo's Sinkhorn tolerance (L1 marginal error). On the demo's tasks it gives the same scores
#: to 4 decimals as the library's default (1e-6) with half the iterations, which keeps the demo
#: well under a minute on 2 cores.
DEMO_TOL = 1e-4


class CliError(Exception):
    """Bad input the user can fix (missing file or key); reported like a library ValueError."""


# --------------------------------------------------------------------------------------- helpers


def _jsonable(obj: Any) -> Any:
    """Plain JSON: arrays to lists, NumPy scalars to Python, NaN/inf to null (strict parsers reject NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _result_dict(res: Any) -> dict[str, Any]:
    """The fields of an OTCEResult that a script needs (the joint tables included)."""
    keys = ("score", "std", "scores", "conditional_entropy", "transport_cost", "iterations", "converged",
            "marginal_error", "joint", "source_classes", "target_classes", "epsilon", "tol", "n_pixels",
            "repeats", "seed", "dtype", "elapsed", "timed_out", "blocked")
    out = {k: getattr(res, k) for k in keys if hasattr(res, k)}
    out["all_converged"] = bool(np.all(res.converged))
    return out


def _otce(what: str, *args: Any, **kwargs: Any) -> Any:
    """st.otce, with its non-convergence RuntimeWarning replaced by one line on stderr.

    The library's warning text is long and, printed by the warnings module, carries a source line
    from this file; a CLI user needs which input was affected and what to do.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        res = _st.otce(*args, **kwargs)
    for w in caught:  # pass on anything but the convergence warning, reported below
        if not (issubclass(w.category, RuntimeWarning) and "did not reach tol" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    conv = np.asarray(res.converged, dtype=bool)
    if not conv.all():
        worst = float(np.max(res.marginal_error))
        max_iter = kwargs.get("max_iter") or DEFAULT_MAX_ITER  # the CLI has no timeout
        cause = stop_cause(False, bool(np.all(res.iterations[~conv] < max_iter)),
                           float(np.max(np.asarray(res.marginal_error)[~conv])))
        advice = {"stalled": "its error stopped falling: loosen --tol or raise --epsilon",
                  "diverged": "the iteration diverged: raise --epsilon"}.get(cause, "raise --max-iter or loosen --tol")
        print(f"warning: {what}: Sinkhorn did not converge in {int((~conv).sum())} of {conv.size} repeats "
              f"(worst marginal error {worst:.2g}, tol {res.tol:g}); {unconverged_effect(worst)}: {advice}",
              file=sys.stderr)
    return res


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


_COLUMNS = (f"{'rank':>4}  {'source':<20} {'OTCE':>8} {'± std':>7} {'H(Yt|Ys)':>9} {'W_D':>9} {'converged':>9} "
            f"{'time':>7}")


def _row(rank: int, name: str, res: Any) -> str:
    return (f"{rank:>4}  {name:<20} {res.score:>8.4f} {res.std:>7.4f} {float(np.mean(res.conditional_entropy)):>9.4f} "
            f"{float(np.mean(res.transport_cost)):>9.4g} {_yes(bool(np.all(res.converged))):>9} "
            f"{res.elapsed:>6.2f}s")


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _seed(text: str) -> int:
    return _int_at_least(text, 0)


def _n_pixels(text: str) -> int | None:
    """An integer, or 'all' for every valid pixel in one draw (n_pixels=None in the API)."""
    return None if text.lower() == "all" else _positive_int(text)


def _ignore(text: str) -> int | list[int] | None:
    """'255', '0,255' or 'none': the forms ignore_index accepts."""
    if text.lower() == "none":
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, a comma-separated list or 'none', got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one label value")
    return values[0] if len(values) == 1 else values


def _threads() -> int:
    """Threads the CPU solver uses by default: OpenMP's OMP_NUM_THREADS, else the usable cores."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# -------------------------------------------------------------------------------------- commands


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import make_demo

    bench = make_demo(args.seed)
    tgt = bench.target
    start = time.perf_counter()
    scored = [(src, _otce(f"source {src.name!r}", src.features, src.labels, tgt.features, tgt.labels,
                          n_pixels=args.n_pixels, repeats=args.repeats, seed=args.seed, tol=args.tol,
                          threads=args.threads))
              for src in bench.sources]
    total = time.perf_counter() - start
    ranked = sorted(scored, key=lambda sr: -sr[1].score)
    known = bench.expected_ranking
    # Tied scores rank nothing: sorted() is stable and the sources come in the known order, so a tie
    # (every score 0 at n_pixels=1) would otherwise pass as the right ranking.
    scores = [r.score for _, r in ranked]
    tied = any(not scores[i] > scores[i + 1] for i in range(len(scores) - 1))
    matches = [s.name for s, _ in ranked] == known and not tied

    if args.json:
        doc = {
            "target": tgt.name,
            "n_pixels": args.n_pixels,
            "repeats": args.repeats,
            "seed": args.seed,
            "epsilon": 0.1,
            "tol": args.tol,
            "known_ranking": known,
            "ranking": [s.name for s, _ in ranked],
            "ranking_matches_known_relatedness": matches,
            "tied_scores": tied,
            "total_seconds": total,
            "sources": [{"rank": i + 1, "name": s.name, "relatedness": s.relatedness, "description": s.description,
                         **_result_dict(r)} for i, (s, r) in enumerate(ranked)],
        }
        print(json.dumps(_jsonable(doc), indent=2))
    else:
        b, d, h, w = tgt.features.shape
        print(f"segtransfer {_st.__version__} demo (seed {args.seed}): {len(scored)} synthetic sources scored "
              f"against a {b}-image target ({d}x{h}x{w} features, labels {tgt.labels.shape[1]}x{tgt.labels.shape[2]})")
        print(f"n_pixels={args.n_pixels}, repeats={args.repeats}, epsilon=0.1, tol={args.tol:g}; "
              "higher OTCE = more transferable")
        print(_COLUMNS)
        for i, (s, r) in enumerate(ranked):
            print(_row(i + 1, s.name, r))
        print(f"known order (most related first): {', '.join(known)}")
        note = " (tied scores rank nothing: raise --n-pixels)" if tied else ""
        print(f"ranking matches the known relatedness: {_yes(matches)}{note}   (scored in {total:.1f} s)")
    return EXIT_OK if matches else EXIT_MISMATCH


def _load(path: str, side: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise CliError(f"{side} file not found: {path}")
    hint = "save with np.savez(path, features=..., labels=...)"
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if not zipfile.is_zipfile(path) and magic != b"\x93NUMPY":  # np.load would try it as a pickle
        raise CliError(f"{side} file {path} is not a NumPy .npz archive; {hint}")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            raise CliError(f"{side} file {path} holds a single array, not 'features' and 'labels'; {hint}")
        with data:
            missing = [k for k in ("features", "labels") if k not in data.files]
            if missing:
                raise CliError(f"{side} file {path} has no {' or '.join(repr(k) for k in missing)} array "
                               f"(found: {', '.join(data.files) or 'none'}); {hint}")
            return data["features"], data["labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # not NumPy, truncated, pickled
        raise CliError(f"cannot read {side} file {path}: {exc}") from None


def _cmd_score(args: argparse.Namespace) -> int:
    xs, ys = _load(args.source, "source")
    xt, yt = _load(args.target, "target")
    res = _otce("score", xs, ys, xt, yt, n_pixels=args.n_pixels, repeats=args.repeats, epsilon=args.epsilon,
                seed=args.seed, ignore_index=args.ignore_index, channels_last=args.channels_last, tol=args.tol,
                max_iter=args.max_iter, threads=args.threads, blocked=args.blocked)
    if args.json:
        print(json.dumps(_jsonable({"source": args.source, "target": args.target, **_result_dict(res)}), indent=2))
        return EXIT_OK
    ns, nt = res.n_pixels
    print(f"source: {args.source}  ({len(res.source_classes)} classes)")
    print(f"target: {args.target}  ({len(res.target_classes)} classes)")
    print(f"OTCE score: {res.score:.4f} ± {res.std:.4f}   ({res.repeats} repeats of {ns}+{nt} pixels, "
          f"epsilon={res.epsilon:g}, seed={res.seed}, {res.dtype}, {res.elapsed:.2f} s)")
    print(f"{'repeat':>6} {'OTCE':>9} {'H(Yt|Ys)':>9} {'W_D':>10} {'iterations':>10} {'converged':>9} {'marg. err':>9}")
    for k in range(res.repeats):
        print(f"{k:>6} {res.scores[k]:>9.4f} {res.conditional_entropy[k]:>9.4f} {res.transport_cost[k]:>10.4g} "
              f"{int(res.iterations[k]):>10} {_yes(bool(res.converged[k])):>9} {res.marginal_error[k]:>9.1e}")
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from . import _core

    built = bool(_core.built_with_cuda())
    status = getattr(_core, "cuda_status", None)
    detail = f" ({status()})" if callable(status) else ""
    print(f"segtransfer {_st.__version__} (numpy {np.__version__}, python {sys.version.split()[0]})")
    print(f"CUDA built: {_yes(built)}; CUDA available: {_yes(_st.cuda_available())}{detail}")
    print(f"CPU threads: {_threads()} (of {os.cpu_count()} cores; set OMP_NUM_THREADS or threads= to change)")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segtransfer",
                                description="OTCE transferability estimation for semantic segmentation.")
    p.add_argument("--version", action="version", version=f"segtransfer {_st.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,score,info}")

    d = sub.add_parser("demo", help="rank synthetic sources of known relatedness (exit 1 if the ranking is wrong)",
                       description="Score the sources of segtransfer's synthetic benchmark against its target "
                                   "and check the ranking against the designed relatedness.")
    d.add_argument("--n-pixels", type=_positive_int, default=2000, help="pixels per side and draw (default 2000)")
    d.add_argument("--repeats", type=_positive_int, default=5, help="independent draws (default 5)")
    d.add_argument("--seed", type=_seed, default=0, help="benchmark and sampling seed (default 0)")
    d.add_argument("--tol", type=float, default=DEMO_TOL,
                   help=f"Sinkhorn tolerance (default {DEMO_TOL:g}: same scores to 4 decimals as the library's "
                        "1e-6, in half the time)")
    d.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all)")
    d.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("score", help="OTCE of SOURCE.npz to TARGET.npz",
                       description="Score a source task against a target task. Each .npz file holds "
                                   "'features' ((P, D) or (B, D, H, W) maps) and 'labels' ((P,) or (B, H', W')).")
    s.add_argument("source", help="source .npz (features, labels)")
    s.add_argument("target", help="target .npz (features, labels)")
    s.add_argument("--n-pixels", type=_n_pixels, default=10_000,
                   help="pixels per side and draw, or 'all' (default 10000)")
    s.add_argument("--repeats", type=_positive_int, default=10, help="independent draws (default 10)")
    s.add_argument("--epsilon", type=float, default=0.1, help="entropic regularisation (default 0.1)")
    s.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    s.add_argument("--ignore-index", type=_ignore, default=255, metavar="LABELS",
                   help="label(s) to ignore: an int, a comma-separated list, or 'none' (default 255); "
                        "a value starting with '-' needs the = form: --ignore-index=-1,255")
    s.add_argument("--channels-last", action="store_true", help="feature maps are (B, H, W, D)")
    s.add_argument("--tol", type=float, default=None, help="Sinkhorn tolerance (default: the library's)")
    s.add_argument("--max-iter", type=_positive_int, default=None,
                   help="Sinkhorn iteration cap (default: the library's)")
    s.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all)")
    s.add_argument("--blocked", action="store_true",
                   help="recompute the cost instead of storing it: for n-pixels whose N x N cost does not fit "
                        "in memory (far slower; see the README)")
    s.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    s.set_defaults(func=_cmd_score)

    i = sub.add_parser("info", help="version, CUDA support and thread count")
    i.set_defaults(func=_cmd_info)
    return p


def _cli_spelling(message: str, command: str) -> str:
    """A library message's advice in this command's option names."""
    every = "lower --n-pixels" if command == "demo" else "lower --n-pixels or pass --n-pixels all to use them all"
    return message.replace("lower n_pixels or pass n_pixels=None to use them all", every)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segtransfer`` console script; returns the exit status.

    0: success; 1: ``demo`` ranked the sources differently from their known relatedness;
    2: bad input or arguments (one line on stderr, no traceback); 130: interrupted.
    """
    parser = _parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors exit 2
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_ERROR
    try:
        return int(args.func(args))
    except (CliError, ValueError, TypeError, MemoryError) as exc:
        print(f"segtransfer {args.command}: error: {_cli_spelling(str(exc), args.command)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("segtransfer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `segtransfer ... | head`: stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
