// Typed exceptions of the core. Each names the argument it is about, so that the bindings can
// translate them into the matching Python exception with a message the user can act on.
#pragma once
#include <stdexcept>
#include <string>

namespace segtransfer {

// A value is out of its domain (shape, range, NaN, ...). Python: ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  InvalidArgument(const std::string& arg, const std::string& problem)
      : std::invalid_argument(arg + ": " + problem), arg_(arg) {}
  const std::string& argument() const noexcept { return arg_; }

 private:
  std::string arg_;
};

// Squared distances between the features beyond the floating-point range: the one error for it, from
// the stored, blocked and CUDA solvers alike.
inline InvalidArgument cost_overflow() {
  return InvalidArgument("features", "squared distances between the features overflow the floating-point "
                                     "type (the features are too large); rescale them (float32 features: or "
                                     "pass them as float64)");
}

// A value has an unsupported type (dtype). Python: TypeError.
class InvalidType : public std::invalid_argument {
 public:
  InvalidType(const std::string& arg, const std::string& problem)
      : std::invalid_argument(arg + ": " + problem) {}
};

// A buffer would not fit in the memory budget; thrown before allocating. Python: MemoryError.
class OutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The caller's interrupt callback asked to stop (Ctrl-C). Python: KeyboardInterrupt.
class Interrupted : public std::runtime_error {
 public:
  Interrupted() : std::runtime_error("interrupted") {}
};

// A CUDA runtime failure, with the CUDA error string and the operation. Python: RuntimeError.
class DeviceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace segtransfer
