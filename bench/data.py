"""Deterministic synthetic "segmentation features" for the OTCE benchmark.

The features imitate what a segmentation network's last layer produces for every pixel:

* ``dim == 19`` ("logits"): one coordinate per class of the source model. A pixel of latent class c
  has logits ``m_c + noise`` where ``m_c`` has a dominant coordinate c of magnitude 5..15 on top of a
  small class-specific bias; boundary pixels are blends of two class means. Squared distances then
  range from ~2 (same class) to a few hundred (different classes), so ``cost / eps`` reaches ~10^3
  at eps = 0.1, as in the paper's setting.
* any other ``dim`` (e.g. 256, "embeddings"): class prototypes at random directions with norms ~6-9
  plus isotropic noise, again giving squared distances from a few units to a few hundred.

Source and target are two *related* tasks on two domains: the source task labels pixels with the 19
latent classes; the target task uses a coarser, partly regrouped label set (``TARGET_GROUPS``) with
some label noise, its own (related) class frequencies and a small domain shift in feature space. About 3 % of
the pixels carry the ignore label 255.

Everything is a pure function of ``(dim, pixels, seed)``.
"""

from __future__ import annotations

import numpy as np

IGNORE = 255
NUM_LATENT = 19
# Target label of each latent class: 10 target classes; several latent classes merge (coarse task),
# latent classes 17 and 18 are split differently than in the source task.
TARGET_GROUPS = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 8], dtype=np.int64)


def _class_frequencies(rng: np.random.Generator, k: int, skew: float) -> np.ndarray:
    """Imbalanced class frequencies (Zipf-like, shuffled), as in street-scene data sets."""
    w = 1.0 / np.arange(1, k + 1) ** skew
    rng.shuffle(w)
    return w / w.sum()


def _related_frequencies(rng: np.random.Generator, freq: np.ndarray, spread: float) -> np.ndarray:
    """Another domain's frequencies of the same classes: same ranking roughly, perturbed log-normally."""
    w = freq * np.exp(rng.normal(0.0, spread, size=freq.shape))
    return w / w.sum()


def _prototypes(rng: np.random.Generator, dim: int) -> np.ndarray:
    if dim == NUM_LATENT:
        margin = rng.uniform(5.0, 15.0, size=NUM_LATENT)
        protos = rng.normal(0.0, 0.8, size=(NUM_LATENT, dim))  # class-specific bias on all logits
        protos[np.arange(NUM_LATENT), np.arange(NUM_LATENT)] += margin
        return protos
    dirs = rng.normal(size=(NUM_LATENT, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return dirs * rng.uniform(6.0, 9.0, size=(NUM_LATENT, 1))


def _domain(rng: np.random.Generator, protos: np.ndarray, pixels: int, freq: np.ndarray, noise: float,
            shift: np.ndarray, blend_frac: float) -> tuple[np.ndarray, np.ndarray]:
    dim = protos.shape[1]
    z = rng.choice(NUM_LATENT, size=pixels, p=freq)
    x = protos[z] + shift
    # Boundary pixels: convex blend with a second class.
    nb = int(blend_frac * pixels)
    which = rng.choice(pixels, size=nb, replace=False)
    other = rng.integers(0, NUM_LATENT, size=nb)
    lam = rng.uniform(0.0, 0.5, size=(nb, 1))
    x[which] = (1.0 - lam) * x[which] + lam * (protos[other] + shift)
    x += rng.normal(0.0, noise, size=(pixels, dim))
    return x.astype(np.float32), z


def make_task_pair(dim: int, pixels: int, seed: int = 0, dtype: str = "float32", freq_spread: float = 0.5):
    """Source and target pixel tables: ``(xs (P, dim), ys (P,), xt (P, dim), yt (P,))``.

    Labels are int64; ignored pixels have label 255. Features have the requested dtype (float32 like
    a network's output by default; float64 is the float32 values upcast).
    """
    rng = np.random.default_rng([seed, dim, pixels, 20240521])
    protos = _prototypes(rng, dim)
    noise = 0.45 if dim == NUM_LATENT else 0.12
    freq_s = _class_frequencies(rng, NUM_LATENT, 1.1)
    xs, zs = _domain(rng, protos, pixels, freq_s, noise, np.zeros(dim), blend_frac=0.08)
    shift = rng.normal(0.0, 0.3 if dim == NUM_LATENT else 0.05, size=dim)
    xt, zt = _domain(rng, protos, pixels, _related_frequencies(rng, freq_s, freq_spread), noise * 1.15,
                     shift, blend_frac=0.12)
    ys = zs.copy()
    yt = TARGET_GROUPS[zt]
    flip = rng.random(pixels) < 0.04  # annotation noise on the target task
    yt[flip] = rng.integers(0, TARGET_GROUPS.max() + 1, size=int(flip.sum()))
    ys[rng.random(pixels) < 0.03] = IGNORE
    yt[rng.random(pixels) < 0.03] = IGNORE
    return xs.astype(dtype), ys, xt.astype(dtype), yt


def valid_codes(labels: np.ndarray, ignore: int = IGNORE) -> np.ndarray:
    """int32 code per pixel: index into the sorted valid label values, -1 for ignored pixels."""
    codes = np.full(labels.shape[0], -1, dtype=np.int32)
    ok = labels != ignore
    _, inv = np.unique(labels[ok], return_inverse=True)
    codes[ok] = inv.reshape(-1)
    return codes


def draw_indices(ys: np.ndarray, yt: np.ndarray, n: int, repeats: int, seed: int):
    """The pixel draws ``st.otce(..., n_pixels=n, repeats=repeats, seed=seed)`` makes, if segtransfer's
    sampler can be reached (same generator, same seed derivation); otherwise a NumPy draw.

    Returns ``(idx_s (K, n), idx_t (K, n), how)`` with ``how`` in {"segtransfer", "numpy"}.
    """
    cs, ct = valid_codes(ys), valid_codes(yt)
    try:
        from segtransfer import _core  # noqa: PLC0415

        idx_s = np.asarray(_core.sample_pixels(cs, n, repeats, 2 * seed, "source_labels")).reshape(repeats, n)
        idx_t = np.asarray(_core.sample_pixels(ct, n, repeats, 2 * seed + 1, "target_labels")).reshape(repeats, n)
        return idx_s.astype(np.int64), idx_t.astype(np.int64), "segtransfer"
    except Exception:  # noqa: BLE001 - not installed / internals changed: fall back
        rng = np.random.default_rng([seed, n, 7])
        vs, vt = np.flatnonzero(cs >= 0), np.flatnonzero(ct >= 0)
        idx_s = np.stack([np.sort(rng.choice(vs, n, replace=False)) for _ in range(repeats)])
        idx_t = np.stack([np.sort(rng.choice(vt, n, replace=False)) for _ in range(repeats)])
        return idx_s, idx_t, "numpy"


if __name__ == "__main__":  # quick look at the cost scale
    for d in (19, 256):
        xs, ys, xt, yt = make_task_pair(d, 3000, 0)
        a = xs[:1000].astype(np.float64)
        b = xt[:1000].astype(np.float64)
        c = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        same = ys[:1000, None] == np.arange(19)
        print(f"D={d}: C min {c.min():.2f}  median {np.median(c):.1f}  max {c.max():.1f}  "
              f"row-min median {np.median(c.min(1)):.2f}  C/eps max {c.max() / 0.1:.0f}  "
              f"classes src {np.unique(ys).size - 1} tgt {np.unique(yt).size - 1}")
