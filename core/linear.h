// Linear layers on oneDNN matmul: y = x W^T + b, optionally with GELU(tanh) fused.
// This file and linear.cc are the one adapter between oneDNN and the rest of the project:
// oneDNN's exceptions are caught here and become absl::Status.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>

#include "absl/status/statusor.h"
#include "core/weights.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace mmdit {

// The oneDNN CPU engine and the stream all of a model's primitives run on.
struct DnnlContext {
  dnnl::engine engine;
  dnnl::stream stream;
  static absl::StatusOr<std::unique_ptr<DnnlContext>> Create();
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
  absl::StatusOr<dnnl::matmul*> PrimitiveForRows(int64_t rows);

  DnnlContext* context_ = nullptr;
  int64_t in_features_ = 0, out_features_ = 0;
  Epilogue epilogue_ = Epilogue::kNone;
  dnnl::memory packed_weights_;  // [in, out] in oneDNN's chosen layout
  dnnl::memory bias_;            // [1, out]
  std::unordered_map<int64_t, dnnl::matmul> primitive_by_rows_;
};

}  // namespace mmdit
