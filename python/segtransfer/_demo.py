"""A synthetic segmentation benchmark whose transferability ranking is known by construction.

Real transferability benchmarks need datasets, trained encoders and fine-tuning runs; this one fits
in memory, builds in a fraction of a second and needs only NumPy, so the library, its command line
and its tests can show OTCE ranking sources correctly without downloading anything.

How the ordering is made known
------------------------------
Every scene is a Voronoi partition of a 64 x 64 image into regions, each region drawn from one of
``LATENT_TYPES`` (8) latent "stuff" types. One fixed "source encoder" maps a pixel block to a
16-channel logit-like vector: the block's latent-type mixture times a fixed prototype matrix, plus
Gaussian noise. The prototypes are far apart compared with the noise, so the encoder's features
cluster by latent type in every task, the target's and the sources' alike. Optimal transport
between two such clouds (with near-equal class proportions) therefore pairs pixels of the same
latent type, and the joint label table P(ys, yt) is the table of "what a source label says about
the latent type" crossed with "what the target label says about it".

The target task labels the 8 latent types directly, so H(Yt) is about ln 8 = 2.08 nats. The sources
differ only in how their labels relate to the latent types, which fixes H(Yt|Ys) analytically:

====  ==================  ==========================================================  ==========
rank  name                source labels                                               H(Yt|Ys)
====  ==================  ==========================================================  ==========
0     same-taxonomy       the 8 latent types under other class ids (a permutation)    ~0
1     merged-pairs        4 classes, each the union of 2 latent types                 ~ln 2 = 0.69
2     superclasses        2 classes, each the union of 4 latent types (nested in 1)   ~ln 4 = 1.39
3     noisy-superclasses  as 2, but 30 % of regions get a coin-flip superclass        ~ln 4 + h(0.15) = 1.81
4     unrelated           8 classes from an independent layout (ignores the scene)   ~H(Yt) = 2.08
====  ==================  ==========================================================  ==========

Consecutive sources are 0.25-0.7 nats apart while the spread over pixel draws (n_pixels=2000) is a
few hundredths, so OTCE = -H(Yt|Ys) must rank them in this order. Small deviations from the
analytic values come from the blocks straddling region borders (mixed features), from the sources'
latent proportions not matching the target's exactly (uniform marginals then move a little mass
across types) and from the entropic blur; all are far below the gaps.

Label maps are at 4x the feature resolution, like a stride-4 encoder, with 255 on a 4-pixel frame
and on region contours (as in VOC-style annotations), so a scorer must downsample them to the
feature grid (nearest: label[4i, 4j]) and drop the ignored pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["DemoBenchmark", "Task", "make_demo", "LATENT_TYPES", "IGNORE_INDEX"]

LATENT_TYPES = 8
"""Number of latent region types; the target task has one class per type."""

IGNORE_INDEX = 255

_IMAGES = 64          # per task: 64 * ~175 valid feature pixels, enough for n_pixels = 10_000
_LABEL_SIZE = 64      # label maps (B, 64, 64)
_STRIDE = 4           # feature maps (B, D, 16, 16)
_CHANNELS = 16
_REGIONS = 12         # Voronoi cells per image
_FRAME = 4            # ignored border width in label pixels: one feature pixel all round
_PROTOTYPE_SCALE = 0.15  # see _prototypes
_NOISE = 0.02            # per-channel pixel noise
_LABEL_NOISE = 0.3      # fraction of regions relabelled at random in the noisy source


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
    grid = np.arange(_LABEL_SIZE, dtype=np.float64) + 0.5
    dy = grid[None, None, :, None] - sites[:, :, 0, None, None]
    dx = grid[None, None, None, :] - sites[:, :, 1, None, None]
    return np.argmin(dy * dy + dx * dx, axis=1).astype(np.int64)


def _prototypes(rng: np.random.Generator) -> np.ndarray:
    """(LATENT_TYPES, _CHANNELS) mean logits of each latent type."""
    return rng.normal(0.0, _PROTOTYPE_SCALE, size=(LATENT_TYPES, _CHANNELS))


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
    """(latent type map, region ids), both (images, S, S): Voronoi cells of uniformly drawn types."""
    regions = _voronoi(rng, images)
    types = _balanced_types(rng, regions)
    latent = np.take_along_axis(types, regions.reshape(images, -1), axis=1).reshape(regions.shape)
    return latent, regions


def _encode(rng: np.random.Generator, latent: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """The shared "source encoder": (B, S, S) latent map -> (B, D, S/4, S/4) float32 logits.

    Feature pixel (i, j) sees a 3x3 receptive field of label pixels centred on (4i, 4j), the pixel
    that nearest-neighbour downsampling takes its label from. Near region borders the field mixes
    types, so those features fall between prototypes, as a real encoder's do; a wider field (the
    whole 4x4 block) would make a third of the pixels mixed at this scene scale and lift even the
    best source's H(Yt|Ys) to ~0.3 nats. The noise is drawn per task, the prototypes are shared:
    that is what makes the tasks comparable through one encoder.
    """
    b, s, _ = latent.shape
    h = s // _STRIDE
    padded = np.pad(latent, ((0, 0), (1, 1), (1, 1)), mode="edge")
    centre = np.arange(h) * _STRIDE + 1  # (4i, 4j) in padded coordinates
    rows = (centre[:, None] + np.arange(-1, 2)[None, :])  # (h, 3)
    field = padded[:, rows[:, None, :, None], rows[None, :, None, :]]  # (B, h, h, 3, 3)
    mix = np.eye(LATENT_TYPES)[field.reshape(b, h, h, 9)].mean(axis=3)  # (B, h, h, T)
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

    Each task has 64 images: features (64, 16, 16, 16) float32, labels (64, 64, 64) uint8. Every
    task has at least ~10_000 valid feature pixels, so even the library's default n_pixels works.
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
