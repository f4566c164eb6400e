// Our own float32 matrix product for products of few rows, on weights oneDNN has packed.
//
// Why not oneDNN's matmul for these: at MMDiT's shapes its brgemm kernels run at 97 % of peak
// when the weights are in cache, but a forward pass streams every weight matrix from DRAM,
// and at 32-64 rows (a sample's text or image tokens) they then lose 10-17 % waiting on it.
// This kernel prefetches each weight panel ahead of the multiply-adds (bench/gemm_bench.sh
// measures both). oneDNN still packs the weights, in a layout both kernels read, and runs
// every larger or bf16 product.
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
