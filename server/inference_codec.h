// The Open Inference Protocol's (KServe v2) ModelInfer in our terms: its input tensors as the
// DenoiseRequest they stand for, and the prediction as its answer. The protocol's tensors carry
// the names of DenoiseRequest's fields (img_latent, txt_embed, timestep, pooled_text) and one
// output, prediction. What only the protocol has is checked here (names, datatypes, raw against
// typed contents, requested outputs, parameters); shapes and sizes are DecodeRequest's.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/model_config.h"
#include "core/tensor.h"
#include "inference/grpc_predict_v2.pb.h"
#include "mmdit/v1/denoiser.pb.h"

namespace mmdit {

inline constexpr absl::string_view kInferInputNames[] = {"img_latent", "txt_embed", "timestep", "pooled_text"};
inline constexpr absl::string_view kInferOutputName = "prediction";

// "FP32", "FP16", "BF16": the protocol's names of our wire dtypes.
absl::string_view InferDatatypeName(v1::DType dtype);

// The DenoiseRequest that `request` stands for (id as request_id; the request parameter
// wait_for_batch, a bool, as wait_for_batch; timestep [B, 1], as Triton's tools send it, as [B]).
// Errors: INVALID_ARGUMENT naming the input
// ("inputs[1] (txt_embed): ...") or field.
// Taken by value: the raw contents move into the DenoiseRequest instead of being copied.
absl::StatusOr<v1::DenoiseRequest> DenoiseRequestFromInfer(inference::ModelInferRequest request);

// A tensor's per-sample shape for `config` (-1: any size); the batch goes in front of it. The
// latent and prediction are image form ([C, H, W]) where the model has a position table, else
// token form ([N, img_dim]); timestep is a scalar ([]). ModelMetadata and ModelConfig both say
// this, each in its own convention.
std::vector<int64_t> InferSampleDims(const ModelConfig& config, absl::string_view tensor);

// Fills `response`'s one output, prediction: `outputs` stacked in `dtype`, as raw contents.
void EncodeInferResponse(const std::vector<Tensor>& outputs, v1::DType dtype, inference::ModelInferResponse& response);

}  // namespace mmdit
