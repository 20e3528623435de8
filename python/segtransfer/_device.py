"""Where a call computes, and how CUDA-resident inputs reach the CUDA solver without a copy.

* ``placement`` reads where every input lives (``__dlpack_device__`` or ``__cuda_array_interface__``; no
  data is touched) and decides between the CPU path (``None``) and one CUDA device (a ``CudaPlacement``).
  Rules: ``device=None`` computes where the features are (on the CPU path when no CUDA device is usable,
  which then refuses device arrays with its own message); features on two devices, or on a CUDA device
  and in host memory, are refused (``device="cuda:N"`` asks for host inputs to be copied to device N, and
  then only their sampled pixels are uploaded); ``device="cpu"`` never copies device arrays to the host.
* ``device_array`` describes a CUDA array in place: pointer, shape, strides, dtype, device and the stream
  to wait on, from its DLPack capsule (parsed by ``_core.dlpack_info``, requested with ``stream=1`` so
  that the producer's pending work is ordered before the legacy default stream, which the solver waits
  on) or from its ``__cuda_array_interface__`` dict (whose ``stream`` entry is honoured the same way).
* Labels and weights that live on a CUDA device are copied to the host (one small copy each): class codes
  are computed on the host, then uploaded for the pixel draw, which runs on the device and takes the
  pixels the CPU path takes for the same seed (``sample_pixels``). Features are never copied; the solver
  reads them through their strides.

Nothing here creates a CUDA context: the CUDA runtime is first used when a solve (or a device-pointer
query for ``__cuda_array_interface__`` inputs) actually runs. cuda-python is not needed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import _core
from ._arrays import PixelTable, check_features, pixel_table, settle_torch, to_host_array

# DLPack device types (dlpack.h).
_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13
_CUDA_TYPES = {_KDL_CUDA, _KDL_CUDA_MANAGED}
# DLPack type codes (dlpack.h): int, uint, float, bfloat, complex, bool.
_DL_KINDS = {0: "i", 1: "u", 2: "f", 5: "c", 6: "b"}
# The legacy default stream, in both the DLPack and the __cuda_array_interface__ conventions.
_LEGACY_STREAM = 1


@dataclass(frozen=True)
class Location:
    """Where an input lives: host memory (``cuda`` False) or a CUDA device (``index`` None: not yet known,
    for ``__cuda_array_interface__`` objects, which do not say)."""

    cuda: bool
    index: int | None = None

    def __str__(self) -> str:
        if not self.cuda:
            return "host memory"
        return f"a CUDA device (cuda:{self.index})" if self.index is not None else "a CUDA device"


_HOST = Location(False)


def locate(obj: Any) -> Location:
    """Where ``obj`` lives, from its protocols alone (never reads data, never touches CUDA).

    Only CUDA devices are recognised here; anything else counts as host and is left to
    ``_arrays.to_host_array``, which reads it or explains why it cannot.
    """
    if obj is None or isinstance(obj, np.ndarray):
        return _HOST
    if hasattr(obj, "__dlpack_device__"):
        try:
            dev_type, dev_id = obj.__dlpack_device__()
            dev_type, dev_id = int(dev_type), int(dev_id)
        except Exception:  # noqa: BLE001 - to_host_array reports the broken protocol
            return _HOST
        return Location(True, dev_id) if dev_type in _CUDA_TYPES else _HOST
    if hasattr(obj, "__cuda_array_interface__"):
        return Location(True, None)
    return _HOST


def parse_device(device: Any) -> str | int | None:
    """None, "cpu", -1 (any CUDA device) or a CUDA ordinal. Accepts strings and torch.device-like objects."""
    if device is None:
        return None
    if isinstance(device, (bool, np.bool_)):
        raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if isinstance(device, (int, np.integer)):
        if device < 0:
            raise ValueError(f"device must be a CUDA device ordinal >= 0, got {device}")
        return int(device)
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu"
    if text == "cuda":
        return -1
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _cuda_usable() -> bool:
    return bool(_core.built_with_cuda()) and _core.cuda_device_count() > 0


def _check_one_device(indices: dict[str, int]) -> None:
    names = list(indices)
    for name in names[1:]:
        if indices[name] != indices[names[0]]:
            raise ValueError(
                f"mixed devices: {names[0]} lives on cuda:{indices[names[0]]} but {name} lives on "
                f"cuda:{indices[name]}; put all inputs on the same device"
            )


def placement(device: Any, features: dict[str, Any], others: dict[str, Any]) -> CudaPlacement | None:
    """The CUDA device a call computes on, or None for the CPU path (see the module docstring).

    ``features``: name -> the feature arrays; ``others``: name -> labels / weights (None allowed).
    Raises ValueError for mixed or contradictory placements and RuntimeError when a CUDA device is
    needed but none is usable; each message names the argument.
    """
    want = parse_device(device)
    locs = {name: locate(obj) for name, obj in {**features, **others}.items()}
    on_cuda = {name: loc for name, loc in locs.items() if loc.cuda}
    if want == "cpu":
        if on_cuda:
            name, loc = next(iter(on_cuda.items()))
            raise ValueError(
                f"{name} lives on {loc} but device='cpu': segtransfer does not copy device arrays to the "
                "host; move it first (e.g. tensor.cpu()) or compute on its device (device=None)"
            )
        return None
    if want is None:
        if not on_cuda:
            return None
        if not _cuda_usable():
            # The CPU path refuses device arrays itself, naming the argument (_arrays.to_host_array).
            return None
    _check_one_device({name: loc.index for name, loc in on_cuda.items() if loc.index is not None})
    if want is None:
        cuda_features = [name for name in features if locs[name].cuda]
        host_features = [name for name in features if not locs[name].cuda]
        if not cuda_features:
            name, loc = next(iter(on_cuda.items()))
            raise ValueError(
                f"mixed devices: {name} lives on {loc} but the features are in host memory; move {name} to "
                "the host, or pass device='cuda' to compute on the GPU"
            )
        if host_features:
            name, loc = cuda_features[0], locs[cuda_features[0]]
            hint = f"device='cuda:{loc.index}'" if loc.index is not None else "device='cuda'"
            raise ValueError(
                f"mixed devices: {name} lives on {loc} but {host_features[0]} is in host memory; put both "
                f"on the same device, or pass {hint} to copy the host side's sampled pixels to the GPU"
            )
    if not _cuda_usable():  # reached only with an explicit device="cuda..."
        raise RuntimeError(f"device={device!r} was requested, but no CUDA device is usable here: "
                           f"{_core.cuda_status()}")
    indices: dict[str, int] = {}
    for name, loc in on_cuda.items():
        indices[name] = loc.index if loc.index is not None else device_array(
            {**features, **others}[name], name).device
    _check_one_device(indices)
    if isinstance(want, int) and want >= 0:
        index = want
    else:
        index = next(iter(indices.values()), 0)
    for name, i in indices.items():
        if i != index:
            raise ValueError(f"mixed devices: {name} lives on cuda:{i} but device='cuda:{index}' was requested")
    count = _core.cuda_device_count()
    if index >= count:
        raise ValueError(f"device='cuda:{index}' does not exist: {count} CUDA device(s) are visible")
    return CudaPlacement(index)


# ---------------------------------------------------------------------------------------------------
# Device arrays


@dataclass(frozen=True)
class DeviceArray:
    """A CUDA array described in place. ``strides`` are in elements; ``owner`` keeps the memory alive
    (the exporting object and, for DLPack, the capsule, whose destructor releases the export)."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype
    device: int
    stream: int  # 0: ready now, 1: legacy default stream, 2: per-thread default stream, else cudaStream_t
    owner: Any

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _dlpack_dtype(info: dict[str, Any], name: str) -> np.dtype:
    code, bits, lanes = info["dtype_code"], info["dtype_bits"], info["dtype_lanes"]
    if lanes != 1:
        raise TypeError(f"{name} has a vector DLPack dtype ({lanes} lanes), which segtransfer cannot read")
    if code == 4:
        raise TypeError(f"{name} has dtype bfloat{bits}; convert it to float32 or float64 first")
    kind = _DL_KINDS.get(code)
    if kind is None or bits % 8:
        raise TypeError(f"{name} has an unsupported DLPack dtype (code {code}, {bits} bits)")
    try:
        return np.dtype(f"{kind}{bits // 8}" if kind != "b" else "?")
    except TypeError:
        raise TypeError(f"{name} has an unsupported DLPack dtype (code {code}, {bits} bits)") from None


def _dlpack_capsule(obj: Any) -> Any:
    """``obj.__dlpack__`` asked to order its work before the legacy default stream.

    torch makes that wait from the *current* device's streams, whatever device the tensor is on
    (``Tensor.__dlpack__`` calls ``torch.cuda.current_stream()`` without a device): a tensor on cuda:1
    written on a side stream while cuda:0 is current would be read unsynchronised. So torch's export
    runs with the tensor's own device current.
    """
    torch = sys.modules.get("torch")
    device = getattr(obj, "device", None)
    if torch is not None and type(obj).__module__.startswith("torch") and getattr(device, "type", None) == "cuda":
        with torch.cuda.device(device):
            return obj.__dlpack__(stream=_LEGACY_STREAM)
    return obj.__dlpack__(stream=_LEGACY_STREAM)


def device_array(obj: Any, name: str) -> DeviceArray:
    """Describe a CUDA-resident ``obj`` without copying it (DLPack first, else __cuda_array_interface__)."""
    obj = settle_torch(obj, name)
    capsule = None
    if hasattr(obj, "__dlpack__"):
        try:
            capsule = _dlpack_capsule(obj)
        except Exception as exc:  # noqa: BLE001 - producer-specific failures
            # An exporter whose __dlpack__ refuses the stream request (older wrappers) may still
            # describe itself through __cuda_array_interface__.
            if not hasattr(obj, "__cuda_array_interface__"):
                raise TypeError(f"{name} could not be exported through DLPack: {exc}") from None
    if capsule is not None:
        info = _core.dlpack_info(capsule, name)
        if info["device_type"] not in _CUDA_TYPES:
            raise ValueError(f"{name} exported a DLPack tensor of device type {info['device_type']}, not CUDA")
        return DeviceArray(ptr=int(info["ptr"]), shape=tuple(info["shape"]), strides=tuple(info["strides"]),
                           dtype=_dlpack_dtype(info, name), device=int(info["device_id"]),
                           stream=_LEGACY_STREAM, owner=(obj, capsule))
    if hasattr(obj, "__cuda_array_interface__"):
        cai = obj.__cuda_array_interface__
        try:
            ptr = int(cai["data"][0])
            shape = tuple(int(s) for s in cai["shape"])
            dtype = np.dtype(cai["typestr"])
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"{name} has a malformed __cuda_array_interface__: {exc!r}") from None
        if cai.get("mask") is not None:
            raise TypeError(f"{name} is a masked CUDA array, which segtransfer cannot read")
        if not dtype.isnative:
            raise TypeError(f"{name} is a byte-swapped CUDA array (dtype {dtype}); segtransfer cannot read it")
        if cai.get("strides") is None:
            strides = [1] * len(shape)
            for d in range(len(shape) - 2, -1, -1):
                strides[d] = strides[d + 1] * shape[d + 1]
        else:
            byte_strides = [int(s) for s in cai["strides"]]
            if any(s % dtype.itemsize for s in byte_strides):
                raise TypeError(f"{name} has strides that are not whole elements; make it contiguous first")
            strides = [s // dtype.itemsize for s in byte_strides]
        stream = cai.get("stream")
        if stream == 0:
            raise ValueError(f"{name} has stream 0 in its __cuda_array_interface__, which the protocol forbids")
        device = _core.cuda_pointer_device(ptr) if ptr else 0
        return DeviceArray(ptr=ptr, shape=shape, strides=tuple(strides), dtype=dtype, device=int(device),
                           stream=int(stream) if stream is not None else 0, owner=obj)
    raise TypeError(f"{name} is neither a DLPack nor a __cuda_array_interface__ array")


def to_host(dev: DeviceArray) -> np.ndarray:
    """A host copy of a (small) device array: labels and weights. Copies the span its strides cover."""
    if any(s == 0 for s in dev.shape):
        return np.empty(dev.shape, dtype=dev.dtype)
    item = dev.dtype.itemsize
    lo = sum(min(0, (n - 1) * s) for n, s in zip(dev.shape, dev.strides)) * item
    hi = sum(max(0, (n - 1) * s) for n, s in zip(dev.shape, dev.strides)) * item + item
    buf = np.empty(hi - lo, dtype=np.uint8)
    _core.cuda_copy_to_host(buf, dev.ptr + lo, dev.device, dev.stream)
    view = np.ndarray(dev.shape, dtype=dev.dtype, buffer=buf, offset=-lo,
                      strides=tuple(s * item for s in dev.strides))
    return np.array(view)


def stand_in(dev: DeviceArray) -> np.ndarray:
    """A zero-stride host array with ``dev``'s shape and dtype and no memory behind it (one element), so
    that ``pixel_table``'s shape and label rules apply unchanged to device features. Never read as data
    (every reshape of an all-zero-stride array is a view, so nothing of ``dev``'s size is allocated)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dev.dtype), shape=dev.shape,
                                           strides=(0,) * dev.ndim, writeable=False)


def _source(ptr: int, float64: bool, shape3: tuple[int, int, int], strides3: tuple[int, int, int],
            device: int, stream: int) -> Any:
    fs = _core.FeatureSource()
    fs.data = ptr
    fs.float64 = float64
    fs.images, fs.pixels, fs.dim = (int(v) for v in shape3)
    fs.stride_image, fs.stride_pixel, fs.stride_dim = (int(v) for v in strides3)
    fs.device = device
    fs.stream = stream
    return fs


def host_source(view: np.ndarray) -> Any:
    """FeatureSource for a host (B, P, D) or (P, D) float array (strides are whole elements: check_features)."""
    if view.ndim == 2:
        view = view[None, :, :]
    item = view.dtype.itemsize
    b, p, d = view.shape
    sb, sp, sd = (s // item for s in view.strides)
    return _source(view.__array_interface__["data"][0], view.dtype == np.float64, (b, p, d), (sb, sp, sd), -1, 0)


def device_source(dev: DeviceArray, name: str, channels_last: bool) -> Any:
    """FeatureSource for a device (P, D) table or (B, D, H, W) / (B, H, W, D) maps, read in place."""
    if dev.ndim == 2:
        return _source(dev.ptr, dev.dtype == np.float64, (1, dev.shape[0], dev.shape[1]),
                       (0, dev.strides[0], dev.strides[1]), dev.device, dev.stream)
    if dev.ndim != 4:
        raise ValueError(f"{name} must be 2-D or 4-D, got shape {dev.shape}")
    if channels_last:
        b, h, w, d = dev.shape
        sb, sh, sw, sd = dev.strides
    else:
        b, d, h, w = dev.shape
        sb, sd, sh, sw = dev.strides
    if w == 1:
        sp = sh
    elif h == 1 or sh == w * sw:
        sp = sw
    else:
        raise ValueError(
            f"{name} has strides {dev.strides} (elements) in which H and W do not merge into one pixel "
            "stride, so it cannot be read in place; make it contiguous first (e.g. tensor.contiguous())"
        )
    return _source(dev.ptr, dev.dtype == np.float64, (b, h * w, d), (sb, sp, sd), dev.device, dev.stream)


class CudaPlacement:
    """One call's CUDA device, and the inputs prepared for it (kept alive until the call returns)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.sources: dict[str, Any] = {}  # side or argument name -> FeatureSource
        self._keep: list[Any] = []

    def host(self, obj: Any, name: str) -> Any:
        """Labels / weights: a host copy when they live on a CUDA device, else ``obj`` unchanged."""
        if not locate(obj).cuda:
            return obj
        dev = device_array(obj, name)
        if dev.device != self.index:
            raise ValueError(f"mixed devices: {name} lives on cuda:{dev.device} but the call runs on cuda:{self.index}")
        return to_host(dev)

    def _features(self, obj: Any, name: str) -> tuple[np.ndarray, DeviceArray | None]:
        """(host array or stand-in, device description or None) for a feature input."""
        if not locate(obj).cuda:
            return check_features(to_host_array(obj, name), name), None
        dev = device_array(obj, name)
        if dev.device != self.index:
            raise ValueError(f"mixed devices: {name} lives on cuda:{dev.device} but the call runs on cuda:{self.index}")
        self._keep.append(dev.owner)
        return check_features(stand_in(dev), name), dev

    def pixel_table(self, features: Any, labels: Any, *, channels_last: bool, ignore_index: Any,
                    side: str) -> PixelTable:
        """``_arrays.pixel_table`` for the CUDA path; the FeatureSource goes to ``self.sources[side]``."""
        fname, lname = f"{side}_features", f"{side}_labels"
        arr, dev = self._features(features, fname)
        labels = self.host(labels, lname)
        table = pixel_table(arr, labels, channels_last=channels_last, ignore_index=ignore_index, side=side)
        self.sources[side] = host_source(table.features) if dev is None else device_source(dev, fname, channels_last)
        self._keep.append(table.features)
        return table

    def sample_pixels(self, codes: np.ndarray, n: int, repeats: int, seed: int, name: str) -> np.ndarray:
        """``_core.sample_pixels``' draws (the same pixels), computed on this device."""
        return _core.sample_pixels_cuda(codes, n, repeats, seed, name, self.index)

    def otce(self, src: PixelTable, tgt: PixelTable, idx_s: np.ndarray, idx_t: np.ndarray, opt: Any) -> dict[str, Any]:
        return _core.otce_cuda(self.sources["source"], src.codes, int(src.classes.size),
                               np.ascontiguousarray(idx_s, dtype=np.int64), self.sources["target"], tgt.codes,
                               int(tgt.classes.size), np.ascontiguousarray(idx_t, dtype=np.int64), opt, self.index)

    def sinkhorn(self, x: Any, y: Any, a: Any, b: Any, opt: Any,
                 weights: Callable[[Any, int, str], np.ndarray | None]) -> dict[str, Any]:
        """``sinkhorn`` on the device; ``weights`` is the API's weight validation (host arrays)."""
        shapes = {}
        for name, obj in (("x", x), ("y", y)):
            arr, dev = self._features(obj, name)
            if arr.ndim != 2:
                raise ValueError(f"{name} must be a 2-D (points, dims) array, got shape {arr.shape}")
            if arr.shape[0] < 1 or arr.shape[1] < 1:
                raise ValueError(f"{name} must have at least one point and one dimension, got shape {arr.shape}")
            shapes[name] = arr.shape
            self.sources[name] = host_source(arr) if dev is None else device_source(dev, name, False)
            self._keep.append(arr)
        if shapes["x"][1] != shapes["y"][1]:
            raise ValueError(f"x has {shapes['x'][1]} dimensions but y has {shapes['y'][1]}")
        wa = weights(self.host(a, "a"), shapes["x"][0], "a")
        wb = weights(self.host(b, "b"), shapes["y"][0], "b")
        return {**_core.sinkhorn_cuda(self.sources["x"], self.sources["y"], wa, wb, opt, self.index), "a": wa, "b": wb}


__all__ = ["CudaPlacement", "DeviceArray", "Location", "device_array", "locate", "parse_device", "placement",
           "stand_in", "to_host"]
