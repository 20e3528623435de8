#!/usr/bin/env python3
"""Fuzz target for the array-parsing boundary: segtransfer.otce / segtransfer.sinkhorn argument handling.

Every input byte string decodes to one call: which function, tiny arrays (shape, dtype, values, memory
layout, container: NumPy, nested lists, 0-d, device stand-ins, junk) and every keyword argument. Byte k
picks option ``byte % len(options)`` of knob k, option 0 being the ordinary choice, and a missing byte
reads as 0: the empty input is a plain valid call and each mutated byte changes one knob.

The oracle (``TestOneInput``): a refused call raises ValueError / TypeError / MemoryError whose message
names an argument and leaks no binding internals; an accepted call returns arrays of the documented
shapes, and a converged result holds finite numbers with 0 <= W_T <= log(Ct). Anything else (another
exception, a crash, a hang) is a finding.

Run it
  with atheris (coverage-guided, libFuzzer flags):
      python tests/fuzz/fuzz_api.py -max_total_time=60 -timeout=20 NEW_CORPUS_DIR tests/fuzz/corpus
  without atheris (seeded random mutation of the corpus, same target):
      python tests/fuzz/fuzz_api.py --random --seconds 60 --seed 0 tests/fuzz/corpus
  replay only (what tests/test_fuzz_corpus.py does):
      python tests/fuzz/fuzz_api.py --replay tests/fuzz/corpus
  regenerate the seed corpus (one input per distinct outcome of 3000 seeded random inputs):
      python tests/fuzz/fuzz_api.py --distill 3000 --seed 0 tests/fuzz/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

try:
    import atheris
except ImportError:  # the random mutator below drives the same target
    atheris = None

if atheris is not None and __name__ == "__main__" and not {"--random", "--replay", "--distill"} & set(sys.argv):
    with atheris.instrument_imports(include=["segtransfer"]):
        import segtransfer as st
else:
    import segtransfer as st

ARGUMENTS = ("source_features", "source_labels", "target_features", "target_labels", "n_pixels", "repeats",
             "epsilon", "seed", "ignore_index", "sampling", "tol", "max_iter", "timeout", "threads", "x", "y",
             "a", "b", "features", "labels", "channels_last")
EXPECTED = (ValueError, TypeError, MemoryError)
NAMES_AN_ARGUMENT = re.compile(r"(?<![A-Za-z_])(" + "|".join(ARGUMENTS) + r")(?![A-Za-z_])")


class Knobs:
    """Reads one byte per decision; option 0 is the ordinary one and a missing byte reads as 0."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.byte() % len(options)]


# ------------------------------------------------------------------------------------- array pieces

class OnDevice:
    def __init__(self, device_type: int) -> None:
        self.device_type = device_type

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self.device_type, 0)

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a device array was exported instead of refused")


class CudaArray:
    __cuda_array_interface__ = {"shape": (2, 2), "typestr": "<f4", "data": (0, False), "version": 3}


class BrokenDLPack:
    def __dlpack_device__(self) -> Any:
        raise RuntimeError("broken")


def _unaligned(a: np.ndarray) -> np.ndarray:
    raw = np.zeros(a.nbytes + 1, dtype=np.uint8)
    out = np.ndarray(a.shape, dtype=a.dtype, buffer=raw, offset=1)
    out[...] = a
    return out


def _field(a: np.ndarray) -> np.ndarray:
    rec = np.zeros(a.shape, dtype=[("v", a.dtype), ("pad", np.int8)])
    rec["v"] = a
    return rec["v"]


def _flip(a: np.ndarray) -> np.ndarray:
    sl = tuple(slice(None, None, -1) for _ in range(a.ndim))
    return a[sl].copy()[sl]


def _every_other(a: np.ndarray) -> np.ndarray:
    big = np.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
    sl = tuple(slice(None, None, 2) for _ in range(a.ndim))
    big[sl] = a
    return big[sl]


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


LAYOUTS: list[Callable[[np.ndarray], Any]] = [
    lambda a: a, np.asfortranarray, _flip, _every_other, _read_only, _unaligned, _field,
    lambda a: np.broadcast_to(a.reshape(-1)[:1].reshape((1,) * a.ndim), a.shape) if a.size else a,
    lambda a: a.tolist(), lambda a: a.reshape(-1)[0] if a.size else np.float64(0.0),
    lambda a: OnDevice(2), lambda a: OnDevice(10), lambda a: CudaArray(), lambda a: BrokenDLPack(),
    lambda a: None, lambda a: "features", lambda a: [[1.0, 2.0], [3.0]],
]
FEATURE_DTYPES = [np.float64, np.float32, ">f8", ">f4", np.float16, np.int64, np.int8, np.uint8, np.bool_,
                  np.complex128, object, "U3", "datetime64[s]"]
LABEL_DTYPES = [np.int64, np.int32, np.uint8, np.int8, np.uint64, ">i8", np.int16, np.float64, np.bool_, object]
SCALES = [1.0, 0.3, 1e-3, 1e-310, 1e-40, 0.0, 1e3, 1e6, 1e20, 1e154]
POISON = [None, None, None, np.nan, np.inf, -np.inf, 5e-324, -0.0]


def _cast(values: np.ndarray, dtype: Any) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            return values.astype(dtype)
        except (TypeError, ValueError):
            return values.astype(np.float64).astype(object)


def features(k: Knobs, shape: tuple[int, ...]) -> Any:
    rng = np.random.default_rng(k.byte())
    values = rng.normal(size=shape) * k.pick(SCALES) + k.pick([0.0, 0.0, 1e6, -3.0])
    poison = k.pick(POISON)
    if poison is not None and values.size:
        values.reshape(-1)[k.byte() % values.size] = poison
    return k.pick(LAYOUTS[:8] * 3 + LAYOUTS)(_cast(values, k.pick(FEATURE_DTYPES)))


def labels(k: Knobs, shape: tuple[int, ...], classes: int) -> Any:
    rng = np.random.default_rng(k.byte())
    values = rng.integers(0, classes, size=shape) if classes > 0 else np.zeros(shape, dtype=np.int64)
    if values.size >= 2 and classes >= 2:
        values.reshape(-1)[:2] = [0, 1]  # at least two classes unless asked otherwise
    offset = k.pick([0, 0, 255, -1, -(2**40), 2**40, 2**62])
    dtype = k.pick(LABEL_DTYPES)
    with np.errstate(all="ignore"):
        values = values.astype(np.int64) + offset
    if k.pick([False, False, True]) and values.size:  # some pixels carry the ignore label
        values.reshape(-1)[: max(1, values.size // 3)] = 255
    return k.pick(LAYOUTS[:8] * 3 + LAYOUTS)(_cast(values, dtype))


def _dim(k: Knobs, options: Sequence[int]) -> int:
    return int(k.pick(options))


# --------------------------------------------------------------------------------------------- calls

def otce_call(k: Knobs) -> tuple[Callable[..., Any], tuple, dict]:
    args: list[Any] = []
    channels_last = False
    for _side in ("source", "target"):
        layout = k.pick(["table", "table", "maps", "maps_last", "flat", "3d", "5d"])
        d = _dim(k, [3, 1, 2, 0, 5])
        if layout in ("maps", "maps_last"):
            b, h, w = _dim(k, [2, 1, 0, 3]), _dim(k, [3, 1, 2, 0, 4]), _dim(k, [4, 1, 2, 0, 5])
            shape: tuple[int, ...] = (b, d, h, w) if layout == "maps" else (b, h, w, d)
            channels_last = channels_last or layout == "maps_last"
            lh, lw = (h, w) if k.pick([True, False]) else (_dim(k, [2 * h, 1, 7, 0]), _dim(k, [w, 3, 1]))
            lshape: tuple[int, ...] = (k.pick([b, b, b + 1, 0]), lh, lw)
        else:
            p = _dim(k, [12, 6, 2, 1, 0, 3, 24])
            shape = {"table": (p, d), "flat": (p,), "3d": (1, p, d), "5d": (1, 1, 1, p, d)}[layout]
            lshape = (max(p + k.pick([0, 0, 0, -1, 1]), 0),) if k.pick([True, True, False]) else (p, 1)
        args.append(features(k, shape))
        args.append(labels(k, lshape, k.pick([3, 2, 1, 0, 5])))
    # Always passed (option 0 keeps each solve to milliseconds): the library's defaults (n_pixels=10_000,
    # max_iter=50_000) would make nearly every tiny input a refusal or a slow solve.
    kw: dict[str, Any] = {"n_pixels": k.pick([None, 4, 2, 1, 0, -1, 10**6, 2**63, 2**64, 1.5, "4", True]),
                          "threads": k.pick([1, 1, 2, None, 0, 10**6, 1.5]),
                          "epsilon": k.pick([0.5, 0.5, 0.1, 1e-6, 1e6, 0.0, -1.0, math.nan, math.inf, 1e-300,
                                             "0.1", None]),
                          "max_iter": k.pick([2000, 2000, 1, 5, 0, -1, 2**62, 2**63, 10.0])}
    optional = {
        "repeats": [2, 1, 3, 0, -1, 10**12, 2**63, 2.0],
        "seed": [0, 1, 2**63 - 1, 2**63, -1, 1.0],
        "ignore_index": [255, None, [], [0, 1], -1, 2**70, 2.5, "255", [[255]], np.uint64(2**64 - 1)],
        "sampling": ["uniform", "Uniform", 3, None],
        "tol": [1e-6, 1e-3, 1e300, 0.0, -1.0, math.nan],
        "timeout": [5.0, 0.01, 0.0, -1.0, math.inf],
        "channels_last": [channels_last, not channels_last],
    }
    for name, options in optional.items():
        if k.pick([False, True]):
            kw[name] = k.pick(options)
    kw.setdefault("channels_last", channels_last)
    return st.otce, tuple(args), kw


def _weights(k: Knobs, n: int) -> Any:
    kind = k.pick(["none", "none", "uniform", "short", "zero", "nan", "unnormalised", "device", "complex"])
    w = np.full(max(n, 1), 1.0 / max(n, 1))
    if kind == "none":
        return None
    if kind == "short":
        return w[:-1]
    if kind == "zero" and n > 1:
        w[0], w[1] = 0.0, 2.0 / n
    if kind == "nan":
        w[0] = math.nan
    if kind == "unnormalised":
        w = w * 2
    if kind == "device":
        return OnDevice(2)
    if kind == "complex":
        return w.astype(complex)
    return w


def sinkhorn_call(k: Knobs) -> tuple[Callable[..., Any], tuple, dict]:
    d = _dim(k, [3, 1, 2, 0])
    n, m = _dim(k, [10, 1, 2, 0, 7]), _dim(k, [8, 1, 3, 0])
    x = features(k, k.pick([(n, d), (n, d), (n,), (1, n, d)]))
    y = features(k, (m, k.pick([d, d, d + 1])))
    kw: dict[str, Any] = {"a": _weights(k, n), "b": _weights(k, m), "threads": k.pick([1, 1, 2, 0]),
                          "epsilon": k.pick([0.5, 0.5, 1e-6, 1e6, 0.0, math.nan, "x"]),
                          "max_iter": k.pick([2000, 2000, 1, 0, 2**63])}
    optional = {"tol": [1e-6, 1e300, 0.0], "timeout": [5.0, 0.01, -1.0]}
    for name, options in optional.items():
        if k.pick([False, True]):
            kw[name] = k.pick(options)
    return st.sinkhorn, (x, y), kw


def decode(data: bytes) -> tuple[Callable[..., Any], tuple, dict]:
    k = Knobs(data)
    return k.pick([otce_call, sinkhorn_call])(k)


# ------------------------------------------------------------------------------------------- oracle

def _check_otce(r: st.OTCEResult) -> None:
    k, cs, ct = r.repeats, r.source_classes.size, r.target_classes.size
    assert cs >= 2 and ct >= 2, (cs, ct)
    for name in ("scores", "conditional_entropy", "transport_cost", "iterations", "converged", "marginal_error"):
        assert getattr(r, name).shape == (k,), name
    assert r.joint.shape == (k, cs, ct)
    for i in np.flatnonzero(r.converged):
        assert np.isfinite(r.scores[i]) and np.all(np.isfinite(r.joint[i])), "converged but not finite"
        assert -1e-12 <= r.conditional_entropy[i] <= math.log(ct) + 1e-9, r.conditional_entropy[i]


def _check_sinkhorn(r: st.SinkhornResult, x: Any, y: Any) -> None:
    assert r.f.ndim == 1 and r.g.ndim == 1
    if r.converged:
        assert np.all(np.isfinite(r.f)) and np.all(np.isfinite(r.g)) and math.isfinite(r.transport_cost)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris and libFuzzer expect
    fn, args, kwargs = decode(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence warnings are the documented outcome
        try:
            result = fn(*args, **kwargs)
        except EXPECTED as exc:
            msg = str(exc)
            assert "incompatible function arguments" not in msg and "internal:" not in msg, f"leaked: {msg!r}"
            assert NAMES_AN_ARGUMENT.search(msg), f"{type(exc).__name__} names no argument: {msg!r}"
            return
    if fn is st.otce:
        _check_otce(result)
    else:
        _check_sinkhorn(result, *args)


# ----------------------------------------------------------------------------------------- runners

def corpus_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return files


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 or not b:
            b.insert(rng.randint(0, len(b)), rng.randrange(256))
        elif op == 1:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 3:
            del b[rng.randrange(len(b))]
        else:
            other = rng.choice(pool)
            cut = rng.randint(0, len(b))
            b = b[:cut] + other[rng.randint(0, len(other)) :]
    return bytes(b[:256])


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang("an input ran longer than the per-input limit")


def run_random(paths: Sequence[str], seconds: float, seed: int, artifacts: Path, per_input: float) -> int:
    """The fallback fuzzer: seeded random mutation and splicing of the corpus, bounded in time; writes a
    failing input to ``artifacts/crash-<sha1>`` and stops, like libFuzzer."""
    rng = random.Random(seed)
    pool = [f.read_bytes() for f in corpus_files(paths)] or [b""]
    signal.signal(signal.SIGALRM, _alarm)  # the solver polls Python signals, so a hang surfaces as Hang
    deadline, runs = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        data = mutate(rng, rng.choice(pool), pool) if runs else b""
        try:
            signal.setitimer(signal.ITIMER_REAL, per_input)
            TestOneInput(data)
        except Exception:
            artifacts.mkdir(parents=True, exist_ok=True)
            path = artifacts / f"crash-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            print(f"fuzz: failure after {runs} inputs; input saved to {path}", file=sys.stderr)
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        runs += 1
        if rng.random() < 0.02:
            pool.append(data)  # keep some variety without coverage feedback
    print(f"fuzz: {runs} inputs in {seconds:.0f} s (seed {seed}), no failure")
    return 0


def outcome(data: bytes) -> str:
    """A short label of what an input does: the exception and the start of its message, or 'ok'."""
    fn, args, kwargs = decode(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            r = fn(*args, **kwargs)
        except EXPECTED as exc:
            return f"{type(exc).__name__}: " + re.split(r"[0-9(\[{'\"]", str(exc))[0][:48]
    converged = bool(np.all(r.converged))
    return f"ok {fn.__name__} converged={converged}"


def distill(count: int, seed: int, out: Path) -> int:
    """Seed corpus: ``count`` seeded random inputs (random bytes and mutations of those kept), keeping
    the first input of every distinct outcome; written to ``out`` as files named by their hash."""
    rng = random.Random(seed)
    kept: dict[str, bytes] = {"ok otce converged=True": b""}
    for _ in range(count):
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) if rng.random() < 0.3 else 0 for _ in range(rng.randint(1, 60)))
        else:
            data = mutate(rng, rng.choice(list(kept.values())), list(kept.values()))
        kept.setdefault(outcome(data), data)
    out.mkdir(parents=True, exist_ok=True)
    for data in kept.values():
        (out / hashlib.sha1(data).hexdigest()).write_bytes(data)
    print(f"fuzz: {len(kept)} outcomes from {count} inputs written to {out}")
    return 0


def replay(paths: Sequence[str]) -> int:
    files = corpus_files(paths)
    for f in files:
        TestOneInput(f.read_bytes())
    print(f"fuzz: replayed {len(files)} inputs")
    return 0


def main(argv: list[str]) -> int:
    if "--distill" in argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--distill", type=int, required=True)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("out")
        ns = ap.parse_args(argv)
        return distill(ns.distill, ns.seed, Path(ns.out))
    if "--random" in argv or "--replay" in argv:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--random", action="store_true")
        ap.add_argument("--replay", action="store_true")
        ap.add_argument("--seconds", type=float, default=60.0)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--per-input", type=float, default=20.0)
        ap.add_argument("--artifacts", default="build/fuzz")
        ap.add_argument("corpus", nargs="+")
        ns = ap.parse_args(argv)
        if ns.replay:
            return replay(ns.corpus)
        return run_random(ns.corpus, ns.seconds, ns.seed, Path(ns.artifacts), ns.per_input)
    if atheris is None:
        print("atheris is not installed; use --random (or pip install atheris)", file=sys.stderr)
        return 2
    atheris.Setup([sys.argv[0], *argv], TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
