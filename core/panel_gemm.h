// Our own matrix product, on weights oneDNN packed.
//
// Why not oneDNN's matmul: its brgemm kernels run near peak when the weights are in cache, but
// a forward pass streams every weight matrix from DRAM, and with few rows per weight (a
// sample's 32-1024 text or image tokens) oneDNN 2.6 then loses 10-35 % waiting on memory.
// This kernel prefetches the next weight panel while it multiplies the current one, and at
// thousands of rows still matches oneDNN (build/bin/gemm_bench compares the two:
// bench/gemm_bench.cc). It also allocates nothing. oneDNN still packs the weights, in a
// layout both kernels read, and runs the products where this kernel cannot (no AVX-512; bf16
// without AVX512_BF16 or with an odd input width).
#pragma once

#include <cstdint>

namespace mmdit {

// Columns per weight panel. The packed layouts are oneDNN's BA16a48b (float32) and
// BA16a48b2a (bf16): W^T [in, out] as panels of 48 output columns, each [in rounded up to 16
// (float32) or 32 (bf16)] x 48 with zero padding; in bf16, consecutive input pairs of a
// column are adjacent.
inline constexpr int64_t kPanelColumns = 48;

enum class PanelDType { kF32, kBF16 };
enum class PanelEpilogue { kBias, kBiasGeluTanh };

// True when this CPU runs PanelGemm in `dtype`: AVX-512 (its 32 vector registers hold a
// tile), and for bf16 AVX512_BF16.
bool PanelGemmAvailable(PanelDType dtype = PanelDType::kF32);

// One product: y[rows, out] = epilogue(x[rows, in] W^T + bias), accumulated in float32.
struct PanelProduct {
  PanelDType dtype;          // of x and the packed weights (bf16: uint16_t bits; `in` even)
  const void* x;             // rows `in` elements apart
  int64_t rows, in, out;
  const void* packed_weights;
  const float* bias;         // [out]
  PanelEpilogue epilogue;
  bool bf16_output;          // y holds bf16 (round to nearest even) rather than float32
  void* y;                   // rows `out` elements apart
};

// Runs `product`, parallel with OpenMP over units of a panel x a block of rows (threads take
// units from each other's shares once their own are done); more than 1024 rows in chunks.
// Requires PanelGemmAvailable(dtype).
void PanelGemm(const PanelProduct& product);

// dst[i] = bf16(src[i]) (round to nearest even), parallel with OpenMP; for a float32 input
// of a bf16 product. Requires PanelGemmAvailable(PanelDType::kBF16).
void ConvertToBf16(const float* src, int64_t count, uint16_t* dst);

}  // namespace mmdit
