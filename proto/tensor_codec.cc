#include "proto/tensor_codec.h"

#include <cmath>
#include <optional>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"

namespace mmdit {
namespace {

std::optional<DType> StorageDType(v1::DType dtype) {
  switch (dtype) {
    case v1::FP32:
      return DType::kF32;
    case v1::FP16:
      return DType::kF16;
    case v1::BF16:
      return DType::kBF16;
    default:
      return std::nullopt;
  }
}

}  // namespace

absl::StatusOr<Tensor> DecodeTensor(const v1::Tensor& wire, const std::string& field) {
  if (wire.shape_size() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": missing (no shape)"));
  }
  const std::optional<DType> dtype = StorageDType(wire.dtype());
  if (!dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": dtype must be FP32, FP16 or BF16, got ",
        v1::DType_Name(wire.dtype()).empty() ? std::to_string(wire.dtype()) : v1::DType_Name(wire.dtype())));
  }
  Shape shape(wire.shape().begin(), wire.shape().end());
  for (int64_t dim : shape) {
    if (dim < 1) return absl::InvalidArgumentError(absl::StrCat(field, ": shape ", ShapeString(shape), " is empty"));
  }
  // Bytes the shape needs, with the multiplication checked: a client's shape may name more
  // elements than 64 bits can count, and nothing is allocated before the bytes match.
  uint64_t needed = DTypeSize(*dtype);
  bool overflow = false;
  for (int64_t dim : shape) overflow = overflow || __builtin_mul_overflow(needed, static_cast<uint64_t>(dim), &needed);
  if (overflow || wire.data().size() != needed) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", wire.data().size(), " bytes, but ",
                                                   v1::DType_Name(wire.dtype()), " ", ShapeString(shape), " needs ",
                                                   overflow ? "over 2^64" : std::to_string(needed)));
  }
  const int64_t count = static_cast<int64_t>(needed / DTypeSize(*dtype));
  Tensor tensor(std::move(shape));
  ConvertToFloat(*dtype, wire.data().data(), count, tensor.data.data());
  for (int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(tensor.data[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": element ", i, " is ", std::isnan(tensor.data[i]) ? "NaN" : "Inf"));
    }
  }
  return tensor;
}

void EncodeTensor(const TensorView& tensor, v1::DType dtype, v1::Tensor* wire) {
  const DType storage = StorageDType(dtype).value_or(DType::kF32);
  wire->set_dtype(StorageDType(dtype) ? dtype : v1::FP32);
  wire->mutable_shape()->Assign(tensor.shape.begin(), tensor.shape.end());
  std::string* data = wire->mutable_data();
  data->resize(tensor.NumElements() * DTypeSize(storage));
  ConvertFromFloat(storage, tensor.data, tensor.NumElements(), data->data());
}

std::optional<int64_t> FirstUnencodable(const TensorView& values, v1::DType dtype) {
  const DType storage = StorageDType(dtype).value_or(DType::kF32);
  const int64_t count = values.NumElements();
  for (int64_t i = 0; i < count; ++i) {
    const float value = values.data[i];
    // The same conversions as ConvertFromFloat, so that "encodes finite" is exactly what is sent.
    const float encoded = storage == DType::kF16    ? HalfToFloat(FloatToHalf(value))
                          : storage == DType::kBF16 ? BFloat16ToFloat(FloatToBFloat16(value))
                                                    : value;
    if (!std::isfinite(encoded)) return i;
  }
  return std::nullopt;
}

void EncodePrediction(const std::vector<Tensor>& outputs, v1::DType dtype, v1::Tensor* prediction) {
  const DType storage = StorageDType(dtype).value_or(DType::kF32);
  prediction->set_dtype(StorageDType(dtype) ? dtype : v1::FP32);
  prediction->clear_shape();
  prediction->add_shape(static_cast<int64_t>(outputs.size()));
  for (int64_t dim : outputs.front().shape) prediction->add_shape(dim);
  std::string* data = prediction->mutable_data();
  const size_t sample_bytes = outputs.front().NumElements() * DTypeSize(storage);
  data->resize(outputs.size() * sample_bytes);
  for (size_t b = 0; b < outputs.size(); ++b) {
    ConvertFromFloat(storage, outputs[b].data.data(), outputs[b].NumElements(), data->data() + b * sample_bytes);
  }
}

}  // namespace mmdit
