// Linear layers on oneDNN matmul: y = x W^T + b, optionally with GELU(tanh) fused.
// This file and linear.cc are the one adapter between oneDNN and the rest of the project:
// oneDNN's exceptions are caught here and become absl::Status.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "core/compute_dtype.h"
#include "core/weights.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace mmdit {

enum class Epilogue { kNone, kGeluTanh };

// What a Linear's input or output rows hold. kCompute: the context's compute dtype, so in a
// bf16 context bf16 values (uint16_t bits) that go from one product to the next without a
// float32 round trip; kF32: float32 whatever the compute dtype.
enum class RowsDType { kF32, kCompute };

// The shape of one executed product, recorded for benchmarks (see DnnlContext::trace).
struct MatmulCall {
  int64_t rows, in, out;
  Epilogue epilogue;
  RowsDType input, output;
};

// The oneDNN CPU engine and the stream all of a model's primitives run on.
struct DnnlContext {
  dnnl::engine engine;
  dnnl::stream stream;
  ComputeDType compute = ComputeDType::kF32;
  // kBF16: the current product's input converted to bf16, shared by every Linear of the
  // model (their Forward calls are serialised); grows to the largest input, never shrinks.
  std::vector<uint16_t> bf16_input;
  // When set, every Linear::Forward appends its shape here (the roofline benchmark replays
  // a forward's products on their own).
  std::vector<MatmulCall>* trace = nullptr;
  // Where the CPU runs PanelGemm in the compute dtype (panel_gemm.h): Linears created while
  // this is set pack their weights in the layout both oneDNN's matmul and PanelGemm read, and
  // run their products on PanelGemm. Cleared: on oneDNN's matmul (the roofline benchmark's
  // baseline, and what runs where PanelGemm cannot).
  bool use_panel_gemm = true;
  static absl::StatusOr<std::unique_ptr<DnnlContext>> Create(ComputeDType compute);
};

// Thread-compatible: Forward caches one primitive per row count, so callers serialise.
class Linear {
 public:
  // Takes `weights` ([out, in], [out]; read now if unread) and reorders the matrix once into
  // the packed layout (PanelGemm's panels, or where it does not run the layout oneDNN's matmul
  // prefers). Errors: Internal if oneDNN refuses.
  static absl::StatusOr<Linear> Create(DnnlContext& context, LinearWeights weights, Epilogue epilogue,
                                       RowsDType input = RowsDType::kF32, RowsDType output = RowsDType::kF32);

  // One Linear computing all of `parts` (same input width), outputs in order, float32 rows.
  // Each part is read, packed straight into its columns of the packed matrix and freed, so that
  // preparing a large stack (the modulation: 340 MB for seed-default) never holds it twice.
  static absl::StatusOr<Linear> CreateStacked(DnnlContext& context, std::vector<LinearWeights> parts);

  // y[rows, out] = epilogue(x[rows, in] W^T + b), for a Linear with float32 rows on both
  // sides. Errors: Internal if oneDNN fails, or if the Linear was made for other rows.
  absl::Status Forward(const float* x, int64_t rows, float* y);
  // The same with rows of the dtypes the Linear was created with.
  absl::Status ForwardRows(const void* x, int64_t rows, void* y);

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }

 private:
  Linear() = default;
  // Everything one row count needs, made once: executing then allocates nothing on our side
  // (the memory objects only get their data pointers swapped in).
  struct RowPrimitives {
    dnnl::matmul matmul;
    dnnl::memory source;       // [rows, in] in the compute dtype: the input itself, or its conversion
    dnnl::reorder to_bf16;     // a bf16 context's float32 input only: converts it into `source`,
    dnnl::memory f32_input;    // over DnnlContext::bf16_input
    dnnl::memory destination;  // [rows, out]
  };
  bool ConvertsInput() const;
  // DnnlContext::bf16_input, grown to hold `rows` of this Linear's input.
  uint16_t* Bf16Staging(int64_t rows);
  absl::StatusOr<RowPrimitives*> PrimitivesForRows(int64_t rows);
  void Execute(const dnnl::primitive& primitive, std::initializer_list<dnnl_exec_arg_t> args);  // throws dnnl::error

  DnnlContext* context_ = nullptr;
  int64_t in_features_ = 0, out_features_ = 0;
  Epilogue epilogue_ = Epilogue::kNone;
  bool panel_gemm_ = false;  // products run on PanelGemm rather than oneDNN's matmul
  RowsDType input_ = RowsDType::kF32, output_ = RowsDType::kF32;
  dnnl::memory packed_weights_;  // [in, out], packed (see Create) in the compute dtype
  dnnl::memory bias_;            // [1, out]
  std::unordered_map<int64_t, RowPrimitives> primitives_by_rows_;
};

// The transformer's feed-forward, Linear(GELU_tanh(Linear(x))). Its hidden rows stay in the
// compute dtype: in bf16 the first product writes bf16 and the second reads it as is.
class FeedForward {
 public:
  // `input`: what the rows passed to Forward hold.
  static absl::StatusOr<FeedForward> Create(DnnlContext& context, LinearWeights in, LinearWeights out,
                                            RowsDType input = RowsDType::kF32);
  // y[rows, D] (float32) from x[rows, D] (as created); `hidden` is scratch of rows *
  // hidden_features() floats.
  absl::Status Forward(const void* x, int64_t rows, float* hidden, float* y);
  int64_t hidden_features() const { return in_.out_features(); }

 private:
  FeedForward(Linear in, Linear out) : in_(std::move(in)), out_(std::move(out)) {}
  Linear in_, out_;
};

}  // namespace mmdit
