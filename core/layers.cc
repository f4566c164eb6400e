#include "core/layers.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cassert>
#include <cmath>

#include "core/simd.h"

namespace mmdit {
namespace {

using simd::Broadcast;
using simd::ExpNonPositive;
using simd::Isa;
using simd::kVector;
using simd::Load;
using simd::Store;
using simd::Vec;

// Attention (see Attention below) works in tasks of up to kQueryTile query rows of one
// sequence and head: enough rows that a task reuses the head's packed keys and values from
// cache, few enough that short sequences still split across threads. Within a task, rows go
// kRowGroup at a time, so a thread's scores are only kRowGroup rows long.
constexpr int64_t kQueryTile = 32;
// Query rows and key columns one micro-kernel step holds in registers.
constexpr int kRowGroup = 4;
constexpr int64_t kKeyBlock = 32;  // key columns per score step: two Vecs

// Where the j-th row of a sequence lives.
struct RowRef {
  const AttentionSegment* segment;
  int64_t row;
};

RowRef Locate(const AttentionSequence& seq, int64_t j) {
  if (j < seq.segments[0].rows) return {&seq.segments[0], j};
  return {&seq.segments[1], j - seq.segments[0].rows};
}

int64_t RoundUp(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// One sequence and head's keys and values, packed so the kernels read them with unit
// stride: keys transposed and pre-scaled by 1/sqrt(hd), key_t[e * padded_length + j]
// (columns past the length are zero); values[j * padded_dim + e] (features past hd zero).
struct PackedHead {
  float* key_t;
  float* values;
  int64_t length, padded_length, head_dim, padded_dim;
};

int64_t PackedHeadFloats(int64_t length, int64_t head_dim) {
  return head_dim * RoundUp(length, kKeyBlock) + length * RoundUp(head_dim, kVector);
}

void PackHead(const AttentionSequence& seq, int64_t head_offset, int64_t input_stride, float scale, PackedHead& packed) {
  std::fill_n(packed.key_t, packed.head_dim * packed.padded_length, 0.0f);
  for (int64_t j = 0; j < packed.length; ++j) {
    const RowRef ref = Locate(seq, j);
    const float* k = ref.segment->k + ref.row * input_stride + head_offset;
    const float* v = ref.segment->v + ref.row * input_stride + head_offset;
    for (int64_t e = 0; e < packed.head_dim; ++e) packed.key_t[e * packed.padded_length + j] = k[e] * scale;
    float* value_row = packed.values + j * packed.padded_dim;
    std::copy_n(v, packed.head_dim, value_row);
    std::fill(value_row + packed.head_dim, value_row + packed.padded_dim, 0.0f);
  }
}

// scores[r][j] = q_r . key_j (scaled) for kRows query rows and all padded key columns;
// returns nothing, the caller reduces. kRows query rows at a time share every key load.
template <int kRows>
[[gnu::always_inline]] inline void ScoreRows(const float* const* q, const PackedHead& kv, float* scores,
                                             int64_t scores_stride) {
  for (int64_t j = 0; j < kv.padded_length; j += kKeyBlock) {
    Vec acc[kRows][2] = {};
    const float* key_column = kv.key_t + j;
    for (int64_t e = 0; e < kv.head_dim; ++e, key_column += kv.padded_length) {
      const Vec k0 = Load(key_column), k1 = Load(key_column + kVector);
      for (int r = 0; r < kRows; ++r) {
        const Vec qe = Broadcast(q[r][e]);
        acc[r][0] += qe * k0;
        acc[r][1] += qe * k1;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      Store(scores + r * scores_stride + j, acc[r][0]);
      Store(scores + r * scores_stride + j + kVector, acc[r][1]);
    }
  }
}

// In place over one row of `length` scores: p_j = exp(s_j - max); returns sum_j p_j.
[[gnu::always_inline]] inline float SoftmaxNumerators(float* scores, int64_t length) {
  // The maximum sixteen lanes at a time: a scalar loop is one long chain of dependent maxes
  // (GCC does not vectorise it: the order matters for NaN), as slow as the row's products.
  Vec lane_max = Broadcast(-INFINITY);
  int64_t j = 0;
  for (; j + kVector <= length; j += kVector) {
    const Vec s = Load(scores + j);
    lane_max = s > lane_max ? s : lane_max;
  }
  float max_score = -INFINITY;
  for (int64_t e = 0; e < kVector; ++e) max_score = std::max(max_score, lane_max[e]);
  for (; j < length; ++j) max_score = std::max(max_score, scores[j]);
  Vec sum = {};
  for (j = 0; j + kVector <= length; j += kVector) {
    const Vec p = ExpNonPositive(Load(scores + j) - max_score);
    Store(scores + j, p);
    sum += p;
  }
  float total = 0.0f;
  for (int64_t e = 0; e < kVector; ++e) total += sum[e];
  if (j < length) {  // the tail, through a copy padded with the maximum (e^0 lanes, unused)
    float tail[kVector];
    std::fill_n(tail, kVector, max_score);
    std::copy(scores + j, scores + length, tail);
    const Vec p = ExpNonPositive(Load(tail) - max_score);
    for (int64_t e = 0; e < length - j; ++e) total += (scores[j + e] = p[e]);
  }
  return total;
}

// out_r[e0, e0 + 16 kVecs) = sum_j p_r[j] v_j[...] for kRows rows: each value load feeds
// kRows rows. Scaled by 1/sum_r and written as the rows' first `width` features of the chunk.
template <int kRows, int kVecs>
[[gnu::always_inline]] inline void WeightedValues(const float* scores, int64_t scores_stride, const PackedHead& kv,
                                                  int64_t e0, const float* inv_sum, float* const* out) {
  Vec acc[kRows][kVecs] = {};
  const float* value = kv.values + e0;
  for (int64_t j = 0; j < kv.length; ++j, value += kv.padded_dim) {
    Vec v[kVecs];
    for (int c = 0; c < kVecs; ++c) v[c] = Load(value + c * kVector);
    for (int r = 0; r < kRows; ++r) {
      const Vec p = Broadcast(scores[r * scores_stride + j]);
      for (int c = 0; c < kVecs; ++c) acc[r][c] += p * v[c];
    }
  }
  const int64_t width = std::min<int64_t>(kVecs * kVector, kv.head_dim - e0);
  for (int r = 0; r < kRows; ++r) {
    float row[kVecs * kVector];
    for (int c = 0; c < kVecs; ++c) Store(row + c * kVector, acc[r][c] * inv_sum[r]);
    std::copy_n(row, width, out[r] + e0);
  }
}

template <int kRows>
[[gnu::always_inline]] inline void WeightedValueRows(const float* scores, int64_t scores_stride, const PackedHead& kv,
                                                     const float* inv_sum, float* const* out) {
  int64_t e0 = 0;
  for (; e0 + 4 * kVector <= kv.padded_dim; e0 += 4 * kVector) {
    WeightedValues<kRows, 4>(scores, scores_stride, kv, e0, inv_sum, out);
  }
  switch ((kv.padded_dim - e0) / kVector) {
    case 3: WeightedValues<kRows, 3>(scores, scores_stride, kv, e0, inv_sum, out); break;
    case 2: WeightedValues<kRows, 2>(scores, scores_stride, kv, e0, inv_sum, out); break;
    case 1: WeightedValues<kRows, 1>(scores, scores_stride, kv, e0, inv_sum, out); break;
    default: break;
  }
}

// kRows query rows starting at sequence row i: scores, softmax, weighted values.
template <int kRows>
[[gnu::always_inline]] inline void AttendRows(const AttentionSequence& seq, const PackedHead& kv, int64_t head_offset,
                                              const AttentionStrides& strides, int64_t i, float* scores) {
  const float* q[kRows];
  float* out[kRows];
  for (int r = 0; r < kRows; ++r) {
    const RowRef ref = Locate(seq, i + r);
    q[r] = ref.segment->q + ref.row * strides.input + head_offset;
    out[r] = ref.segment->out + ref.row * strides.output + head_offset;
  }
  ScoreRows<kRows>(q, kv, scores, kv.padded_length);
  float inv_sum[kRows];
  for (int r = 0; r < kRows; ++r) inv_sum[r] = 1.0f / SoftmaxNumerators(scores + r * kv.padded_length, kv.length);
  WeightedValueRows<kRows>(scores, kv.padded_length, kv, inv_sum, out);
}

// Query rows [q_begin, q_end) of one sequence and head against its packed keys and values.
// `scores` holds kRowGroup * padded_length floats. Inlined into one copy per instruction
// set (see kAttendTile).
[[gnu::always_inline]] inline void AttendTileBody(const AttentionSequence& seq, const PackedHead& kv,
                                                  int64_t head_offset, const AttentionStrides& strides, int64_t q_begin,
                                                  int64_t q_end, float* scores) {
  int64_t i = q_begin;
  for (; i + kRowGroup <= q_end; i += kRowGroup) AttendRows<kRowGroup>(seq, kv, head_offset, strides, i, scores);
  for (; i < q_end; ++i) AttendRows<1>(seq, kv, head_offset, strides, i, scores);
}

// float32 to bf16 bits, rounding to nearest even; NaN stays NaN (as FloatToBFloat16).
[[gnu::always_inline]] inline uint16_t ToBf16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}
[[gnu::always_inline]] inline void StoreAs(float value, float* out) { *out = value; }
[[gnu::always_inline]] inline void StoreAs(float value, uint16_t* out) { *out = ToBf16(value); }

// One row of LayerNormModulate; inlined into one copy per instruction set and output type.
template <typename Out>
[[gnu::always_inline]] inline void LayerNormModulateRow(const float* xr, int64_t dim, const float* shift,
                                                        const float* scale, Out* yr) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < dim; ++e) sum += xr[e];
  const float mean = sum / dim;
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t e = 0; e < dim; ++e) sq += (xr[e] - mean) * (xr[e] - mean);
  const float inv_std = 1.0f / std::sqrt(sq / dim + kNormEpsilon);
#pragma omp simd
  for (int64_t e = 0; e < dim; ++e) StoreAs((xr[e] - mean) * inv_std * (1.0f + scale[e]) + shift[e], yr + e);
}

// Run-time dispatch for the two hot loops of our own: AVX-512, AVX2+FMA, or baseline x86-64,
// picked once from the CPU (simd.h).
using AttendTileFn = void (*)(const AttentionSequence&, const PackedHead&, int64_t, const AttentionStrides&, int64_t,
                              int64_t, float*);
template <typename Out>
using LayerNormRowFn = void (*)(const float*, int64_t, const float*, const float*, Out*);

[[MMDIT_TARGET_AVX512]] void AttendTileAvx512(const AttentionSequence& seq, const PackedHead& kv, int64_t head_offset,
    const AttentionStrides& strides, int64_t q_begin, int64_t q_end, float* scores) {
  AttendTileBody(seq, kv, head_offset, strides, q_begin, q_end, scores);
}
[[MMDIT_TARGET_AVX2]] void AttendTileAvx2(const AttentionSequence& seq, const PackedHead& kv, int64_t head_offset,
    const AttentionStrides& strides, int64_t q_begin, int64_t q_end, float* scores) {
  AttendTileBody(seq, kv, head_offset, strides, q_begin, q_end, scores);
}
void AttendTileBaseline(const AttentionSequence& seq, const PackedHead& kv, int64_t head_offset,
    const AttentionStrides& strides, int64_t q_begin, int64_t q_end, float* scores) {
  AttendTileBody(seq, kv, head_offset, strides, q_begin, q_end, scores);
}
template <typename Out>
[[MMDIT_TARGET_AVX512]] void LayerNormRowAvx512(const float* x, int64_t dim,
                                                                                       const float* shift,
                                                                                       const float* scale, Out* y) {
  LayerNormModulateRow(x, dim, shift, scale, y);
}
template <typename Out>
[[MMDIT_TARGET_AVX2]] void LayerNormRowAvx2(const float* x, int64_t dim, const float* shift, const float* scale,
                                                  Out* y) {
  LayerNormModulateRow(x, dim, shift, scale, y);
}
template <typename Out>
void LayerNormRowBaseline(const float* x, int64_t dim, const float* shift, const float* scale, Out* y) {
  LayerNormModulateRow(x, dim, shift, scale, y);
}

const Isa kIsa = simd::CpuIsa();
const AttendTileFn kAttendTile = kIsa == Isa::kAvx512 ? AttendTileAvx512
                                 : kIsa == Isa::kAvx2 ? AttendTileAvx2
                                                      : AttendTileBaseline;
// A function, not a variable template: instances of a variable template have no defined
// initialisation order relative to kIsa.
template <typename Out>
LayerNormRowFn<Out> LayerNormRowFor(Isa isa) {
  return isa == Isa::kAvx512 ? LayerNormRowAvx512<Out> : isa == Isa::kAvx2 ? LayerNormRowAvx2<Out> : LayerNormRowBaseline<Out>;
}

// The group of row r: groups are few (a batch's samples), so a scan is cheap.
int64_t GroupOf(const RowGroups& groups, int64_t r) {
  int64_t g = 0;
  while (g + 1 < static_cast<int64_t>(groups.start.size()) && groups.start[g + 1] <= r) ++g;
  return g;
}

template <typename Out>
void LayerNormModulateRows(const float* x, const RowGroups& groups, int64_t dim, const float* shift,
                           const float* scale, Out* out) {
  const LayerNormRowFn<Out> row_fn = LayerNormRowFor<Out>(kIsa);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < groups.rows; ++r) {
    const int64_t g = GroupOf(groups, r) * groups.stride;
    row_fn(x + r * dim, dim, shift + g, scale + g, out + r * dim);
  }
}

}  // namespace

void LayerNormModulate(const float* x, const RowGroups& groups, int64_t dim, const float* shift, const float* scale,
                       float* out) {
  LayerNormModulateRows(x, groups, dim, shift, scale, out);
}

void LayerNormModulate(const float* x, const RowGroups& groups, int64_t dim, const float* shift, const float* scale,
                       uint16_t* out) {
  LayerNormModulateRows(x, groups, dim, shift, scale, out);
}

void GatedResidualAdd(const float* y, const RowGroups& groups, int64_t dim, const float* gate, float* x) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < groups.rows; ++r) {
    const float* row_gate = gate + GroupOf(groups, r) * groups.stride;
#pragma omp simd
    for (int64_t e = 0; e < dim; ++e) x[r * dim + e] += row_gate[e] * y[r * dim + e];
  }
}

void RmsNormHeads(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim, const float* gamma) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      float* z = x + r * row_stride + h * head_dim;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t e = 0; e < head_dim; ++e) sq += z[e] * z[e];
      const float inv_rms = 1.0f / std::sqrt(sq / head_dim + kNormEpsilon);
      for (int64_t e = 0; e < head_dim; ++e) z[e] = z[e] * inv_rms * gamma[e];
    }
  }
}

void SiLU(const float* x, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = x[i] / (1.0f + std::exp(-x[i]));
}

void TimestepFeatures(float timestep, float* out) {
  constexpr int64_t kHalf = kTimestepFeatures / 2;
  // In double: the angle reaches 1000 rad, where float32 would lose ~1e-4 of phase.
  for (int64_t k = 0; k < kHalf; ++k) {
    const double frequency = std::exp(-std::log(10000.0) * static_cast<double>(k) / kHalf);
    const double angle = static_cast<double>(timestep) * frequency;
    out[k] = static_cast<float>(std::cos(angle));
    out[kHalf + k] = static_cast<float>(std::sin(angle));
  }
}

void Patchify(const float* latent, int64_t channels, int64_t height, int64_t width, int64_t patch, float* tokens) {
  const int64_t grid_w = width / patch, features = channels * patch * patch;
  for (int64_t i = 0; i < height / patch; ++i) {
    for (int64_t j = 0; j < grid_w; ++j) {
      float* token = tokens + (i * grid_w + j) * features;
      for (int64_t c = 0; c < channels; ++c) {
        for (int64_t u = 0; u < patch; ++u) {
          for (int64_t v = 0; v < patch; ++v) {
            token[(c * patch + u) * patch + v] = latent[(c * height + i * patch + u) * width + j * patch + v];
          }
        }
      }
    }
  }
}

void Unpatchify(const float* tokens, int64_t channels, int64_t height, int64_t width, int64_t patch, float* latent) {
  const int64_t grid_w = width / patch, features = channels * patch * patch;
  for (int64_t i = 0; i < height / patch; ++i) {
    for (int64_t j = 0; j < grid_w; ++j) {
      const float* token = tokens + (i * grid_w + j) * features;
      for (int64_t u = 0; u < patch; ++u) {
        for (int64_t v = 0; v < patch; ++v) {
          for (int64_t c = 0; c < channels; ++c) {
            latent[(c * height + i * patch + u) * width + j * patch + v] = token[(u * patch + v) * channels + c];
          }
        }
      }
    }
  }
}

void AddCroppedPositions(const float* table, int64_t table_size, int64_t grid_h, int64_t grid_w, int64_t dim,
                         float* tokens) {
  assert(grid_h <= table_size && grid_w <= table_size && "callers validate the grid against the table");
  const int64_t top = (table_size - grid_h) / 2, left = (table_size - grid_w) / 2;
  for (int64_t i = 0; i < grid_h; ++i) {
    for (int64_t j = 0; j < grid_w; ++j) {
      const float* row = table + ((top + i) * table_size + left + j) * dim;
      float* token = tokens + (i * grid_w + j) * dim;
      for (int64_t e = 0; e < dim; ++e) token[e] += row[e];
    }
  }
}

namespace {

// Scratch for packed heads totalling `packed_floats` plus each thread's scores.
int64_t ScratchFloats(int64_t packed_floats, int64_t max_length, int threads) {
  return packed_floats + threads * kRowGroup * RoundUp(max_length, kKeyBlock);
}

// Sequence s, head h's packed keys and values in `scratch`: every sequence's heads, one after
// another. Found by a scan rather than kept in a table, so that Attention allocates nothing.
PackedHead PackedHeadAt(absl::Span<const AttentionSequence> sequences, size_t s, int64_t h, int64_t heads,
                        int64_t head_dim, float* scratch) {
  float* at = scratch;
  for (size_t i = 0; i < s; ++i) at += heads * PackedHeadFloats(sequences[i].length(), head_dim);
  const int64_t length = sequences[s].length(), padded_length = RoundUp(length, kKeyBlock);
  at += h * PackedHeadFloats(length, head_dim);
  return {at, at + head_dim * padded_length, length, padded_length, head_dim, RoundUp(head_dim, kVector)};
}

}  // namespace

int64_t AttentionScratchFloats(absl::Span<const int64_t> lengths, int64_t heads, int64_t head_dim, int threads) {
  int64_t packed = 0, max_length = 0;
  for (int64_t length : lengths) {
    packed += heads * PackedHeadFloats(length, head_dim);
    max_length = std::max(max_length, length);
  }
  return ScratchFloats(packed, max_length, threads);
}

void Attention(absl::Span<const AttentionSequence> sequences, int64_t heads, int64_t head_dim,
               const AttentionStrides& strides, absl::Span<float> scratch) {
  // Scratch: every (sequence, head)'s packed keys and values, then each thread's scores.
  int64_t packed_floats = 0, max_length = 0;
  for (const AttentionSequence& seq : sequences) {
    packed_floats += heads * PackedHeadFloats(seq.length(), head_dim);
    max_length = std::max(max_length, seq.length());
  }
  assert(static_cast<int64_t>(scratch.size()) >= ScratchFloats(packed_floats, max_length, omp_get_max_threads()));
  float* const thread_scores = scratch.data() + packed_floats;
  const int64_t scores_floats = kRowGroup * RoundUp(max_length, kKeyBlock);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

  // Tasks: (sequence, head, query tile), numbered sequence by sequence, so that a batch of
  // short sequences still spreads over all threads. Mapped back by a scan: batches are small.
  auto tiles = [](int64_t length) { return (length + kQueryTile - 1) / kQueryTile; };
  int64_t total_tasks = 0;
  for (const AttentionSequence& seq : sequences) total_tasks += heads * tiles(seq.length());
  const int64_t total_heads = static_cast<int64_t>(sequences.size()) * heads;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t sh = 0; sh < total_heads; ++sh) {
      PackedHead kv = PackedHeadAt(sequences, sh / heads, sh % heads, heads, head_dim, scratch.data());
      PackHead(sequences[sh / heads], (sh % heads) * head_dim, strides.input, scale, kv);
    }
    float* scores = thread_scores + omp_get_thread_num() * scores_floats;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < total_tasks; ++task) {
      int64_t local = task;
      size_t s = 0;
      while (local >= heads * tiles(sequences[s].length())) local -= heads * tiles(sequences[s++].length());
      const int64_t length = sequences[s].length();
      const int64_t head = local / tiles(length);
      const int64_t q_begin = (local % tiles(length)) * kQueryTile;
      const int64_t q_end = std::min(q_begin + kQueryTile, length);
      const PackedHead kv = PackedHeadAt(sequences, s, head, heads, head_dim, scratch.data());
      kAttendTile(sequences[s], kv, head * head_dim, strides, q_begin, q_end, scores);
    }
  }
}

}  // namespace mmdit
