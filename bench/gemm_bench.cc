// PanelGemm against oneDNN's matmul on the products of one joint block, each product
// on weights no other product touches (as in a forward pass, they stream from DRAM), the two
// kernels alternating run by run in one process. Not part of CI.
//   build/bin/gemm_bench [--dtype f32|bf16] [--hidden 768] [--img_rows 64] [--txt_rows 32]
//                        [--copies 12] [--runs 31]
// Defaults: seed-default at batch 1. sd3-medium batch 1: --hidden 1536 --img_rows 1024
// --txt_rows 77 --copies 4. Prints per product kind the median ms of its `copies` products
// with each kernel and the ratio (oneDNN / ours: above 1, ours is faster).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "core/linear.h"
#include "core/status_macros.h"
#include "tools/flags.h"

namespace mmdit {
namespace {

struct ProductKind {
  std::string name;
  int64_t rows, in, out;
  Epilogue epilogue;
};

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

absl::Status Run(const Flags& flags) {
  ASSIGN_OR_RETURN(const ComputeDType compute, ParseComputeDType(flags.String("dtype", "f32"), "dtype"));
  ASSIGN_OR_RETURN(const int64_t d, flags.Int("hidden", 768));
  ASSIGN_OR_RETURN(const int64_t img, flags.Int("img_rows", 64));
  ASSIGN_OR_RETURN(const int64_t txt, flags.Int("txt_rows", 32));
  ASSIGN_OR_RETURN(const int64_t copies, flags.Int("copies", 12));
  ASSIGN_OR_RETURN(const int64_t runs, flags.Int("runs", 31));
  const std::vector<ProductKind> kinds = {
      {"image qkv", img, d, 3 * d, Epilogue::kNone},        {"text qkv", txt, d, 3 * d, Epilogue::kNone},
      {"image out", img, d, d, Epilogue::kNone},            {"text out", txt, d, d, Epilogue::kNone},
      {"image ff in", img, d, 4 * d, Epilogue::kGeluTanh},  {"text ff in", txt, d, 4 * d, Epilogue::kGeluTanh},
      {"image ff out", img, 4 * d, d, Epilogue::kNone},     {"text ff out", txt, 4 * d, d, Epilogue::kNone},
  };
  // kernel 0: the engine's (PanelGemm where available); kernel 1: oneDNN's matmul.
  std::unique_ptr<DnnlContext> contexts[2];
  std::vector<std::vector<Linear>> linears[2];  // [kernel][kind][copy]
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uniform(-0.05f, 0.05f);
  for (int kernel = 0; kernel < 2; ++kernel) {
    ASSIGN_OR_RETURN(contexts[kernel], DnnlContext::Create(compute));
    contexts[kernel]->use_panel_gemm = kernel == 0;
    linears[kernel].resize(kinds.size());
    for (size_t k = 0; k < kinds.size(); ++k) {
      for (int64_t c = 0; c < copies; ++c) {
        LinearWeights weights{Tensor({kinds[k].out, kinds[k].in}), Tensor({kinds[k].out})};
        for (float& w : weights.weight.data) w = uniform(rng);
        ASSIGN_OR_RETURN(Linear linear, Linear::Create(*contexts[kernel], std::move(weights), kinds[k].epilogue));
        linears[kernel][k].push_back(std::move(linear));
      }
    }
  }
  std::vector<float> x(std::max(img, txt) * 4 * d, 0.01f), y(std::max(img, txt) * 4 * d);
  std::vector<std::vector<double>> ms[2];  // [kernel][kind] per run
  for (auto& per_kind : ms) per_kind.resize(kinds.size());
  for (int64_t run = 0; run <= runs; ++run) {  // run 0 warms up
    for (int kernel = 0; kernel < 2; ++kernel) {
      std::vector<double> total(kinds.size(), 0.0);
      // Block by block, as the forward interleaves them.
      for (int64_t c = 0; c < copies; ++c) {
        for (size_t k = 0; k < kinds.size(); ++k) {
          const auto start = std::chrono::steady_clock::now();
          RETURN_IF_ERROR(linears[kernel][k][c].Forward(x.data(), kinds[k].rows, y.data()));
          total[k] += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        }
      }
      if (run > 0) {
        for (size_t k = 0; k < kinds.size(); ++k) ms[kernel][k].push_back(total[k]);
      }
    }
  }
  std::printf("%s, %d threads, hidden %lld, %lld image / %lld text rows, %lld copies, median of %lld runs\n",
              ComputeDTypeName(compute), omp_get_max_threads(), static_cast<long long>(d), static_cast<long long>(img),
              static_cast<long long>(txt), static_cast<long long>(copies), static_cast<long long>(runs));
  std::printf("%-14s %10s %10s %8s %12s\n", "product", "ours_ms", "onednn_ms", "ratio", "ours_GFLOP/s");
  double ours_sum = 0, onednn_sum = 0;
  for (size_t k = 0; k < kinds.size(); ++k) {
    const double ours = Median(ms[0][k]), onednn = Median(ms[1][k]);
    ours_sum += ours;
    onednn_sum += onednn;
    const double gflop = 2.0 * kinds[k].rows * kinds[k].in * kinds[k].out * copies / 1e9;
    std::printf("%-14s %10.2f %10.2f %8.3f %12.1f\n", kinds[k].name.c_str(), ours, onednn, onednn / ours,
                gflop / (ours / 1e3));
  }
  std::printf("%-14s %10.2f %10.2f %8.3f\n", "all", ours_sum, onednn_sum, onednn_sum / ours_sum);
  return absl::OkStatus();
}

}  // namespace
}  // namespace mmdit

int main(int argc, char** argv) {
  auto flags = mmdit::Flags::Parse(std::vector<std::string>(argv + 1, argv + argc),
                                   {"dtype", "hidden", "img_rows", "txt_rows", "copies", "runs"});
  absl::Status status = flags.ok() ? mmdit::Run(*flags) : flags.status();
  if (!status.ok()) {
    std::cerr << "gemm_bench: " << status << "\n";
    return 1;
  }
  return 0;
}
