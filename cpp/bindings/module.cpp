// segtransfer._core: the pybind11 face of the C++ core. Array checks, GIL handling and exception
// translation only; every number is computed in cpp/src.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "segtransfer/blocked.hpp"
#include "segtransfer/device.hpp"
#include "segtransfer/errors.hpp"
#include "segtransfer/otce.hpp"
#include "segtransfer/sampling.hpp"
#include "results.hpp"

namespace py = pybind11;
using namespace segtransfer;
using namespace segtransfer::bindings;

// cuda_bindings.cpp: DLPack parsing and the CUDA solvers (stubs that throw when built without CUDA).
void register_cuda_bindings(py::module_& m);

namespace {

// A (B, P, D) float array, any strides (no copy), as the core's strided view.
template <typename T>
PixelView<T> view3(const py::array& arr, const char* name) {
  if (arr.ndim() != 3) throw InvalidArgument(name, "internal: expected a (B, P, D) view");
  PixelView<T> v;
  v.data = static_cast<const T*>(arr.data());
  v.images = arr.shape(0);
  v.pixels = arr.shape(1);
  v.dim = arr.shape(2);
  const py::ssize_t* s = arr.strides();
  for (int k = 0; k < 3; ++k)
    if (s[k] % static_cast<py::ssize_t>(sizeof(T)) != 0)
      throw InvalidArgument(name, "has strides that are not a multiple of its item size");
  v.stride_image = s[0] / static_cast<py::ssize_t>(sizeof(T));
  v.stride_pixel = s[1] / static_cast<py::ssize_t>(sizeof(T));
  v.stride_dim = s[2] / static_cast<py::ssize_t>(sizeof(T));
  return v;
}

template <typename T>
py::dict otce_impl(const py::array& src, const py::array_t<int32_t, py::array::c_style>& src_code,
                   int cs, const py::array_t<int64_t, py::array::c_style>& src_idx, const py::array& tgt,
                   const py::array_t<int32_t, py::array::c_style>& tgt_code, int ct,
                   const py::array_t<int64_t, py::array::c_style>& tgt_idx, const SinkhornOptions& opt,
                   double memory_budget) {
  const PixelView<T> vs = view3<T>(src, "source_features"), vt = view3<T>(tgt, "target_features");
  if (src_code.size() != vs.size() || tgt_code.size() != vt.size())
    throw InvalidArgument("labels", "internal: one class code per pixel expected");
  if (src_idx.ndim() != 2 || tgt_idx.ndim() != 2 || src_idx.shape(0) != tgt_idx.shape(0))
    throw InvalidArgument("indices", "internal: (repeats, n) index arrays expected");
  const int64_t repeats = src_idx.shape(0), ns = src_idx.shape(1), nt = tgt_idx.shape(1);
  OTCEResult r;
  {
    const SinkhornOptions o = with_interrupt(opt);
    py::gil_scoped_release nogil;
    // One call for all repeats, so that they run side by side; otce listens for Ctrl-C between
    // draws as well as inside them.
    r = otce<T>(vs, src_code.data(), cs, src_idx.data(), ns, vt, tgt_code.data(), ct, tgt_idx.data(), nt, repeats, o,
                memory_budget);
  }
  return otce_dict(r, repeats, cs, ct);
}

template <typename T>
py::dict sinkhorn_impl(const py::array_t<T, py::array::c_style>& x, const py::array_t<T, py::array::c_style>& y,
                       const py::object& a, const py::object& b, const SinkhornOptions& opt,
                       double memory_budget) {
  const int64_t n = x.shape(0), m = y.shape(0), d = x.shape(1);
  py::array_t<double, py::array::c_style> wa, wb;
  const double* pa = nullptr;
  const double* pb = nullptr;
  if (!a.is_none()) { wa = a.cast<py::array_t<double, py::array::c_style>>(); pa = wa.data(); }
  if (!b.is_none()) { wb = b.cast<py::array_t<double, py::array::c_style>>(); pb = wb.data(); }
  TransportResult r;
  {
    const SinkhornOptions o = with_interrupt(opt);
    py::gil_scoped_release nogil;
    r = transport_points<T>(x.data(), n, y.data(), m, d, pa, pb, o, memory_budget);
  }
  return transport_dict(r);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "segtransfer C++ core (internal; use the segtransfer package)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Interrupted&) {
      if (PyErr_Occurred()) throw py::error_already_set();
      PyErr_SetString(PyExc_KeyboardInterrupt, "interrupted");
    } catch (const InvalidType& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const DeviceError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  py::class_<SinkhornOptions>(m, "SinkhornOptions")
      .def(py::init<>())
      .def_readwrite("epsilon", &SinkhornOptions::epsilon)
      .def_readwrite("tol", &SinkhornOptions::tol)
      .def_readwrite("max_iter", &SinkhornOptions::max_iter)
      .def_readwrite("timeout", &SinkhornOptions::timeout)
      .def_readwrite("eps_scaling", &SinkhornOptions::eps_scaling)
      .def_readwrite("scaling_factor", &SinkhornOptions::scaling_factor)
      .def_readwrite("stage_tol", &SinkhornOptions::stage_tol)
      .def_readwrite("truncation", &SinkhornOptions::truncation)
      .def_readwrite("max_density", &SinkhornOptions::max_density)
      .def_readwrite("dense_last_iterations", &SinkhornOptions::dense_last_iterations)
      .def_readwrite("overrelaxation", &SinkhornOptions::overrelaxation)
      .def_readwrite("newton", &SinkhornOptions::newton)
      .def_readwrite("newton_switch", &SinkhornOptions::newton_switch)
      .def_readwrite("newton_cg_floor", &SinkhornOptions::newton_cg_floor)
      .def_readwrite("multiscale_points", &SinkhornOptions::multiscale_points)
      .def_readwrite("class_balance", &SinkhornOptions::class_balance)
      .def_readwrite("stage_truncation", &SinkhornOptions::stage_truncation)
      .def_readwrite("float_stage_exponents", &SinkhornOptions::float_stage_exponents)
      .def_readwrite("multiscale_resolution", &SinkhornOptions::multiscale_resolution)
      .def_readwrite("handover_tol", &SinkhornOptions::handover_tol)
      .def_readwrite("blocked", &SinkhornOptions::blocked)
      .def_readwrite("stage_extrapolation", &SinkhornOptions::stage_extrapolation)
      .def_readwrite("num_threads", &SinkhornOptions::num_threads);

  m.def("sample_pixels",
        [](const py::array_t<int32_t, py::array::c_style>& code, int64_t n, int64_t repeats, uint64_t seed,
           const std::string& arg) {
          std::vector<int64_t> idx;
          {
            py::gil_scoped_release nogil;
            idx = sample_pixels(code.data(), code.size(), n, repeats, seed, arg.c_str());
          }
          return to_numpy(idx, {static_cast<py::ssize_t>(repeats), static_cast<py::ssize_t>(n)});
        },
        py::arg("code"), py::arg("n"), py::arg("repeats"), py::arg("seed"), py::arg("arg_name"));
  m.def("count_valid", [](const py::array_t<int32_t, py::array::c_style>& code) {
    return count_valid(code.data(), code.size());
  });
  m.def("otce_f32", &otce_impl<float>);
  m.def("otce_f64", &otce_impl<double>);
  m.def("sinkhorn_f32", &sinkhorn_impl<float>);
  m.def("sinkhorn_f64", &sinkhorn_impl<double>);
  m.def("conditional_entropy", [](const py::array_t<double, py::array::c_style>& joint) {
    if (joint.ndim() != 2) throw InvalidArgument("joint", "must be 2-D");
    return conditional_entropy(joint.data(), static_cast<int>(joint.shape(0)), static_cast<int>(joint.shape(1)));
  });
  // The dense solver's own footprint, so that the Python layer's memory pre-check stays in step with it.
  m.def("dense_bytes", [](int64_t n, int64_t m, int itemsize) {
    if (itemsize != 4 && itemsize != 8) throw InvalidArgument("itemsize", "must be 4 or 8");
    return itemsize == 4 ? dense_bytes<float>(n, m) : dense_bytes<double>(n, m);
  });
  m.def("blocked_bytes", [](int64_t n, int64_t m, int64_t d, int itemsize, int threads, int row_groups,
                            int col_groups) {
    if (itemsize != 4 && itemsize != 8) throw InvalidArgument("itemsize", "must be 4 or 8");
    return itemsize == 4 ? blocked_bytes<float>(n, m, d, threads, row_groups, col_groups)
                         : blocked_bytes<double>(n, m, d, threads, row_groups, col_groups);
  });
  m.attr("max_groups") = kMaxGroups;
  m.def("built_with_cuda", &built_with_cuda);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_status", &cuda_status);
  register_cuda_bindings(m);
}
