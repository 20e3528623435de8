"""The one place where user arrays become what the core reads.

Accepts NumPy arrays and anything exposing ``__dlpack__`` or ``__array_interface__`` (torch, JAX, CuPy on
the host...). Host arrays of a supported dtype are never copied: the core reads them through their strides.
Everything that can be wrong with an input is reported here, naming the argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
IgnoreIndex = Union[int, Sequence[int], None]

# DLPack device types that live in host memory (CPU, CUDA-pinned host, ROCm-pinned host).
_DLPACK_HOST = {1, 3, 11}


def to_host_array(obj: Any, name: str) -> np.ndarray:
    """A NumPy view of ``obj`` without copying when possible; clear errors for device arrays."""
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "__cuda_array_interface__"):
        raise ValueError(
            f"{name} is a CUDA array; this segtransfer build computes on the CPU only "
            "(segtransfer.cuda_available() is False). Move it to host memory first, e.g. tensor.cpu()."
        )
    if hasattr(obj, "__dlpack_device__"):
        dev_type = int(obj.__dlpack_device__()[0])
        if dev_type not in _DLPACK_HOST:
            raise ValueError(
                f"{name} lives on a device (DLPack device type {dev_type}); this segtransfer build "
                "computes on the CPU only. Move it to host memory first, e.g. tensor.cpu()."
            )
        try:
            return np.from_dlpack(obj)
        except (BufferError, TypeError, RuntimeError):
            pass  # e.g. a torch tensor that requires grad: fall back to the array protocols
    if hasattr(obj, "detach") and callable(obj.detach):  # torch tensors with requires_grad
        obj = obj.detach()
    try:
        arr = np.asarray(obj)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the user's input problem
        raise TypeError(f"{name} could not be read as an array: {exc}") from None
    return arr


def check_features(arr: np.ndarray, name: str) -> np.ndarray:
    """Validate dtype; returns a native-endian float32/float64 array (a copy only if byte-swapped)."""
    dt = arr.dtype
    if dt.kind == "f" and dt.itemsize in (4, 8):
        if not dt.isnative:
            return arr.astype(dt.newbyteorder("="))
        return arr
    hint = "convert it with .astype(np.float32) or .astype(np.float64)"
    if dt.kind == "f":
        raise TypeError(f"{name} has dtype {dt}; only float32 and float64 are supported: {hint}")
    if dt.kind in "iub":
        raise TypeError(f"{name} has integer/bool dtype {dt}; features must be floating point: {hint}")
    raise TypeError(f"{name} has unsupported dtype {dt} (kind {dt.kind!r}); {hint}")


def check_labels(arr: np.ndarray, name: str) -> np.ndarray:
    dt = arr.dtype
    if dt.kind not in "iu" or dt == np.bool_:
        raise TypeError(f"{name} must hold integer class ids, got dtype {dt}")
    return arr


@dataclass(frozen=True)
class PixelTable:
    """Features as a (B, P, D) strided view plus one class code per pixel (-1 = ignored)."""

    features: np.ndarray  # (B, P, D), float32/float64, any strides
    codes: np.ndarray  # (B * P,), int32, C-contiguous
    classes: np.ndarray  # (C,), the original label values of codes 0..C-1

    @property
    def num_valid(self) -> int:
        return int(np.count_nonzero(self.codes >= 0))


def _nearest_indices(out_size: int, in_size: int) -> np.ndarray:
    # PyTorch's 'nearest': src = floor(dst * in / out), done in integers so that it is exact.
    return (np.arange(out_size, dtype=np.int64) * in_size) // out_size


def _ignore_values(ignore_index: IgnoreIndex, name: str = "ignore_index") -> np.ndarray:
    if ignore_index is None:
        return np.empty(0, dtype=np.int64)
    values = np.atleast_1d(np.asarray(ignore_index))
    if values.size == 0:
        return np.empty(0, dtype=np.int64)
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an int or a sequence of ints, got {ignore_index!r}")
    return values


def pixel_table(
    features: Any,
    labels: Any,
    *,
    channels_last: bool,
    ignore_index: IgnoreIndex,
    side: str,
) -> PixelTable:
    """Normalise one side (``side`` is 'source' or 'target') of an OTCE call."""
    fname, lname = f"{side}_features", f"{side}_labels"
    x = check_features(to_host_array(features, fname), fname)
    y = check_labels(to_host_array(labels, lname), lname)
    if x.ndim == 2:
        if y.ndim != 1:
            raise ValueError(f"{lname} must be 1-D (P,) for a (P, D) pixel table {fname}, got shape {y.shape}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{lname} has {y.shape[0]} labels but {fname} has {x.shape[0]} pixels (rows)")
        view = x[None, :, :]
        flat = y
    elif x.ndim == 4:
        if channels_last:
            b, h, w, d = x.shape
            view = x.reshape(b, h * w, d)
        else:
            b, d, h, w = x.shape
            view = x.transpose(0, 2, 3, 1).reshape(b, h * w, d)
        if y.ndim != 3:
            raise ValueError(
                f"{lname} must be 3-D label maps (B, H, W) for 4-D feature maps {fname}, got shape {y.shape}"
            )
        if y.shape[0] != b:
            raise ValueError(f"{lname} has {y.shape[0]} label maps but {fname} has {b} feature maps")
        if y.shape[1] < 1 or y.shape[2] < 1:
            raise ValueError(f"{lname} has empty label maps, shape {y.shape}")
        if (y.shape[1], y.shape[2]) != (h, w):
            y = y[:, _nearest_indices(h, y.shape[1])[:, None], _nearest_indices(w, y.shape[2])[None, :]]
        flat = y.reshape(-1)
    else:
        layout = "(B, H, W, D)" if channels_last else "(B, D, H, W)"
        raise ValueError(f"{fname} must be a (P, D) pixel table or {layout} feature maps, got shape {x.shape}")
    if view.shape[2] < 1:
        raise ValueError(f"{fname} has no feature channels (D = 0), shape {x.shape}")
    if view.shape[0] * view.shape[1] == 0:
        raise ValueError(f"{fname} has no pixels, shape {x.shape}")

    ignored = np.isin(flat, _ignore_values(ignore_index)) if ignore_index is not None else None
    valid = flat if ignored is None else flat[~ignored]
    classes, inverse = np.unique(valid, return_inverse=True)
    if classes.size == 0:
        raise ValueError(f"{lname} has no valid pixels: every label is in ignore_index={ignore_index!r}")
    if classes.size > np.iinfo(np.int32).max:
        raise ValueError(f"{lname} has too many distinct classes ({classes.size})")
    codes = np.full(flat.shape[0], -1, dtype=np.int32)
    if ignored is None:
        codes[:] = inverse.reshape(-1)
    else:
        codes[~ignored] = inverse.reshape(-1)
    return PixelTable(features=view, codes=codes, classes=classes)
