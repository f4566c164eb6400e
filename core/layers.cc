#include "core/layers.h"

#include <omp.h>

#include <algorithm>
#include <cassert>
#include <cmath>

namespace mmdit {
namespace {

// Query rows per attention task: enough to reuse each key row from cache, few enough that
// short sequences still split across threads.
constexpr int64_t kQueryTile = 32;

// Where the j-th row of a sequence lives.
struct RowRef {
  const AttentionSegment* segment;
  int64_t row;
};

RowRef Locate(const AttentionSequence& seq, int64_t j) {
  if (j < seq.segments[0].rows) return {&seq.segments[0], j};
  return {&seq.segments[1], j - seq.segments[0].rows};
}

// Attention of query rows [q_begin, q_end) of one sequence and head. `scores` holds
// length() floats. Inlined into one copy per instruction set (see kAttendTile).
[[gnu::always_inline]] inline void AttendTileBody(const AttentionSequence& seq, int64_t head_offset, int64_t head_dim,
                                                  int64_t row_stride, int64_t q_begin, int64_t q_end, float* scores) {
  const int64_t length = seq.length();
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (int64_t i = q_begin; i < q_end; ++i) {
    const RowRef qi = Locate(seq, i);
    const float* q = qi.segment->q + qi.row * row_stride + head_offset;
    float max_score = -INFINITY;
    int64_t j = 0;
    for (int s = 0; s < seq.num_segments; ++s) {
      const AttentionSegment& seg = seq.segments[s];
      for (int64_t r = 0; r < seg.rows; ++r, ++j) {
        const float* k = seg.k + r * row_stride + head_offset;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t e = 0; e < head_dim; ++e) dot += q[e] * k[e];
        scores[j] = dot * scale;
        max_score = std::max(max_score, scores[j]);
      }
    }
    float sum = 0.0f;
    for (j = 0; j < length; ++j) {
      scores[j] = std::exp(scores[j] - max_score);
      sum += scores[j];
    }
    float* out = qi.segment->out + qi.row * row_stride + head_offset;
    std::fill(out, out + head_dim, 0.0f);
    j = 0;
    for (int s = 0; s < seq.num_segments; ++s) {
      const AttentionSegment& seg = seq.segments[s];
      for (int64_t r = 0; r < seg.rows; ++r, ++j) {
        const float* v = seg.v + r * row_stride + head_offset;
        const float p = scores[j];
#pragma omp simd
        for (int64_t e = 0; e < head_dim; ++e) out[e] += p * v[e];
      }
    }
    const float inv_sum = 1.0f / sum;
    for (int64_t e = 0; e < head_dim; ++e) out[e] *= inv_sum;
  }
}

// One row of LayerNormModulate; inlined into one copy per instruction set.
[[gnu::always_inline]] inline void LayerNormModulateRow(const float* xr, int64_t dim, const float* shift,
                                                        const float* scale, float* yr) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < dim; ++e) sum += xr[e];
  const float mean = sum / dim;
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t e = 0; e < dim; ++e) sq += (xr[e] - mean) * (xr[e] - mean);
  const float inv_std = 1.0f / std::sqrt(sq / dim + kNormEpsilon);
#pragma omp simd
  for (int64_t e = 0; e < dim; ++e) yr[e] = (xr[e] - mean) * inv_std * (1.0f + scale[e]) + shift[e];
}

// Run-time dispatch for the two hot loops of our own: AVX-512, AVX2+FMA, or baseline x86-64,
// picked once from the CPU (the binaries are built for any x86-64; no -march=native). Plain
// function pointers rather than GCC's target_clones: an ifunc resolver runs before the
// sanitizers' runtimes are up and crashes TSan builds.
using AttendTileFn = void (*)(const AttentionSequence&, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
using LayerNormRowFn = void (*)(const float*, int64_t, const float*, const float*, float*);

[[gnu::target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]] void AttendTileAvx512(
    const AttentionSequence& seq, int64_t head_offset, int64_t head_dim, int64_t row_stride, int64_t q_begin,
    int64_t q_end, float* scores) {
  AttendTileBody(seq, head_offset, head_dim, row_stride, q_begin, q_end, scores);
}
[[gnu::target("avx2,fma")]] void AttendTileAvx2(const AttentionSequence& seq, int64_t head_offset, int64_t head_dim,
                                                int64_t row_stride, int64_t q_begin, int64_t q_end, float* scores) {
  AttendTileBody(seq, head_offset, head_dim, row_stride, q_begin, q_end, scores);
}
void AttendTileBaseline(const AttentionSequence& seq, int64_t head_offset, int64_t head_dim, int64_t row_stride,
                        int64_t q_begin, int64_t q_end, float* scores) {
  AttendTileBody(seq, head_offset, head_dim, row_stride, q_begin, q_end, scores);
}
[[gnu::target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]] void LayerNormRowAvx512(const float* x, int64_t dim,
                                                                                       const float* shift,
                                                                                       const float* scale, float* y) {
  LayerNormModulateRow(x, dim, shift, scale, y);
}
[[gnu::target("avx2,fma")]] void LayerNormRowAvx2(const float* x, int64_t dim, const float* shift, const float* scale,
                                                  float* y) {
  LayerNormModulateRow(x, dim, shift, scale, y);
}
void LayerNormRowBaseline(const float* x, int64_t dim, const float* shift, const float* scale, float* y) {
  LayerNormModulateRow(x, dim, shift, scale, y);
}

enum class Isa { kAvx512, kAvx2, kBaseline };
Isa DetectIsa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kBaseline;
}
const Isa kIsa = DetectIsa();
const AttendTileFn kAttendTile = kIsa == Isa::kAvx512 ? AttendTileAvx512
                                 : kIsa == Isa::kAvx2 ? AttendTileAvx2
                                                      : AttendTileBaseline;
const LayerNormRowFn kLayerNormRow = kIsa == Isa::kAvx512 ? LayerNormRowAvx512
                                     : kIsa == Isa::kAvx2 ? LayerNormRowAvx2
                                                          : LayerNormRowBaseline;

}  // namespace

void LayerNormModulate(const float* x, int64_t rows, int64_t dim, const float* shift, const float* scale, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) kLayerNormRow(x + r * dim, dim, shift, scale, out + r * dim);
}

void GatedResidualAdd(const float* y, int64_t rows, int64_t dim, const float* gate, float* x) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t e = 0; e < dim; ++e) x[r * dim + e] += gate[e] * y[r * dim + e];
  }
}

void RmsNormHeads(float* x, int64_t rows, int64_t heads, int64_t head_dim, const float* gamma) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      float* z = x + (r * heads + h) * head_dim;
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

int64_t AttentionScratchFloats(int64_t max_length, int threads) { return max_length * threads; }

void Attention(absl::Span<const AttentionSequence> sequences, int64_t heads, int64_t head_dim, int64_t row_stride,
               absl::Span<float> scratch) {
  // Tasks: (sequence, head, query tile), numbered sequence by sequence, so that a batch of
  // short sequences still spreads over all threads. Mapped back by a scan: batches are small.
  auto tiles = [](int64_t length) { return (length + kQueryTile - 1) / kQueryTile; };
  int64_t total_tasks = 0, max_length = 0;
  for (const AttentionSequence& seq : sequences) {
    total_tasks += heads * tiles(seq.length());
    max_length = std::max(max_length, seq.length());
  }
  assert(static_cast<int64_t>(scratch.size()) >= AttentionScratchFloats(max_length, omp_get_max_threads()));
#pragma omp parallel for schedule(dynamic)
  for (int64_t task = 0; task < total_tasks; ++task) {
    int64_t local = task;
    size_t s = 0;
    while (local >= heads * tiles(sequences[s].length())) local -= heads * tiles(sequences[s++].length());
    const int64_t head = local / tiles(sequences[s].length());
    const int64_t q_begin = (local % tiles(sequences[s].length())) * kQueryTile;
    const int64_t q_end = std::min(q_begin + kQueryTile, sequences[s].length());
    float* scores = scratch.data() + omp_get_thread_num() * max_length;
    kAttendTile(sequences[s], head * head_dim, head_dim, row_stride, q_begin, q_end, scores);
  }
}

}  // namespace mmdit
