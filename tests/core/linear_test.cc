// The oneDNN Linear against a naive matmul, for several row counts on one prepared weight.
#include "core/linear.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "core/dtype.h"
#include "core/panel_gemm.h"
#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::MaxAbsDiff;
using ::mmdit::testing::RandomTensor;

float RoundToBf16(float v) { return BFloat16ToFloat(FloatToBFloat16(v)); }

// x W^T + b in double; with `bf16`, x and W rounded to bf16 first (as the engine does).
Tensor NaiveLinear(const Tensor& x, const LinearWeights& w, bool gelu, bool bf16) {
  const int64_t rows = x.shape[0], in = x.shape[1], out = w.weight.shape[0];
  Tensor y({rows, out});
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = w.bias.data[o];
      for (int64_t i = 0; i < in; ++i) {
        const float xi = x.data[r * in + i], wi = w.weight.data[o * in + i];
        acc += bf16 ? double(RoundToBf16(xi)) * RoundToBf16(wi) : double(xi) * wi;
      }
      if (gelu) acc = 0.5 * acc * (1 + std::tanh(std::sqrt(2 / M_PI) * (acc + 0.044715 * acc * acc * acc)));
      y.data[r * out + o] = acc;
    }
  }
  return y;
}

// A context whose Linears run on PanelGemm where the CPU has it (`panel_gemm`), or on
// oneDNN's matmul, as on CPUs without it: every test below runs both.
std::unique_ptr<DnnlContext> Context(ComputeDType compute, bool panel_gemm) {
  auto context = DnnlContext::Create(compute);
  EXPECT_TRUE(context.ok()) << context.status();
  if (!context.ok()) return nullptr;
  (*context)->use_panel_gemm = panel_gemm;
  return *std::move(context);
}

class LinearTest : public ::testing::TestWithParam<std::tuple<Epilogue, ComputeDType, bool>> {};

TEST_P(LinearTest, MatchesNaiveMatmulForEveryRowCount) {
  const auto [epilogue, compute, panel_gemm] = GetParam();
  auto context = Context(compute, panel_gemm);
  ASSERT_NE(context, nullptr);
  const int64_t in = 48, out = 80;
  const LinearWeights weights{RandomTensor({out, in}, 1, 0.2f), RandomTensor({out}, 2)};
  auto linear = Linear::Create(*context, weights, epilogue);
  ASSERT_TRUE(linear.ok()) << linear.status();
  EXPECT_EQ(linear->in_features(), in);
  EXPECT_EQ(linear->out_features(), out);
  for (int64_t rows : {1, 7, 256, 333, 7}) {  // 7 twice: the cached primitive
    const Tensor x = RandomTensor({rows, in}, 3 + rows);
    Tensor y({rows, out});
    ASSERT_TRUE(linear->Forward(x.data.data(), rows, y.data.data()).ok());
    const Tensor expected = NaiveLinear(x, weights, epilogue == Epilogue::kGeluTanh, compute == ComputeDType::kBF16);
    EXPECT_LE(MaxAbsDiff(y, expected), 1e-4) << rows << " rows";
  }
}

INSTANTIATE_TEST_SUITE_P(EpiloguesDtypesAndKernels, LinearTest,
                         ::testing::Combine(::testing::Values(Epilogue::kNone, Epilogue::kGeluTanh),
                                            ::testing::Values(ComputeDType::kF32, ComputeDType::kBF16),
                                            ::testing::Bool()));

struct PanelShape {
  int64_t in, out;
};

class PanelGemmLinearTest
    : public ::testing::TestWithParam<std::tuple<PanelShape, Epilogue, ComputeDType, bool>> {};

// Products run on our own kernel where the CPU has it (AVX-512; bf16 with AVX512_BF16 and an
// even input width), else on oneDNN: against the naive product, across tile tails (rows not a
// multiple of 8), row chunks (over 1024 rows), depth blocks (inputs over 1024 wide), a last
// panel narrower than 48 columns, input widths off the packing's 16 or 32, and
// pre-activations large enough to reach both of GELU's saturated ends.
TEST_P(PanelGemmLinearTest, MatchesNaiveMatmul) {
  const auto [shape, epilogue, compute, panel_gemm] = GetParam();
  const bool bf16 = compute == ComputeDType::kBF16;
  auto context = Context(compute, panel_gemm);
  ASSERT_NE(context, nullptr);
  const LinearWeights weights{RandomTensor({shape.out, shape.in}, 1, 0.5f), RandomTensor({shape.out}, 2, 4.0f)};
  auto linear = Linear::Create(*context, weights, epilogue);
  ASSERT_TRUE(linear.ok()) << linear.status();
  // Inputs over 1024 wide run in depth blocks, whose partial sums go through y: fewer rows
  // there, the naive product being slow.
  const std::vector<int64_t> row_counts = shape.in > 1024 ? std::vector<int64_t>{1, 9, 1030}
                                                           : std::vector<int64_t>{1, 5, 8, 9, 23, 1024, 1027, 2500};
  for (int64_t rows : row_counts) {
    const Tensor x = RandomTensor({rows, shape.in}, 3 + rows, 2.0f);
    Tensor y({rows, shape.out});
    ASSERT_TRUE(linear->Forward(x.data.data(), rows, y.data.data()).ok());
    const Tensor expected = NaiveLinear(x, weights, epilogue == Epilogue::kGeluTanh, bf16);
    // Float32 rounding (of sums of exact products, in bf16): relative to the sum of the
    // magnitudes of each output's terms.
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t o = 0; o < shape.out; ++o) {
        double magnitude = std::abs(weights.bias.data[o]);
        for (int64_t i = 0; i < shape.in; ++i) {
          magnitude += std::abs(double(x.data[r * shape.in + i]) * weights.weight.data[o * shape.in + i]);
        }
        const double error = std::abs(y.data[r * shape.out + o] - expected.data[r * shape.out + o]);
        worst = std::max(worst, error / (1.0 + magnitude));
      }
    }
    EXPECT_LE(worst, 1e-6) << rows << " rows";
  }
}

INSTANTIATE_TEST_SUITE_P(ShapesAndEpilogues, PanelGemmLinearTest,
                         ::testing::Combine(::testing::Values(PanelShape{48, 48}, PanelShape{50, 130},
                                                              PanelShape{7, 1}, PanelShape{96, 144}, PanelShape{64, 48},
                                                              PanelShape{2100, 130}),
                                            ::testing::Values(Epilogue::kNone, Epilogue::kGeluTanh),
                                            ::testing::Values(ComputeDType::kF32, ComputeDType::kBF16),
                                            ::testing::Bool()));

// GELU-tanh as PanelGemm's epilogue computes it (its own exp and reciprocal), on one input
// through a unit weight: from far below zero (where it is 0 to float precision) through zero
// to far above it (where it is x), and NaN stays NaN.
TEST(PanelGemmGeluTest, MatchesTheFormulaOverTheWholeRange) {
  if (!PanelGemmAvailable(PanelDType::kF32)) GTEST_SKIP() << "this CPU runs no PanelGemm";
  auto context = Context(ComputeDType::kF32, true);
  ASSERT_NE(context, nullptr);
  const LinearWeights weights{Tensor({1, 1}, {1.0f}), Tensor({1}, {0.0f})};
  auto linear = Linear::Create(*context, weights, Epilogue::kGeluTanh);
  ASSERT_TRUE(linear.ok()) << linear.status();
  std::vector<float> inputs = {0.0f, -0.0f, NAN};
  for (float magnitude = 1e-3f; magnitude < 1e5f; magnitude *= 1.07f) {
    inputs.push_back(magnitude);
    inputs.push_back(-magnitude);
  }
  std::vector<float> outputs(inputs.size());
  ASSERT_TRUE(linear->Forward(inputs.data(), static_cast<int64_t>(inputs.size()), outputs.data()).ok());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const double x = inputs[i];
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(outputs[i]));
      continue;
    }
    const double expected = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    // Relative: float's rounding of t = -2u is carried into e^t, |t| x 6e-8 (1e-6 at x = -4).
    EXPECT_NEAR(outputs[i], expected, 1e-12 + 2e-6 * std::abs(expected)) << "x = " << x;
  }
}

class PanelGemmThreadsTest : public ::testing::TestWithParam<ComputeDType> {};

// PanelGemm hands its units (panel x row block) out to the threads, which take them from each
// other's shares once their own are done: whatever the thread count, every output is computed
// once, the same way, so the results are bitwise those of one thread. 7 threads on this
// machine's cores steal often; 70 is more threads than have shares (they only steal). In bf16
// the outputs are bf16 too (summed in a float32 tile, then rounded).
TEST_P(PanelGemmThreadsTest, EveryThreadCountGivesTheOneThreadResult) {
  const ComputeDType compute = GetParam();
  if (!PanelGemmAvailable(compute == ComputeDType::kBF16 ? PanelDType::kBF16 : PanelDType::kF32)) {
    GTEST_SKIP() << "this CPU runs no PanelGemm in " << ComputeDTypeName(compute);
  }
  auto context = Context(compute, true);
  ASSERT_NE(context, nullptr);
  const int64_t in = 2100, out = 130;  // depth blocks (partial sums in y), three panels
  const LinearWeights weights{RandomTensor({out, in}, 1, 0.05f), RandomTensor({out}, 2)};
  const RowsDType output = compute == ComputeDType::kBF16 ? RowsDType::kCompute : RowsDType::kF32;
  auto linear = Linear::Create(*context, weights, Epilogue::kGeluTanh, RowsDType::kF32, output);
  ASSERT_TRUE(linear.ok()) << linear.status();
  const int threads_before = omp_get_max_threads();
  for (int64_t rows : {9, 1000}) {  // one unit per panel; panels cut into row blocks
    const Tensor x = RandomTensor({rows, in}, 3 + rows);
    Tensor one_thread({rows, out});  // room for float32 outputs; bf16 ones fill half
    omp_set_num_threads(1);
    ASSERT_TRUE(linear->ForwardRows(x.data.data(), rows, one_thread.data.data()).ok());
    for (int threads : {2, 3, 7, 70}) {
      Tensor y({rows, out});
      omp_set_num_threads(threads);
      ASSERT_TRUE(linear->ForwardRows(x.data.data(), rows, y.data.data()).ok());
      EXPECT_EQ(y.data, one_thread.data) << rows << " rows, " << threads << " threads";
    }
  }
  omp_set_num_threads(threads_before);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, PanelGemmThreadsTest, ::testing::Values(ComputeDType::kF32, ComputeDType::kBF16));

class StackedLinearTest : public ::testing::TestWithParam<std::tuple<int64_t, ComputeDType, bool>> {};

// CreateStacked equals one Linear over the parts' rows stacked, whether the parts start on
// blocks of the packed layout (packed part by part) or not (stacked first).
TEST_P(StackedLinearTest, EqualsTheLinearOfTheStackedWeights) {
  const auto [part_rows, compute, panel_gemm] = GetParam();
  auto context = Context(compute, panel_gemm);
  ASSERT_NE(context, nullptr);
  const int64_t in = 48;
  std::vector<LinearWeights> parts;
  for (uint32_t p = 0; p < 3; ++p) {
    parts.push_back({RandomTensor({part_rows * (p + 1), in}, 10 + p, 0.2f), RandomTensor({part_rows * (p + 1)}, 20 + p)});
  }
  const LinearWeights stacked = StackOutputs(parts);
  auto linear = Linear::CreateStacked(*context, parts);
  ASSERT_TRUE(linear.ok()) << linear.status();
  EXPECT_EQ(linear->out_features(), 6 * part_rows);
  for (int64_t rows : {1, 8}) {
    const Tensor x = RandomTensor({rows, in}, 30 + rows);
    Tensor y({rows, 6 * part_rows});
    ASSERT_TRUE(linear->Forward(x.data.data(), rows, y.data.data()).ok());
    EXPECT_LE(MaxAbsDiff(y, NaiveLinear(x, stacked, false, compute == ComputeDType::kBF16)), 1e-4) << rows;
  }
}

INSTANTIATE_TEST_SUITE_P(PartSizesAndDtypes, StackedLinearTest,
                         ::testing::Combine(::testing::Values(int64_t{48}, int64_t{64}, int64_t{7}),
                                            ::testing::Values(ComputeDType::kF32, ComputeDType::kBF16),
                                            ::testing::Bool()));

class FeedForwardTest : public ::testing::TestWithParam<std::tuple<ComputeDType, bool>> {};

// Linear(GELU(Linear(x))); in bf16 the hidden rows are rounded to bf16 between the two, as
// the engine keeps them.
TEST_P(FeedForwardTest, MatchesNaiveLinearGeluLinear) {
  const auto [compute, panel_gemm] = GetParam();
  const bool bf16 = compute == ComputeDType::kBF16;
  auto context = Context(compute, panel_gemm);
  ASSERT_NE(context, nullptr);
  const int64_t dim = 32, hidden = 96;
  const LinearWeights in{RandomTensor({hidden, dim}, 4, 0.2f), RandomTensor({hidden}, 5)};
  const LinearWeights out{RandomTensor({dim, hidden}, 6, 0.2f), RandomTensor({dim}, 7)};
  auto ff = FeedForward::Create(*context, in, out);
  ASSERT_TRUE(ff.ok()) << ff.status();
  EXPECT_EQ(ff->hidden_features(), hidden);
  for (int64_t rows : {1, 13, 13}) {
    const Tensor x = RandomTensor({rows, dim}, 8 + rows);
    std::vector<float> scratch(rows * hidden, NAN);
    Tensor y({rows, dim});
    ASSERT_TRUE(ff->Forward(x.data.data(), rows, scratch.data(), y.data.data()).ok());
    Tensor h = NaiveLinear(x, in, /*gelu=*/true, bf16);
    if (bf16) {
      for (float& v : h.data) v = RoundToBf16(v);
    }
    const Tensor expected = NaiveLinear(h, out, /*gelu=*/false, bf16);
    EXPECT_LE(MaxAbsDiff(y, expected), bf16 ? 2e-3 : 1e-4) << rows << " rows";
  }
}

TEST(FeedForwardTest, Bf16LinearsRefuseTheFloat32Entry) {
  auto context = DnnlContext::Create(ComputeDType::kBF16);
  ASSERT_TRUE(context.ok()) << context.status();
  const LinearWeights w{RandomTensor({8, 8}, 1), RandomTensor({8}, 2)};
  auto linear = Linear::Create(**context, w, Epilogue::kNone, RowsDType::kCompute, RowsDType::kF32);
  ASSERT_TRUE(linear.ok());
  std::vector<float> x(8), y(8);
  EXPECT_EQ(linear->Forward(x.data(), 1, y.data()).code(), absl::StatusCode::kInternal);
}

INSTANTIATE_TEST_SUITE_P(DtypesAndKernels, FeedForwardTest,
                         ::testing::Combine(::testing::Values(ComputeDType::kF32, ComputeDType::kBF16), ::testing::Bool()));

}  // namespace
}  // namespace mmdit
