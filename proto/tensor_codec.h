// mmdit.v1.Tensor (dtype, shape, little-endian bytes) to and from float32 tensors; shared by
// the server and the client.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tensor.h"
#include "mmdit/v1/denoiser.pb.h"

namespace mmdit {

// Decodes `wire` to float32. Errors: INVALID_ARGUMENT naming `field`: no shape, an unknown
// dtype, an empty or oversized dimension, bytes not equal to shape x dtype, NaN or Inf.
absl::StatusOr<Tensor> DecodeTensor(const v1::Tensor& wire, const std::string& field);

// Encodes `tensor` as `dtype` (FP32 for anything else).
void EncodeTensor(const TensorView& tensor, v1::DType dtype, v1::Tensor* wire);

// The index of the first element of `values` that is not finite once encoded as `dtype`
// (NaN, Inf, or beyond FP16's or BF16's range); nullopt when every one is.
std::optional<int64_t> FirstUnencodable(const TensorView& values, v1::DType dtype);

// Stacks same-shaped per-sample tensors into one [B, ...] wire tensor of `dtype`.
void EncodePrediction(const std::vector<Tensor>& outputs, v1::DType dtype, v1::Tensor* prediction);

}  // namespace mmdit
