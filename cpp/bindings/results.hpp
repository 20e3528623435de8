// Conversions shared by the CPU (module.cpp) and CUDA (cuda_bindings.cpp) bindings, so that both
// solvers hand Python the same keys, shapes and dtypes. No numerics here.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "segtransfer/otce.hpp"

namespace segtransfer::bindings {

namespace py = pybind11;

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array_t<T> out(shape);
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

// Ctrl-C: the solver polls this from its own (GIL-free) thread; a pending signal leaves the
// KeyboardInterrupt set in Python's error indicator, which the exception translator re-raises.
inline SinkhornOptions with_interrupt(SinkhornOptions opt) {
  opt.interrupt = []() {
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
  };
  return opt;
}

inline py::dict otce_dict(const OTCEResult& r, int64_t repeats, int cs, int ct) {
  py::dict d;
  const auto K = static_cast<py::ssize_t>(repeats);
  d["conditional_entropy"] = to_numpy(r.conditional_entropy, {K});
  d["transport_cost"] = to_numpy(r.transport_cost, {K});
  d["marginal_error"] = to_numpy(r.marginal_error, {K});
  d["joint"] = to_numpy(r.joint, {K, cs, ct});
  d["iterations"] = to_numpy(r.iterations, {K});
  d["converged"] = to_numpy(r.converged, {K}).attr("astype")("bool");
  d["timed_out"] = to_numpy(r.timed_out, {K}).attr("astype")("bool");
  return d;
}

inline py::dict transport_dict(const TransportResult& r) {
  py::dict out;
  out["f"] = to_numpy(r.f, {static_cast<py::ssize_t>(r.f.size())});
  out["g"] = to_numpy(r.g, {static_cast<py::ssize_t>(r.g.size())});
  out["transport_cost"] = r.transport_cost;
  out["iterations"] = r.report.iterations;
  out["converged"] = r.report.converged;
  out["timed_out"] = r.report.timed_out;
  out["marginal_error"] = r.report.marginal_error;
  out["stages"] = r.report.stages;
  out["dense_stages"] = r.report.dense_stages;
  out["newton_steps"] = r.report.newton_steps;
  out["cg_iterations"] = r.report.cg_iterations;
  return out;
}

}  // namespace segtransfer::bindings
