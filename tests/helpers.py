"""Small data generators shared by the tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

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


def f32_delta(x32, y32, eps):
    """Bound on |df|/eps for float32 inputs (derivation: test_sinkhorn.py docstring), for these points:
    4 (d + 3) u S / eps for the float32 cost + 1e-3 for convergence to tol 1e-6."""
    x = x32.astype(np.float64)
    y = y32.astype(np.float64)
    mean = np.concatenate([x, y]).mean(0)
    s = float((((x - mean) ** 2).sum(1)).max() + (((y - mean) ** 2).sum(1)).max())
    d = x.shape[1]
    return 4 * (d + 3) * U32 * s / eps + 1e-3


def interrupt_child(script: str, *args: str, delay: float = 1.0) -> tuple[str, str, int]:
    """Runs ``python -c script *args``, waits for its "solving" line, sends SIGINT ``delay`` seconds
    later and returns (stdout after that line, stderr, return code). The child is killed if it
    outlives the 60 s wait."""
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
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
