#include "server/inference_codec.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "proto/tensor_codec.h"

namespace mmdit {
namespace {

using InferInput = inference::ModelInferRequest::InferInputTensor;

absl::StatusOr<v1::DType> DtypeFromDatatype(const std::string& datatype, absl::string_view where) {
  for (v1::DType dtype : {v1::FP32, v1::FP16, v1::BF16}) {
    if (datatype == InferDatatypeName(dtype)) return dtype;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": datatype \"", datatype, "\" is not served; expected FP32, FP16 or BF16"));
}

// The element count of `shape`, or an error for a negative dimension or a count beyond any
// message (the byte size check that follows must not overflow).
absl::StatusOr<int64_t> ElementCount(const InferInput& input, absl::string_view where) {
  int64_t count = 1;
  for (int64_t dim : input.shape()) {
    if (dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": shape [", absl::StrJoin(input.shape(), ", "),
                                                     "] has a negative dimension"));
    }
    if (dim != 0 && count > (int64_t{1} << 40) / dim) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": shape [", absl::StrJoin(input.shape(), ", "), "] is larger than any request"));
    }
    count *= dim;
  }
  return count;
}

// The one typed field of `contents` that is set, with its count; FP32 inputs may use only
// fp32_contents (FP16 and BF16 have no typed field: raw only).
absl::Status CopyTypedContents(const InferInput& input, v1::DType dtype, int64_t elements, absl::string_view where,
                               std::string& data) {
  const inference::InferTensorContents& contents = input.contents();
  const int others = contents.bool_contents_size() + contents.int_contents_size() + contents.int64_contents_size() +
                     contents.uint_contents_size() + contents.uint64_contents_size() +
                     contents.fp64_contents_size() + contents.bytes_contents_size();
  if (dtype != v1::FP32) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", InferDatatypeName(dtype),
                                                   " has no typed contents in the protocol; send it in "
                                                   "raw_input_contents"));
  }
  if (others > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": an FP32 input's typed contents go in contents.fp32_contents"));
  }
  if (contents.fp32_contents_size() != elements) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", contents.fp32_contents_size(),
                                                   " values in contents.fp32_contents for shape [",
                                                   absl::StrJoin(input.shape(), ", "), "] (", elements, " elements)"));
  }
  data.resize(static_cast<size_t>(elements) * sizeof(float));
  if (elements > 0) std::memcpy(data.data(), contents.fp32_contents().data(), data.size());  // both little-endian
  return absl::OkStatus();
}

v1::Tensor* FieldFor(absl::string_view name, v1::DenoiseRequest& request) {
  if (name == "img_latent") return request.mutable_img_latent();
  if (name == "txt_embed") return request.mutable_txt_embed();
  if (name == "timestep") return request.mutable_timestep();
  if (name == "pooled_text") return request.mutable_pooled_text();
  return nullptr;
}

}  // namespace

absl::string_view InferDatatypeName(v1::DType dtype) {
  switch (dtype) {
    case v1::FP16:
      return "FP16";
    case v1::BF16:
      return "BF16";
    default:
      return "FP32";
  }
}

absl::StatusOr<v1::DenoiseRequest> DenoiseRequestFromInfer(inference::ModelInferRequest request) {
  v1::DenoiseRequest denoise;
  denoise.set_request_id(request.id());
  for (const auto& [name, value] : request.parameters()) {
    if (name != "wait_for_batch") continue;  // other parameters (priority, timeout, ...) are clients' hints
    if (value.parameter_choice_case() != inference::InferParameter::kBoolParam) {
      return absl::InvalidArgumentError("parameters[\"wait_for_batch\"]: expected a bool_param");
    }
    denoise.set_wait_for_batch(value.bool_param());
  }
  for (int i = 0; i < request.outputs_size(); ++i) {
    if (request.outputs(i).name() != kInferOutputName) {
      return absl::InvalidArgumentError(absl::StrCat("outputs[", i, "]: unknown output \"", request.outputs(i).name(),
                                                     "\"; the model has one output, prediction"));
    }
  }
  const bool raw = request.raw_input_contents_size() > 0;
  if (raw && request.raw_input_contents_size() != request.inputs_size()) {
    return absl::InvalidArgumentError(absl::StrCat("raw_input_contents: ", request.raw_input_contents_size(),
                                                   " entries for ", request.inputs_size(),
                                                   " inputs; expected one per input, in their order"));
  }
  for (int i = 0; i < request.inputs_size(); ++i) {
    const InferInput& input = request.inputs(i);
    const std::string where = absl::StrCat("inputs[", i, "] (", input.name(), ")");
    v1::Tensor* field = FieldFor(input.name(), denoise);
    if (field == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("inputs[", i, "]: unknown input \"", input.name(),
                                                     "\"; the model takes ", absl::StrJoin(kInferInputNames, ", ")));
    }
    if (field->shape_size() > 0 || !field->data().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": the input is given twice"));
    }
    absl::StatusOr<v1::DType> dtype = DtypeFromDatatype(input.datatype(), where);
    if (!dtype.ok()) return dtype.status();
    absl::StatusOr<int64_t> elements = ElementCount(input, where);
    if (!elements.ok()) return elements.status();
    field->set_dtype(*dtype);
    field->mutable_shape()->CopyFrom(input.shape());
    // Triton's tools send a per-sample scalar as [B, 1] (ModelConfig declares it so).
    if (input.name() == "timestep" && field->shape_size() == 2 && field->shape(1) == 1) field->mutable_shape()->RemoveLast();
    if (raw) {
      if (input.has_contents()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": has typed contents while raw_input_contents is used; use one or the other"));
      }
      // Sizes against the shape are DecodeRequest's check.
      field->set_data(std::move(*request.mutable_raw_input_contents(i)));
    } else if (absl::Status copied = CopyTypedContents(input, *dtype, *elements, where, *field->mutable_data());
               !copied.ok()) {
      return copied;
    }
  }
  return denoise;
}

std::vector<int64_t> InferSampleDims(const ModelConfig& config, absl::string_view tensor) {
  if (tensor == "img_latent" || tensor == kInferOutputName) {
    const int64_t channels = tensor == "img_latent" ? config.in_channels : config.out_channels;
    return config.has_positions() ? std::vector<int64_t>{channels, -1, -1}
                                  : std::vector<int64_t>{-1, config.patch_features()};
  }
  if (tensor == "txt_embed") return {-1, config.joint_attention_dim};
  if (tensor == "pooled_text") return {config.pooled_projection_dim};
  return {};  // timestep
}

void EncodeInferResponse(const std::vector<Tensor>& outputs, v1::DType dtype, inference::ModelInferResponse& response) {
  v1::Tensor prediction;
  EncodePrediction(outputs, dtype, &prediction);
  auto* output = response.add_outputs();
  output->set_name(std::string(kInferOutputName));
  output->set_datatype(std::string(InferDatatypeName(dtype)));
  output->mutable_shape()->CopyFrom(prediction.shape());
  *response.add_raw_output_contents() = std::move(*prediction.mutable_data());
}

}  // namespace mmdit
