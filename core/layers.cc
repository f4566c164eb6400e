#include "core/layers.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cassert>
#include <cmath>
#include <type_traits>
#include <utility>

#include "core/simd.h"

namespace mmdit {
namespace {

using simd::Broadcast;
using simd::Exp;
using simd::Isa;
using simd::kLanes;
using simd::Load;
using simd::Store;
using simd::Vec;
using simd::VecOf;

// Our kernels here are templates over their vector type V (simd.h): VecOf<16> under AVX-512,
// VecOf<8> under AVX2, VecOf<4> on baseline x86-64.

// float32 to bf16 bits, rounding to nearest even; NaN stays NaN (as FloatToBFloat16).
template <typename Bits>
[[gnu::always_inline]] inline Bits ToBf16Bits(Bits bits) {
  const Bits rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const Bits quiet_nan = (bits >> 16) | 0x40u;
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded;
}
template <int W>
struct Bf16Types {
  typedef uint32_t Bits __attribute__((vector_size(4 * W)));
  typedef uint16_t Halves __attribute__((vector_size(2 * W), aligned(2), may_alias));
};
[[gnu::always_inline]] inline void StoreAs(float value, float* out) { *out = value; }
[[gnu::always_inline]] inline void StoreAs(float value, uint16_t* out) {
  *out = static_cast<uint16_t>(ToBf16Bits(std::bit_cast<uint32_t>(value)));
}
template <typename V>
[[gnu::always_inline]] inline void StoreAs(V value, float* out) {
  Store(out, value);
}
template <typename V>
[[gnu::always_inline]] inline void StoreAs(V value, uint16_t* out) {
  using T = Bf16Types<kLanes<V>>;
  *reinterpret_cast<typename T::Halves*>(out) =
      __builtin_convertvector(ToBf16Bits(reinterpret_cast<typename T::Bits>(value)), typename T::Halves);
}
// Sixteen bf16 pairs: lane l holds `low`'s lane l rounded to bf16 in its low half and
// `high`'s in its high half, as `vdpbf16ps` reads a pair.
[[gnu::always_inline]] inline Vec Bf16Pairs(Vec low, Vec high) {
  using Bits = Bf16Types<simd::kVector>::Bits;
  return reinterpret_cast<Vec>(ToBf16Bits(reinterpret_cast<Bits>(low)) | (ToBf16Bits(reinterpret_cast<Bits>(high)) << 16));
}

// Attention (see Attention below) works in tasks of one sequence and head, or of part of its
// query rows when heads are too few to share among the threads. A task's thread packs the
// head's keys and values into its own scratch, where they stay in cache for every query row.
// Within a task, rows go kRowGroup<V> at a time, so a thread's scores are only that many rows
// long, and kKeyBlock<V> (two vectors of) keys at a time.
template <typename V>
constexpr int kRowGroup = kLanes<V> == 16 ? 8 : 4;  // 16 of AVX-512's 32 registers; 8 of 16
template <typename V>
constexpr int64_t kKeyBlock = 2 * kLanes<V>;
constexpr int kMaxRowGroup = 8;         // the largest of each, to size the scratch
constexpr int64_t kMaxKeyBlock = 32;
constexpr int64_t kFeatureAlign = 16;   // packed value rows: a multiple of every width
constexpr int64_t kTasksPerThread = 4;  // at least, where heads are few: splits them by query rows
// Accumulators a micro-kernel may hold: half the registers of V's instruction set.
template <typename V>
constexpr int kAccumulators = kLanes<V> == 16 ? 16 : 8;

// Attention's two products run in steps of 4 bytes per operand, as PanelGemm's do: one float32,
// or in bf16 one pair of bf16 values (two adjacent features of q and of k; two adjacent keys
// of p and of v), read as a float's bits and multiplied pair by pair. bf16 runs only at
// AVX-512's width.
template <ComputeDType kDType, typename V>
[[gnu::always_inline]] inline V MultiplyAddSteps(V acc, V x, V w) {
  if constexpr (kDType == ComputeDType::kBF16) {
    return simd::DotBf16Pairs(acc, x, w);
  } else {
    return acc + x * w;
  }
}
template <ComputeDType kDType>
constexpr int64_t kValuesPerStep = kDType == ComputeDType::kBF16 ? 2 : 1;
typedef float StepBits __attribute__((may_alias));  // a step's 4 bytes, whatever they hold

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

// One sequence and head's keys and values, packed so the kernels read them with unit stride,
// in steps (see MultiplyAddSteps). Keys are pre-scaled by 1/sqrt(hd) and transposed in blocks
// of B = kKeyBlock<V> keys: key_blocks[(j / B) * key_steps * B + s * B + j % B] holds key j's
// step s (feature s, or features 2s and 2s + 1), zero past the length. values[s * padded_dim +
// e] holds feature e of step s's keys (key s, or keys 2s and 2s + 1), zero past hd and past
// the length.
struct PackedHead {
  float* key_blocks;
  float* values;
  int64_t length, padded_length, head_dim, padded_dim;
  int64_t key_steps, value_steps;
};

// At any width and in either dtype (bf16 needs no more than float32).
int64_t PackedHeadFloats(int64_t length, int64_t head_dim) {
  return head_dim * RoundUp(length, kMaxKeyBlock) + length * RoundUp(head_dim, kFeatureAlign);
}

// A thread's scratch for sequences up to `max_length`: one packed head, then kMaxRowGroup rows
// of scores, then (bf16 only) as many rows of bf16 weights and of bf16 queries.
int64_t ScoresFloats(int64_t max_length) { return kMaxRowGroup * RoundUp(max_length, kMaxKeyBlock); }
int64_t ThreadScratchFloats(int64_t max_length, int64_t head_dim) {
  const int64_t scores = ScoresFloats(max_length);
  return PackedHeadFloats(max_length, head_dim) + scores + scores / 2 +
         kMaxRowGroup * RoundUp(head_dim, kFeatureAlign) / 2;
}

template <typename V, ComputeDType kDType>
PackedHead PackedHeadIn(float* scratch, int64_t length, int64_t head_dim) {
  constexpr int64_t kPer = kValuesPerStep<kDType>;
  const int64_t padded_length = RoundUp(length, kKeyBlock<V>), key_steps = head_dim / kPer;
  return {scratch,    scratch + key_steps * padded_length, length, padded_length, head_dim,
          RoundUp(head_dim, kFeatureAlign), key_steps, (length + kPer - 1) / kPer};
}

// W rows of W floats transposed in registers (rows[i][l] becomes rows[l][i]): the
// off-diagonal blocks of W/2 lanes, then of W/4, ..., 1 swap places, one two-source shuffle
// per row and round. In a round with blocks of B lanes, row i (i & B == 0) takes its own lanes
// where l & B == 0 and row i + B's lanes l - B elsewhere; row i + B takes row i's lanes l + B
// and its own.
template <int kBlock, bool kSecondRow>
constexpr int TransposeSource(int lanes, int l) {
  if (kSecondRow) return (l & kBlock) == 0 ? l + kBlock : lanes + l;
  return (l & kBlock) == 0 ? l : lanes + l - kBlock;
}
template <int kBlock, typename V, int... kLane>
[[gnu::always_inline]] inline void TransposeRound(V* rows, std::integer_sequence<int, kLane...>) {
  constexpr int kW = sizeof...(kLane);
#pragma GCC unroll 16
  for (int i = 0; i < kW; ++i) {
    if ((i & kBlock) != 0) continue;
    const V a = rows[i], b = rows[i + kBlock];
    rows[i] = __builtin_shufflevector(a, b, TransposeSource<kBlock, false>(kW, kLane)...);
    rows[i + kBlock] = __builtin_shufflevector(a, b, TransposeSource<kBlock, true>(kW, kLane)...);
  }
}
template <typename V>
[[gnu::always_inline]] inline void Transpose(V* rows) {
  constexpr auto lanes = std::make_integer_sequence<int, kLanes<V>>{};
  if constexpr (kLanes<V> >= 16) TransposeRound<8>(rows, lanes);
  if constexpr (kLanes<V> >= 8) TransposeRound<4>(rows, lanes);
  TransposeRound<2>(rows, lanes);
  TransposeRound<1>(rows, lanes);
}

// Packs one sequence and head's keys and values (PackedHead), W keys at a time: their key rows
// are transposed in registers, W features at a time. The source rows are a fused q/k/v
// projection's output, far apart and in L3 by now, so the next W rows' lines are prefetched
// while these are packed. bf16 needs head_dim a multiple of 16.
template <typename V, ComputeDType kDType>
[[gnu::always_inline]] inline void PackHeadBody(const AttentionSequence& seq, int64_t head_offset,
                                                int64_t input_stride, float key_scale, const PackedHead& packed) {
  constexpr bool kBf16 = kDType == ComputeDType::kBF16;
  constexpr int64_t kW = kLanes<V>, kB = kKeyBlock<V>;
  const int64_t hd = packed.head_dim, whole = hd / kW * kW;
  auto row_of = [&](int64_t j, const float* AttentionSegment::*column) {
    const RowRef ref = Locate(seq, j);
    return ref.segment->*column + ref.row * input_stride + head_offset;
  };
  const V scale = Broadcast<V>(key_scale);
  for (int64_t j0 = 0; j0 < packed.padded_length; j0 += kW) {
    for (int64_t j = j0 + kW; j < std::min(j0 + 2 * kW, packed.length); ++j) {
      for (int64_t e = 0; e < hd; e += 16) {  // 64-byte lines
        __builtin_prefetch(row_of(j, &AttentionSegment::k) + e);
        __builtin_prefetch(row_of(j, &AttentionSegment::v) + e);
      }
    }
    const int64_t keys = std::clamp<int64_t>(packed.length - j0, 0, kW);  // the rest is padding
    const float* k[kW];
    for (int64_t c = 0; c < keys; ++c) k[c] = row_of(j0 + c, &AttentionSegment::k);
    float* columns = packed.key_blocks + (j0 / kB) * packed.key_steps * kB + j0 % kB;
    for (int64_t e0 = 0; e0 < whole; e0 += kW) {
      V block[kW];
      for (int64_t c = 0; c < kW; ++c) block[c] = c < keys ? Load<V>(k[c] + e0) * scale : V{};
      Transpose(block);  // block[e]: feature e0 + e of the W keys
      for (int64_t e = 0; e < kW; e += kValuesPerStep<kDType>) {
        if constexpr (kBf16) {
          Store(columns + (e0 + e) / 2 * kB, Bf16Pairs(block[e], block[e + 1]));
        } else {
          Store(columns + (e0 + e) * kB, block[e]);
        }
      }
    }
    for (int64_t e = whole; e < hd; ++e) {  // float32 only
      for (int64_t c = 0; c < kW; ++c) columns[e * kB + c] = c < keys ? k[c][e] * key_scale : 0.0f;
    }
    for (int64_t j = j0; j < j0 + keys; j += kValuesPerStep<kDType>) {
      const float* v = row_of(j, &AttentionSegment::v);
      float* value_row = packed.values + j / kValuesPerStep<kDType> * packed.padded_dim;
      if constexpr (kBf16) {  // keys j and j + 1 (zero past the length)
        const float* next = j + 1 < packed.length ? row_of(j + 1, &AttentionSegment::v) : nullptr;
        for (int64_t e = 0; e < hd; e += kW) {
          Store(value_row + e, Bf16Pairs(Load<V>(v + e), next != nullptr ? Load<V>(next + e) : V{}));
        }
      } else {
        int64_t e = 0;
        for (; e < whole; e += kW) Store(value_row + e, Load<V>(v + e));
        for (; e < hd; ++e) value_row[e] = v[e];
        for (; e < packed.padded_dim; ++e) value_row[e] = 0.0f;
      }
    }
  }
}

// 0, 1, ..., W - 1: to mask the key columns past a sequence's end.
template <typename V, int... kLane>
constexpr V LaneIndices(std::integer_sequence<int, kLane...>) {
  return V{static_cast<float>(kLane)...};
}

// scores[r][j] = q_r . key_j (scaled) for kRows query rows (in steps) and all padded key
// columns, -inf past the length; row_max[r] gets row r's maximum in every lane. kRows query
// rows at a time share every key load.
template <typename V, int kRows, ComputeDType kDType>
[[gnu::always_inline]] inline void ScoreRows(const StepBits* const* q, const PackedHead& kv, float* scores,
                                             int64_t scores_stride, V* row_max) {
  constexpr int64_t kW = kLanes<V>, kB = kKeyBlock<V>;
  for (int r = 0; r < kRows; ++r) row_max[r] = Broadcast<V>(-INFINITY);
  for (int64_t j = 0; j < kv.padded_length; j += kB) {
    V acc[kRows][2] = {};
    const float* key = kv.key_blocks + j * kv.key_steps;
    for (int64_t s = 0; s < kv.key_steps; ++s, key += kB) {
      const V k0 = Load<V>(key), k1 = Load<V>(key + kW);
      for (int r = 0; r < kRows; ++r) {
        const V qs = Broadcast<V>(q[r][s]);
        acc[r][0] = MultiplyAddSteps<kDType>(acc[r][0], qs, k0);
        acc[r][1] = MultiplyAddSteps<kDType>(acc[r][1], qs, k1);
      }
    }
    if (j + kB > kv.length) {  // the last block: its padding must not raise the maximum
      const V lane = LaneIndices<V>(std::make_integer_sequence<int, kW>{});
      const V valid = Broadcast<V>(static_cast<float>(kv.length - j));
      const V minus_infinity = Broadcast<V>(-INFINITY);
      for (int r = 0; r < kRows; ++r) {
        acc[r][0] = lane < valid ? acc[r][0] : minus_infinity;
        acc[r][1] = lane + static_cast<float>(kW) < valid ? acc[r][1] : minus_infinity;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      Store(scores + r * scores_stride + j, acc[r][0]);
      Store(scores + r * scores_stride + j + kW, acc[r][1]);
      row_max[r] = simd::Max(row_max[r], simd::Max(acc[r][0], acc[r][1]));
    }
  }
  for (int r = 0; r < kRows; ++r) row_max[r] = simd::AllLanesMax(row_max[r]);
}

// Over one row of padded scores: p_j = exp(s_j - max), written to `weights` (in place, or as
// bf16); returns sum_j p_j (of the float32 values) in every lane. Padding (-inf) becomes
// e^-87 (Exp's floor): the row's maximum contributes 1 to the sum, so 31 such terms
// cannot change it, and the padding's values are zero.
template <typename V, typename Weight>
[[gnu::always_inline]] inline V SoftmaxNumerators(float* scores, int64_t padded_length, V max_score, Weight* weights) {
  V sum = {};
  for (int64_t j = 0; j < padded_length; j += kLanes<V>) {
    const V p = Exp(Load<V>(scores + j) - max_score);
    if constexpr (std::is_same_v<Weight, uint16_t>) {  // bf16: AVX-512 only
      *reinterpret_cast<Bf16Types<simd::kVector>::Halves*>(weights + j) = simd::RoundToBf16(p);
    } else {
      Store(weights + j, p);
    }
    sum += p;
  }
  return simd::AllLanesSum(sum);
}

// out_r[e0, e0 + W kVecs) = sum_j p_r[j] v_j[...] / sum_r for kRows rows, over the weights'
// and values' steps: each value load feeds kRows rows. Written as the rows' first `width`
// features of the chunk.
template <typename V, int kRows, int kVecs, ComputeDType kDType>
[[gnu::always_inline]] inline void WeightedValues(const StepBits* weights, int64_t weights_stride,
                                                  const PackedHead& kv, int64_t e0, const V* inv_sum,
                                                  float* const* out) {
  constexpr int64_t kW = kLanes<V>;
  V acc[kRows][kVecs] = {};
  const float* value = kv.values + e0;
  for (int64_t s = 0; s < kv.value_steps; ++s, value += kv.padded_dim) {
    V v[kVecs];
    for (int c = 0; c < kVecs; ++c) v[c] = Load<V>(value + c * kW);
    for (int r = 0; r < kRows; ++r) {
      const V p = Broadcast<V>(weights[r * weights_stride + s]);
      for (int c = 0; c < kVecs; ++c) acc[r][c] = MultiplyAddSteps<kDType>(acc[r][c], p, v[c]);
    }
  }
  const int64_t width = std::min<int64_t>(kVecs * kW, kv.head_dim - e0);
  for (int r = 0; r < kRows; ++r) {
    if (width == kVecs * kW) {
      for (int c = 0; c < kVecs; ++c) Store(out[r] + e0 + c * kW, acc[r][c] * inv_sum[r]);
      continue;
    }
    float row[kVecs * kW];  // the head's last, partial chunk
    for (int c = 0; c < kVecs; ++c) Store(row + c * kW, acc[r][c] * inv_sum[r]);
    for (int64_t e = 0; e < width; ++e) out[r][e0 + e] = row[e];
  }
}

template <typename V, int kRows, ComputeDType kDType>
[[gnu::always_inline]] inline void WeightedValueRows(const StepBits* weights, int64_t weights_stride,
                                                     const PackedHead& kv, const V* inv_sum, float* const* out) {
  // Chunks of kWide vectors: kRows * kWide accumulators, within kAccumulators<V>.
  constexpr int kWide = std::clamp(kAccumulators<V> / kRows, 1, 4);
  constexpr int64_t kW = kLanes<V>;
  int64_t e0 = 0;
  for (; e0 + kWide * kW <= kv.padded_dim; e0 += kWide * kW) {
    WeightedValues<V, kRows, kWide, kDType>(weights, weights_stride, kv, e0, inv_sum, out);
  }
  for (; e0 < kv.padded_dim; e0 += kW) {  // the rest one vector at a time
    WeightedValues<V, kRows, 1, kDType>(weights, weights_stride, kv, e0, inv_sum, out);
  }
}

// A thread's working rows: kRowGroup<V> rows of scores (padded_length floats apart) and, in bf16,
// the same rows' weights and queries in bf16.
struct AttentionRows {
  float* scores;
  uint16_t* weights_bf16;  // padded_length apart
  uint16_t* queries_bf16;  // head_dim apart
};

// kRows query rows starting at sequence row i: scores, softmax, weighted values.
template <typename V, int kRows, ComputeDType kDType>
[[gnu::always_inline]] inline void AttendRows(const AttentionSequence& seq, const PackedHead& kv, int64_t head_offset,
                                              const AttentionStrides& strides, int64_t i, const AttentionRows& rows) {
  constexpr bool kBf16 = kDType == ComputeDType::kBF16;
  const StepBits* q[kRows];
  float* out[kRows];
  for (int r = 0; r < kRows; ++r) {
    const RowRef ref = Locate(seq, i + r);
    const float* query = ref.segment->q + ref.row * strides.input + head_offset;
    out[r] = ref.segment->out + ref.row * strides.output + head_offset;
    if constexpr (kBf16) {
      uint16_t* query_bf16 = rows.queries_bf16 + r * kv.head_dim;
      for (int64_t e = 0; e < kv.head_dim; e += simd::kVector) {
        *reinterpret_cast<Bf16Types<simd::kVector>::Halves*>(query_bf16 + e) = simd::RoundToBf16(Load<Vec>(query + e));
      }
      q[r] = reinterpret_cast<const StepBits*>(query_bf16);
    } else {
      q[r] = query;
    }
  }
  V row_max[kRows], inv_sum[kRows];
  const int64_t stride = kv.padded_length;
  ScoreRows<V, kRows, kDType>(q, kv, rows.scores, stride, row_max);
  for (int r = 0; r < kRows; ++r) {
    float* row = rows.scores + r * stride;
    if constexpr (kBf16) {
      inv_sum[r] = 1.0f / SoftmaxNumerators(row, stride, row_max[r], rows.weights_bf16 + r * stride);
    } else {
      inv_sum[r] = 1.0f / SoftmaxNumerators(row, stride, row_max[r], row);
    }
  }
  if constexpr (kBf16) {
    WeightedValueRows<V, kRows, kDType>(reinterpret_cast<const StepBits*>(rows.weights_bf16), stride / 2, kv,
                                        inv_sum, out);
  } else {
    WeightedValueRows<V, kRows, kDType>(rows.scores, stride, kv, inv_sum, out);
  }
}

// One task of Attention: query rows [q_begin, q_end) of one sequence and head, against its
// keys and values in `kv`, which the task first packs if `pack` (a thread reuses the head it
// packed for its previous task).
struct AttentionTask {
  const AttentionSequence* seq;
  int64_t head_offset;
  AttentionStrides strides;
  float key_scale;
  bool pack;
  PackedHead kv;
  int64_t q_begin, q_end;
  AttentionRows rows;
};

// Inlined into one copy per instruction set and dtype (see AttendTaskFor).
template <typename V, ComputeDType kDType>
[[gnu::always_inline]] inline void AttendTaskBody(const AttentionTask& t) {
  if (t.pack) PackHeadBody<V, kDType>(*t.seq, t.head_offset, t.strides.input, t.key_scale, t.kv);
  int64_t i = t.q_begin;
  for (; i + kRowGroup<V> <= t.q_end; i += kRowGroup<V>) {
    AttendRows<V, kRowGroup<V>, kDType>(*t.seq, t.kv, t.head_offset, t.strides, i, t.rows);
  }
  for (; i < t.q_end; ++i) AttendRows<V, 1, kDType>(*t.seq, t.kv, t.head_offset, t.strides, i, t.rows);
}

// The sum of term(row[e]) over e in [0, count): four vector accumulators, so that the adds do
// not wait on each other (one chain made LayerNorm latency-bound: 3x slower at the seed's 768
// features).
template <typename V, typename Term>
[[gnu::always_inline]] inline float SumOf(const float* row, int64_t count, Term term) {
  constexpr int64_t kW = kLanes<V>;
  V partial[4] = {};
  int64_t e = 0;
  for (; e + 4 * kW <= count; e += 4 * kW) {
    for (int c = 0; c < 4; ++c) partial[c] += term(Load<V>(row + e + c * kW));
  }
  for (; e + kW <= count; e += kW) partial[0] += term(Load<V>(row + e));
  float sum = simd::AllLanesSum((partial[0] + partial[1]) + (partial[2] + partial[3]))[0];
  for (; e < count; ++e) sum += term(Broadcast<V>(row[e]))[0];
  return sum;
}

// One row of LayerNormModulate; inlined into one copy per instruction set and output type.
template <typename V, typename Out>
[[gnu::always_inline]] inline void LayerNormModulateRow(const float* xr, int64_t dim, const float* shift,
                                                        const float* scale, Out* yr) {
  constexpr int64_t kW = kLanes<V>;
  const float mean = SumOf<V>(xr, dim, [](V x) { return x; }) / dim;
  const V mean_v = Broadcast<V>(mean);
  const float variance = SumOf<V>(xr, dim, [&](V x) { return (x - mean_v) * (x - mean_v); }) / dim;
  const float inv_std = 1.0f / std::sqrt(variance + kNormEpsilon);
  const V inv_std_v = Broadcast<V>(inv_std);
  int64_t e = 0;
  for (; e + kW <= dim; e += kW) {
    StoreAs((Load<V>(xr + e) - mean_v) * inv_std_v * (1.0f + Load<V>(scale + e)) + Load<V>(shift + e), yr + e);
  }
  for (; e < dim; ++e) StoreAs((xr[e] - mean) * inv_std * (1.0f + scale[e]) + shift[e], yr + e);
}

// Run-time dispatch for the two hot loops of our own: AVX-512, AVX2+FMA, or baseline x86-64,
// picked once from the CPU (simd.h), each at its own vector width.
using AttendTaskFn = void (*)(const AttentionTask&);
template <typename Out>
using LayerNormRowFn = void (*)(const float*, int64_t, const float*, const float*, Out*);

template <ComputeDType kDType>
[[MMDIT_TARGET_AVX512]] void AttendTaskAvx512(const AttentionTask& task) {
  AttendTaskBody<VecOf<16>, kDType>(task);
}
[[MMDIT_TARGET_AVX2]] void AttendTaskAvx2(const AttentionTask& task) {
  AttendTaskBody<VecOf<8>, ComputeDType::kF32>(task);
}
void AttendTaskBaseline(const AttentionTask& task) { AttendTaskBody<VecOf<4>, ComputeDType::kF32>(task); }
template <typename Out>
[[MMDIT_TARGET_AVX512]] void LayerNormRowAvx512(const float* x, int64_t dim, const float* shift, const float* scale,
                                                Out* y) {
  LayerNormModulateRow<VecOf<16>>(x, dim, shift, scale, y);
}
template <typename Out>
[[MMDIT_TARGET_AVX2]] void LayerNormRowAvx2(const float* x, int64_t dim, const float* shift, const float* scale,
                                            Out* y) {
  LayerNormModulateRow<VecOf<8>>(x, dim, shift, scale, y);
}
template <typename Out>
void LayerNormRowBaseline(const float* x, int64_t dim, const float* shift, const float* scale, Out* y) {
  LayerNormModulateRow<VecOf<4>>(x, dim, shift, scale, y);
}

const Isa kIsa = simd::CpuIsa();
AttendTaskFn AttendTaskFor(bool bf16) {
  if (bf16) return AttendTaskAvx512<ComputeDType::kBF16>;
  return kIsa == Isa::kAvx512 ? AttendTaskAvx512<ComputeDType::kF32>
         : kIsa == Isa::kAvx2 ? AttendTaskAvx2
                              : AttendTaskBaseline;
}
// The packed layout (its key blocks) depends on the width the task runs at.
PackedHead PackedHeadFor(bool bf16, float* scratch, int64_t length, int64_t head_dim) {
  if (bf16) return PackedHeadIn<VecOf<16>, ComputeDType::kBF16>(scratch, length, head_dim);
  return kIsa == Isa::kAvx512 ? PackedHeadIn<VecOf<16>, ComputeDType::kF32>(scratch, length, head_dim)
         : kIsa == Isa::kAvx2 ? PackedHeadIn<VecOf<8>, ComputeDType::kF32>(scratch, length, head_dim)
                              : PackedHeadIn<VecOf<4>, ComputeDType::kF32>(scratch, length, head_dim);
}
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

bool Bf16AttentionRuns(ComputeDType compute, int64_t head_dim) {
  return compute == ComputeDType::kBF16 && simd::CpuHasBf16DotProduct() && head_dim % simd::kVector == 0;
}

int64_t AttentionScratchFloats(absl::Span<const int64_t> lengths, int64_t head_dim, int threads) {
  int64_t max_length = 0;
  for (int64_t length : lengths) max_length = std::max(max_length, length);
  return threads * ThreadScratchFloats(max_length, head_dim);
}

void Attention(absl::Span<const AttentionSequence> sequences, int64_t heads, int64_t head_dim,
               const AttentionStrides& strides, ComputeDType compute, absl::Span<float> scratch) {
  int64_t max_length = 0;
  for (const AttentionSequence& seq : sequences) max_length = std::max(max_length, seq.length());
  const int threads = omp_get_max_threads();
  const int64_t thread_floats = ThreadScratchFloats(max_length, head_dim);
  assert(static_cast<int64_t>(scratch.size()) >= threads * thread_floats);
  const float key_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const bool bf16 = Bf16AttentionRuns(compute, head_dim);
  const AttendTaskFn attend_task = AttendTaskFor(bf16);

  // Tasks: (sequence, head, part of its query rows). One part per head when there are enough
  // heads to keep every thread busy; when heads are few (one long sequence on many threads),
  // each is split, and every thread working on a head packs its own copy.
  const int64_t total_heads = static_cast<int64_t>(sequences.size()) * heads;
  if (total_heads == 0) return;
  const int64_t parts = std::max<int64_t>(1, (kTasksPerThread * threads + total_heads - 1) / total_heads);
#pragma omp parallel
  {
    float* const mine = scratch.data() + omp_get_thread_num() * thread_floats;
    float* const scores = mine + PackedHeadFloats(max_length, head_dim);
    uint16_t* const weights_bf16 = reinterpret_cast<uint16_t*>(scores + ScoresFloats(max_length));
    const AttentionRows rows{scores, weights_bf16, weights_bf16 + ScoresFloats(max_length)};
    int64_t packed_head = -1;  // the (sequence, head) this thread's scratch holds
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < total_heads * parts; ++task) {
      const int64_t sequence_head = task / parts, part = task % parts;
      const AttentionSequence& seq = sequences[sequence_head / heads];
      const int64_t head_offset = (sequence_head % heads) * head_dim, length = seq.length();
      const int64_t part_rows = RoundUp((length + parts - 1) / parts, kMaxRowGroup);
      const int64_t q_begin = std::min(part * part_rows, length), q_end = std::min(q_begin + part_rows, length);
      if (q_begin == q_end) continue;
      const PackedHead kv = PackedHeadFor(bf16, mine, length, head_dim);
      attend_task({&seq, head_offset, strides, key_scale, packed_head != sequence_head, kv, q_begin, q_end, rows});
      packed_head = sequence_head;
    }
  }
}

}  // namespace mmdit
