// The roofline side of `mmdit bench --roofline`: a forward pass's matrix products replayed on
// their own, so that the benchmark can report how close the forward comes to the products'
// standalone speed.
#pragma once

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/compute_dtype.h"
#include "core/linear.h"

namespace mmdit {

// Median milliseconds, over `iters` runs after one warm-up, of executing `calls` in order,
// each on its own freshly prepared weights (as in a forward, every product reads weights no
// other product touched) through the same Linear adapter the engine uses, with the same
// input and output dtypes (so a bf16 product converts a float32 input exactly where the
// engine's does). `panel_gemm`: whether the products run on PanelGemm where the CPU has it,
// as in the engine; false times oneDNN's matmul alone. Errors: Internal (oneDNN).
absl::StatusOr<double> StandaloneMatmulMs(ComputeDType compute, absl::Span<const MatmulCall> calls, int iters,
                                          bool panel_gemm);

}  // namespace mmdit
