// Plain float32 tensors: a shape and row-major data. The engine computes in float32;
// stored F16/BF16 weights are converted once at load.
#pragma once

#include <cstdint>
#include <memory>
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

// Elements kept outside a Tensor until it is loaded: a tensor stored in a mapped checkpoint
// file (safetensors.h, OpenSafetensors).
class ElementSource {
 public:
  virtual ~ElementSource() = default;
  // Converts elements [first, first + count) to float32 at `out`, then gives back the memory
  // they occupied in this process (reading them again is correct, only slower).
  virtual void Read(int64_t first, int64_t count, float* out) const = 0;
};

// Owns its data. Invariant: data.size() == NumElements(shape), except while the values are
// still unread (see Load).
struct Tensor {
  // Elements [first, first + count) of `source`.
  struct UnreadRange {
    std::shared_ptr<const ElementSource> source;
    int64_t first = 0, count = 0;
  };

  Shape shape;
  std::vector<float> data;
  // While not empty, `data` is empty and the values are these ranges, in order. A checkpoint
  // is read this way so that the engine converts one tensor at a time as it packs it: the
  // model's float32 copy never exists whole beside its packed weights.
  std::vector<UnreadRange> unread;

  Tensor() = default;
  explicit Tensor(Shape s) : shape(std::move(s)), data(mmdit::NumElements(shape)) {}
  Tensor(Shape s, std::vector<float> d) : shape(std::move(s)), data(std::move(d)) {}
  static Tensor Unread(Shape shape, std::vector<UnreadRange> ranges) {
    Tensor t;
    t.shape = std::move(shape);
    t.unread = std::move(ranges);
    return t;
  }
  int64_t NumElements() const { return mmdit::NumElements(shape); }
  // Reads unread values into `data`; nothing when they are already there.
  void Load();
};

// Elements [first, first + NumElements(shape)) of `t` as a tensor of `shape`, left unread
// when `t` is.
Tensor ElementRange(const Tensor& t, Shape shape, int64_t first);

// `a`'s elements then `b`'s as a tensor of `shape`, left unread when both are.
Tensor Concatenate(Tensor a, Tensor b, Shape shape);

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
