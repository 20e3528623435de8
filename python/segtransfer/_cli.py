"""The ``segtransfer`` command: ``demo``, ``score`` and ``info``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from . import __version__, _core
from ._api import cuda_available, otce
from ._result import OTCEResult


def _row(rank: int | str, name: str, r: OTCEResult) -> str:
    conv = "yes" if r.all_converged else "NO"
    return (f"{rank!s:>4}  {name:<28} {r.score:>10.4f} {r.std:>8.4f} {r.conditional_entropy.mean():>9.4f} "
            f"{r.transport_cost.mean():>10.3f} {conv:>9} {r.elapsed:>7.2f}")


_HEADER = (f"{'rank':>4}  {'source':<28} {'OTCE':>10} {'± std':>8} {'H(Yt|Ys)':>9} {'W_D':>10} "
           f"{'converged':>9} {'time s':>7}")


def _demo(args: argparse.Namespace) -> int:
    from ._demo import make_demo

    bench = make_demo(args.seed)
    tgt = bench.target
    start = time.perf_counter()
    results = []
    for src in bench.sources:
        res = otce(src.features, src.labels, tgt.features, tgt.labels, n_pixels=args.n_pixels,
                   repeats=args.repeats, seed=args.seed)
        results.append((src, res))
    total = time.perf_counter() - start
    ranked = sorted(results, key=lambda sr: -sr[1].score)
    matches = [s.relatedness for s, _ in ranked] == sorted(s.relatedness for s in bench.sources)
    if args.json:
        doc = {
            "target": tgt.name,
            "n_pixels": args.n_pixels,
            "repeats": args.repeats,
            "seed": args.seed,
            "ranking_matches_known_relatedness": matches,
            "total_seconds": total,
            "sources": [
                {"rank": i + 1, "name": s.name, "relatedness": s.relatedness, **r.to_dict()}
                for i, (s, r) in enumerate(ranked)
            ],
        }
        print(json.dumps(doc, indent=2, default=float))
    else:
        print(f"segtransfer {__version__} demo: {len(bench.sources)} synthetic source tasks scored against "
              f"'{tgt.name}' (n_pixels={args.n_pixels}, repeats={args.repeats}, epsilon=0.1, seed={args.seed})")
        print(_HEADER)
        for i, (s, r) in enumerate(ranked):
            print(_row(i + 1, s.name, r))
        known = ", ".join(s.name for s in sorted(bench.sources, key=lambda s: s.relatedness))
        print(f"known relatedness order: {known}")
        print(f"ranking matches the known relatedness: {'yes' if matches else 'NO'}  (total {total:.1f} s)")
    return 0 if matches else 1


def _load(path: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.exists(path):
        raise _UsageError(f"{what} file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("features", "labels") if k not in data.files]
            if missing:
                raise _UsageError(f"{path} lacks the key(s) {missing}; save with np.savez(path, features=..., labels=...)")
            return data["features"], data["labels"]
    except (OSError, ValueError) as exc:
        raise _UsageError(f"cannot read {what} file {path}: {exc}") from None


def _score(args: argparse.Namespace) -> int:
    xs, ys = _load(args.source, "source")
    xt, yt = _load(args.target, "target")
    res = otce(xs, ys, xt, yt, n_pixels=args.n_pixels, repeats=args.repeats, epsilon=args.epsilon,
               seed=args.seed, ignore_index=args.ignore_index, channels_last=args.channels_last)
    if args.json:
        print(json.dumps({"source": args.source, "target": args.target, **res.to_dict()}, indent=2, default=float))
    else:
        print(_HEADER)
        print(_row(1, os.path.basename(args.source), res))
        print("per-repeat OTCE: " + " ".join(f"{s:.4f}" for s in res.scores))
        print(f"iterations: {res.iterations.tolist()}  max marginal error: {res.marginal_error.max():.2e}")
    if not res.all_converged:
        print("warning: some repeats did not converge; the score may be off", file=sys.stderr)
    return 0


def _info(_: argparse.Namespace) -> int:
    print(f"segtransfer {__version__}")
    print(f"CUDA built: {bool(_core.built_with_cuda())}; available: {cuda_available()} ({_core.cuda_status()})")
    print(f"CPU threads: {os.cpu_count()}")
    return 0


class _UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segtransfer", description="OTCE transferability for segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="score synthetic source tasks of known relatedness")
    d.add_argument("--n-pixels", type=int, default=1000)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_demo)
    s = sub.add_parser("score", help="score SOURCE.npz against TARGET.npz (keys: features, labels)")
    s.add_argument("source")
    s.add_argument("target")
    s.add_argument("--n-pixels", type=int, default=10_000)
    s.add_argument("--repeats", type=int, default=10)
    s.add_argument("--epsilon", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ignore-index", type=int, default=255)
    s.add_argument("--channels-last", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_score)
    i = sub.add_parser("info", help="version and backends")
    i.set_defaults(func=_info)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (_UsageError, ValueError, TypeError, MemoryError) as exc:
        print(f"segtransfer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
