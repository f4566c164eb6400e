// Joint attention alone (core/layers.h `Attention`), float32 and bf16 alternating run by run
// in one process, on the layout a forward gives it: each sample's text and image rows as two
// segments of fused q/k/v projection outputs. Not part of CI.
//   build/bin/attention_bench [--batch 8] [--heads 12] [--head_dim 64] [--img_rows 64]
//                             [--txt_rows 32] [--runs 101]
// Defaults: seed-default at batch 8. sd3-medium at 1024x1024 (128x128 latent): --batch 1
// --heads 24 --img_rows 4096 --txt_rows 77 --runs 5. Prints per dtype the median ms of one
// call, its GFLOP/s (4 L^2 hd per head: Q K^T and P V) and the bf16 speed-up.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "core/layers.h"
#include "core/status_macros.h"
#include "tools/flags.h"

namespace mmdit {
namespace {

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

absl::Status Run(const Flags& flags) {
  ASSIGN_OR_RETURN(const int64_t batch, flags.Int("batch", 8));
  ASSIGN_OR_RETURN(const int64_t heads, flags.Int("heads", 12));
  ASSIGN_OR_RETURN(const int64_t head_dim, flags.Int("head_dim", 64));
  ASSIGN_OR_RETURN(const int64_t img, flags.Int("img_rows", 64));
  ASSIGN_OR_RETURN(const int64_t txt, flags.Int("txt_rows", 32));
  ASSIGN_OR_RETURN(const int64_t runs, flags.Int("runs", 101));
  if (batch < 1 || heads < 1 || head_dim < 1 || img < 1 || txt < 0 || runs < 1) {
    return absl::InvalidArgumentError("batch, heads, head_dim, img_rows and runs must be positive, txt_rows >= 0");
  }
  const int64_t dim = heads * head_dim, length = img + txt;
  // q, k, v rows as the engine holds them: [rows, 3 * dim] per stream, samples one after another.
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> image_qkv(batch * img * 3 * dim), text_qkv(batch * txt * 3 * dim);
  for (float& x : image_qkv) x = normal(rng);
  for (float& x : text_qkv) x = normal(rng);
  std::vector<float> image_out(batch * img * dim), text_out(batch * txt * dim);
  std::vector<AttentionSequence> sequences(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const float* t = text_qkv.data() + b * txt * 3 * dim;
    const float* m = image_qkv.data() + b * img * 3 * dim;
    sequences[b].segments[0] = {t, t + dim, t + 2 * dim, text_out.data() + b * txt * dim, txt};
    sequences[b].segments[1] = {m, m + dim, m + 2 * dim, image_out.data() + b * img * dim, img};
    sequences[b].num_segments = 2;
  }
  const std::vector<int64_t> lengths(batch, length);
  std::vector<float> scratch(AttentionScratchFloats(lengths, head_dim, omp_get_max_threads()));

  const ComputeDType dtypes[] = {ComputeDType::kF32, ComputeDType::kBF16};
  std::vector<double> ms[2];
  for (int64_t run = -2; run < runs; ++run) {  // two warm-up runs
    for (int d = 0; d < 2; ++d) {
      const auto start = std::chrono::steady_clock::now();
      Attention(sequences, heads, head_dim, {3 * dim, dim}, dtypes[d], absl::MakeSpan(scratch));
      const double elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      if (run >= 0) ms[d].push_back(elapsed);
    }
  }
  const double gflop = 4.0 * batch * heads * length * length * head_dim / 1e9;
  std::printf("attention, %d threads, batch %ld, %ld heads x %ld, %ld image + %ld text rows, median of %ld runs\n",
              omp_get_max_threads(), static_cast<long>(batch), static_cast<long>(heads), static_cast<long>(head_dim),
              static_cast<long>(img), static_cast<long>(txt), static_cast<long>(runs));
  for (int d = 0; d < 2; ++d) {
    const double median = Median(ms[d]);
    std::printf("%-5s %10.3f ms %8.1f GFLOP/s\n", ComputeDTypeName(dtypes[d]), median, gflop / median * 1e3);
  }
  std::printf("bf16 speed-up %.2fx%s\n", Median(ms[0]) / Median(ms[1]),
              Bf16AttentionRuns(ComputeDType::kBF16, head_dim) ? "" : " (bf16 ran as float32 here)");
  return absl::OkStatus();
}

}  // namespace
}  // namespace mmdit

int main(int argc, char** argv) {
  auto flags = mmdit::Flags::Parse(std::vector<std::string>(argv + 1, argv + argc),
                                   {"batch", "heads", "head_dim", "img_rows", "txt_rows", "runs"});
  absl::Status status = flags.ok() ? mmdit::Run(*flags) : flags.status();
  if (!status.ok()) {
    std::cerr << "attention_bench: " << status << "\n";
    return 1;
  }
  return 0;
}
