"""Small data generators, and the Ctrl-C tests' child process, shared by the tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: Most tests solve on one thread: the machine running the suite may be shared, and OpenMP spin-waits
#: make 2-thread solves of tiny problems erratic under load. Thread-count independence is tested
#: separately (test_otce.py::test_thread_count_does_not_change_result).
ONE_THREAD = {"threads": 1}


def clusters(rng: np.random.Generator, n: int, k: int, d: int, *, sep: float = 1.0, noise: float = 0.3,
             labels: np.ndarray | None = None, centres: np.ndarray | None = None):
    """n points in d dims around k centres; returns (features (n, d) float64, labels 0..k-1, centres)."""
    if centres is None:
        centres = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, size=n) if labels is None else np.asarray(labels)
    x = centres[y] + rng.normal(size=(n, d)) * noise
    return x, y, centres


def weights(rng: np.random.Generator, n: int) -> np.ndarray:
    """Strictly positive, clearly non-uniform weights summing to 1 (ratio up to 5 between entries)."""
    w = rng.uniform(0.2, 1.0, size=n)
    return w / w.sum()


U32 = 2.0 ** -24  # float32 unit roundoff


def hard_problem(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(xs, ys, xt, yt): n points a side where C / epsilon ~ 10^6 at epsilon = 1e-4, so no solve gets
    near tol = 1e-12 in any sensible time; the error stalls at float64's resolution instead."""
    rng = np.random.default_rng(31)
    return rng.normal(size=(n, 4)) * 3, np.arange(n) % 3, rng.normal(size=(n, 4)) * 3 + 1, np.arange(n) % 2


def f32_delta(x32, y32, eps):
    """Bound on |df|/eps for float32 inputs (derivation: test_sinkhorn.py docstring), for these points:
    4 (d + 3) u S / eps for the float32 cost + 1e-3 for convergence to tol 1e-6."""
    x = x32.astype(np.float64)
    y = y32.astype(np.float64)
    mean = np.concatenate([x, y]).mean(0)
    s = float((((x - mean) ** 2).sum(1)).max() + (((y - mean) ** 2).sum(1)).max())
    d = x.shape[1]
    return 4 * (d + 3) * U32 * s / eps + 1e-3


#: The child of the Ctrl-C tests (interrupt_child): argv[1] picks the call ("long", "blocked",
#: "many-short", "gpu"); it prints "solving", makes the call, then "interrupted|finished SECONDS
#: EXPECTED" (exit 130 when interrupted).
INTERRUPT_CHILD = r"""
import signal, sys, time, warnings
import numpy as np
import segtransfer as st
sys.path.insert(0, sys.argv[-1])  # tests/, which interrupt_child passes last
from helpers import hard_problem
warnings.simplefilter("ignore")
# Python leaves SIGINT ignored when it starts that way (a background job of a non-interactive shell,
# e.g. a CI step launched with `&`); the test is about our polling, not about the launcher.
signal.signal(signal.SIGINT, signal.default_int_handler)
if sys.argv[1] == "long":  # one solve of ~13 s
    # 6000 points: the error stops falling at float64's resolution for C / eps ~ 1e6 after ~13 s
    # (one thread, the 2-vCPU benchmark VM) and the solver stops by itself
    # (test_error_stuck_at_float64_resolution_returns). 1200 points had run to the 60 s timeout (error
    # ~1.7e-7) until session 26's Newton and cost changes; they now stop there within a second.
    args = hard_problem(6000)
    kw = dict(n_pixels=None, epsilon=1e-4, tol=1e-12, max_iter=10**9, timeout=60.0, threads=1)
    expected = 13.0
elif sys.argv[1] == "blocked":  # two blocked solves side by side, each polling from its own thread
    # 2000 of 2400 points: ~10 s on the 2 cores of a Zen 5 VM before both stop at float64's resolution.
    # 1000 of 1200 stopped there after 0.93 s by session 42, before the signal (300 of 400 had, within
    # a second, since over-relaxation backs off when balancing stalls, StallBackoff).
    args = hard_problem(2400)
    kw = dict(n_pixels=2000, repeats=2, epsilon=1e-4, tol=1e-12, max_iter=10**9, timeout=60.0, threads=2,
              blocked=True)
    expected = 60.0
elif sys.argv[1] == "gpu":  # one GPU solve that would run for its whole 60 s timeout
    args = hard_problem(3000)
    kw = dict(n_pixels=2000, repeats=3, epsilon=1e-4, tol=1e-12, max_iter=10**9, timeout=60.0, device="cuda")
    st.otce(*args, **{**kw, "timeout": 0.2})  # context and modules loaded before the clock starts
    expected = 60.0
else:  # many solves of ~0.1 ms each, none long enough to reach the solver's own 50 ms poll
    x = np.random.default_rng(31).normal(size=(100, 2))
    args = (x, np.arange(100) % 2, x[::-1].copy(), np.arange(100) % 2)
    t = time.perf_counter()
    st.otce(*args, n_pixels=8, repeats=2000, epsilon=1.0, threads=1)
    per_repeat = (time.perf_counter() - t) / 2000
    repeats = int(min(4e6, 30.0 / per_repeat))  # ~30 s of work
    kw = dict(n_pixels=8, repeats=repeats, epsilon=1.0, threads=1)
    expected = repeats * per_repeat
print("solving", flush=True)
t = time.perf_counter()
try:
    st.otce(*args, **kw)
    print(f"finished {time.perf_counter() - t:.3f} {expected:.3f}", flush=True)
except KeyboardInterrupt:
    print(f"interrupted {time.perf_counter() - t:.3f} {expected:.3f}", flush=True)
    sys.exit(130)
"""


def interrupt_child(script: str, *args: str, delay: float = 1.0) -> tuple[str, str, int]:
    """Runs ``python -c script *args tests_dir`` (the directory last, for the script's imports of
    helpers), waits for its "solving" line, sends SIGINT ``delay`` seconds later and returns (stdout
    after that line, stderr, return code). The child is killed if it outlives the 60 s wait."""
    tests_dir = str(Path(__file__).resolve().parent)
    child = subprocess.Popen([sys.executable, "-c", script, *args, tests_dir], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "solving", child.stderr.read()[-2000:]
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return out, err, child.returncode
