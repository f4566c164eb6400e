#include "tools/roofline.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <random>
#include <vector>

#include "core/status_macros.h"

namespace mmdit {

absl::StatusOr<double> StandaloneMatmulMs(ComputeDType compute, absl::Span<const MatmulCall> calls, int iters,
                                          bool panel_gemm) {
  ASSIGN_OR_RETURN(std::unique_ptr<DnnlContext> context, DnnlContext::Create(compute));
  context->use_panel_gemm = panel_gemm;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uniform(-0.05f, 0.05f);
  std::vector<Linear> linears;
  int64_t max_input = 0, max_output = 0;
  for (const MatmulCall& call : calls) {
    LinearWeights weights{Tensor({call.out, call.in}), Tensor({call.out})};
    for (float& w : weights.weight.data) w = uniform(rng);
    ASSIGN_OR_RETURN(Linear linear, Linear::Create(*context, std::move(weights), call.epilogue, call.input, call.output));
    linears.push_back(std::move(linear));
    max_input = std::max(max_input, call.rows * call.in);
    max_output = std::max(max_output, call.rows * call.out);
  }
  // Inputs of both kinds: float32, and (for products that read bf16 rows) the same values
  // as bf16 bits. Outputs have room for float32, the wider of the two.
  std::vector<float> input(max_input), output(max_output);
  for (float& x : input) x = uniform(rng);
  std::vector<uint16_t> bf16_input(max_input);
  for (int64_t i = 0; i < max_input; ++i) bf16_input[i] = static_cast<uint16_t>(std::bit_cast<uint32_t>(input[i]) >> 16);
  std::vector<double> times_ms;
  for (int i = 0; i < 1 + iters; ++i) {
    const auto start = std::chrono::steady_clock::now();
    for (size_t c = 0; c < calls.size(); ++c) {
      const bool bf16_rows = compute == ComputeDType::kBF16 && calls[c].input == RowsDType::kCompute;
      const void* x = bf16_rows ? static_cast<const void*>(bf16_input.data()) : input.data();
      RETURN_IF_ERROR(linears[c].ForwardRows(x, calls[c].rows, output.data()));
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (i > 0) times_ms.push_back(ms);
  }
  std::sort(times_ms.begin(), times_ms.end());
  return times_ms[times_ms.size() / 2];
}

}  // namespace mmdit
