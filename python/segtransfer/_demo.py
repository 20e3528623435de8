"""A synthetic segmentation benchmark whose transferability ranking is known by construction.

Real transferability benchmarks need datasets, trained encoders and fine-tuning runs; this one fits
in memory, builds in a fraction of a second and needs only NumPy, so the library, its command line
and its tests can show OTCE ranking sources correctly without downloading anything.

How the ordering is made known
------------------------------
Every scene is a Voronoi partition of a 64 x 64 image into regions, each region of one of
``LATENT_TYPES`` (8) latent "stuff" types, balanced in area over a task. One fixed "source encoder"
maps the neighbourhood of a pixel to a 19-channel feature: its latent-type mixture times a fixed
prototype matrix, plus a little Gaussian noise. Every task, the target's and the sources', is seen
through this same encoder, so its features cluster by latent type, and optimal transport between
two tasks pairs pixels of the same latent type. The joint label table P(ys, yt) is then "what a
source label says about the latent type" crossed with "what the target label says about it".

The target labels the 8 latent types directly (H(Yt) = ln 8 = 2.08 nats). The sources see the same
kind of scenes and differ only in how their labels relate to the latent types, which fixes
H(Yt|Ys) analytically for an exact matching. Measured H(Yt|Ys), n_pixels=2000 ("exact": POT's
unregularised OT, seeds 0-4; "otce": ``segtransfer.otce`` at epsilon=0.1, seeds 0-7, mean [range]):

=  ==================  ==============================================  ========  =====  ==================
r  name                source labels                                   analytic  exact  otce
=  ==================  ==============================================  ========  =====  ==================
0  same-taxonomy       the 8 latent types under other class ids        0         0.18   0.37 [0.29, 0.56]
1  merged-pairs        4 classes, each the union of 2 latent types     ln 2      0.83   0.98 [0.90, 1.09]
2  superclasses        2 classes of 4 types each (nests in 1)          ln 4      1.47   1.55 [1.52, 1.59]
3  noisy-superclasses  as 2, 30 % of regions get a coin-flip class     1.81      1.81   1.85 [1.82, 1.88]
4  unrelated           8 classes of an independent layout              ln 8      2.05   2.05 [2.04, 2.05]
=  ==================  ==============================================  ========  =====  ==================

Exact OT lies above the analytic values because some border pixels' receptive fields mix types and
the sampled class counts never match exactly (uniform marginals then move ~3 % of the mass across
types); the entropic plan adds its blur between the closest prototypes. Neither changes the order:
consecutive sources stay >= 0.16 nats apart in every repeat while the spread over draws is <= 0.05.

Why the features are small
--------------------------
The prototypes are random, on average 0.72 apart in squared distance (~7 epsilons), and pixels
scatter around them by far less than epsilon. That is deliberate: the Sinkhorn iterations the
entropic plan needs grow quickly as clusters move many epsilons apart (raw logits, 10^2-10^3
epsilons apart, take thousands), while the ranking stays the same; at this scale a solve at
n_pixels=2000 takes 35-65 iterations to tol=1e-4 (80-90 to 1e-6). The price is the blur above.

Label maps are at 4x the feature resolution, like a stride-4 encoder's input, with 255 on a
4-pixel frame and on region contours (as in VOC-style annotations), so a scorer must downsample
them to the feature grid (nearest: label[4i, 4j]) and drop the ignored pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["DemoBenchmark", "Task", "make_demo", "LATENT_TYPES", "IGNORE_INDEX"]

LATENT_TYPES = 8
"""Number of latent region types; the target task has one class per type."""

IGNORE_INDEX = 255

_IMAGES = 64        # per task: 64 x ~180 valid feature pixels, enough for n_pixels = 10_000
_LABEL_SIZE = 64    # label maps (B, 64, 64)
_STRIDE = 4         # feature maps (B, D, 16, 16)
_CHANNELS = 19      # as if logits of a 19-class (Cityscapes-like) source model; != 16 so that a
                    # channels-last mix-up fails loudly instead of silently
_REGIONS = 12       # Voronoi cells per image (~5 feature pixels across each)
_FRAME = 4          # ignored border width in label pixels: one feature pixel all round
_SEPARATION = 0.72  # mean squared distance between two types' prototypes: ~7 epsilons
_NOISE = 0.02       # per-channel pixel noise: within-type spread 2 * 19 * 0.02^2 = 0.015 << eps
_LABEL_NOISE = 0.3  # fraction of regions given a coin-flip superclass in the noisy source


@dataclass(frozen=True)
class Task:
    """One segmentation task as seen through the shared source encoder.

    features: (B, D, H, W) float32 feature maps. labels: (B, 4H, 4W) uint8 label maps, 255 = ignore.
    relatedness: 0 for the source most related to the target; OTCE must rank sources by it. It is
    -1 for the target itself.
    """

    name: str
    features: np.ndarray
    labels: np.ndarray
    relatedness: int
    description: str = ""


@dataclass(frozen=True)
class DemoBenchmark:
    """A target task and sources listed in order of decreasing relatedness (index == relatedness)."""

    target: Task
    sources: list[Task] = field(default_factory=list)
    seed: int = 0

    @property
    def expected_ranking(self) -> list[str]:
        """Source names from most to least transferable, as designed."""
        return [s.name for s in sorted(self.sources, key=lambda s: s.relatedness)]


def _voronoi(rng: np.random.Generator, images: int) -> np.ndarray:
    """(images, S, S) region ids in [0, _REGIONS): the nearest of _REGIONS random sites.

    Voronoi cells give convex, spatially coherent regions of varied size, which is all OTCE cares
    about: many pixels per region, with few mixed blocks along the borders.
    """
    sites = rng.uniform(0, _LABEL_SIZE, size=(images, _REGIONS, 2))
    sites = sites.astype(np.float32)
    grid = np.arange(_LABEL_SIZE, dtype=np.float32) + 0.5
    dy = grid[None, None, :, None] - sites[:, :, 0, None, None]
    dx = grid[None, None, None, :] - sites[:, :, 1, None, None]
    return np.argmin(dy * dy + dx * dx, axis=1).astype(np.int64)


def _prototypes(rng: np.random.Generator) -> np.ndarray:
    """(LATENT_TYPES, _CHANNELS) mean feature of each latent type, shared by all tasks.

    Random rather than equidistant: a few close pairs couple the clusters strongly enough for
    Sinkhorn to converge fast, while most pairs stay well apart (see the module docstring).
    """
    return rng.normal(0.0, np.sqrt(_SEPARATION / (2 * _CHANNELS)), size=(LATENT_TYPES, _CHANNELS))


def _balanced_types(rng: np.random.Generator, regions: np.ndarray) -> np.ndarray:
    """(images, _REGIONS) latent types such that every type covers about the same area in the task.

    OT with uniform marginals must move all of a source's mass: if one latent type covers 14 % of
    the source pixels but 10 % of the target's, the surplus goes to another type and shows up as
    label confusion that has nothing to do with the labels. Drawing types independently per cell
    leaves imbalances of several percent, so instead the cells, sorted by area, are dealt out in
    rounds of LATENT_TYPES, each round a random permutation of the types: every type gets one cell
    of each size class. Only the sampled feature-grid pixels inside the frame are counted.
    """
    images = regions.shape[0]
    seen = regions[:, _FRAME:_LABEL_SIZE - _FRAME:_STRIDE, _FRAME:_LABEL_SIZE - _FRAME:_STRIDE]
    offsets = np.arange(images)[:, None, None] * _REGIONS
    area = np.bincount((seen + offsets).ravel(), minlength=images * _REGIONS).astype(np.float64)
    order = np.argsort(area + rng.random(area.size), kind="stable")  # random tie-break
    cells = order.size
    rounds = -(-cells // LATENT_TYPES)
    dealt = np.argsort(rng.random((rounds, LATENT_TYPES)), axis=1).ravel()[:cells]
    types = np.empty(cells, dtype=np.int64)
    types[order] = dealt
    return types.reshape(images, _REGIONS)


def _scene(rng: np.random.Generator, images: int) -> tuple[np.ndarray, np.ndarray]:
    """(latent type map, region ids), both (images, S, S): Voronoi cells of area-balanced types."""
    regions = _voronoi(rng, images)
    types = _balanced_types(rng, regions)
    latent = np.take_along_axis(types, regions.reshape(images, -1), axis=1).reshape(regions.shape)
    return latent, regions


def _encode(rng: np.random.Generator, latent: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """The shared "source encoder": (B, S, S) latent map -> (B, D, S/4, S/4) float32 logits.

    Feature pixel (i, j) sees a 3x3 receptive field of label pixels centred on (4i, 4j), the pixel
    that nearest-neighbour downsampling takes its label from. Near region borders the field mixes
    types, so those features fall between prototypes, as a real encoder's do; a wider field (the
    whole 4x4 block) would make a third of the pixels mixed at this scene scale and add ~0.1 nats
    to the best source's H(Yt|Ys). The noise is drawn per task, the prototypes are shared:
    that is what makes the tasks comparable through one encoder.
    """
    b, s, _ = latent.shape
    h = s // _STRIDE
    padded = np.pad(latent, ((0, 0), (1, 1), (1, 1)), mode="edge")
    centre = np.arange(h) * _STRIDE + 1  # (4i, 4j) in padded coordinates
    rows = (centre[:, None] + np.arange(-1, 2)[None, :])  # (h, 3)
    window = padded[:, rows[:, None, :, None], rows[None, :, None, :]]  # (B, h, h, 3, 3)
    mix = np.eye(LATENT_TYPES)[window.reshape(b, h, h, 9)].mean(axis=3)  # (B, h, h, T)
    logits = mix @ prototypes + rng.normal(0.0, _NOISE, size=(b, h, h, prototypes.shape[1]))
    return np.ascontiguousarray(logits.transpose(0, 3, 1, 2), dtype=np.float32)


def _annotate(labels: np.ndarray) -> np.ndarray:
    """uint8 label maps with 255 on the image frame and wherever a label changes (contours).

    Contours are taken from the task's own labels, as an annotator would draw them: merged classes
    have no contour between them.
    """
    out = labels.astype(np.uint8)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1, :] |= labels[:, :-1, :] != labels[:, 1:, :]
    edge[:, :, :-1] |= labels[:, :, :-1] != labels[:, :, 1:]
    edge[:, :_FRAME, :] = edge[:, -_FRAME:, :] = True
    edge[:, :, :_FRAME] = edge[:, :, -_FRAME:] = True
    out[edge] = IGNORE_INDEX
    return out


def _noisy_superclasses(rng: np.random.Generator, latent: np.ndarray, regions: np.ndarray,
                        perm: np.ndarray) -> np.ndarray:
    """Superclass labels where a _LABEL_NOISE fraction of regions get a coin-flip superclass.

    The noise hits whole scene regions, like an annotator mislabelling objects; per-pixel noise
    would be unrealistic and would riddle the maps with ignored contour pixels.
    """
    b = latent.shape[0]
    flip = rng.random((b, _REGIONS)) < _LABEL_NOISE
    coin = rng.integers(0, 2, size=(b, _REGIONS))
    flat = regions.reshape(b, -1)
    flip_px = np.take_along_axis(flip, flat, axis=1).reshape(latent.shape)
    coin_px = np.take_along_axis(coin, flat, axis=1).reshape(latent.shape)
    return np.where(flip_px, coin_px, perm[latent] // 4)


def make_demo(seed: int = 0) -> DemoBenchmark:
    """Build the benchmark: a target and five sources of known relatedness, deterministic in seed.

    Each task has 64 images: features (64, 19, 16, 16) float32, labels (64, 64, 64) uint8. Every
    task has over 11_000 valid feature pixels, so even the library's default n_pixels works.
    seed: any int >= 0; the same seed gives the same arrays (for a given NumPy version).
    """
    rng = np.random.default_rng(np.random.SeedSequence([0x5E67, seed]))
    prototypes = _prototypes(rng)
    perm = rng.permutation(LATENT_TYPES)  # source class ids differ from the target's

    def task(name: str, latent: np.ndarray, labels: np.ndarray, rel: int, desc: str) -> Task:
        feats = _encode(rng, latent, prototypes)
        return Task(name, feats, _annotate(labels), rel, desc)

    t_latent, _ = _scene(rng, _IMAGES)
    target = task("target", t_latent, t_latent, -1, "one class per latent type (8 classes)")

    sources: list[Task] = []
    lat, _ = _scene(rng, _IMAGES)
    sources.append(task("same-taxonomy", lat, perm[lat], 0,
                        "the 8 latent types under permuted class ids"))
    lat, _ = _scene(rng, _IMAGES)
    sources.append(task("merged-pairs", lat, perm[lat] // 2, 1,
                        "4 classes, each merging 2 latent types"))
    lat, _ = _scene(rng, _IMAGES)
    sources.append(task("superclasses", lat, perm[lat] // 4, 2,
                        "2 classes, each merging 4 latent types"))
    lat, cells = _scene(rng, _IMAGES)
    sources.append(task("noisy-superclasses", lat, _noisy_superclasses(rng, lat, cells, perm), 3,
                        f"superclasses with {_LABEL_NOISE:.0%} of regions relabelled by a coin flip"))
    lat, _ = _scene(rng, _IMAGES)
    sources.append(task("unrelated", lat, _scene(rng, _IMAGES)[0], 4,
                        "8 classes from an independent layout: labels say nothing about the scene"))
    return DemoBenchmark(target=target, sources=sources, seed=seed)
