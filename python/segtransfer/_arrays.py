"""The one place where user arrays become what the core reads.

Accepts NumPy arrays and anything exposing ``__dlpack__`` or ``__array_interface__`` (torch, JAX, CuPy on
the host...). Host arrays of a supported dtype are not copied: the core reads them through their strides
(feature maps whose H and W do not merge into one pixel stride, e.g. crops, are the exception: the
reshape to (B, P, D) copies them).
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
_DLPACK_NAMES = {2: "CUDA", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 10: "ROCm", 12: "ExtDev",
                 13: "CUDA managed", 14: "oneAPI", 15: "WebGPU", 16: "Hexagon", 17: "MAIA"}


_CONVERT_HINT = ("convert it to float32 or float64 first (NumPy, JAX, CuPy: .astype(np.float32); "
                 "PyTorch: .float())")


def settle_torch(obj: Any, name: str) -> Any:
    """A torch tensor whose DLPack export means its values (other objects pass through).

    torch exports a tensor with a pending negation (the neg bit of views such as ``z.conj().imag``)
    as its storage, without the sign: read in place it would give the negated features, silently.
    Such tensors are materialised first (a copy, the one case where torch input is copied). Sparse
    layouts have no strided storage to read at all.
    """
    if not type(obj).__module__.startswith("torch"):
        return obj
    layout = getattr(obj, "layout", None)
    if layout is not None and str(layout) != "torch.strided":
        raise TypeError(f"{name} is a torch tensor with layout {layout}; pass a dense tensor (.to_dense())")
    if getattr(obj, "is_meta", False) is True:
        raise ValueError(f"{name} is a torch tensor on the 'meta' device, which holds no values; "
                         "pass a tensor with data (on the CPU, or on CUDA with device='cuda')")
    if getattr(obj, "requires_grad", False) and callable(getattr(obj, "detach", None)):
        obj = obj.detach()  # torch refuses to export tensors that require grad; detach shares storage
    if callable(getattr(obj, "is_neg", None)) and obj.is_neg():
        obj = obj.resolve_neg()
    if callable(getattr(obj, "is_conj", None)) and obj.is_conj():
        obj = obj.resolve_conj()
    return obj


def to_host_array(obj: Any, name: str) -> np.ndarray:
    """A NumPy view of ``obj`` without copying when possible; clear errors for device arrays."""
    if isinstance(obj, np.ndarray):
        return obj
    obj = settle_torch(obj, name)
    dlpack_error: Exception | None = None
    if hasattr(obj, "__cuda_array_interface__"):
        raise ValueError(
            f"{name} is a CUDA array; this segtransfer build computes on the CPU only "
            "(segtransfer.cuda_available() is False). Move it to host memory first, e.g. tensor.cpu()."
        )
    if hasattr(obj, "__dlpack_device__"):
        try:
            dev_type = int(obj.__dlpack_device__()[0])
        except Exception as exc:  # noqa: BLE001 - a broken protocol object is the user's input problem
            raise TypeError(f"{name}.__dlpack_device__() did not return (device_type, device_id): {exc!r}") from None
        if dev_type not in _DLPACK_HOST:
            where = _DLPACK_NAMES.get(dev_type, "non-host")
            raise ValueError(
                f"{name} lives on a {where} device (DLPack device type {dev_type}); this segtransfer build "
                "computes on the CPU only. Move it to host memory first, e.g. tensor.cpu()."
            )
        try:
            return np.from_dlpack(obj)
        except (BufferError, TypeError, RuntimeError) as exc:
            dlpack_error = exc  # e.g. a dtype NumPy lacks: the array protocols may still read it
    try:
        arr = np.asarray(obj)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the user's input problem
        dtype = getattr(obj, "dtype", None)
        if dtype is not None:  # e.g. torch.bfloat16, which neither DLPack to NumPy nor NumPy itself can read
            raise TypeError(f"{name} has dtype {dtype}, which NumPy cannot read; only float32 and float64 "
                            f"features are supported: {_CONVERT_HINT}") from None
        raise TypeError(f"{name} could not be read as an array: {exc}") from None
    if arr.dtype == object and dlpack_error is not None:
        raise TypeError(f"{name} could not be exported through DLPack ({type(dlpack_error).__name__}: "
                        f"{dlpack_error}) nor read as an array otherwise") from None
    return arr


def check_features(arr: np.ndarray, name: str) -> np.ndarray:
    """Validate dtype; returns a native-endian, aligned float32/float64 array.

    A copy is made only when the core could not read the array in place: byte-swapped data, a
    misaligned buffer, or strides that are not whole elements (a field of a structured array).
    """
    dt = arr.dtype
    if dt.kind == "f" and dt.itemsize in (4, 8):
        if not dt.isnative:
            return arr.astype(dt.newbyteorder("="))
        if not arr.flags.aligned or any(s % dt.itemsize for s in arr.strides):
            return np.array(arr, dtype=dt, order="C")
        return arr
    if dt.kind == "f" or "float" in dt.name:  # ml_dtypes' bfloat16 (JAX) has kind 'V'
        raise TypeError(f"{name} has dtype {dt}; only float32 and float64 are supported: {_CONVERT_HINT}")
    if dt.kind in "iub":
        raise TypeError(f"{name} has integer/bool dtype {dt}; features must be floating point: {_CONVERT_HINT}")
    raise TypeError(f"{name} has unsupported dtype {dt} (kind {dt.kind!r}); {_CONVERT_HINT}")


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


def _ignore_values(ignore_index: IgnoreIndex, label_dtype: np.dtype, name: str = "ignore_index") -> np.ndarray:
    """The ignored values that a label of ``label_dtype`` can take, in that dtype.

    Comparing in the labels' own dtype keeps the match exact: ``np.isin`` on uint64 labels and int64
    values would compare in float64, where labels above 2**53 collide.
    """
    if ignore_index is None:
        return np.empty(0, dtype=label_dtype)
    beyond_64_bits = ValueError(f"{name} holds {ignore_index!r}, outside the 64-bit integer range that labels can have")
    if isinstance(ignore_index, (list, tuple)) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in ignore_index):
        # Python ints as they are: NumPy turns [-1, 2**63] into float64, which would lose them.
        ints = [int(v) for v in ignore_index]
        if any(not -(2**63) <= v < 2**64 for v in ints):
            raise beyond_64_bits
    else:
        if isinstance(ignore_index, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in ignore_index):
            # NumPy would turn [255, True] into [255, 1] and ignore class 1.
            raise TypeError(f"{name} must be an int or a sequence of ints, got {ignore_index!r}")
        try:
            values = np.atleast_1d(np.asarray(ignore_index))
        except Exception:  # noqa: BLE001 - ragged nests and the like
            raise TypeError(f"{name} must be an int or a sequence of ints, got {ignore_index!r}") from None
        if values.size == 0:
            return np.empty(0, dtype=label_dtype)
        if values.ndim != 1:
            raise TypeError(f"{name} must be an int or a sequence of ints, got {ignore_index!r}")
        if values.dtype == object and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise beyond_64_bits
        if values.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an int or a sequence of ints, got {ignore_index!r}")
        ints = [int(v) for v in values.tolist()]
    info = np.iinfo(label_dtype)
    return np.array([v for v in ints if info.min <= v <= info.max], dtype=label_dtype)


def _classes_and_codes(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(valid, return_inverse=True)``, by counting where the labels span a short range.

    Label maps hold small integers (class ids, a few ignore values); sorting millions of them was
    most of a large call's preparation (4 x 10^6 pixels a side: 0.24 s a side). A table over the
    span is O(P) and gives the same classes (sorted) and codes; a span wider than the labels
    themselves (sparse ids such as hashes) keeps the sort.
    """
    if valid.size == 0:
        return np.unique(valid, return_inverse=True)
    lo, hi = int(valid.min()), int(valid.max())
    if hi - lo >= max(1 << 16, valid.size):
        return np.unique(valid, return_inverse=True)
    # The shift is taken where it cannot wrap: uint64 in its own type (lo may exceed int64), the rest
    # in int64 (int8 labels from -100 to 100 span more than int8 holds).
    wide = np.uint64 if valid.dtype == np.uint64 else np.int64
    offset = (valid.astype(wide) - wide(lo)).astype(np.intp, copy=False)
    present = np.bincount(offset, minlength=hi - lo + 1) > 0
    lookup = np.cumsum(present, dtype=np.int64) - 1
    classes = (np.flatnonzero(present).astype(wide) + wide(lo)).astype(valid.dtype)
    return classes, lookup[offset]


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

    ignored = np.isin(flat, _ignore_values(ignore_index, flat.dtype)) if ignore_index is not None else None
    valid = flat if ignored is None else flat[~ignored]
    classes, inverse = _classes_and_codes(valid)
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
