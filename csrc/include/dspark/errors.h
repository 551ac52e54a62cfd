// Exceptions thrown by the library. The Python module maps ValueError and
// TypeError to the Python exceptions of the same name and CudaError to
// RuntimeError, so that a C++ check reads the same as a Python one.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace dspark {

// A tensor has the wrong shape, an argument has an invalid value.
class ValueError : public std::invalid_argument {
 public:
  explicit ValueError(const std::string& what) : std::invalid_argument(what) {}
};

// A tensor has the wrong dtype or lives on the wrong kind of device.
class TypeError : public std::invalid_argument {
 public:
  explicit TypeError(const std::string& what) : std::invalid_argument(what) {}
};

// A CUDA runtime call failed; the message carries the op name and CUDA's text.
class CudaError : public std::runtime_error {
 public:
  explicit CudaError(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}
}  // namespace detail

}  // namespace dspark

// DSPARK_CHECK_VALUE(cond, "op: ", "argument ", name, " ...") throws ValueError.
#define DSPARK_CHECK_VALUE(cond, ...)                                 \
  do {                                                                \
    if (!(cond)) throw ::dspark::ValueError(::dspark::detail::concat(__VA_ARGS__)); \
  } while (0)

#define DSPARK_CHECK_TYPE(cond, ...)                                  \
  do {                                                                \
    if (!(cond)) throw ::dspark::TypeError(::dspark::detail::concat(__VA_ARGS__)); \
  } while (0)
