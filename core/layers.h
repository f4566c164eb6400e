// The model's element-wise and attention layers on packed rows (float32, row-major).
// Matrix products live in linear.h. Each function here has a naive-loop twin in
// tests/core/layers_test.cc. All are thread-compatible and parallelise internally with
// OpenMP, the same runtime oneDNN uses, so the two never oversubscribe the cores.
#pragma once

#include <cstdint>

#include "absl/types/span.h"
#include "core/compute_dtype.h"

namespace mmdit {

inline constexpr float kNormEpsilon = 1e-6f;
inline constexpr int64_t kTimestepFeatures = 256;

// Rows in consecutive groups (a batch's samples, packed one after another), each with its own
// modulation: group g is rows [start[g], start[g + 1]) (the last ends at `rows`), and its
// [dim] modulation vectors start `g * stride` floats after group 0's.
struct RowGroups {
  absl::Span<const int64_t> start;  // start[0] == 0
  int64_t rows;
  int64_t stride;
};

// out[r] = LN(x[r]) * (1 + scale_g) + shift_g for rows of width `dim` (g: r's group); LN has
// no affine weights (eps 1e-6, biased variance). The float form's `out` may alias `x`. The
// uint16_t form writes bf16 (round to nearest even) into a separate buffer: the input of a
// bf16 matrix product.
void LayerNormModulate(const float* x, const RowGroups& groups, int64_t dim, const float* shift, const float* scale,
                       float* out);
void LayerNormModulate(const float* x, const RowGroups& groups, int64_t dim, const float* shift, const float* scale,
                       uint16_t* out);

// x[r] += gate_g * y[r] for rows of width `dim` (g: r's group).
void GatedResidualAdd(const float* y, const RowGroups& groups, int64_t dim, const float* gate, float* x);

// In place, per row and head: z / sqrt(mean(z^2) + 1e-6) * gamma over `head_dim` features.
// Each row's first `heads * head_dim` floats, rows `row_stride` floats apart; `gamma` is [head_dim].
void RmsNormHeads(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim, const float* gamma);

// out = x * sigmoid(x); `out` may alias `x`.
void SiLU(const float* x, int64_t count, float* out);

// The sinusoidal timestep features [cos(t f_k), sin(t f_k)], f_k = exp(-ln(1e4) k / 128),
// into out[256].
void TimestepFeatures(float timestep, float* out);

// latent [C, H, W] -> tokens [(H/p)*(W/p), C*p*p]; token i*w+j, feature c*p*p + u*p + v.
void Patchify(const float* latent, int64_t channels, int64_t height, int64_t width, int64_t patch, float* tokens);

// tokens [(H/p)*(W/p), p*p*C] (feature (u*p+v)*C + c) -> latent [C, H, W].
void Unpatchify(const float* tokens, int64_t channels, int64_t height, int64_t width, int64_t patch, float* latent);

// tokens[i*w + j] += table[(top+i)*M + left+j] with top = (M-h)/2, left = (M-w)/2 (centre crop).
void AddCroppedPositions(const float* table, int64_t table_size, int64_t grid_h, int64_t grid_w, int64_t dim,
                         float* tokens);

// One run of consecutive rows of a sample's attention sequence: q, k, v and out each point
// at `rows` rows (strides in AttentionStrides). A sample's sequence is its segments, in order.
struct AttentionSegment {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t rows;
};

// One sample's sequence: up to two segments (text then image, or image alone).
struct AttentionSequence {
  AttentionSegment segments[2];
  int num_segments = 0;
  int64_t length() const { return segments[0].rows + (num_segments > 1 ? segments[1].rows : 0); }
};

// Floats between consecutive rows: of q, k and v (`input`, e.g. 3D when they are the
// thirds of one fused projection's rows) and of out.
struct AttentionStrides {
  int64_t input, output;
};

// Whether Attention with `compute` runs its products in bf16: bf16, on a CPU with AVX512_BF16
// (`vdpbf16ps`), with heads whole vectors wide (16 | head_dim; every real MMDiT's is 64).
bool Bf16AttentionRuns(ComputeDType compute, int64_t head_dim);

// Floats of scratch Attention needs for sequences of these lengths on `threads` threads
// (each thread packs one head at a time, so the head count does not enter).
int64_t AttentionScratchFloats(absl::Span<const int64_t> lengths, int64_t head_dim, int threads);

// For every sequence and head (features [h*hd, (h+1)*hd)): out = softmax(Q K^T / sqrt(hd)) V,
// no mask. `scratch` holds AttentionScratchFloats(the sequences' lengths, head_dim,
// omp_get_max_threads()) floats. A thread packs a head's keys and values into its own part of
// the scratch, where they stay in cache while its query rows run in register-blocked groups
// with a vectorised exp; only a few rows of scores exist at a time (never an [L, L] matrix).
// With `compute` bf16, the two products take bf16 inputs (q, k, the softmax weights and v
// rounded to bf16; float32 sums) where Bf16AttentionRuns; the softmax stays float32.
// Otherwise, and always with f32, everything is float32.
void Attention(absl::Span<const AttentionSequence> sequences, int64_t heads, int64_t head_dim,
               const AttentionStrides& strides, ComputeDType compute, absl::Span<float> scratch);

}  // namespace mmdit
