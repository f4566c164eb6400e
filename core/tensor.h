// Plain float32 tensors: a shape and row-major data. The engine computes in float32;
// stored F16/BF16 weights are converted once at load.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "absl/types/span.h"

namespace mmdit {

using Shape = std::vector<int64_t>;

inline int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// "[2, 4, 8, 8]", for error messages.
inline std::string ShapeString(absl::Span<const int64_t> shape) { return "[" + absl::StrJoin(shape, ", ") + "]"; }

// Owns its data. Invariant: data.size() == NumElements(shape).
struct Tensor {
  Shape shape;
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(Shape s) : shape(std::move(s)), data(mmdit::NumElements(shape)) {}
  Tensor(Shape s, std::vector<float> d) : shape(std::move(s)), data(std::move(d)) {}
  int64_t NumElements() const { return static_cast<int64_t>(data.size()); }
};

// Borrows data owned elsewhere (a request buffer, an .npy file, a Tensor).
struct TensorView {
  Shape shape;
  const float* data = nullptr;

  TensorView() = default;
  TensorView(Shape s, const float* d) : shape(std::move(s)), data(d) {}
  TensorView(const Tensor& t) : shape(t.shape), data(t.data.data()) {}  // NOLINT: implicit view
  int64_t NumElements() const { return mmdit::NumElements(shape); }
};

}  // namespace mmdit
