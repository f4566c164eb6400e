#include "core/panel_gemm.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cassert>

#include "core/simd.h"

namespace mmdit {
namespace {

using simd::Load;
using simd::Store;
using simd::Vec;

// A tile is up to kTileRows rows x one panel (three Vecs): 24 accumulators, three weight
// vectors and a broadcast fit AVX-512's 32 registers, and each weight load feeds 8 FMAs.
constexpr int kTileRows = 8;
constexpr int kPanelVecs = kPanelColumns / simd::kVector;
static_assert(kPanelVecs == 3);
// Panel rows (k steps) one pass of the tiles covers: a 1024 x 48 block is 192 KB, which stays
// in L2 while every row tile of the pass reads it. A whole panel of a 6144-wide input (1.2
// MB) would not.
constexpr int64_t kDepthBlock = 1024;

// Weights stream from DRAM while the multiply-adds run: every pass of a panel prefetches its
// share of the next panel, so the whole panel's time covers the next one's transfer. A
// thread's first panel has no predecessor: its first pass reads kLookaheadSteps panel rows
// (k steps of 192 bytes, ~18 KB) ahead of itself.
constexpr int64_t kLookaheadSteps = 96;

int64_t RoundUp(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// GELU with the tanh approximation, 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi)
// (x + 0.044715 x^3), through e^(-2|u|) so that the exponential's argument is never positive.
[[MMDIT_TARGET_AVX512, gnu::always_inline]] inline Vec GeluTanh(Vec x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  const Vec u = x * (kSqrt2OverPi + (kSqrt2OverPi * 0.044715f) * x * x);
  const Vec abs_u = u < 0.0f ? -u : u;
  const Vec z = simd::ExpNonPositive(-2.0f * abs_u);
  const Vec sigmoid_abs = 1.0f / (1.0f + z);  // sigmoid(2|u|); sigmoid(-2|u|) = z * that
  return x * (u < 0.0f ? z * sigmoid_abs : sigmoid_abs);
}

// One pass of a tile: k steps [0, depth) of up to kTileRows rows against a panel block.
struct Pass {
  const float* x;       // the tile's first row at the block's first k; rows `in` floats apart
  int64_t in;
  const float* panel;   // the block's first panel row
  int64_t depth;
  const float* start;   // what the sums start from: the panel's bias (48 floats, first
  int64_t start_stride; // pass, stride 0) or the previous passes' sums (y rows)
  bool last;            // apply the epilogue
  float* y;
  int64_t y_stride;
  // Prefetch begin + k * step at step k (none when begin is null); with `lookahead`, also
  // this block kLookaheadSteps rows ahead.
  const char* prefetch_begin;
  int64_t prefetch_step;
  bool lookahead;
};

template <int R>
[[MMDIT_TARGET_AVX512]] void TilePass(const Pass& pass, PanelEpilogue epilogue) {
  Vec acc[R][kPanelVecs];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kPanelVecs; ++j) acc[r][j] = Load(pass.start + r * pass.start_stride + j * simd::kVector);
  }
  const float* x = pass.x;
  for (int64_t k = 0; k < pass.depth; ++k) {
    const float* w = pass.panel + k * kPanelColumns;
    if (pass.lookahead) {
      for (int j = 0; j < kPanelVecs; ++j) __builtin_prefetch(w + kLookaheadSteps * kPanelColumns + j * simd::kVector);
    }
    if (pass.prefetch_begin != nullptr) __builtin_prefetch(pass.prefetch_begin + k * pass.prefetch_step);
    Vec wv[kPanelVecs];
    for (int j = 0; j < kPanelVecs; ++j) wv[j] = Load(w + j * simd::kVector);
    for (int r = 0; r < R; ++r) {
      // The intrinsic, not simd::Broadcast: GCC folds it into the FMA's embedded broadcast.
      const Vec xv = _mm512_set1_ps(x[r * pass.in + k]);
      for (int j = 0; j < kPanelVecs; ++j) acc[r][j] += xv * wv[j];
    }
  }
  const bool gelu = pass.last && epilogue == PanelEpilogue::kBiasGeluTanh;
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kPanelVecs; ++j) {
      Store(pass.y + r * pass.y_stride + j * simd::kVector, gelu ? GeluTanh(acc[r][j]) : acc[r][j]);
    }
  }
}

using TilePassFn = void (*)(const Pass&, PanelEpilogue);
constexpr TilePassFn kTilePasses[kTileRows + 1] = {nullptr,     TilePass<1>, TilePass<2>, TilePass<3>, TilePass<4>,
                                                   TilePass<5>, TilePass<6>, TilePass<7>, TilePass<8>};

}  // namespace

bool PanelGemmAvailable() { return simd::CpuIsa() == simd::Isa::kAvx512; }

void PanelGemm(const float* x, int64_t rows, int64_t in, const float* packed_weights, const float* bias, int64_t out,
               PanelEpilogue epilogue, float* y) {
  assert(PanelGemmAvailable());
  const int64_t panels = RoundUp(out, kPanelColumns) / kPanelColumns;
  const int64_t panel_floats = RoundUp(in, kPanelDepthAlign) * kPanelColumns;
  const int64_t panel_bytes = panel_floats * static_cast<int64_t>(sizeof(float));
  const int64_t tiles = RoundUp(rows, kTileRows) / kTileRows;
  const int64_t blocks = RoundUp(in, kDepthBlock) / kDepthBlock;
#pragma omp parallel
  {
    // Contiguous panels per thread, so that the next panel is this thread's own.
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t first = panels * thread / threads, last = panels * (thread + 1) / threads;
    alignas(64) float bias_tile[kPanelColumns];
    alignas(64) float y_tile[kTileRows * kPanelColumns];
    for (int64_t p = first; p < last; ++p) {
      const float* panel = packed_weights + p * panel_floats;
      const char* next_panel = p + 1 < last ? reinterpret_cast<const char*>(panel + panel_floats) : nullptr;
      const int64_t column = p * kPanelColumns, columns = std::min(kPanelColumns, out - column);
      // The last panel's columns past `out` exist only in the packed weights: its sums and
      // results go through a full-width tile here, that tile's passes one after another.
      const bool partial = columns < kPanelColumns;
      std::fill(std::copy_n(bias + column, columns, bias_tile), bias_tile + kPanelColumns, 0.0f);
      // Passes go block by block (every tile through one block while it is in L2), except in a
      // partial panel (tile by tile, so that y_tile holds one tile's sums).
      for (int64_t i = 0; i < tiles * blocks; ++i) {
        const int64_t tile = partial ? i / blocks : i % tiles, block = partial ? i % blocks : i / tiles;
        const int64_t row = tile * kTileRows, k = block * kDepthBlock;
        const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - row));
        Pass pass;
        pass.x = x + row * in + k;
        pass.in = in;
        pass.panel = panel + k * kPanelColumns;
        pass.depth = std::min(kDepthBlock, in - k);
        pass.y = partial ? y_tile : y + row * out + column;
        pass.y_stride = partial ? kPanelColumns : out;
        pass.start = block == 0 ? bias_tile : pass.y;
        pass.start_stride = block == 0 ? 0 : pass.y_stride;
        pass.last = block + 1 == blocks;
        pass.prefetch_begin = next_panel == nullptr ? nullptr : next_panel + panel_bytes * i / (tiles * blocks);
        pass.prefetch_step = std::max<int64_t>(1, panel_bytes / (tiles * blocks * pass.depth));
        pass.lookahead = p == first && i == 0;
        kTilePasses[tile_rows](pass, epilogue);
        if (partial && pass.last) {
          for (int r = 0; r < tile_rows; ++r) {
            std::copy_n(y_tile + r * kPanelColumns, columns, y + (row + r) * out + column);
          }
        }
      }
    }
  }
}

}  // namespace mmdit
