// The CUDA half of segtransfer._core: DLPack capsule parsing (device, pointer, shape, strides, dtype,
// read without copying or consuming the capsule), the CUDA solvers and the two small device helpers.
// Array conversion, GIL handling and argument checks only; the numbers are computed in cuda/.
// Registered from module.cpp, whose exception translator covers these functions too.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <vector>

#include "segtransfer/cuda_otce.hpp"
#include "segtransfer/errors.hpp"
#include "results.hpp"

namespace py = pybind11;
using namespace segtransfer;
using namespace segtransfer::bindings;

namespace {

// The DLPack ABI (dlpack.h, v0.x "dltensor" and v1.x "dltensor_versioned" capsules), declared here
// so that the build needs no dlpack header.
namespace dl {
struct Device {
  int32_t device_type;
  int32_t device_id;
};
struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};
struct Version {
  uint32_t major;
  uint32_t minor;
};
struct ManagedTensorVersioned {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned*);
  uint64_t flags;
  Tensor dl_tensor;
};
constexpr uint64_t kFlagReadOnly = 1;
}  // namespace dl

// Describes the tensor inside a DLPack capsule without consuming it: the capsule keeps its name, so
// its own destructor still calls the producer's deleter, and the memory stays valid for as long as
// the caller holds the capsule. strides are in elements (computed when the producer gives none).
py::dict dlpack_info(const py::object& capsule, const std::string& name) {
  PyObject* obj = capsule.ptr();
  if (!PyCapsule_CheckExact(obj)) throw InvalidType(name, "its __dlpack__() did not return a DLPack capsule");
  const char* cap_name = PyCapsule_GetName(obj);
  if (cap_name == nullptr) throw py::error_already_set();
  const dl::Tensor* t = nullptr;
  bool readonly = false;
  int version = 0;
  if (std::strcmp(cap_name, "dltensor") == 0) {
    auto* mt = static_cast<dl::ManagedTensor*>(PyCapsule_GetPointer(obj, "dltensor"));
    if (mt == nullptr) throw py::error_already_set();
    t = &mt->dl_tensor;
  } else if (std::strcmp(cap_name, "dltensor_versioned") == 0) {
    auto* mt = static_cast<dl::ManagedTensorVersioned*>(PyCapsule_GetPointer(obj, "dltensor_versioned"));
    if (mt == nullptr) throw py::error_already_set();
    if (mt->version.major != 1)
      throw InvalidType(name, "uses DLPack version " + std::to_string(mt->version.major) + "." +
                                  std::to_string(mt->version.minor) + ", which this build cannot read (1.x only)");
    version = 1;
    readonly = (mt->flags & dl::kFlagReadOnly) != 0;
    t = &mt->dl_tensor;
  } else {
    throw InvalidArgument(name, std::string("its DLPack capsule is named '") + cap_name +
                                    "' (already consumed?); pass the array itself, not a capsule");
  }
  if (t->ndim < 0 || t->ndim > 32) throw InvalidArgument(name, "has an invalid number of dimensions in DLPack");
  if (t->ndim > 0 && t->shape == nullptr) throw InvalidArgument(name, "has no shape in its DLPack export");
  py::tuple shape(t->ndim), strides(t->ndim);
  std::vector<int64_t> compact(static_cast<size_t>(t->ndim), 1);
  for (int d = t->ndim - 2; d >= 0; --d) compact[d] = compact[d + 1] * t->shape[d + 1];
  for (int d = 0; d < t->ndim; ++d) {
    shape[d] = py::int_(t->shape[d]);
    strides[d] = py::int_(t->strides != nullptr ? t->strides[d] : compact[d]);
  }
  py::dict out;
  out["ptr"] = py::int_(reinterpret_cast<uintptr_t>(t->data) + t->byte_offset);
  out["shape"] = shape;
  out["strides"] = strides;
  out["dtype_code"] = static_cast<int>(t->dtype.code);
  out["dtype_bits"] = static_cast<int>(t->dtype.bits);
  out["dtype_lanes"] = static_cast<int>(t->dtype.lanes);
  out["device_type"] = static_cast<int>(t->device.device_type);
  out["device_id"] = static_cast<int>(t->device.device_id);
  out["readonly"] = readonly;
  out["versioned"] = version == 1;
  return out;
}

using Codes = py::array_t<int32_t, py::array::c_style>;
using Indices = py::array_t<int64_t, py::array::c_style>;
using Weights = py::array_t<double, py::array::c_style>;

// Same keys as the CPU binding's result (module.cpp, otce_impl).
py::dict otce_cuda_impl(const FeatureSource& src, const Codes& src_code, int cs, const Indices& src_idx,
                        const FeatureSource& tgt, const Codes& tgt_code, int ct, const Indices& tgt_idx,
                        const SinkhornOptions& opt, int device) {
  if (src_code.size() != src.size() || tgt_code.size() != tgt.size())
    throw InvalidArgument("labels", "internal: one class code per pixel expected");
  if (src_idx.ndim() != 2 || tgt_idx.ndim() != 2 || src_idx.shape(0) != tgt_idx.shape(0))
    throw InvalidArgument("indices", "internal: (repeats, n) index arrays expected");
  const int64_t repeats = src_idx.shape(0), ns = src_idx.shape(1), nt = tgt_idx.shape(1);
  OTCEResult r;
  {
    const SinkhornOptions o = with_interrupt(opt);
    py::gil_scoped_release nogil;
    r = otce_cuda(src, src_code.data(), cs, src_idx.data(), ns, tgt, tgt_code.data(), ct, tgt_idx.data(), nt,
                  repeats, o, device);
  }
  return otce_dict(r, repeats, cs, ct);
}

py::dict sinkhorn_cuda_impl(const FeatureSource& x, const FeatureSource& y, const py::object& a, const py::object& b,
                            const SinkhornOptions& opt, int device) {
  Weights wa, wb;
  const double* pa = nullptr;
  const double* pb = nullptr;
  if (!a.is_none()) {
    wa = a.cast<Weights>();
    if (wa.size() != x.size()) throw InvalidArgument("a", "must have one weight per point of x");
    pa = wa.data();
  }
  if (!b.is_none()) {
    wb = b.cast<Weights>();
    if (wb.size() != y.size()) throw InvalidArgument("b", "must have one weight per point of y");
    pb = wb.data();
  }
  TransportResult r;
  {
    const SinkhornOptions o = with_interrupt(opt);
    py::gil_scoped_release nogil;
    r = transport_points_cuda(x, y, pa, pb, o, device);
  }
  return transport_dict(r);
}

}  // namespace

void register_cuda_bindings(py::module_& m) {
  py::class_<FeatureSource>(m, "FeatureSource")
      .def(py::init<>())
      .def_readwrite("data", &FeatureSource::data)
      .def_readwrite("float64", &FeatureSource::float64)
      .def_readwrite("images", &FeatureSource::images)
      .def_readwrite("pixels", &FeatureSource::pixels)
      .def_readwrite("dim", &FeatureSource::dim)
      .def_readwrite("stride_image", &FeatureSource::stride_image)
      .def_readwrite("stride_pixel", &FeatureSource::stride_pixel)
      .def_readwrite("stride_dim", &FeatureSource::stride_dim)
      .def_readwrite("device", &FeatureSource::device)
      .def_readwrite("stream", &FeatureSource::stream);

  m.def("dlpack_info", &dlpack_info, py::arg("capsule"), py::arg("name"));
  m.def("otce_cuda", &otce_cuda_impl);
  m.def("sinkhorn_cuda", &sinkhorn_cuda_impl);
  m.def("sample_pixels_cuda",
        [](const Codes& code, int64_t n, int64_t repeats, uint64_t seed, const std::string& arg, int device) {
          std::vector<int64_t> idx;
          {
            py::gil_scoped_release nogil;
            idx = sample_pixels_cuda(code.data(), code.size(), n, repeats, seed, arg.c_str(), device);
          }
          return to_numpy(idx, {static_cast<py::ssize_t>(repeats), static_cast<py::ssize_t>(n)});
        },
        py::arg("code"), py::arg("n"), py::arg("repeats"), py::arg("seed"), py::arg("arg_name"), py::arg("device"));
  m.def("cuda_pointer_device", [](uint64_t ptr) {
    int dev;
    {
      py::gil_scoped_release nogil;
      dev = cuda_pointer_device(ptr);
    }
    return dev;
  });
  m.def("cuda_copy_to_host",
        [](py::array_t<uint8_t, py::array::c_style> out, uint64_t src, int device, uint64_t stream) {
          void* dst = out.mutable_data();
          const auto bytes = static_cast<uint64_t>(out.size());
          py::gil_scoped_release nogil;
          cuda_copy_to_host(dst, src, bytes, device, stream);
        },
        py::arg("out").noconvert(), py::arg("src"), py::arg("device"), py::arg("stream"));
  m.def("cuda_workspace_bytes", &cuda_workspace_bytes, py::arg("repeats"), py::arg("n"), py::arg("m"), py::arg("dim"),
        py::arg("row_classes"), py::arg("col_classes"), py::arg("float64"), py::arg("codes_len") = 0);
}
