"""The CUDA backend: placement rules and zero-copy plumbing (run everywhere), and the GPU solver against the
CPU solver (marked ``gpu``; skipped unless ``segtransfer.cuda_available()``).

The ``gpu`` tests ran on an H200 on 2026-12-04 (``bench/gpu_check.sh``, sessions 22 and 23): all passed.
Not yet run on a GPU: the two written after that device time was spent (timeout, Ctrl-C), and session
31's (far-apart float32 sets, the opt-in wide chains) and session 37's (the device sampler), written for
changes made while no GPU was lent.
See docs/cuda.md.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import segtransfer as st
from segtransfer import _core, _device
from segtransfer._arrays import pixel_table

import helpers

HAVE_CUDA = st.cuda_available()
requires_gpu = pytest.mark.skipif(not HAVE_CUDA, reason=_core.cuda_status())
no_gpu = pytest.mark.skipif(HAVE_CUDA, reason="checks the behaviour of a machine without a usable CUDA device")


def _data(seed: int = 0, n: int = 300, d: int = 5, k: int = 4, dtype=np.float64):
    """Two labelled point clouds around shared cluster centres (cost / epsilon ~ 10^2 at epsilon 0.3)."""
    rng = np.random.default_rng(seed)
    xs, ys, centres = helpers.clusters(rng, n, k, d, sep=2.0, noise=0.5)
    xt, yt, _ = helpers.clusters(rng, n + 40, k, d, centres=centres, noise=0.5)
    yt = (yt + rng.integers(0, 2, yt.shape)) % k  # target labels only partly predictable
    return xs.astype(dtype), ys, xt.astype(dtype), yt


class FakeCuda:
    """What a GPU tensor looks like to the placement layer, on any machine: DLPack device (2, index).
    Exporting it would touch the device; the tests below never get that far."""

    def __init__(self, arr: np.ndarray, index: int = 0) -> None:
        self._arr, self._index = arr, index
        self.shape, self.dtype = arr.shape, arr.dtype

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self._index)

    def __dlpack__(self, *args, **kwargs):
        raise AssertionError("a device array must be refused before it is exported")


# --------------------------------------------------------------------------------------------------
# Placement rules: CPU-runnable


def test_device_argument_is_validated():
    xs, ys, xt, yt = _data()
    for bad in ("tpu", "cuda:x", "gpu0", True, -1):
        with pytest.raises(ValueError, match="device"):
            st.otce(xs, ys, xt, yt, n_pixels=50, repeats=2, device=bad)
    with pytest.raises(ValueError, match="device"):
        st.sinkhorn(xs, xt, device="opencl")


def test_device_cpu_refuses_device_arrays_naming_them():
    xs, ys, xt, yt = _data()
    with pytest.raises(ValueError, match=r"source_features lives on a CUDA device \(cuda:0\) but device='cpu'"):
        st.otce(FakeCuda(xs), ys, xt, yt, device="cpu")
    with pytest.raises(ValueError, match=r"target_labels lives on a CUDA device .* device='cpu'"):
        st.otce(xs, ys, xt, FakeCuda(yt), device="cpu")
    with pytest.raises(ValueError, match=r"^x lives on a CUDA device .* device='cpu'"):
        st.sinkhorn(FakeCuda(xs), xt, device="cpu")


def test_mixed_cuda_devices_are_refused_before_any_device_work():
    xs, ys, xt, yt = _data()
    with pytest.raises(ValueError, match=r"mixed devices: source_features lives on cuda:0 but target_features lives on cuda:1"):
        st.otce(FakeCuda(xs, 0), ys, FakeCuda(xt, 1), yt, device="cuda")
    with pytest.raises(ValueError, match=r"mixed devices: x lives on cuda:1 but y lives on cuda:2"):
        st.sinkhorn(FakeCuda(xs, 1), FakeCuda(xt, 2), device="cuda")


@no_gpu
def test_device_arrays_without_a_usable_gpu_are_refused_naming_the_argument():
    xs, ys, xt, yt = _data()
    with pytest.raises((ValueError, RuntimeError), match="source_features"):
        st.otce(FakeCuda(xs), ys, FakeCuda(xt), yt)
    with pytest.raises((ValueError, RuntimeError), match="target_features"):
        st.otce(xs, ys, FakeCuda(xt), yt)
    with pytest.raises((ValueError, RuntimeError), match=r"^y "):
        st.sinkhorn(xs, FakeCuda(xt))


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0])
def test_device_cuda_without_a_usable_gpu_is_a_clear_error(device):
    xs, ys, xt, yt = _data()
    with pytest.raises(RuntimeError, match=r"device=.* was requested, but no CUDA device is usable here: "):
        st.otce(xs, ys, xt, yt, n_pixels=50, repeats=2, device=device)
    with pytest.raises(RuntimeError, match="no CUDA device is usable here"):
        st.sinkhorn(xs, xt, device=device)


@no_gpu
def test_cuda_launcher_reports_the_cuda_error_without_a_device():
    """The C++ launcher itself, called directly: a RuntimeError carrying the CUDA error (or saying the
    build has no CUDA), never a crash."""
    x = np.random.default_rng(0).normal(size=(20, 3))
    fs = _device.host_source(x)
    with pytest.raises(RuntimeError, match=r"CUDA error in cudaGetDeviceCount: cuda|built without CUDA"):
        _core.sinkhorn_cuda(fs, fs, None, None, _core.SinkhornOptions(), 0)


@no_gpu
def test_cuda_sampler_reports_the_cuda_error_without_a_device():
    codes = np.arange(40, dtype=np.int32) % 3
    with pytest.raises(RuntimeError, match=r"CUDA error in cudaGetDeviceCount: cuda|built without CUDA"):
        _core.sample_pixels_cuda(codes, 5, 2, 0, "source_labels", 0)


def test_the_module_imports_without_touching_cuda():
    """Importing and asking cuda_available() must work with no driver (and create no context: a GPU
    run checks that with the driver API in test_import_creates_no_context)."""
    code = "import segtransfer as st; print(st.cuda_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(HAVE_CUDA)


def test_workspace_estimate_counts_the_cost_matrices():
    k, n, d = 10, 10_000, 19
    f32 = _core.cuda_workspace_bytes(k, n, n, d, 19, 19, False)
    f64 = _core.cuda_workspace_bytes(k, n, n, d, 19, 19, True)
    assert 4.0e9 < f32 < 4.2e9  # K N^2 float32 cost matrices dominate
    assert 8.0e9 < f64 < 8.2e9
    assert _core.cuda_workspace_bytes(k, n, n, d, 19, 19, False, 10**6) == pytest.approx(f32 + 4e6)


# --------------------------------------------------------------------------------------------------
# DLPack / __cuda_array_interface__ parsing: CPU-runnable with host arrays


@pytest.mark.parametrize("versioned", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8])
def test_dlpack_info_reads_pointer_shape_and_strides_without_copying(versioned, dtype):
    base = np.arange(7 * 6 * 5).astype(dtype).reshape(7, 6, 5)
    arr = base[1::2, :, ::2]  # offset, non-contiguous
    cap = arr.__dlpack__(max_version=(1, 0)) if versioned else arr.__dlpack__()
    info = _core.dlpack_info(cap, "x")
    assert info["ptr"] == arr.__array_interface__["data"][0]
    assert info["shape"] == arr.shape
    assert info["strides"] == tuple(s // arr.itemsize for s in arr.strides)
    assert info["device_type"] == 1 and info["device_id"] == 0
    assert info["dtype_bits"] == 8 * arr.itemsize and info["dtype_lanes"] == 1
    assert info["dtype_code"] == {"f": 2, "i": 0, "u": 1}[arr.dtype.kind]
    assert info["versioned"] == versioned
    # The capsule is not consumed: NumPy can still import it through an exporter that hands it out.
    holder = type("Holder", (), {"__dlpack__": lambda self, **kw: cap, "__dlpack_device__": lambda self: (1, 0)})()
    np.testing.assert_array_equal(np.from_dlpack(holder), arr)


def test_dlpack_info_compact_strides_and_read_only_flag():
    arr = np.arange(12.0).reshape(3, 4)
    arr.flags.writeable = False
    info = _core.dlpack_info(arr.__dlpack__(max_version=(1, 0)), "x")
    assert info["strides"] == (4, 1)
    assert info["readonly"] is True


def test_dlpack_info_refuses_consumed_capsules_and_non_capsules():
    arr = np.arange(4.0)
    cap = arr.__dlpack__()
    holder = type("Holder", (), {"__dlpack__": lambda self, **kw: cap, "__dlpack_device__": lambda self: (1, 0)})()
    np.from_dlpack(holder)  # consumes (renames) the capsule
    with pytest.raises(ValueError, match="already consumed"):
        _core.dlpack_info(cap, "x")
    with pytest.raises(TypeError, match="x: its __dlpack__"):
        _core.dlpack_info(object(), "x")


class HostAsCuda:
    """A host array posing as a CUDA one (DLPack device type 2, exporting its host capsule), so that the
    DLPack request and parsing path can run on a machine without a GPU."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr, self.streams = arr, []

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, **kwargs):
        self.streams.append(stream)
        return self.arr.__dlpack__()


def test_device_array_from_dlpack_is_zero_copy_and_asks_for_the_legacy_stream(monkeypatch):
    monkeypatch.setattr(_device, "_CUDA_TYPES", {1, 2, 13})  # let the host capsule pass as CUDA memory
    arr = np.asfortranarray(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    obj = HostAsCuda(arr)
    dev = _device.device_array(obj, "source_features")
    assert obj.streams == [1]
    assert dev.ptr == arr.__array_interface__["data"][0]
    assert dev.shape == (8, 3) and dev.strides == (1, 8) and dev.dtype == np.float32
    assert dev.stream == 1 and dev.owner[0] is obj


def test_device_array_from_cuda_array_interface(monkeypatch):
    monkeypatch.setattr(_core, "cuda_pointer_device", lambda ptr: 3)
    arr = np.zeros((5, 4), dtype=np.float64)[:, ::2]
    cai = {"shape": arr.shape, "typestr": arr.dtype.str, "data": (arr.__array_interface__["data"][0], False),
           "strides": arr.strides, "version": 3, "stream": 7}
    obj = type("Cai", (), {"__cuda_array_interface__": cai})()
    dev = _device.device_array(obj, "x")
    assert (dev.ptr, dev.shape, dev.strides, dev.device, dev.stream) == (cai["data"][0], (5, 2), (4, 2), 3, 7)
    compact = dict(cai, strides=None, stream=None)
    dev = _device.device_array(type("Cai", (), {"__cuda_array_interface__": compact})(), "x")
    assert dev.strides == (2, 1) and dev.stream == 0
    with pytest.raises(ValueError, match="stream 0"):
        _device.device_array(type("Cai", (), {"__cuda_array_interface__": dict(cai, stream=0)})(), "x")
    with pytest.raises(TypeError, match="masked"):
        _device.device_array(type("Cai", (), {"__cuda_array_interface__": dict(cai, mask=object())})(), "x")


def test_device_array_falls_back_to_cuda_array_interface_when_dlpack_refuses(monkeypatch):
    monkeypatch.setattr(_core, "cuda_pointer_device", lambda ptr: 0)
    arr = np.zeros((4, 3), dtype=np.float32)
    cai = {"shape": arr.shape, "typestr": arr.dtype.str, "data": (arr.__array_interface__["data"][0], False),
           "strides": None, "version": 3, "stream": None}

    def refuse(self, **kwargs):
        raise TypeError("__dlpack__() got an unexpected keyword argument 'stream'")

    both = type("Both", (), {"__dlpack__": refuse, "__cuda_array_interface__": cai})()
    dev = _device.device_array(both, "x")
    assert (dev.ptr, dev.shape, dev.strides) == (cai["data"][0], (4, 3), (3, 1))
    only_dlpack = type("OnlyDlpack", (), {"__dlpack__": refuse})()
    with pytest.raises(TypeError, match="x could not be exported through DLPack: .*stream"):
        _device.device_array(only_dlpack, "x")


def test_torch_cuda_tensors_are_exported_with_their_own_device_current(monkeypatch):
    """torch's __dlpack__ orders the export after the *current* device's stream: segtransfer makes the
    tensor's device current for the call (a stand-in torch module records it; no GPU needed)."""
    entered = []

    class DeviceContext:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(device=DeviceContext))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setattr(_device, "_CUDA_TYPES", {1, 2, 13})
    arr = np.ones((5, 2), dtype=np.float32)
    where = types.SimpleNamespace(type="cuda", index=1)

    class Tensor(HostAsCuda):
        device = where

        def __dlpack__(self, stream=None, **kwargs):
            assert entered == [where], "exported outside the tensor's device context"
            return super().__dlpack__(stream=stream, **kwargs)

    Tensor.__module__ = "torch"
    obj = Tensor(arr)
    dev = _device.device_array(obj, "x")
    assert entered == [where, "exit"] and obj.streams == [1]
    assert dev.ptr == arr.__array_interface__["data"][0]


def _as_device(arr: np.ndarray, device: int = 0) -> _device.DeviceArray:
    return _device.DeviceArray(ptr=arr.__array_interface__["data"][0], shape=arr.shape,
                               strides=tuple(s // arr.itemsize for s in arr.strides), dtype=arr.dtype,
                               device=device, stream=1, owner=arr)


def test_to_host_copies_the_strided_span(monkeypatch):
    """Host memory stands in for device memory: the copy must land every element where it belongs,
    negative strides included."""
    def fake_copy(out, src, device, stream):
        ctypes.memmove(out.ctypes.data, src, out.size)
    monkeypatch.setattr(_core, "cuda_copy_to_host", fake_copy)
    base = np.arange(6 * 7, dtype=np.int64).reshape(6, 7)
    for view in (base, base[1:5, ::3], base[::-1, 2:], base[::-2, ::-3], base[2:3, 4:5]):
        np.testing.assert_array_equal(_device.to_host(_as_device(view)), view)


def test_feature_maps_on_the_device_read_in_place():
    x = np.zeros((2, 5, 3, 4), dtype=np.float32)  # (B, D, H, W)
    fs = _device.device_source(_as_device(x), "f", channels_last=False)
    assert (fs.images, fs.pixels, fs.dim) == (2, 12, 5)
    assert (fs.stride_image, fs.stride_pixel, fs.stride_dim) == (60, 1, 12)
    fs = _device.device_source(_as_device(np.zeros((2, 3, 4, 5))), "f", channels_last=True)
    assert (fs.pixels, fs.stride_image, fs.stride_pixel, fs.stride_dim, fs.float64) == (12, 60, 5, 1, True)
    fs = _device.device_source(_as_device(x[:, :, :, :1]), "f", channels_last=False)  # W == 1
    assert (fs.pixels, fs.stride_pixel) == (3, 4)
    with pytest.raises(ValueError, match=r"f has strides .* H and W do not merge"):
        _device.device_source(_as_device(x[:, :, :, :3]), "f", channels_last=False)


def test_stand_in_runs_the_shape_and_label_rules_without_allocating():
    dev = _as_device(np.zeros(1, dtype=np.float32))
    dev = _device.DeviceArray(ptr=dev.ptr, shape=(4, 64, 256, 256), strides=(64 * 65536, 65536, 256, 1),
                              dtype=np.dtype(np.float32), device=0, stream=1, owner=None)
    labels = np.random.default_rng(0).integers(0, 3, size=(4, 32, 32))
    table = pixel_table(_device.stand_in(dev), labels, channels_last=False, ignore_index=255, side="source")
    assert table.features.shape == (4, 65536, 64)
    assert table.features.strides == (0, 0, 0)  # a view of the one-element stand-in: nothing was copied
    assert table.codes.shape == (4 * 65536,)


# --------------------------------------------------------------------------------------------------
# GPU solver against the CPU solver (run on an H200, 2026-12-04)


def _gpu_and_cpu(xs, ys, xt, yt, **kw):
    cpu = st.otce(xs, ys, xt, yt, device="cpu", **kw)
    cuda = st.otce(xs, ys, xt, yt, device="cuda", **kw)
    return cpu, cuda


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("n_pixels", [200, None])
def test_gpu_matches_cpu_float64(n_pixels):
    # tol 1e-10 on both sides: two plans within 1e-10 marginal error give scores well within 1e-8.
    xs, ys, xt, yt = _data()
    cpu, cuda = _gpu_and_cpu(xs, ys, xt, yt, n_pixels=n_pixels, repeats=3, epsilon=0.3, tol=1e-10)
    assert cuda.dtype == "float64" and cuda.all_converged
    assert np.all(cuda.marginal_error <= 1e-10)
    np.testing.assert_allclose(cuda.scores, cpu.scores, rtol=0, atol=1e-8)
    np.testing.assert_allclose(cuda.joint, cpu.joint, rtol=0, atol=1e-9)
    np.testing.assert_allclose(cuda.transport_cost, cpu.transport_cost, rtol=1e-8)
    np.testing.assert_array_equal(cuda.source_classes, cpu.source_classes)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("epsilon", [0.3, 0.1])
def test_gpu_matches_cpu_float32(epsilon):
    # Both paths store costs in float32 and form exponents in float64; each converges to tol 1e-6,
    # which moves the score by far less than the 1e-4 allowed here.
    xs, ys, xt, yt = _data(dtype=np.float32)
    cpu, cuda = _gpu_and_cpu(xs, ys, xt, yt, n_pixels=200, repeats=3, epsilon=epsilon)
    assert cuda.dtype == "float32" and cuda.all_converged
    np.testing.assert_allclose(cuda.scores, cpu.scores, rtol=0, atol=1e-4)
    np.testing.assert_allclose(cuda.joint, cpu.joint, rtol=0, atol=1e-4)
    np.testing.assert_allclose(cuda.transport_cost, cpu.transport_cost, rtol=1e-4)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("shift", [100.0, 1000.0, 3000.0])
def test_gpu_float32_sets_far_apart_keep_the_accuracy_of_their_spread(shift):
    """The target shifted by `shift` in every channel: the GPU centres each side on its own mean, as the
    CPU does (test_otce.py's test of the same name derives the bound), so float32 rounds costs of the
    size the points' spread gives, not shift^2 d. Its float32 scores against the CPU's float64 ones on
    the same draws, and W_D, whose separable part the host adds back in float64. (Not yet run on a GPU:
    written in session 31, when none was lent.)"""
    xs, ys, xt, yt = _data(dtype=np.float32)
    xt = (xt + shift).astype(np.float32)
    kw = dict(n_pixels=200, repeats=2, epsilon=0.1)
    cuda = st.otce(xs, ys, xt, yt, device="cuda", tol=1e-6, **kw)
    cpu64 = st.otce(xs.astype(np.float64), ys, xt.astype(np.float64), yt, device="cpu", tol=1e-10, **kw)
    assert cuda.dtype == "float32" and cuda.all_converged and cpu64.all_converged
    # The CPU's float32 solve of such sets lands within 3e-8 of float64 (1e-5 derived); on the joint-mean
    # cost it was 1.2e-4 / 2.9e-4 / 2.1e-2 off at these shifts. 5e-5 leaves room for the two paths'
    # own roundings and separates the two cases.
    np.testing.assert_allclose(cuda.scores, cpu64.scores, rtol=0, atol=5e-5)
    np.testing.assert_allclose(cuda.transport_cost, cpu64.transport_cost, rtol=2e-6)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sparse", ["1", "0"])
def test_gpu_newton_matches_cpu(monkeypatch, dtype, sparse):
    """The Newton polish (the GPU default): at epsilon = 0.1, where Sinkhorn alone hit max_iter = 50,000
    on one of these repeats (H200, 2026-12-04), it must converge and agree; with its CG products on the
    plan's pattern (the default) and dense (SEGTRANSFER_CUDA_SPARSE=0)."""
    monkeypatch.setenv("SEGTRANSFER_CUDA_SPARSE", sparse)
    xs, ys, xt, yt = _data(dtype=dtype)
    tol, atol = (1e-10, 1e-8) if dtype == np.float64 else (1e-6, 1e-4)
    cpu, cuda = _gpu_and_cpu(xs, ys, xt, yt, n_pixels=200, repeats=3, epsilon=0.1, tol=tol)
    assert cuda.all_converged, cuda.marginal_error
    assert np.all(cuda.iterations < 5000), cuda.iterations
    np.testing.assert_allclose(cuda.scores, cpu.scores, rtol=0, atol=atol)
    np.testing.assert_allclose(cuda.joint, cpu.joint, rtol=0, atol=atol)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("stage_newton", ["1", "0"])
def test_gpu_large_batch_matches_cpu(monkeypatch, stage_newton):
    """K n m >= 5e7: the stage target is checked after every iteration (BatchOptions.check_each_from),
    and Newton takes over the slow intermediate stages (or, with SEGTRANSFER_CUDA_STAGE_NEWTON=0, only
    the last one). Float64 at the paper's epsilon, against the CPU on the same draws."""
    monkeypatch.setenv("SEGTRANSFER_CUDA_STAGE_NEWTON", stage_newton)
    xs, ys, xt, yt = _data(n=4000, d=8)
    cpu, cuda = _gpu_and_cpu(xs, ys, xt, yt, n_pixels=3000, repeats=6, epsilon=0.1, tol=1e-9)
    assert cpu.all_converged and cuda.all_converged, (cpu.marginal_error, cuda.marginal_error)
    np.testing.assert_allclose(cuda.scores, cpu.scores, rtol=0, atol=1e-7)
    np.testing.assert_allclose(cuda.transport_cost, cpu.transport_cost, rtol=1e-7)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gpu_wide_chains_match_cpu(monkeypatch, dtype):
    """SEGTRANSFER_CUDA_ILP=4: four independent log-sum-exp chains a thread in the Sinkhorn half-steps
    (session 31; compiled, not yet run on a GPU), against the CPU, at sizes that leave a tail after the
    unrolled loops (203 and 197 points: multiples of neither 4 x 32 nor 4 x 8); an unknown value is
    refused naming the variable."""
    monkeypatch.setenv("SEGTRANSFER_CUDA_ILP", "4")
    xs, ys, xt, yt = _data(dtype=dtype)
    tol, atol, rtol = (1e-10, 1e-8, 1e-8) if dtype == np.float64 else (1e-6, 1e-4, 1e-4)
    cpu = st.otce(xs, ys, xt, yt, n_pixels=203, repeats=3, epsilon=0.3, tol=tol, device="cpu")
    rng = np.random.default_rng(7)
    cuda = st.otce(xs, ys, xt, yt, n_pixels=203, repeats=3, epsilon=0.3, tol=tol, device="cuda")
    assert cuda.all_converged, cuda.marginal_error
    np.testing.assert_allclose(cuda.scores, cpu.scores, rtol=0, atol=atol)
    x, y = rng.normal(size=(203, 4)).astype(dtype), (rng.normal(size=(197, 4)) + 0.5).astype(dtype)
    one = st.sinkhorn(x, y, epsilon=0.2, tol=tol, device="cuda")
    ref = st.sinkhorn(x, y, epsilon=0.2, tol=tol, device="cpu")
    assert one.converged
    np.testing.assert_allclose(one.transport_cost, ref.transport_cost, rtol=rtol)
    monkeypatch.setenv("SEGTRANSFER_CUDA_ILP", "3")
    with pytest.raises(ValueError, match="SEGTRANSFER_CUDA_ILP"):
        st.sinkhorn(x, y, epsilon=0.2, device="cuda")


@pytest.mark.gpu
@requires_gpu
def test_gpu_sinkhorn_only_matches_cpu(monkeypatch):
    """SEGTRANSFER_CUDA_NEWTON=0 (the benchmark's comparison): the Sinkhorn-only path stays correct."""
    monkeypatch.setenv("SEGTRANSFER_CUDA_NEWTON", "0")
    xs, ys, xt, yt = _data()
    cpu, cuda = _gpu_and_cpu(xs, ys, xt, yt, n_pixels=200, repeats=3, epsilon=0.3, tol=1e-10)
    assert cuda.all_converged, cuda.marginal_error
    np.testing.assert_allclose(cuda.scores, cpu.scores, rtol=0, atol=1e-8)
    np.testing.assert_allclose(cuda.joint, cpu.joint, rtol=0, atol=1e-8)


def _same_shift(f_a, g_a, f_b, g_b):
    """Potentials are defined up to f + c, g - c: align (f_b, g_b) on (f_a, g_a)."""
    c = float(np.mean(f_a - f_b))
    return f_b + c, g_b - c


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("weighted", [False, True])
def test_gpu_potentials_match_cpu_float64(weighted):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(150, 4)), rng.normal(size=(170, 4)) + 0.5
    kw = dict(epsilon=0.2, tol=1e-10)
    if weighted:
        kw.update(a=helpers.weights(rng, 150), b=helpers.weights(rng, 170))
    cpu = st.sinkhorn(x, y, device="cpu", **kw)
    cuda = st.sinkhorn(x, y, device="cuda", **kw)
    assert cuda.converged and cuda.marginal_error <= 1e-10
    f, g = _same_shift(cpu.f, cpu.g, cuda.f, cuda.g)
    np.testing.assert_allclose(f, cpu.f, rtol=0, atol=1e-7)
    np.testing.assert_allclose(g, cpu.g, rtol=0, atol=1e-7)
    np.testing.assert_allclose(cuda.transport_cost, cpu.transport_cost, rtol=1e-8)
    plan = cuda.plan(x, y, kw.get("a"), kw.get("b"))  # the potentials satisfy the marginals they claim
    a = kw.get("a", np.full(150, 1 / 150))
    b = kw.get("b", np.full(170, 1 / 170))
    assert np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum() <= 1e-9


@pytest.mark.gpu
@requires_gpu
def test_gpu_potentials_match_cpu_float32():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(150, 4)).astype(np.float32), (rng.normal(size=(170, 4)) + 0.5).astype(np.float32)
    cpu = st.sinkhorn(x, y, epsilon=0.2, device="cpu")
    cuda = st.sinkhorn(x, y, epsilon=0.2, device="cuda")
    assert cuda.converged
    f, g = _same_shift(cpu.f, cpu.g, cuda.f, cuda.g)
    delta = 2 * helpers.f32_delta(x, y, 0.2) * 0.2  # both sides' float32 error bound, in potential units
    np.testing.assert_allclose(f, cpu.f, rtol=0, atol=delta)
    np.testing.assert_allclose(g, cpu.g, rtol=0, atol=delta)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("pixels,n,repeats,keep", [(1000, 200, 3, 0.8), (300_000, 10_000, 10, 0.9), (64, 1, 5, 0.5),
                                                   (500, 500, 2, 1.0), (4096, 3000, 3, 0.75), (2_000_003, 10_000, 4, 0.3)])
def test_gpu_sampler_draws_the_host_pixels(pixels, n, repeats, keep):
    """The device sampler runs the host's Floyd draw (floyd_sampler.hpp): the same pixels, every repeat,
    including n equal to the number of valid pixels and draws over 2^21 pixels."""
    rng = np.random.default_rng(pixels)
    codes = np.where(rng.random(pixels) < keep, rng.integers(0, 4, pixels), -1).astype(np.int32)
    n = min(n, int((codes >= 0).sum()))
    for seed in (0, 5, 2**64 - 1):
        host = _core.sample_pixels(codes, n, repeats, seed, "source_labels")
        device = _core.sample_pixels_cuda(codes, n, repeats, seed, "source_labels", 0)
        np.testing.assert_array_equal(device, host)


@pytest.mark.gpu
@requires_gpu
def test_gpu_sampler_refuses_too_few_valid_pixels():
    codes = np.full(100, -1, dtype=np.int32)
    codes[::10] = 1
    with pytest.raises(ValueError, match="target_labels has 10 valid .* fewer than n_pixels=11"):
        _core.sample_pixels_cuda(codes, 11, 2, 0, "target_labels", 0)


@pytest.mark.gpu
@requires_gpu
def test_gpu_is_deterministic():
    xs, ys, xt, yt = _data()
    r1 = st.otce(xs, ys, xt, yt, n_pixels=150, repeats=2, epsilon=0.3, device="cuda")
    r2 = st.otce(xs, ys, xt, yt, n_pixels=150, repeats=2, epsilon=0.3, device="cuda")
    np.testing.assert_array_equal(r1.joint, r2.joint)
    np.testing.assert_array_equal(r1.iterations, r2.iterations)


@pytest.mark.gpu
@requires_gpu
def test_gpu_mixed_precision_runs_in_float64():
    # Sinkhorn alone left this case 8.6e-7 from the CPU at tol 1e-10 (H200, session 22, then xfail); it
    # passes since the Newton polish (three runs, session 23).
    xs, ys, xt, yt = _data()
    # Scores move by about the marginal error: at tol 1e-10 both should be within 1e-8 of the exact score.
    kw = dict(n_pixels=150, repeats=2, epsilon=0.3, tol=1e-10)
    mixed = st.otce(xs.astype(np.float32), ys, xt, yt, device="cuda", **kw)
    cpu = st.otce(xs.astype(np.float32), ys, xt, yt, device="cpu", **kw)
    assert mixed.dtype == cpu.dtype == "float64"
    assert cpu.all_converged, cpu.marginal_error
    assert mixed.all_converged, mixed.marginal_error
    np.testing.assert_allclose(mixed.scores, cpu.scores, rtol=0, atol=1e-8)


@pytest.mark.gpu
@requires_gpu
def test_gpu_refuses_nan_and_oversized_problems():
    xs, ys, xt, yt = _data()
    bad = xs.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"source_features.*NaN or infinite values \(pixel 7\)"):
        st.otce(bad, ys, xt, yt, n_pixels=50, repeats=2, device="cuda")
    rng = np.random.default_rng(0)
    big = rng.normal(size=(300_000, 2)).astype(np.float32)
    labels = rng.integers(0, 2, 300_000)
    with pytest.raises(MemoryError, match=r"the CUDA solver needs .* GB .* but only .* are free"):
        st.otce(big, labels, big, labels, n_pixels=300_000, repeats=10, device="cuda")


def _hard_gpu_problem():
    """C / eps ~ 1e6 and tol 1e-12: no solver finishes this in any sensible time (as test_otce's)."""
    rng = np.random.default_rng(31)
    xs, xt = rng.normal(size=(3000, 4)) * 3, rng.normal(size=(3000, 4)) * 3 + 1
    return xs, np.arange(3000) % 3, xt, np.arange(3000) % 2


@pytest.mark.gpu
@requires_gpu
def test_gpu_below_the_floor_stops_there():
    """Written in session 51 without a GPU (not yet run on one). 400 x 350 float64 points at cost / eps
    = 10^7 and tol 1e-13, below float64's resolution there (~1e-8; the CPU solvers stop at it:
    test_sinkhorn.py's test_blocked_solve_below_the_floor_ends_without_doubling_its_phases). The CUDA
    last stage retried towards ever lower targets until max_iter; it now stops at the floor as the
    CPU does, and reports an unconverged error that includes float64's rounding bound."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = rng.normal(size=(350, 5)) * 0.9 + 0.1
    eps = float((((x[:, None] - y[None]) ** 2).sum(-1)).max() / 1e7)
    with pytest.warns(RuntimeWarning, match="stopped falling"):
        sr = st.sinkhorn(x, y, epsilon=eps, tol=1e-13, max_iter=10**6, device="cuda")
    assert not sr.converged and 1e-13 < sr.marginal_error < 1e-6, sr.marginal_error
    assert sr.iterations < 100_000, sr.iterations


@pytest.mark.gpu
@requires_gpu
def test_gpu_timeout_stops_and_reports():
    """Written after session 23's device time (not yet run on a GPU). The timeout bounds a GPU call,
    which certifies what it has and reports it: timed_out, not converged, a RuntimeWarning."""
    xs, ys, xt, yt = _hard_gpu_problem()
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="timeout"):
        r = st.otce(xs, ys, xt, yt, n_pixels=2000, repeats=3, epsilon=1e-4, tol=1e-12, max_iter=10**9, timeout=0.5,
                    device="cuda")
    assert time.perf_counter() - start < 30
    assert r.timed_out.tolist() == [True] * 3 and not np.any(r.converged)
    assert np.all(r.iterations < 10**9)


@pytest.mark.gpu
@requires_gpu
def test_gpu_ctrl_c_interrupts_a_call():
    """Written after session 23's device time (not yet run on a GPU). SIGINT one second into a GPU
    call that would run for its 60 s timeout: KeyboardInterrupt soon after (the launcher polls every
    50 ms between kernel batches, and in Newton between products)."""
    out, err, returncode = helpers.interrupt_child(helpers.INTERRUPT_CHILD, "gpu")
    status, ran, _ = out.split()
    assert (status, returncode) == ("interrupted", 130), (out, err[-2000:])
    assert float(ran) < 10.0, f"interrupted after {ran} s"


# ---- frameworks: zero copy (data_ptr identity, no allocation by the framework)


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


def _spy_otce(monkeypatch):
    seen = {}
    real = _core.otce_cuda

    def spy(src, *args):
        seen["source"] = src.data
        seen["target"] = args[3].data
        return real(src, *args)

    monkeypatch.setattr(_core, "otce_cuda", spy)
    return seen


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_cuda_tensors_are_read_in_place(monkeypatch, dtype):
    torch = _torch_cuda()
    xs, ys, xt, yt = _data(dtype=dtype)
    ts, tt = torch.from_numpy(xs).cuda(), torch.from_numpy(xt).cuda()
    ls, lt = torch.from_numpy(ys).cuda(), torch.from_numpy(yt).cuda()
    seen = _spy_otce(monkeypatch)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    res = st.otce(ts, ls, tt, lt, n_pixels=150, repeats=2, epsilon=0.3)
    assert torch.cuda.memory_allocated() == before  # torch allocated nothing: no copies were made
    assert seen == {"source": ts.data_ptr(), "target": tt.data_ptr()}
    ref = st.otce(xs, ys, xt, yt, n_pixels=150, repeats=2, epsilon=0.3, device="cuda")
    np.testing.assert_array_equal(res.joint, ref.joint)  # same pixels, same kernels


@pytest.mark.gpu
@requires_gpu
def test_torch_cuda_feature_maps_and_mixed_devices(monkeypatch):
    torch = _torch_cuda()
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(3, 6, 8, 10))  # (B, D, H, W)
    labels = rng.integers(0, 3, size=(3, 16, 20))
    cpu = st.otce(maps, labels, maps[::-1].copy(), labels[::-1].copy(), n_pixels=100, repeats=2, epsilon=0.5,
                  tol=1e-10, device="cpu")
    tm = torch.from_numpy(maps).cuda()
    cuda = st.otce(tm, torch.from_numpy(labels).cuda(), tm.flip(0).contiguous(), torch.from_numpy(labels[::-1].copy()),
                   n_pixels=100, repeats=2, epsilon=0.5, tol=1e-10)
    np.testing.assert_allclose(cuda.scores, cpu.scores, rtol=0, atol=1e-8)
    cl = tm.permute(0, 2, 3, 1)  # channels-last view of the same memory: read in place
    seen = _spy_otce(monkeypatch)
    st.otce(cl, labels, cl, labels, n_pixels=100, repeats=2, epsilon=0.5, channels_last=True)
    assert seen["source"] == tm.data_ptr()
    with pytest.raises(ValueError, match="mixed devices: source_features lives on a CUDA device"):
        st.otce(tm, labels, maps, labels, n_pixels=100, repeats=2)
    ok = st.otce(tm, labels, maps, labels, n_pixels=100, repeats=2, epsilon=0.5, device="cuda:0")
    assert ok.all_converged
    with pytest.raises(ValueError, match="source_features lives on a CUDA device .* device='cpu'"):
        st.otce(tm, labels, maps, labels, device="cpu")


@pytest.mark.gpu
@requires_gpu
def test_cupy_arrays_are_read_in_place_through_dlpack_and_cai(monkeypatch):
    cp = pytest.importorskip("cupy")
    xs, ys, xt, yt = _data()
    cs, ct = cp.asarray(xs), cp.asarray(xt)
    seen = _spy_otce(monkeypatch)
    res = st.otce(cs, cp.asarray(ys), ct, yt, n_pixels=150, repeats=2, epsilon=0.3)
    assert seen == {"source": cs.data.ptr, "target": ct.data.ptr}

    class CaiOnly:  # Numba-style: only __cuda_array_interface__
        def __init__(self, a):
            self.__cuda_array_interface__ = a.__cuda_array_interface__
            self._a = a

    res2 = st.otce(CaiOnly(cs), ys, CaiOnly(ct), yt, n_pixels=150, repeats=2, epsilon=0.3)
    assert seen == {"source": cs.data.ptr, "target": ct.data.ptr}
    np.testing.assert_array_equal(res.joint, res2.joint)


@pytest.mark.gpu
@requires_gpu
def test_import_creates_no_context():
    driver = pytest.importorskip("cuda.bindings.driver")
    code = (
        "import segtransfer as st\n"
        "assert st.cuda_available()\n"
        "from cuda.bindings import driver as d\n"
        "assert d.cuInit(0)[0] == d.CUresult.CUDA_SUCCESS\n"
        "err, dev = d.cuDeviceGet(0)\n"
        "err, flags, active = d.cuDevicePrimaryCtxGetState(dev)\n"
        "print(int(active))\n"
    )
    del driver
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
