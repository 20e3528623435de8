"""segtransfer: which pretrained source will transfer best to your segmentation task (OTCE)."""

from __future__ import annotations

from ._api import DEFAULT_MAX_ITER, DEFAULT_TOL, cuda_available, otce, sinkhorn
from ._result import OTCEResult, SinkhornResult

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "OTCEResult",
    "SinkhornResult",
    "cuda_available",
    "otce",
    "sinkhorn",
    "__version__",
]
