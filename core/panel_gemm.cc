#include "core/panel_gemm.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>

#include "core/dtype.h"
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
// Inputs one pass of the tiles covers: a float32 1024 x 48 block is 192 KB, which stays in L2
// while every row tile of the pass reads it. A whole panel of a 6144-wide input (1.2 MB)
// would not.
constexpr int64_t kDepthBlock = 1024;
// Rows one run over the panels covers: each tile pass reads its rows' inputs for the current
// block, so these (1024 rows x 1024 float inputs: 4 MB) should come from L2/L3 rather than
// DRAM; larger products run in chunks, streaming the weights once per chunk (at 4096 rows,
// sd3-medium's shapes, 5 % faster than one run: gemm_bench's ratio to oneDNN 0.980 -> 1.027).
constexpr int64_t kChunkRows = 1024;

// Weights stream from DRAM while the multiply-adds run: when a thread's next unit of work is
// on another panel, every pass of the current unit prefetches its share of that panel, so the
// unit's whole time covers the transfer. A unit whose panel nobody prefetched for this thread
// (its first, or one taken from another thread's share) reads kLookaheadSteps panel rows (of
// 192 bytes: ~18 KB) ahead of itself in its first pass.
constexpr int64_t kLookaheadSteps = 96;

// Work units per thread a product is cut into when it has fewer panels (see PanelGemm), and
// the fewest row tiles of a panel one unit covers.
constexpr int64_t kUnitsPerThread = 32;
constexpr int64_t kMinBlockTiles = 8;
// Threads with a share of their own; any beyond steal only (the shares live on the stack).
constexpr int64_t kMaxShares = 64;

// A thread's share of a product's units, [front, back) in one atomic word: its owner takes
// units from the front, and threads whose own shares are done take them from the back.
class UnitShare {
 public:
  void Reset(int64_t front, int64_t back) { bits_.store(Pack(front, back), std::memory_order_relaxed); }
  // The front (or back) unit, or -1 when the share is empty.
  int64_t TakeFront() { return Take(true); }
  int64_t TakeBack() { return Take(false); }

 private:
  static uint64_t Pack(int64_t front, int64_t back) {
    return static_cast<uint64_t>(front) << 32 | static_cast<uint32_t>(back);
  }
  int64_t Take(bool front_end) {
    uint64_t bits = bits_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t front = static_cast<int64_t>(bits >> 32), back = static_cast<int64_t>(bits & 0xffffffffu);
      if (front >= back) return -1;
      const uint64_t taken = front_end ? Pack(front + 1, back) : Pack(front, back - 1);
      // Relaxed: a unit's inputs are ready before the parallel region, its outputs are read
      // after it, and nothing else is shared.
      if (bits_.compare_exchange_weak(bits, taken, std::memory_order_relaxed)) return front_end ? front : back - 1;
    }
  }
  alignas(64) std::atomic<uint64_t> bits_;
};

int64_t RoundUp(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }
int64_t ElementBytes(PanelDType dtype) { return dtype == PanelDType::kBF16 ? 2 : 4; }

// GELU with the tanh approximation: 0.5 x (1 + tanh(u)) = x / (1 + e^t), t = -2u, u =
// sqrt(2/pi) (x + 0.044715 x^3). It runs on every output of the MLP's first product, so it is
// written in few instructions: simd::Exp (vrndscaleps and vscalefps here), and the division
// as vrcp14ps plus one Newton step (within about an ulp). t is capped at 80 so that 1 + e^t
// and its reciprocal stay normal floats (no slow subnormal arithmetic): the result there, x
// e^-80 for x below about -10, is 0 to float precision. Below -87, Exp gives e^-87, and the
// result is x.
[[MMDIT_TARGET_AVX512, gnu::always_inline]] inline Vec GeluTanh(Vec x) {
  constexpr float kMinus2Sqrt2OverPi = -2 * 0.7978845608028654f;
  const Vec minus_2u = x * (kMinus2Sqrt2OverPi + (kMinus2Sqrt2OverPi * 0.044715f) * x * x);
  // A NaN x gives t = 80, and a NaN result through the last product.
  const Vec t = minus_2u < 80.0f ? minus_2u : simd::Broadcast(80.0f);
  const Vec denominator = 1.0f + simd::Exp(t);
  // The intrinsic's all-lanes form starts from an undefined vector, which GCC 12 warns about:
  // this is the masked form with every lane set.
  const __m512 denominator_bits = reinterpret_cast<__m512>(denominator);
  const Vec reciprocal = reinterpret_cast<Vec>(_mm512_mask_rcp14_ps(denominator_bits, 0xffff, denominator_bits));
  return x * (reciprocal * (2.0f - denominator * reciprocal));
}

// One pass of a tile: depth steps [0, depth) of up to kTileRows rows against a panel block.
// A depth step is one panel row of 192 bytes and 4 bytes of each input row: one input in
// float32 (48 columns x 1 float), an input pair in bf16 (48 columns x 2 bf16).
struct Pass {
  const char* x;        // the tile's first row at the block's first step; rows x_stride bytes apart
  int64_t x_stride;
  const char* panel;    // the block's first panel row
  int64_t depth;
  const float* start;   // what the sums start from: the panel's bias (48 floats, first
  int64_t start_stride; // pass, stride 0) or the previous passes' sums (y rows)
  bool last;            // apply the epilogue
  float* y;             // float32 sums (the result or a partial), rows y_stride floats apart
  int64_t y_stride;
  // Prefetch begin + step * s at depth step s (none when begin is null); with `lookahead`,
  // also this block kLookaheadSteps rows ahead.
  const char* prefetch_begin;
  int64_t prefetch_step;
  bool lookahead;
};
constexpr int64_t kPanelRowBytes = 192;
// Input rows and panels are read as floats whatever they hold (bf16 pairs too).
typedef float AliasedFloat __attribute__((may_alias));

template <int R, PanelDType kDType>
[[MMDIT_TARGET_AVX512]] void TilePass(const Pass& pass, PanelEpilogue epilogue) {
  Vec acc[R][kPanelVecs];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kPanelVecs; ++j) acc[r][j] = Load(pass.start + r * pass.start_stride + j * simd::kVector);
  }
  for (int64_t step = 0; step < pass.depth; ++step) {
    const char* w = pass.panel + step * kPanelRowBytes;
    if (pass.lookahead) {
      for (int j = 0; j < kPanelVecs; ++j) __builtin_prefetch(w + kLookaheadSteps * kPanelRowBytes + 64 * j);
    }
    if (pass.prefetch_begin != nullptr) {
      // Every line of this step's share: with few tiles a step's share is a whole 192-byte row.
      const char* share = pass.prefetch_begin + step * pass.prefetch_step;
      for (int64_t byte = 0; byte < pass.prefetch_step; byte += 64) __builtin_prefetch(share + byte);
    }
    Vec wv[kPanelVecs];
    for (int j = 0; j < kPanelVecs; ++j) wv[j] = Load(reinterpret_cast<const float*>(w + 64 * j));
    for (int r = 0; r < R; ++r) {
      // 4 bytes of the row: one float, or one bf16 pair (read as a float's bits).
      const AliasedFloat* xr = reinterpret_cast<const AliasedFloat*>(pass.x + r * pass.x_stride) + step;
      const Vec xv = simd::Broadcast(*xr);
      for (int j = 0; j < kPanelVecs; ++j) {
        if constexpr (kDType == PanelDType::kF32) {
          acc[r][j] += xv * wv[j];
        } else {
          acc[r][j] = simd::DotBf16Pairs(acc[r][j], xv, wv[j]);
        }
      }
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
template <PanelDType kDType>
constexpr TilePassFn kTilePasses[kTileRows + 1] = {
    nullptr,           TilePass<1, kDType>, TilePass<2, kDType>, TilePass<3, kDType>, TilePass<4, kDType>,
    TilePass<5, kDType>, TilePass<6, kDType>, TilePass<7, kDType>, TilePass<8, kDType>};

[[MMDIT_TARGET_AVX512, gnu::target("avx512bf16")]] void StoreBf16(const float* sums, int64_t count, uint16_t* out) {
  int64_t i = 0;
  for (; i + simd::kVector <= count; i += simd::kVector) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(sums + i))));
  }
  for (; i < count; ++i) out[i] = FloatToBFloat16(sums[i]);
}

}  // namespace

bool PanelGemmAvailable(PanelDType dtype) {
  if (simd::CpuIsa() != simd::Isa::kAvx512) return false;
  return dtype == PanelDType::kF32 || simd::CpuHasBf16DotProduct();
}

void ConvertToBf16(const float* src, int64_t count, uint16_t* dst) {
  assert(PanelGemmAvailable(PanelDType::kBF16));
  constexpr int64_t kChunk = 16384;
#pragma omp parallel for schedule(static)
  for (int64_t begin = 0; begin < count; begin += kChunk) {
    StoreBf16(src + begin, std::min(kChunk, count - begin), dst + begin);
  }
}

void PanelGemm(const PanelProduct& product) {
  assert(PanelGemmAvailable(product.dtype));
  if (product.rows > kChunkRows) {
    // In chunks of equal size (a multiple of the tile), each streaming the weights once.
    const int64_t chunks = RoundUp(product.rows, kChunkRows) / kChunkRows;
    const int64_t chunk_rows = RoundUp(RoundUp(product.rows, chunks) / chunks, kTileRows);
    const int64_t x_row_bytes = product.in * ElementBytes(product.dtype);
    const int64_t y_row_bytes = product.out * (product.bf16_output ? 2 : 4);
    for (int64_t row = 0; row < product.rows; row += chunk_rows) {
      PanelProduct chunk = product;
      chunk.rows = std::min(chunk_rows, product.rows - row);
      chunk.x = static_cast<const char*>(product.x) + row * x_row_bytes;
      chunk.y = static_cast<char*>(product.y) + row * y_row_bytes;
      PanelGemm(chunk);
    }
    return;
  }
  const bool bf16 = product.dtype == PanelDType::kBF16;
  assert(!bf16 || product.in % 2 == 0);
  const TilePassFn* tile_passes = bf16 ? kTilePasses<PanelDType::kBF16> : kTilePasses<PanelDType::kF32>;
  const int64_t rows = product.rows, in = product.in, out = product.out;
  const int64_t element_bytes = ElementBytes(product.dtype);
  const int64_t steps = bf16 ? in / 2 : in;              // depth steps of 4 input bytes
  const int64_t block_steps = bf16 ? kDepthBlock / 2 : kDepthBlock;
  const int64_t depth_align = bf16 ? 32 : 16;  // BA16a48b2a blocks inputs by 16 pairs
  const int64_t panel_bytes = RoundUp(in, depth_align) * kPanelColumns * element_bytes;
  const int64_t tiles = RoundUp(rows, kTileRows) / kTileRows;
  const int64_t blocks = std::max<int64_t>(1, RoundUp(steps, block_steps) / block_steps);  // in = 0: the bias
  const char* x = static_cast<const char*>(product.x);
  const char* packed = static_cast<const char*>(product.packed_weights);
  // Float32 results go straight to y; bf16 ones are summed in a float32 tile first.
  float* y_f32 = product.bf16_output ? nullptr : static_cast<float*>(product.y);
  uint16_t* y_bf16 = product.bf16_output ? static_cast<uint16_t*>(product.y) : nullptr;
  // Work goes in units of one panel x a block of its row tiles. Each thread owns an equal,
  // contiguous share of the units, in panel order, and multiplies them front to back; a
  // thread whose share is done takes units from the back of another's. With a fixed split
  // alone, the first thread to finish waited about 3 % of a seed-default batch-8 forward's
  // product time (the VM and interrupts slow one thread or the other). A panel is cut into row
  // blocks when there are fewer than kUnitsPerThread panels per thread, at least
  // kMinBlockTiles tiles each, so that a block's multiply time still covers the next panel's
  // prefetch.
  if (rows == 0 || out == 0) return;
  const int64_t panels = RoundUp(out, kPanelColumns) / kPanelColumns;
  const int64_t threads = omp_get_max_threads();
  const int64_t wanted_row_blocks = RoundUp(kUnitsPerThread * threads, panels) / panels;
  const int64_t row_blocks = std::clamp<int64_t>(wanted_row_blocks, 1, std::max<int64_t>(1, tiles / kMinBlockTiles));
  const int64_t units = panels * row_blocks;
  const int64_t shares = std::min(threads, kMaxShares);
  std::array<UnitShare, kMaxShares> share;
  for (int64_t t = 0; t < shares; ++t) share[t].Reset(units * t / shares, units * (t + 1) / shares);
#pragma omp parallel
  {
    alignas(64) float bias_tile[kPanelColumns];
    alignas(64) float y_tile[kTileRows * kPanelColumns];
    const int64_t me = omp_get_thread_num();
    auto take_unit = [&]() -> int64_t {
      if (me < shares) {
        if (const int64_t unit = share[me].TakeFront(); unit >= 0) return unit;
      }
      for (int64_t k = 1; k <= shares; ++k) {
        const int64_t other = (me + k) % shares;
        if (other == me) continue;
        if (const int64_t unit = share[other].TakeBack(); unit >= 0) return unit;
      }
      return -1;
    };
    int64_t unit = take_unit();
    int64_t cached_panel = -1;  // the panel this thread multiplied or prefetched last
    while (unit >= 0) {
      // The next unit is taken now, so that its panel (when another) streams in while this
      // unit multiplies.
      const int64_t following = take_unit();
      const int64_t p = unit / row_blocks, next_p = following >= 0 ? following / row_blocks : -1;
      const char* panel = packed + p * panel_bytes;
      const char* next_panel = next_p >= 0 && next_p != p ? packed + next_p * panel_bytes : nullptr;
      const bool cold = cached_panel != p;  // not prefetched: the first pass reads ahead of itself
      const int64_t row_block = unit % row_blocks;  // tiles split evenly: blocks differ by one at most
      const int64_t first_tile = row_block * tiles / row_blocks;
      const int64_t unit_tiles = (row_block + 1) * tiles / row_blocks - first_tile;
      const int64_t column = p * kPanelColumns, columns = std::min(kPanelColumns, out - column);
      // The last panel's columns past `out` exist only in the packed weights, and bf16
      // results are rounded once, from their final sums: such a panel's sums go through a
      // full-width float32 tile, that tile's passes one after another.
      const bool through_tile = columns < kPanelColumns || product.bf16_output;
      std::fill(std::copy_n(product.bias + column, columns, bias_tile), bias_tile + kPanelColumns, 0.0f);
      // Passes go block by block (every tile through one block while it is in L2), except
      // through the tile (tile by tile, so that y_tile holds one tile's sums).
      const int64_t passes = unit_tiles * blocks;
      for (int64_t i = 0; i < passes; ++i) {
        const int64_t tile = first_tile + (through_tile ? i / blocks : i % unit_tiles);
        const int64_t block = through_tile ? i % blocks : i / unit_tiles;
        const int64_t row = tile * kTileRows, step = block * block_steps;
        const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - row));
        Pass pass;
        pass.x = x + (row * in) * element_bytes + step * 4;
        pass.x_stride = in * element_bytes;
        pass.panel = panel + step * kPanelRowBytes;
        pass.depth = std::min(block_steps, steps - step);
        pass.y = through_tile ? y_tile : y_f32 + row * out + column;
        pass.y_stride = through_tile ? kPanelColumns : out;
        pass.start = block == 0 ? bias_tile : pass.y;
        pass.start_stride = block == 0 ? 0 : pass.y_stride;
        pass.last = block + 1 == blocks;
        pass.prefetch_begin = next_panel == nullptr ? nullptr : next_panel + panel_bytes * i / passes;
        pass.prefetch_step = std::max<int64_t>(1, panel_bytes / (passes * std::max<int64_t>(1, pass.depth)));
        pass.lookahead = cold && i == 0;
        tile_passes[tile_rows](pass, product.epilogue);
        if (through_tile && pass.last) {
          for (int r = 0; r < tile_rows; ++r) {
            const float* sums = y_tile + r * kPanelColumns;
            if (y_bf16 != nullptr) {
              StoreBf16(sums, columns, y_bf16 + (row + r) * out + column);
            } else {
              std::copy_n(sums, columns, y_f32 + (row + r) * out + column);
            }
          }
        }
      }
      cached_panel = next_p;
      unit = following;
    }
  }
}

}  // namespace mmdit
