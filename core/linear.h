// Linear layers on oneDNN matmul: y = x W^T + b, optionally with GELU(tanh) fused.
// This file and linear.cc are the one adapter between oneDNN and the rest of the project:
// oneDNN's exceptions are caught here and become absl::Status.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "core/compute_dtype.h"
#include "core/weights.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace mmdit {

// The oneDNN CPU engine and the stream all of a model's primitives run on.
struct DnnlContext {
  dnnl::engine engine;
  dnnl::stream stream;
  ComputeDType compute = ComputeDType::kF32;
  // kBF16: the current product's input converted to bf16, shared by every Linear of the
  // model (their Forward calls are serialised); grows to the largest input, never shrinks.
  std::vector<uint16_t> bf16_input;
  static absl::StatusOr<std::unique_ptr<DnnlContext>> Create(ComputeDType compute);
};

enum class Epilogue { kNone, kGeluTanh };

// Thread-compatible: Forward caches one primitive per row count, so callers serialise.
class Linear {
 public:
  // Takes `weights` ([out, in], [out]) and reorders the matrix once into the layout oneDNN's
  // matmul prefers. Errors: Internal if oneDNN refuses.
  static absl::StatusOr<Linear> Create(DnnlContext& context, LinearWeights weights, Epilogue epilogue);

  // y[rows, out] = epilogue(x[rows, in] W^T + b). Errors: Internal if oneDNN fails.
  absl::Status Forward(const float* x, int64_t rows, float* y);

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }

 private:
  Linear() = default;
  struct RowPrimitives {
    dnnl::matmul matmul;
    dnnl::reorder to_bf16;  // kBF16 only: float32 input to bf16
  };
  absl::StatusOr<RowPrimitives*> PrimitivesForRows(int64_t rows);

  DnnlContext* context_ = nullptr;
  int64_t in_features_ = 0, out_features_ = 0;
  Epilogue epilogue_ = Epilogue::kNone;
  dnnl::memory packed_weights_;  // [in, out] in oneDNN's chosen layout and the compute dtype
  dnnl::memory bias_;            // [1, out]
  std::unordered_map<int64_t, RowPrimitives> primitives_by_rows_;
};

}  // namespace mmdit
