// Our own float32 matrix product for products of up to ~1000 rows, on weights oneDNN packed.
//
// Why not oneDNN's matmul for these: its brgemm kernels run near peak when the weights are in
// cache, but a forward pass streams every weight matrix from DRAM, and with few rows per
// weight (a sample's 32-1024 text or image tokens) oneDNN 2.6 then loses 10-35 % waiting on
// memory. This kernel prefetches the next weight panel while it multiplies the current one
// (build/bin/gemm_bench compares the two: bench/gemm_bench.cc). oneDNN still packs the
// weights, in a layout both kernels read, and runs every larger or bf16 product.
#pragma once

#include <cstdint>

namespace mmdit {

// Columns per weight panel: the packed layout is oneDNN's BA16a48b, i.e. W^T [in, out] as
// panels of 48 output columns, each [in rounded up to 16][48] with zero padding.
inline constexpr int64_t kPanelColumns = 48;
inline constexpr int64_t kPanelDepthAlign = 16;

// True when this CPU runs PanelGemm (it needs AVX-512's 32 vector registers).
bool PanelGemmAvailable();

enum class PanelEpilogue { kBias, kBiasGeluTanh };

// y[rows, out] = epilogue(x[rows, in] W^T + bias), W^T packed as above at `packed_weights`.
// Rows are contiguous (x: `in` floats apart, y: `out`). Parallel over panels with OpenMP.
// Requires PanelGemmAvailable().
void PanelGemm(const float* x, int64_t rows, int64_t in, const float* packed_weights, const float* bias, int64_t out,
               PanelEpilogue epilogue, float* y);

}  // namespace mmdit
