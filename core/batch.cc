#include "core/batch.h"

#include "absl/strings/str_cat.h"

namespace mmdit {
namespace {

// Sample b of a [B, ...] tensor.
TensorView SampleView(const TensorView& batched, int64_t b) {
  const Shape inner(batched.shape.begin() + 1, batched.shape.end());
  return TensorView(inner, batched.data + b * NumElements(inner));
}

}  // namespace

absl::StatusOr<std::vector<SampleInput>> SplitBatch(const TensorView& img_latent, const TensorView& txt_embed,
                                                    const TensorView& timestep, const TensorView& pooled_text) {
  const struct {
    const char* name;
    const TensorView& tensor;
    size_t rank;
    const char* layout;
  } fields[] = {
      {"img_latent", img_latent, 0, "[B, C, H, W] or [B, N, img_dim]"},
      {"txt_embed", txt_embed, 3, "[B, T, J]"},
      {"timestep", timestep, 1, "[B]"},
      {"pooled_text", pooled_text, 2, "[B, P]"},
  };
  for (const auto& field : fields) {
    const size_t rank = field.tensor.shape.size();
    const bool rank_ok = field.rank == 0 ? (rank == 3 || rank == 4) : rank == field.rank;
    if (!rank_ok || field.tensor.shape[0] < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(field.name, ": expected ", field.layout, " with B >= 1, got ", ShapeString(field.tensor.shape)));
    }
    if (field.tensor.shape[0] != img_latent.shape[0]) {
      return absl::InvalidArgumentError(absl::StrCat(field.name, ": batch size ", field.tensor.shape[0],
                                                     " differs from img_latent's ", img_latent.shape[0]));
    }
  }
  std::vector<SampleInput> samples;
  for (int64_t b = 0; b < img_latent.shape[0]; ++b) {
    samples.push_back(
        {SampleView(img_latent, b), SampleView(txt_embed, b), timestep.data[b], SampleView(pooled_text, b)});
  }
  return samples;
}

absl::StatusOr<Tensor> StackBatch(const std::vector<Tensor>& samples) {
  if (samples.empty()) return absl::InvalidArgumentError("nothing to stack");
  Shape shape = samples[0].shape;
  shape.insert(shape.begin(), static_cast<int64_t>(samples.size()));
  Tensor out;
  out.shape = shape;
  for (const Tensor& sample : samples) {
    if (sample.shape != samples[0].shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot stack ", ShapeString(sample.shape), " with ", ShapeString(samples[0].shape)));
    }
    out.data.insert(out.data.end(), sample.data.begin(), sample.data.end());
  }
  return out;
}

}  // namespace mmdit
