#include "core/linear.h"

#include "absl/strings/str_cat.h"
#include "core/panel_gemm.h"

namespace mmdit {
namespace {

using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

// The row count the weight layout is chosen for; oneDNN's blocked weight layouts depend on
// K and N, and the same packed weights then serve every row count.
constexpr int64_t kLayoutRows = 256;

// A bound on cached primitives per Linear; ragged batches produce many row counts.
constexpr size_t kMaxCachedPrimitives = 128;

absl::Status DnnlError(const dnnl::error& e, const std::string& what) {
  return absl::InternalError(absl::StrCat("oneDNN ", what, ": ", e.what()));
}

dt ComputeType(ComputeDType compute) { return compute == ComputeDType::kBF16 ? dt::bf16 : dt::f32; }
dt RowsType(RowsDType rows, ComputeDType compute) { return rows == RowsDType::kCompute ? ComputeType(compute) : dt::f32; }

// The product's source is always in the compute dtype (a float32 input to a bf16 product is
// converted first); its destination is what the Linear's output rows hold.
dnnl::matmul::primitive_desc MakeDesc(const dnnl::engine& engine, int64_t rows, int64_t in, int64_t out,
                                      const dnnl::memory::desc& weights_md, Epilogue epilogue, ComputeDType compute,
                                      RowsDType output) {
  const dnnl::memory::desc src_md({rows, in}, ComputeType(compute), tag::ab);
  const dnnl::memory::desc bias_md({1, out}, dt::f32, tag::ab);
  const dnnl::memory::desc dst_md({rows, out}, RowsType(output, compute), tag::ab);
  dnnl::primitive_attr attr;
  if (epilogue == Epilogue::kGeluTanh) {
    dnnl::post_ops ops;
    ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_gelu_tanh, 0.0f, 0.0f);
    attr.set_post_ops(ops);
  }
  return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src_md, weights_md, bias_md, dst_md), attr, engine);
}

PanelDType PanelDTypeOf(ComputeDType compute) {
  return compute == ComputeDType::kBF16 ? PanelDType::kBF16 : PanelDType::kF32;
}

// Whether a Linear with `in` inputs runs its products on PanelGemm.
bool UsesPanelGemm(const DnnlContext& context, int64_t in) {
  const bool bf16 = context.compute == ComputeDType::kBF16;
  return context.use_panel_gemm && PanelGemmAvailable(PanelDTypeOf(context.compute)) && (!bf16 || in % 2 == 0);
}

// The packed weights' layout: oneDNN's choice, or where PanelGemm runs too, the 48-column
// panels it reads (which oneDNN's brgemm matmul also takes).
dnnl::memory::desc PackedWeightsDesc(const DnnlContext& context, int64_t in, int64_t out) {
  static_assert(kPanelColumns == 48, "BA16a48b, BA16a48b2a");
  const dt type = ComputeType(context.compute);
  if (!UsesPanelGemm(context, in)) return dnnl::memory::desc({in, out}, type, tag::any);
  return dnnl::memory::desc({in, out}, type, context.compute == ComputeDType::kBF16 ? tag::BA16a48b2a : tag::BA16a48b);
}

// The reorder that converts a [rows, in] float32 input to bf16 (throws dnnl::error).
[[gnu::noinline]] dnnl::reorder Bf16Conversion(const dnnl::engine& engine, int64_t rows, int64_t in) {
  const dnnl::memory::desc f32_md({rows, in}, dt::f32, tag::ab);
  const dnnl::memory::desc bf16_md({rows, in}, dt::bf16, tag::ab);
  return dnnl::reorder(dnnl::reorder::primitive_desc(engine, f32_md, engine, bf16_md));
}

}  // namespace

// Through the C API: the C++ `execute` copies its argument map into a fresh vector on every
// call, and this runs ~200 times per forward.
void Linear::Execute(const dnnl::primitive& primitive, std::initializer_list<dnnl_exec_arg_t> args) {
  dnnl::error::wrap_c_api(dnnl_primitive_execute(primitive.get(), context_->stream.get(),
                                                 static_cast<int>(args.size()), std::data(args)),
                          "could not execute a primitive");
}

absl::StatusOr<std::unique_ptr<DnnlContext>> DnnlContext::Create(ComputeDType compute) {
  try {
    auto context = std::make_unique<DnnlContext>();
    context->compute = compute;
    context->engine = dnnl::engine(dnnl::engine::kind::cpu, 0);
    context->stream = dnnl::stream(context->engine);
    return context;
  } catch (const dnnl::error& e) {
    return DnnlError(e, "engine creation");
  }
}

absl::StatusOr<Linear> Linear::Create(DnnlContext& context, LinearWeights weights, Epilogue epilogue,
                                      RowsDType input, RowsDType output) {
  Linear linear;
  linear.context_ = &context;
  linear.out_features_ = weights.weight.shape[0];
  linear.in_features_ = weights.weight.shape[1];
  linear.epilogue_ = epilogue;
  linear.input_ = input;
  linear.output_ = output;
  const int64_t in = linear.in_features_, out = linear.out_features_;
  linear.panel_gemm_ = UsesPanelGemm(context, in);
  weights.Load();
  try {
    // The checkpoint's [out, in] row-major matrix is W^T [in, out] in `ba` order.
    const dnnl::memory::desc stored_md({in, out}, dt::f32, tag::ba);
    const auto desc = MakeDesc(context.engine, kLayoutRows, in, out, PackedWeightsDesc(context, in, out), epilogue,
                               context.compute, output);
    dnnl::memory stored(stored_md, context.engine, weights.weight.data.data());
    linear.packed_weights_ = dnnl::memory(desc.weights_desc(), context.engine);
    dnnl::reorder(stored, linear.packed_weights_).execute(context.stream, stored, linear.packed_weights_);
    linear.bias_ = dnnl::memory({{1, out}, dt::f32, tag::ab}, context.engine);
    std::copy(weights.bias.data.begin(), weights.bias.data.end(), static_cast<float*>(linear.bias_.get_data_handle()));
    context.stream.wait();
  } catch (const dnnl::error& e) {
    return DnnlError(e, absl::StrCat("preparing a [", out, ", ", in, "] linear"));
  }
  return linear;
}

absl::StatusOr<Linear> Linear::CreateStacked(DnnlContext& context, std::vector<LinearWeights> parts) {
  int64_t out = 0;
  for (const LinearWeights& part : parts) out += part.weight.shape[0];
  const int64_t in = parts.empty() ? 0 : parts[0].weight.shape[1];
  std::vector<dnnl::memory::desc> part_columns;  // each part's columns of the packed matrix
  dnnl::memory::desc packed_md;
  try {
    packed_md = MakeDesc(context.engine, kLayoutRows, in, out, PackedWeightsDesc(context, in, out), Epilogue::kNone,
                         context.compute, RowsDType::kF32)
                    .weights_desc();
    int64_t first_column = 0;
    for (const LinearWeights& part : parts) {
      const int64_t columns = part.weight.shape[0];
      part_columns.push_back(packed_md.submemory_desc({in, columns}, {0, first_column}));
      first_column += columns;
    }
  } catch (const dnnl::error&) {
    // A part's columns do not start on a block of the packed layout (small test models):
    // stack first, then pack as one.
    return Create(context, StackOutputs(std::move(parts)), Epilogue::kNone);
  }
  Linear linear;
  linear.context_ = &context;
  linear.out_features_ = out;
  linear.in_features_ = in;
  linear.panel_gemm_ = UsesPanelGemm(context, in);
  try {
    linear.packed_weights_ = dnnl::memory(packed_md, context.engine);
    linear.bias_ = dnnl::memory({{1, out}, dt::f32, tag::ab}, context.engine);
    float* bias = static_cast<float*>(linear.bias_.get_data_handle());
    for (size_t i = 0; i < parts.size(); ++i) {
      const int64_t columns = parts[i].weight.shape[0];
      parts[i].Load();
      dnnl::memory destination(part_columns[i], context.engine, linear.packed_weights_.get_data_handle());
      dnnl::memory stored({{in, columns}, dt::f32, tag::ba}, context.engine, parts[i].weight.data.data());
      dnnl::reorder(stored, destination).execute(context.stream, stored, destination);
      context.stream.wait();
      std::copy(parts[i].bias.data.begin(), parts[i].bias.data.end(), bias);
      bias += columns;
      parts[i] = LinearWeights();
    }
  } catch (const dnnl::error& e) {
    return DnnlError(e, absl::StrCat("preparing a stacked [", out, ", ", in, "] linear"));
  }
  return linear;
}

uint16_t* Linear::Bf16Staging(int64_t rows) {
  std::vector<uint16_t>& staging = context_->bf16_input;
  if (staging.size() < static_cast<size_t>(rows * in_features_)) staging.resize(rows * in_features_);
  return staging.data();
}

bool Linear::ConvertsInput() const { return context_->compute == ComputeDType::kBF16 && input_ == RowsDType::kF32; }

absl::StatusOr<Linear::RowPrimitives*> Linear::PrimitivesForRows(int64_t rows) {
  if (auto it = primitives_by_rows_.find(rows); it != primitives_by_rows_.end()) return &it->second;
  if (primitives_by_rows_.size() >= kMaxCachedPrimitives) primitives_by_rows_.clear();
  try {
    const ComputeDType compute = context_->compute;
    const dnnl::engine& engine = context_->engine;
    const auto desc = MakeDesc(engine, rows, in_features_, out_features_, packed_weights_.get_desc(), epilogue_,
                               compute, output_);
    RowPrimitives primitives{dnnl::matmul(desc),
                             dnnl::memory(desc.src_desc(), engine, nullptr),
                             {},
                             {},
                             dnnl::memory(desc.dst_desc(), engine, nullptr)};
    if (ConvertsInput()) {
      primitives.to_bf16 = Bf16Conversion(engine, rows, in_features_);
      primitives.f32_input = dnnl::memory({{rows, in_features_}, dt::f32, tag::ab}, engine, nullptr);
    }
    return &primitives_by_rows_.emplace(rows, std::move(primitives)).first->second;
  } catch (const dnnl::error& e) {
    return DnnlError(e, absl::StrCat("matmul for ", rows, " x ", in_features_, " x ", out_features_));
  }
}

absl::Status Linear::Forward(const float* x, int64_t rows, float* y) {
  if (context_->compute != ComputeDType::kF32 && (input_ != RowsDType::kF32 || output_ != RowsDType::kF32)) {
    return absl::InternalError("Linear::Forward on a Linear made for bf16 rows; use ForwardRows");
  }
  return ForwardRows(x, rows, y);
}

absl::Status Linear::ForwardRows(const void* x, int64_t rows, void* y) {
  if (rows == 0) return absl::OkStatus();
  if (context_->trace) context_->trace->push_back({rows, in_features_, out_features_, epilogue_, input_, output_});
  if (panel_gemm_) {
    const bool bf16 = context_->compute == ComputeDType::kBF16;
    const void* input = x;
    if (ConvertsInput()) {
      uint16_t* converted = Bf16Staging(rows);
      ConvertToBf16(static_cast<const float*>(x), rows * in_features_, converted);
      input = converted;
    }
    PanelGemm({bf16 ? PanelDType::kBF16 : PanelDType::kF32, input, rows, in_features_, out_features_,
               packed_weights_.get_data_handle(), static_cast<const float*>(bias_.get_data_handle()),
               epilogue_ == Epilogue::kGeluTanh ? PanelEpilogue::kBiasGeluTanh : PanelEpilogue::kBias,
               /*bf16_output=*/bf16 && output_ == RowsDType::kCompute, y});
    return absl::OkStatus();
  }
  auto primitives = PrimitivesForRows(rows);
  if (!primitives.ok()) return primitives.status();
  try {
    RowPrimitives& p = **primitives;
    p.destination.set_data_handle(y);
    if (ConvertsInput()) {
      p.f32_input.set_data_handle(const_cast<void*>(x));
      p.source.set_data_handle(Bf16Staging(rows));
      Execute(p.to_bf16, {{DNNL_ARG_FROM, p.f32_input.get()}, {DNNL_ARG_TO, p.source.get()}});
    } else {
      p.source.set_data_handle(const_cast<void*>(x));
    }
    Execute(p.matmul, {{DNNL_ARG_SRC, p.source.get()},
                       {DNNL_ARG_WEIGHTS, packed_weights_.get()},
                       {DNNL_ARG_BIAS, bias_.get()},
                       {DNNL_ARG_DST, p.destination.get()}});
    context_->stream.wait();
  } catch (const dnnl::error& e) {
    return DnnlError(e, "matmul execution");
  }
  return absl::OkStatus();
}

absl::StatusOr<FeedForward> FeedForward::Create(DnnlContext& context, LinearWeights in, LinearWeights out,
                                                RowsDType input) {
  auto first = Linear::Create(context, std::move(in), Epilogue::kGeluTanh, input, RowsDType::kCompute);
  if (!first.ok()) return first.status();
  auto second = Linear::Create(context, std::move(out), Epilogue::kNone, RowsDType::kCompute, RowsDType::kF32);
  if (!second.ok()) return second.status();
  return FeedForward(*std::move(first), *std::move(second));
}

absl::Status FeedForward::Forward(const void* x, int64_t rows, float* hidden, float* y) {
  if (absl::Status status = in_.ForwardRows(x, rows, hidden); !status.ok()) return status;
  return out_.ForwardRows(hidden, rows, y);
}

}  // namespace mmdit
